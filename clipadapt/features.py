"""Frozen image features computed once: per run in memory, and across a sweep's runs on disk (opt-in).

An evaluation set's features under a frozen image tower depend only on the tower's weights, the
evaluation transform and the image files (and, up to float rounding, the code path that runs the tower);
so they are stored under a key made of exactly those: the digest of the image tower's state (every
`visual.*` tensor: names, shapes, dtypes and bytes), the transform's repr, the precision the run encodes
at, the backbone's `attention` and `compile` settings, and each file's (path, size, mtime). A run keeps
the features of every set it evaluated in memory (validation every epoch encodes its images once);
with `data.feature_cache DIR` a finished set is also written to `DIR/<key>.pt`, and the next run of
the sweep with the same weights and files (zero-shot, linear probe, RAda EFT, Tip-Adapter; any seed
and shot count: the test split does not depend on them) reads it instead of encoding. A changed file
(size or mtime), other weights or another transform make another key; nothing is ever overwritten
with other content. Files are read with `weights_only=True` and written atomically (tmp + rename),
so concurrent runs of a sweep at worst both encode a set.
"""

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from clipadapt.errors import ClipAdaptError

__all__ = ["FeatureStore", "files_digest", "set_key", "weights_digest"]


def weights_digest(module: nn.Module) -> str:
    """sha1 of a module's state: every tensor's name, shape, dtype and bytes (on CPU), in state-dict order."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        data = tensor.detach().cpu().contiguous().reshape(-1)  # 0-dim tensors (BatchNorm counters) as 1 element
        digest.update(f"{name}:{tuple(tensor.shape)}:{data.dtype};".encode())
        digest.update(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")
    return digest.hexdigest()


def files_digest(paths: Iterable[str]) -> str:
    """sha1 of each file's (absolute path, size, mtime in ns), in order; a missing file raises ClipAdaptError."""
    digest = hashlib.sha1()
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as err:
            raise ClipAdaptError(
                f"cannot stat image {path} for the feature cache: {err}; is the dataset intact?"
            ) from None
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def set_key(weights: str, transform: str, precision: str, files: str) -> str:
    """The store key of one evaluation set's features."""
    return hashlib.sha1(f"{weights}|{transform}|{precision}|{files}".encode()).hexdigest()


class FeatureStore:
    """(N, D) features of whole evaluation sets by key: in memory, and in `directory` when one is given."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory else None
        self._memory: dict[str, Tensor] = {}
        self._partial: dict[str, tuple[Tensor, Tensor]] = {}  # key -> (N, D) rows so far, (N,) filled

    def get(self, key: str) -> Tensor | None:
        """The features stored under `key` (memory first, then the directory), or None."""
        if key in self._memory:
            return self._memory[key]
        path = self._path(key)
        if path is not None and path.is_file():
            try:
                features = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - a truncated or foreign file is a miss, never trusted
                return None
            if isinstance(features, Tensor):
                self._memory[key] = features
                return features
        return None

    def add_rows(self, key: str, total: int, rows: Tensor, features: Tensor) -> Tensor | None:
        """Record features of rows `rows` (B,) of an N-row set; the whole (N, D) set once every row is in, else None."""
        if key not in self._partial:
            self._partial[key] = (features.new_zeros(total, features.shape[-1]), torch.zeros(total, dtype=torch.bool))
        held, filled = self._partial[key]
        held[rows.to(held.device)] = features.detach().to(held.dtype)
        filled[rows.cpu()] = True
        if not bool(filled.all()):
            return None
        del self._partial[key]
        self.put(key, held)
        return held

    def put(self, key: str, features: Tensor) -> None:
        """Keep `features` under `key` in memory and, with a directory, on disk (atomically)."""
        self._memory[key] = features
        path = self._path(key)
        if path is None or path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", suffix=".pt", delete=False) as tmp:
            torch.save(features.detach().cpu(), tmp)
        os.replace(tmp.name, path)

    def clear(self) -> None:
        """Forget what is held in memory (the directory stays)."""
        self._memory.clear()
        self._partial.clear()

    def _path(self, key: str) -> Path | None:
        return self.directory / f"{key}.pt" if self.directory is not None else None
