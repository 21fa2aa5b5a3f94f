"""`clipadapt data prepare` end to end against a local HTTP server (127.0.0.1, a free port): no network."""

import hashlib
import io
import re
import shutil
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clipadapt.cli import main
from clipadapt.data import write_synthetic
from clipadapt.data.download import extract, fetch
from clipadapt.data.prepare import DOWNLOADS
from clipadapt.data.readers import DATASETS
from clipadapt.data.sources import SOURCES
from clipadapt.errors import ClipAdaptError
from clipadapt.toy import DOMAINS


class Server:
    """Serves `files` ({url path: bytes}) with Range support; `cut` paths drop the connection midway, once."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match:
                    start = int(match.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if self.path in server.cut:  # half of the file, then the connection closes
                    server.cut.discard(self.path)
                    self.wfile.write(body[start : start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free one
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def fake_dtd(tmp_path: Path) -> tuple[bytes, bytes]:
    """(dtd-r1.0.1.tar.gz, split json) in DTD's real structure: the archive holds dtd/images/<class>/*.jpg."""
    write_synthetic(tmp_path / "src", "dtd", num_classes=3, train_per_class=4, val_per_class=2, test_per_class=2)
    folder = tmp_path / "src" / "dtd"
    (folder / "labels").mkdir()
    (folder / "labels" / "labels_joint_anno.txt").write_text("as in DTD r1.0.1\n")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder / "images", arcname="dtd/images")
        tar.add(folder / "labels", arcname="dtd/labels")
    return buffer.getvalue(), (folder / "split_zhou_DescribableTextures.json").read_bytes()


@pytest.fixture
def dtd_served(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Server, bytes]:
    """The fake DTD on the server; the table's md5 (of the real archive) replaced by the fake's sha256."""
    archive, split = fake_dtd(tmp_path)
    server.files = {"/dtd/dtd-r1.0.1.tar.gz": archive, "/dtd/split_zhou_DescribableTextures.json": split}
    source = SOURCES["dtd"]
    files = (replace(source.files[0], checksum="sha256:" + hashlib.sha256(archive).hexdigest()), source.files[1])
    monkeypatch.setitem(SOURCES, "dtd", replace(source, files=files))
    return server, archive


def leftovers(root: Path) -> list[str]:
    """Anything under root but a finished dataset folder: temp folders, downloads, .part files."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith(".") or p.suffix == ".part")


def test_prepare_builds_a_root_that_data_check_passes(dtd_served, tmp_path: Path, capsys) -> None:
    server, _ = dtd_served
    root = tmp_path / "DATA"
    (root / ".dtd.tmp-killed").mkdir(parents=True)  # a half-built folder of a killed earlier prepare
    main(["data", "prepare", "dtd", "--root", str(root), "--mirror", server.url])
    out = capsys.readouterr().out
    assert "prepared" in out and "classes:  3" in out and "all 24 decode" in out  # data check ran on it
    assert (root / "dtd" / "split_zhou_DescribableTextures.json").is_file() and (root / "dtd" / "labels").is_dir()
    assert leftovers(root) == [] and not (root / DOWNLOADS).exists()  # archives removed after unpacking
    assert [path for path, _ in server.requests] == list(server.files)
    main(["data", "check", "--root", str(root), "--dataset", "dtd"])
    main(["data", "prepare", "DescribableTextures", "--root", str(root), "--mirror", server.url])
    assert "exists, so nothing is downloaded" in capsys.readouterr().out and len(server.requests) == 2


def test_interrupted_download_resumes_with_range(dtd_served, tmp_path: Path, capsys) -> None:
    server, archive = dtd_served
    server.cut = {"/dtd/dtd-r1.0.1.tar.gz"}
    root = tmp_path / "DATA"
    main(["data", "prepare", "dtd", "--root", str(root), "--mirror", server.url, "--keep-downloads"])
    archive_requests = [rng for path, rng in server.requests if path.endswith(".tar.gz")]
    assert archive_requests == [None, f"bytes={len(archive) // 2}-"]  # the second asks only for the rest
    assert (root / DOWNLOADS / "dtd" / "dtd-r1.0.1.tar.gz").read_bytes() == archive  # kept, whole
    assert "all 24 decode" in capsys.readouterr().out


def test_a_part_file_of_an_earlier_run_is_resumed(server: Server, tmp_path: Path) -> None:
    body = bytes(range(256)) * 64
    server.files = {"/f.bin": body}
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(body[:1000])
    fetch([server.url + "/f.bin"], dest, "md5:" + hashlib.md5(body).hexdigest(), progress=False)
    assert server.requests == [("/f.bin", "bytes=1000-")] and dest.read_bytes() == body
    assert not dest.with_name("f.bin.part").exists()


def test_checksum_mismatch_is_one_line_and_keeps_nothing(dtd_served, tmp_path: Path, monkeypatch) -> None:
    server, _ = dtd_served
    source = SOURCES["dtd"]
    files = (replace(source.files[0], checksum="sha256:" + "0" * 64), source.files[1])
    monkeypatch.setitem(SOURCES, "dtd", replace(source, files=files))
    root = tmp_path / "DATA"
    with pytest.raises(SystemExit, match=r"checksum mismatch for dtd-r1\.0\.1\.tar\.gz .*expected sha256 0+, got") as e:
        main(["data", "prepare", "dtd", "--root", str(root), "--mirror", server.url])
    assert "\n" not in str(e.value.code) and "nothing was unpacked" in str(e.value.code)
    assert not (root / "dtd").exists()
    assert [p.name for p in root.rglob("*") if p.is_file()] == []  # no .part, no half-built folder


def test_missing_file_on_the_server_names_the_manual_step(server: Server, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"could not download dtd-r1\.0\.1\.tar\.gz .*HTTP 404.*put it at"):
        main(["data", "prepare", "dtd", "--root", str(tmp_path / "DATA"), "--mirror", server.url])
    assert not (tmp_path / "DATA" / "dtd").exists()


def test_imagenet_prints_the_manual_steps_then_checks(server: Server, tmp_path: Path, capsys) -> None:
    server.files = {"/imagenet/classnames.txt": b"n00000000 red circle\n"}
    root = tmp_path / "DATA"
    with pytest.raises(SystemExit, match=r"ImageNet.*images/train and .*images/val are needed; do the manual steps"):
        main(["data", "prepare", "imagenet", "--root", str(root), "--mirror", server.url])
    out = capsys.readouterr().out
    assert "image-net.org" in out and f"tar -xf ILSVRC2012_img_train.tar -C {root}/imagenet/images/train" in out
    assert (root / "imagenet" / "classnames.txt").read_bytes() == server.files["/imagenet/classnames.txt"]
    write_synthetic(tmp_path / "src", "imagenet", num_classes=2, train_per_class=2, val_per_class=0, test_per_class=1)
    shutil.copytree(tmp_path / "src" / "imagenet" / "images", root / "imagenet" / "images")  # the manual steps
    shutil.copy(tmp_path / "src" / "imagenet" / "classnames.txt", root / "imagenet")
    main(["data", "prepare", "imagenet", "--root", str(root), "--mirror", server.url])
    assert "all 6 decode" in capsys.readouterr().out


def test_own_data_has_nothing_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="imagefolder .*nothing to download"):
        main(["data", "prepare", "imagefolder", "--root", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown dataset 'petz'"):
        main(["data", "prepare", "petz", "--root", str(tmp_path)])


def test_extract_refuses_members_outside_the_target(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(ClipAdaptError, match="cannot unpack .*evil.tar"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "outside.txt").exists()


def test_the_table_covers_every_coop_dataset_and_matches_the_readers() -> None:
    assert set(SOURCES) == set(DATASETS) - {"synthetic", *DOMAINS}  # generated here, not downloaded
    for name, source in SOURCES.items():
        info = DATASETS[name]
        names = [d.name for d in source.files]
        assert len(set(names)) == len(names), name
        for d in source.files:
            assert d.urls and all(u.startswith(("http://", "https://")) for u in d.urls), d.name
            assert d.checksum is None or re.fullmatch(r"md5:[0-9a-f]{32}|sha256:[0-9a-f]{64}", d.checksum), d.name
            assert d.moves if d.dest is None else not (d.moves or d.inner), d.name  # a file, or what to take out
        placed = {d.dest for d in source.files if d.dest} | {dst for d in source.files for _, dst in d.moves}
        if info.reader == "json":  # the split file the reader wants, and its image folder(s)
            image_dirs = {"cars_train", "cars_test"} if info.prefix == "dataset_dir" else {info.image_dir}
            assert info.split_file in placed and (image_dirs <= placed or "" in placed), name
        if info.reader == "folders" or info.reader == "imagenet_v2":
            assert "classnames.txt" in placed and info.image_dir in placed, name
    drive_ids = {d.urls[0] for d in SOURCES["dtd"].files if "google" in d.urls[0]}
    assert drive_ids == {
        "https://drive.usercontent.google.com/download?id=1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x&export=download&confirm=t"
    }


def test_a_file_put_in_the_downloads_folder_is_verified(dtd_served, tmp_path: Path, capsys) -> None:
    server, archive = dtd_served
    root = tmp_path / "DATA"
    placed = root / DOWNLOADS / "dtd" / "dtd-r1.0.1.tar.gz"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(archive[:-1] + b"x")  # a damaged copy
    with pytest.raises(SystemExit, match=r"checksum mismatch for .*dtd-r1\.0\.1\.tar\.gz .*it was deleted"):
        main(["data", "prepare", "dtd", "--root", str(root), "--mirror", server.url])
    assert not placed.exists() and server.requests == []
    placed.write_bytes(archive)  # a good copy is used without downloading it
    main(["data", "prepare", "dtd", "--root", str(root), "--mirror", server.url])
    assert [path for path, _ in server.requests] == ["/dtd/split_zhou_DescribableTextures.json"]
    assert "all 24 decode" in capsys.readouterr().out
