"""Reading image files: one decode for training and `clipadapt data check`, and a parallel scan for bad files.

`read_rgb` is what every loader runs on a file; `find_unreadable` runs the same decode (or only
PIL's header parse, `decode=False`, which is what `fit` affords on the test split before it trains)
over many files in a thread pool. Threads, not processes: PIL releases the GIL while it decodes,
opening a file waits on the disk, and a thread pool needs no pickling or process start (it also
runs inside DataLoader workers and DDP ranks).

An unreadable file met in a loader raises `ImageReadError`, a one-line `ClipAdaptError` naming the
file and its split. A DataLoader worker's exception reaches the main process as
`type(err)(<header and the worker's whole traceback>)`; `ImageReadError` keeps only its own line
of that text, so the message is the same one line with `num_workers` 0 and > 0.
"""

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from PIL import Image
from tqdm import tqdm

from clipadapt.data.readers import Datum
from clipadapt.errors import ClipAdaptError

__all__ = ["ImageReadError", "check_images", "find_unreadable", "read_rgb"]

FIX = "replace the file or remove it from the split (`clipadapt data check` lists every unreadable image)"
CHUNK = 64  # files per pool task: few enough tasks for 50k files, small enough for a smooth progress bar


class ImageReadError(ClipAdaptError):
    """An image file that cannot be read; one line, also when a DataLoader worker re-raises it."""

    def __init__(self, message: str) -> None:
        if "\n" in message:  # torch's worker re-raise: the traceback's last line is "<module>.ImageReadError: <ours>"
            message = message.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
        super().__init__(message)


def _reason(err: Exception) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())  # one line, whatever PIL put in it


def read_rgb(path: str, split: str) -> Image.Image:
    """The decoded image as RGB (grey and CMYK files exist in the real datasets); ImageReadError if it cannot be."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ... for broken files
        raise ImageReadError(f"cannot read image {path} ({split} split): {_reason(err)}; {FIX}") from err


def _problems(paths: Sequence[str], decode: bool) -> list[str | None]:
    found: list[str | None] = []
    for path in paths:
        try:
            with Image.open(path) as img:
                if decode:
                    img.convert("RGB")  # the decode `read_rgb` does
            found.append(None)
        except Exception as err:  # a scan reports every kind of failure; it never stops at one
            found.append(_reason(err))
    return found


def find_unreadable(
    paths: Sequence[str], decode: bool = True, workers: int | None = None, progress: bool = False, desc: str = ""
) -> list[tuple[str, str]]:
    """(path, reason) for each file PIL cannot decode (decode=False: cannot open, a header check), in input order.

    `workers` threads (default min(32, CPUs + 4)); `progress` shows a tqdm bar on stderr when it is a terminal.
    """
    paths = list(paths)
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    bad = []
    bar = tqdm(total=len(paths), desc=desc or None, unit="img", disable=None if progress else True, leave=False)
    with ThreadPoolExecutor(workers or min(32, (os.cpu_count() or 1) + 4)) as pool, bar:
        for chunk, problems in zip(chunks, pool.map(partial(_problems, decode=decode), chunks), strict=True):
            bad += [(path, problem) for path, problem in zip(chunk, problems, strict=True) if problem]
            bar.update(len(chunk))
    return bad


def check_images(
    splits: dict[str, list[Datum]], workers: int | None = None, progress: bool = False, limit: int = 20
) -> tuple[list[str], int]:
    """Decode every image of `splits`: report lines (the first `limit` bad files, then a count) and how many are bad."""
    split_of: dict[str, str] = {}
    for split, items in splits.items():
        for d in items:
            split_of.setdefault(d.path, split)
    bad = find_unreadable(list(split_of), workers=workers, progress=progress, desc="decoding")
    if not bad:
        return [f"images:   all {len(split_of)} decode"], 0
    lines = [f"unreadable: {len(bad)} of {len(split_of)} images cannot be decoded:"]
    lines += [f"  {path} ({split_of[path]} split): {reason}" for path, reason in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return lines, len(bad)
