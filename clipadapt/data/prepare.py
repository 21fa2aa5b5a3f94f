"""`clipadapt data prepare DATASET --root R`: download, verify and arrange one dataset in CoOp's layout.

For each file of the dataset's `sources.Source`: fetch it into the downloads folder (resumable, with
a progress bar, checksum-verified; `download.fetch`), and only when every file is there, build the
dataset folder in a temporary sibling (`R/.<folder>.tmp-*`: archives unpacked, their folders moved
into place, plain files copied) and rename it to `R/<folder>` in one step. An interrupted or failed
prepare therefore leaves no dataset folder at all, only resumable `.part` files; a checksum mismatch
deletes its download. An existing dataset folder is never overwritten, only checked. ImageNet's
images cannot be downloaded (licence): the exact manual steps are printed, and the run ends with an
error until they are done. The CLI then runs `data check` on the result.

`--mirror URL` replaces every source with `URL/<dataset folder>/<file name>` (a lab mirror, or the
test's local server); checksums are verified all the same. Files can also be put into the downloads
folder by hand under their names (e.g. StanfordCars from a copy), and are verified there.
"""

import argparse
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from clipadapt.data.download import extract, fetch, verify
from clipadapt.data.readers import DATASETS, absolute_root, resolve_dataset
from clipadapt.data.sources import CLASSNAMES, SOURCES, Download, Source
from clipadapt.errors import ClipAdaptError

__all__ = ["add_arguments", "prepare"]

log = logging.getLogger(__name__)
DOWNLOADS = ".clipadapt-downloads"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `clipadapt data prepare`."""
    parser.add_argument("dataset", help=f"one of: {', '.join(SOURCES)} (or the CoOp spelling)")
    parser.add_argument("--root", required=True, help="folder that holds the dataset folders (CoOp's $DATA)")
    parser.add_argument("--mirror", help="fetch every file from MIRROR/<dataset folder>/<file name> instead")
    parser.add_argument("--downloads", help=f"where downloads go and resume from (default: ROOT/{DOWNLOADS})")
    parser.add_argument("--keep-downloads", action="store_true", help="keep the archives after unpacking them")
    parser.add_argument("--no-decode", action="store_true", help="check the layout only, without decoding images")


def _source(dataset: str) -> Source:
    info = resolve_dataset(dataset)
    if info.name not in SOURCES:
        raise ClipAdaptError(
            f"{info.display} has nothing to download (own data and the synthetic set are made locally); "
            f"data prepare knows: {', '.join(SOURCES)}"
        )
    return SOURCES[info.name]


def _urls(download: Download, folder: str, mirror: str | None) -> tuple[str, ...]:
    return (f"{mirror.rstrip('/')}/{folder}/{download.name}",) if mirror else download.urls


def _verified_local(path: Path, download: Download) -> None:
    """A file already in the downloads folder (an earlier run, or put there by hand) must match its checksum."""
    if path.is_file():
        verify(path, download.checksum, str(path), "it was deleted: run the command again to download it")


def _arrange(download: Download, path: Path, out: Path) -> None:
    """Put one downloaded file into the dataset folder being built at `out`."""
    if download.dest is not None:
        (out / download.dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / download.dest)
        return
    unpacked = Path(tempfile.mkdtemp(prefix=".unpack-", dir=out))
    extract(path, unpacked)
    if download.inner:
        inner = unpacked / download.inner
        if not inner.is_file():
            raise ClipAdaptError(f"{path} holds no {download.inner}: {_changed(unpacked)}")
        extract(inner, unpacked)
    for src, dst in download.moves or (("", ""),):
        source = unpacked / src
        if not source.exists():
            raise ClipAdaptError(f"{path} holds no {src}/: {_changed(unpacked)}")
        if dst:
            (out / dst).parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, out / dst)
        else:  # its contents become the dataset folder's
            for child in source.iterdir():
                os.replace(child, out / child.name)
    shutil.rmtree(unpacked)


def _changed(unpacked: Path) -> str:
    top = sorted(p.name for p in unpacked.iterdir())[:8]
    return (
        f"the archive has changed (its top level: {', '.join(top) or 'nothing'}); arrange it by hand as CoOp's "
        "DATASETS.md says"
    )


def prepare(
    dataset: str,
    root: str | os.PathLike,
    mirror: str | None = None,
    downloads: str | os.PathLike | None = None,
    keep_downloads: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = log.info,
) -> Path:
    """Build `root/<folder>` of `dataset` from its sources (see the module docstring); returns the folder."""
    source = _source(dataset)
    info = DATASETS[source.dataset]
    root_path = absolute_root(root)
    if root_path.exists() and not root_path.is_dir():
        raise ClipAdaptError(f"--root {root_path} is a file: pass the folder that holds (or will hold) the datasets")
    root_path.mkdir(parents=True, exist_ok=True)
    target = root_path / info.folder
    store = Path(downloads).expanduser() if downloads else root_path / DOWNLOADS
    store = store / info.folder

    def get(download: Download) -> Path:
        local = root_path / "imagenet" / "classnames.txt"
        if download is CLASSNAMES and source.dataset != "imagenet" and local.is_file():
            say(f"using {local} (CoOp: the ImageNet variants share ImageNet's classnames.txt)")
            return local
        path = store / download.name
        _verified_local(path, download)
        if not path.is_file():
            say(f"downloading {download.name}" + (f" ({download.note})" if download.note else ""))
        try:
            return fetch(_urls(download, info.folder, mirror), path, download.checksum, progress=progress)
        except ClipAdaptError as err:  # with where the file comes from, for the manual step
            raise ClipAdaptError(f"{err} (source: {download.note or download.urls[0]})") from err

    if source.manual:  # ImageNet: the images come by hand; classnames.txt is fetched
        images = [target / info.image_dir / split for split in ("train", "val")]
        missing = not all(folder.is_dir() for folder in images)
        if missing:
            say(source.manual.format(folder=target, root=root_path))
        if not (target / "classnames.txt").is_file():
            names = get(CLASSNAMES)
            target.mkdir(exist_ok=True)
            shutil.copyfile(names, target / "classnames.txt")
        if missing:
            raise ClipAdaptError(
                f"{info.display}: {images[0]} and {images[1]} are needed; do the manual steps above, then run "
                "the command again"
            )
        return target
    if target.exists():
        say(f"{target} exists, so nothing is downloaded (move it away to prepare it anew); checking it")
        return target
    if source.note:
        say(f"note: {source.note}")
    fetched = [(download, get(download)) for download in source.files]  # all verified before anything is built
    for stale in root_path.glob(f".{info.folder}.tmp-*"):  # what a killed earlier prepare left
        shutil.rmtree(stale)
    building = Path(tempfile.mkdtemp(prefix=f".{info.folder}.tmp-", dir=root_path))
    try:
        for download, path in fetched:
            say(f"arranging {download.name}")
            _arrange(download, path, building)
        os.rename(building, target)
    finally:
        if building.exists():
            shutil.rmtree(building)
    if not keep_downloads:
        for _, path in fetched:
            if path.parent == store:
                path.unlink(missing_ok=True)
        for folder in (store, store.parent) if downloads is None else (store,):  # a given --downloads stays
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    say(f"prepared {target}")
    return target
