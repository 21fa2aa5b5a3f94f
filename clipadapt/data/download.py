"""Resumable, verified, atomic downloads and safe extraction (for `clipadapt data prepare`).

`fetch` writes into `<dest>.part`, resuming with an HTTP `Range` request after a dropped connection
(or in a later run), shows a progress bar, verifies the checksum of the whole file, and only then
renames it to `dest`: a file under its final name is always complete and verified. A checksum
mismatch deletes the `.part` (the next try starts over) and raises a one-line `ClipAdaptError`.
`extract` unpacks a tar or zip archive without letting a member escape the target folder.
"""

import hashlib
import http.client
import os
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from clipadapt.errors import ClipAdaptError

__all__ = ["extract", "fetch", "file_digest"]

CHUNK = 1 << 20
USER_AGENT = "clipadapt-data-prepare"


class _Retry(Exception):
    """A transfer that stopped early or failed in a way another try may fix."""


class _NextURL(Exception):
    """This URL will not give the file (404, a web page): try the next one."""


def verify(path: Path, checksum: str | None, what: str, then: str) -> None:
    """Delete `path` and raise a one-line ClipAdaptError (`what` names the file, `then` the way on) unless it
    matches `checksum` ("md5:<hex>" / "sha256:<hex>"); no checksum, nothing to check."""
    if not checksum:
        return
    algorithm, _, expected = checksum.partition(":")
    got = file_digest(path, algorithm)
    if got != expected.lower():
        path.unlink()
        raise ClipAdaptError(f"checksum mismatch for {what} (expected {algorithm} {expected}, got {got}); {then}")


def file_digest(path: Path, algorithm: str) -> str:
    """The hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _get(url: str, part: Path, progress: bool, timeout: float) -> None:
    """Append the rest of `url` to `part` (Range from its size); _Retry when the transfer stops early."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT} | ({"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416:  # the .part is not a prefix the server knows: start over
            part.unlink(missing_ok=True)
            raise _Retry(f"HTTP 416 for a resume at byte {offset}") from err
        if err.code >= 500 or err.code == 429:
            raise _Retry(f"HTTP {err.code}") from err
        raise _NextURL(f"HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise _Retry(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from err
    with response:
        if "text/html" in response.headers.get("Content-Type", ""):
            raise _NextURL(
                "a web page instead of the file (a moved link, or Google Drive's quota or confirmation page)"
            )
        if offset and response.status != 206:  # the server ignored Range: the body is the whole file
            offset = 0
        elif offset and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            part.unlink(missing_ok=True)
            raise _Retry(f"the server resumed at another byte than {offset}")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        bar = tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            desc=part.name[:-5],
            disable=None if progress else True,
        )
        done = offset
        with open(part, "ab" if offset else "wb") as f, bar:
            try:
                while block := response.read(CHUNK):
                    f.write(block)
                    done += len(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as err:  # a dropped connection: resume from what we have
                raise _Retry(f"connection lost at byte {done}: {type(err).__name__}") from err
        if total is not None and done < total:
            raise _Retry(f"connection closed at byte {done} of {total}")


def fetch(
    urls: Sequence[str],
    dest: Path,
    checksum: str | None = None,
    attempts: int = 5,
    progress: bool = True,
    timeout: float = 60.0,
    backoff: float = 1.0,
) -> Path:
    """Download the first of `urls` that works to `dest` (resumable via `dest.part`); verify `checksum` ("md5:hex").

    A `dest` that exists was verified when it was written and is returned as is.
    """
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    problems = []
    for url in urls:
        done = False
        for attempt in range(attempts):
            try:
                _get(url, part, progress, timeout)
                done = True
                break
            except _NextURL as err:
                problems.append(f"{url}: {err}")
                break
            except _Retry as err:
                problems.append(f"{url}: {err}")
                time.sleep(backoff * attempt)
        if not done:
            continue
        verify(
            part, checksum, f"{dest.name} from {url}",
            f"the download was deleted (nothing was unpacked): run the command again, or fetch the file yourself and put it at {dest}",
        )  # fmt: skip
        os.replace(part, dest)
        return dest
    last = problems[-1] if problems else "no URL"
    raise ClipAdaptError(
        f"could not download {dest.name} ({len(problems)} failed tries; last: {last}); run the command again to "
        f"resume, pass --mirror, or fetch the file yourself and put it at {dest}"
    )


def extract(archive: Path, out: Path) -> None:
    """Unpack a tar (any compression) or zip archive into `out`; no member may land outside it."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                root = out.resolve()
                for member in z.namelist():
                    if not (out / member).resolve().is_relative_to(root):
                        raise ClipAdaptError(f"{archive}: member {member!r} would be written outside {out}")
                z.extractall(out)
        else:
            with tarfile.open(archive) as t:
                t.extractall(out, filter="data")  # refuses absolute paths, '..', links out of `out`, devices
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise ClipAdaptError(
            f"cannot unpack {archive}: {type(err).__name__}: {err}; delete it and run the command again"
        ) from err
