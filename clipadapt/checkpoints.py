"""Read the files a user is given (checkpoints, pretrained weights) as data, never as code.

`torch.load(weights_only=False)` unpickles any object a file names, and unpickling can call any
function; `torch.jit.load` compiles and runs the TorchScript code an archive carries (its
`__setstate__` runs during the load: a crafted archive writes a file of its choosing with
`aten::save`). So every file a user passes reaches clipadapt through this module:

- `load`: torch's format with `weights_only=True` (tensors, containers, plain data). A checkpoint
  written by clipadapt holds nothing else, so no type is allow-listed: `keep_plain` (called as a
  checkpoint is saved) leaves out hyperparameters that are not plain data, as Lightning already
  does for lambdas; the CLI writes them as plain `{class_path, init_args}` dicts anyway.
- `read_checkpoint`: `load`, checked to be a checkpoint written by clipadapt.
- `read_weights`: pretrained weights: safetensors, torch's format, or a TorchScript archive (what
  OpenAI's `clip` package downloads). An archive's tensors are read from its pickled module tree by
  a restricted unpickler that knows only tensor rebuilding and containers; TorchScript objects
  become inert attribute holders and no code of the archive is compiled or run.

Writing: `AtomicCheckpointIO` (the CLI's default) writes a checkpoint into a temp file beside it and
renames it into place, so a full disk or a kill mid-write leaves the previous file whole.

Decision (issue 10 §3): no "unsafe" opt-in flag exists, because every genuine file (clipadapt
checkpoints, open_clip / OpenAI weights, RAda's EFT checkpoint) loads this way. Anything else ends
in one ClipAdaptError line that names the file and what to pass instead.
"""

import collections
import contextlib
import io
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.jit._pickle
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor

from clipadapt.errors import ClipAdaptError

CHECKPOINT_KEY = "clipadapt"  # what `AdaptationModule.on_save_checkpoint` adds: stage, method state, class path

# The only callables a TorchScript archive's data.pkl may name: tensor rebuilding and list type tags.
_ARCHIVE_CALLABLES = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{
        ("torch.jit._pickle", name): getattr(torch.jit._pickle, name)
        for name in ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag")
    },
}

_STORAGE_DTYPES = {  # the legacy storage classes an archive names for its tensors' dtypes
    f"{name}Storage": dtype
    for name, dtype in {
        "Double": torch.float64, "Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16,
        "Long": torch.int64, "Int": torch.int32, "Short": torch.int16, "Char": torch.int8, "Byte": torch.uint8,
        "Bool": torch.bool, "ComplexDouble": torch.complex128, "ComplexFloat": torch.complex64,
    }.items()
}  # fmt: skip


def load(path: str | Path, what: str = "checkpoint") -> Any:
    """The contents of a torch file, read with weights_only=True; one ClipAdaptError line if that cannot be done."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (or is not a file): pass the path of a .ckpt/.pt file")
    try:
        # mmap: tensors are paged in when used, so a check of a large checkpoint reads little of it.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found:
            raise ClipAdaptError(
                f"{what} {path} holds a Python object ({found.group(1)}) beyond tensors and plain data, and "
                "unpickling it could run code from the file: clipadapt loads none. Pass a checkpoint written by "
                "`clipadapt fit` (or a plain state dict of tensors)"
            ) from None
        # torch's text advises weights_only=False; only the unpickler's own reason is worth showing.
        reason = str(err).partition("WeightsUnpickler error:")[2].strip().splitlines()
        raise _not_a_checkpoint(path, what, pickle.UnpicklingError(reason[0]) if reason else err) from None
    except Exception as err:  # noqa: BLE001 - torch's readers fail with a different type for every kind of bad file
        raise _not_a_checkpoint(path, what, err) from None


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """A checkpoint written by clipadapt (`clipadapt fit`, or a Trainer over a clipadapt method), read safely."""
    checkpoint = load(path, what)
    entry = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("class_path"), str) or "state_dict" not in checkpoint:
        raise ClipAdaptError(
            f"{what} {path} is not a checkpoint written by `clipadapt fit` (it has no {CHECKPOINT_KEY!r} entry): "
            "pass a .ckpt file from a run's checkpoints/ folder"
        )
    return checkpoint


def method_path(checkpoint: dict[str, Any]) -> str:
    """`module.QualName` of the method class that wrote `checkpoint`."""
    return checkpoint[CHECKPOINT_KEY]["class_path"]


def read_weights(path: str | Path, what: str = "pretrained weights") -> dict[str, Tensor]:
    """A state dict of tensors from safetensors, torch's format or a TorchScript archive, read as data only."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own and OS errors
            raise _not_a_checkpoint(path, what, err) from None
    elif is_torchscript(path):
        state = read_torchscript(path, what)
    else:
        state = load(path, what)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ClipAdaptError(
            f"{what} {path} is not a state dict of tensors: pass an open_clip checkpoint (.pt/.bin/.safetensors) "
            "or OpenAI's TorchScript archive"
        )
    return state


def is_torchscript(path: str | Path) -> bool:
    """Whether `path` is a TorchScript archive: a zip whose top folder holds constants.pkl (torch's own test)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.count("/") == 1 and name.endswith("/constants.pkl") for name in archive.namelist())


def read_torchscript(path: str | Path, what: str = "pretrained weights") -> dict[str, Tensor]:
    """Every tensor attribute of a TorchScript archive's module tree by dotted name; none of its code runs."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            (prefix,) = {
                name[: -len("data.pkl")] for name in names if name.count("/") == 1 and name.endswith("/data.pkl")
            }
            byteorder = f"{prefix}byteorder"
            if byteorder in names and archive.read(byteorder).decode().strip() != sys.byteorder:
                raise ValueError(f"its tensors are stored {archive.read(byteorder).decode().strip()}-endian")
            root = _ArchiveUnpickler(archive, prefix).load()
    except Exception as err:  # noqa: BLE001 - a crafted archive can fail anywhere; none of it is run
        raise ClipAdaptError(
            f"{what} {path} is a TorchScript archive that cannot be read as weights ({_first_line(err)}): pass "
            "OpenAI's original archive or an open_clip state dict"
        ) from None
    return _tensor_attributes(root)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint writer, atomic: a temp file in the target's folder, then `os.replace`.

    A rename within one folder (one file system) replaces the name at once: a reader sees the old
    checkpoint or the new one, never a part. Remote paths (`s3://`, ...) go to Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")  # hidden; one writer per process
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(partial, path)
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable (not every file system allows it)
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)


def keep_plain(checkpoint: dict[str, Any]) -> None:
    """Leave out hyperparameters that are not plain data, so that the checkpoint loads with weights_only=True."""
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint[key] = {name: value for name, value in checkpoint[key].items() if _is_plain(value)}


def _is_plain(value: Any) -> bool:
    # Exact types: a subclass (AttributeDict, Namespace, OrderedDict) is pickled by its class name.
    if type(value) in (list, tuple):
        return all(_is_plain(v) for v in value)
    if type(value) is dict:
        return all(type(k) in (str, int) and _is_plain(v) for k, v in value.items())
    return value is None or type(value) in (bool, int, float, str) or isinstance(value, Tensor)


class _Attributes:
    """A TorchScript object read as data: its pickled attributes, none of its methods."""


class _StorageType(NamedTuple):
    """Stands for `torch.<X>Storage` in a storage reference: only its dtype is used, it cannot be called."""

    dtype: torch.dtype


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's data.pkl with tensors and containers only (Python docs' restricted pattern)."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(archive.read(f"{prefix}data.pkl")))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.TypedStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".", 1)[0] == "__torch__":
            return _Attributes  # a scripted class: keep its attributes, never its code
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _ARCHIVE_CALLABLES:
            return _ARCHIVE_CALLABLES[module, name]
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not a tensor or container")

    def persistent_load(self, pid: Any) -> torch.TypedStorage:
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage reference {pid!r}")
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}data/{key}")
            untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            self.storages[key] = torch.TypedStorage(wrap_storage=untyped, dtype=storage_type.dtype, _internal=True)
        return self.storages[key]


def _tensor_attributes(root: Any) -> dict[str, Tensor]:
    """{dotted name: tensor} over a tree of `_Attributes` (module names as in a state dict)."""
    found: dict[str, Tensor] = {}
    todo, seen = [("", root)], set()
    while todo:
        prefix, obj = todo.pop()
        if id(obj) in seen or not isinstance(obj, _Attributes):
            continue
        seen.add(id(obj))
        for name, value in vars(obj).items():
            if isinstance(value, Tensor):
                found[prefix + name] = value
            elif isinstance(value, _Attributes):
                todo.append((f"{prefix}{name}.", value))
    return found


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _not_a_checkpoint(path: Path, what: str, err: BaseException) -> ClipAdaptError:
    return ClipAdaptError(
        f"{what} {path} is not a PyTorch checkpoint ({_first_line(err)}): pass a .ckpt/.pt file "
        "written by torch.save, e.g. a run's checkpoints/last.ckpt"
    )
