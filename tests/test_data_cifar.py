"""CIFAR-10/100 reading and downloading, on tiny archives written in the exact official format."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import shlex
import shutil
import struct
import tarfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from resnetlab.data import cifar
from resnetlab.data.cifar import CIFAR_FILES, download_cifar, find_cifar, is_cifar_path, load_cifar
from resnetlab.errors import UserError

CIFAR10_NAMES = b"airplane automobile bird cat deer dog frog horse ship truck".split()


# --- writing data sets in the official format ------------------------------------------------------------


def py3_pickle(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=2)


def py2_pickle(obj: object) -> bytes:
    """``obj`` pickled as Python 2 with numpy 1.x wrote the official files: str as BINSTRING, numpy.core.

    Python 3 cannot write these opcodes, and writes bytes through ``_codecs.encode`` instead.
    """

    def dump(x: object) -> bytes:
        if isinstance(x, bytes):  # a Python 2 str
            return b"U" + bytes([len(x)]) + x if len(x) < 256 else b"T" + struct.pack("<i", len(x)) + x
        if x is None:
            return b"N"
        if isinstance(x, int):
            return b"J" + struct.pack("<i", x)
        if isinstance(x, tuple):
            return b"(" + b"".join(dump(v) for v in x) + b"t"
        if isinstance(x, list):
            return b"](" + b"".join(dump(v) for v in x) + b"e"
        if isinstance(x, dict):
            return b"}(" + b"".join(dump(k) + dump(v) for k, v in x.items()) + b"u"
        if isinstance(x, np.ndarray):
            # numpy.core.multiarray._reconstruct(ndarray, (0,), "b"), then its state (shape, dtype, bytes)
            assert x.dtype == np.uint8
            dtype = b"cnumpy\ndtype\n" + dump((b"u1", 0, 1)) + b"R" + dump((3, b"|", None, None, None, -1, -1, 0))
            return (
                b"cnumpy.core.multiarray\n_reconstruct\n"
                + b"cnumpy\nndarray\n"
                + dump((0,))
                + dump(b"b")
                + b"\x87R"
                + b"("
                + dump(1)
                + dump(x.shape)
                + dtype
                + b"b"
                + b"\x89"
                + dump(x.tobytes())
                + b"tb"
            )
        raise TypeError(type(x))

    return b"\x80\x02" + dump(obj) + b"."


@dataclass
class Made:
    """A tiny CIFAR data set on disk and the arrays it must read back as."""

    folder: Path
    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def known_image() -> np.ndarray:
    """An image whose planes and pixels are told apart: red counts up row by row, green and blue are flat."""
    red = (np.arange(1024) % 200).reshape(32, 32)
    green = np.full((32, 32), 220)
    blue = np.full((32, 32), 240)
    blue[31, 31] = 7
    return np.stack([red, green, blue]).astype(np.uint8)


def make_cifar10(root: Path, per_batch: int = 3, dump=py3_pickle, seed: int = 0) -> Made:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = rng.integers(0, 256, (5 * per_batch + 4, 3, 32, 32), dtype=np.uint8)
    images[0] = known_image()
    labels = rng.integers(0, 10, len(images))
    labels[0] = 7
    for i in range(6):
        name = f"data_batch_{i + 1}" if i < 5 else "test_batch"
        part = slice(i * per_batch, (i + 1) * per_batch if i < 5 else None)
        batch = {
            b"batch_label": f"training batch {i + 1} of 5".encode(),
            b"labels": [int(v) for v in labels[part]],
            b"data": images[part].reshape(-1, 3072),
            b"filenames": [f"img_{j}.png".encode() for j in range(len(labels[part]))],
        }
        (folder / name).write_bytes(dump(batch))
    (folder / "batches.meta").write_bytes(dump({b"label_names": CIFAR10_NAMES, b"num_vis": 3072}))
    (folder / "readme.html").write_text("<html>not a batch</html>")
    n = 5 * per_batch
    classes = [c.decode() for c in CIFAR10_NAMES]
    return Made(folder, classes, images[:n], labels[:n], images[n:], labels[n:])


def make_cifar100(root: Path, dump=py3_pickle) -> Made:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    images = rng.integers(0, 256, (9, 3, 32, 32), dtype=np.uint8)
    fine = np.array([99, 0, 42, 5, 63, 17, 88, 1, 50])
    coarse = fine // 5
    for name, part in (("train", slice(0, 6)), ("test", slice(6, None))):
        batch = {
            b"filenames": [b"x.png"] * len(fine[part]),
            b"batch_label": b"training batch 1 of 1",
            b"fine_labels": [int(v) for v in fine[part]],
            b"coarse_labels": [int(v) for v in coarse[part]],
            b"data": images[part].reshape(-1, 3072),
        }
        (folder / name).write_bytes(dump(batch))
    fine_names = [f"fine_{i}".encode() for i in range(100)]
    coarse_names = [f"coarse_{i}".encode() for i in range(20)]
    (folder / "meta").write_bytes(dump({b"fine_label_names": fine_names, b"coarse_label_names": coarse_names}))
    classes = [n.decode() for n in fine_names]
    return Made(folder, classes, images[:6], fine[:6], images[6:], fine[6:])


def make_archive(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_matches(source, made: Made, name: str = "cifar10") -> None:
    assert source.name == name
    assert source.classes == made.classes
    assert set(source.splits) == {"train", "test"}
    for split, images, labels in (
        ("train", made.train_images, made.train_labels),
        ("test", made.test_images, made.test_labels),
    ):
        got = source.splits[split]
        assert got.images.dtype == torch.uint8 and got.labels.dtype == torch.int64
        assert torch.equal(got.images, torch.from_numpy(images))
        assert torch.equal(got.labels, torch.from_numpy(labels.astype(np.int64)))


@pytest.fixture
def c10(tmp_path: Path) -> Made:
    return make_cifar10(tmp_path / "data")


# --- reading ---------------------------------------------------------------------------------------------


def test_pixel_layout_labels_and_class_names(c10: Made):
    source = load_cifar("cifar10", c10.folder)
    train = source.splits["train"]
    assert train.images.shape == (15, 3, 32, 32) and source.splits["test"].images.shape == (4, 3, 32, 32)
    image = train.images[0]
    # A row of the file is 1024 red, 1024 green, 1024 blue values, each plane row-major.
    assert torch.equal(image, torch.from_numpy(known_image()))
    assert image[0, 0, 1] == 1 and image[0, 1, 0] == 32 and image[0, 31, 31] == 1023 % 200
    assert (image[1] == 220).all() and image[2, 31, 31] == 7 and image[2, 0, 0] == 240
    assert train.labels[0] == 7 and source.classes[7] == "horse"
    assert_matches(source, c10)  # batches 1..5 in order, then the test batch


@pytest.mark.parametrize("where", ["archive", "folder", "parent of folder", "parent of archive"])
def test_same_result_from_archive_folder_and_parent(tmp_path: Path, c10: Made, where: str):
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir()
    archive = make_archive(c10.folder, archive_dir / "cifar-10-python.tar.gz")
    path = {
        "archive": archive,
        "folder": c10.folder,
        "parent of folder": c10.folder.parent,
        "parent of archive": archive_dir,
    }[where]
    source = load_cifar("cifar10", path, md5=None)  # md5=None: a home-made archive under the official name
    assert_matches(source, c10)
    assert source.origin == path


def test_cifar100_uses_the_fine_labels(tmp_path: Path):
    made = make_cifar100(tmp_path)
    archive = make_archive(made.folder, tmp_path / "c100.tgz")
    for path in (made.folder, archive):
        source = load_cifar("cifar100", path)
        assert_matches(source, made, "cifar100")
        assert source.splits["train"].labels.tolist() == [99, 0, 42, 5, 63, 17]
        assert len(source.classes) == 100 and source.classes[99] == "fine_99"


def test_python2_pickles_as_in_the_official_files(tmp_path: Path):
    data = py2_pickle({b"data": (np.arange(6144) % 256).astype(np.uint8).reshape(2, 3072), b"labels": [3, 4]})
    # The hand-made Python 2 pickle is what it claims to be (standard pickle, no _codecs, numpy.core).
    back = pickle.loads(data, encoding="bytes")
    assert back[b"labels"] == [3, 4] and back[b"data"].dtype == np.uint8 and back[b"data"].shape == (2, 3072)
    assert b"_codecs" not in data and b"numpy.core.multiarray\n_reconstruct" in data

    made = make_cifar10(tmp_path / "py2", dump=py2_pickle)
    assert_matches(load_cifar("cifar10", make_archive(made.folder, tmp_path / "py2.tar.gz")), made)
    made100 = make_cifar100(tmp_path / "py2_100", dump=py2_pickle)
    assert_matches(load_cifar("cifar100", made100.folder), made100, "cifar100")


def test_any_number_of_images_per_batch(tmp_path: Path):
    made = make_cifar10(tmp_path, per_batch=1)
    assert len(load_cifar("cifar10", made.folder).splits["train"]) == 5


# --- bad files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_archive", [False, True])
def test_missing_batch_is_named(tmp_path: Path, c10: Made, as_archive: bool):
    (c10.folder / "data_batch_3").unlink()
    path = make_archive(c10.folder, tmp_path / "mine.tar.gz") if as_archive else c10.folder
    with pytest.raises(UserError, match="missing .*data_batch_3") as info:
        load_cifar("cifar10", path)
    assert str(path) in str(info.value)


def test_truncated_archive_is_named(tmp_path: Path, c10: Made):
    archive = make_archive(c10.folder, tmp_path / "mine.tar.gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="mine.tar.gz"):
        load_cifar("cifar10", archive)


def test_not_an_archive_at_all(tmp_path: Path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(UserError, match="notes.txt"):
        load_cifar("cifar10", path)


@pytest.mark.parametrize("bad", [10, -1])
def test_label_out_of_range(c10: Made, bad: int):
    batch = pickle.loads((c10.folder / "data_batch_2").read_bytes(), encoding="bytes")
    batch[b"labels"][1] = bad
    (c10.folder / "data_batch_2").write_bytes(py3_pickle(batch))
    with pytest.raises(UserError, match=rf"data_batch_2.*label {bad} out of range"):
        load_cifar("cifar10", c10.folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({b"labels": [1, 2]}, "2 labels for 4 images"),
        ({b"data": np.zeros((4, 3000), np.uint8)}, r"shape \(4, 3000\)"),
        ({b"data": np.zeros((4, 3072), np.float32)}, "uint8"),
        ({b"labels": [1.0, 2.0, 3.0, 4.0]}, "list of integers"),
    ],
)
def test_malformed_batch_is_named(c10: Made, change: dict, message: str):
    batch = pickle.loads((c10.folder / "test_batch").read_bytes(), encoding="bytes")
    (c10.folder / "test_batch").write_bytes(py3_pickle({**batch, **change}))
    with pytest.raises(UserError, match=rf"test_batch.*{message}"):
        load_cifar("cifar10", c10.folder)


def test_wrong_number_of_class_names(c10: Made):
    (c10.folder / "batches.meta").write_bytes(py3_pickle({b"label_names": CIFAR10_NAMES[:9]}))
    with pytest.raises(UserError, match="batches.meta.*9 class names"):
        load_cifar("cifar10", c10.folder)


class Exploit:
    """Pickles as a call of ``func(arg)``: what a malicious batch file would run on load."""

    def __init__(self, func, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("as_archive", [False, True])
def test_pickle_with_a_forbidden_global_is_refused_unrun(tmp_path: Path, c10: Made, kind: str, as_archive: bool):
    marker = tmp_path / "pwned"
    if kind == "os.system":
        exploit = Exploit(os.system, f"touch {shlex.quote(str(marker))}")
    else:
        exploit = Exploit(exec, f"open({str(marker)!r}, 'w').close()")
    (c10.folder / "data_batch_1").write_bytes(py3_pickle({b"data": exploit, b"labels": []}))
    path = make_archive(c10.folder, tmp_path / "evil.tar.gz") if as_archive else c10.folder
    with pytest.raises(UserError, match="not a CIFAR batch file") as info:
        load_cifar("cifar10", path)
    message = str(info.value)
    assert "data_batch_1" in message and "refuses to load" in message
    assert ("system" if kind == "os.system" else "exec") in message
    assert not marker.exists()


def test_codecs_is_allowed_only_for_latin1(c10: Made):
    # Python 3's protocol-2 bytes go through _codecs.encode(text, "latin1"); other codecs stay refused.
    (c10.folder / "data_batch_1").write_bytes(
        b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00base64\x86R."
    )
    with pytest.raises(UserError, match="data_batch_1.*base64"):
        load_cifar("cifar10", c10.folder)


# --- checksums -------------------------------------------------------------------------------------------


def test_official_name_is_checked_against_the_official_md5(tmp_path: Path, c10: Made):
    official = make_archive(c10.folder, tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(UserError, match="MD5") as info:
        load_cifar("cifar10", official)
    message = str(info.value)
    assert "cifar-10-python.tar.gz" in message and "re-download" in message
    assert CIFAR_FILES["cifar10"].md5 in message and md5_of(official) in message
    # also when found inside a folder
    with pytest.raises(UserError, match="MD5"):
        load_cifar("cifar10", tmp_path)

    # The same bytes under another name are someone's own archive: not checked.
    other = tmp_path / "my-cifar.tar.gz"
    shutil.copy(official, other)
    assert_matches(load_cifar("cifar10", other), c10)
    # An explicit MD5 is checked whatever the name; None checks nothing.
    assert_matches(load_cifar("cifar10", official, md5=md5_of(official).upper()), c10)
    assert_matches(load_cifar("cifar10", official, md5=None), c10)
    with pytest.raises(UserError, match="MD5") as info:
        load_cifar("cifar10", other, md5="0" * 32)
    assert "my-cifar.tar.gz" in str(info.value)


def test_md5_of_a_folder_is_refused(c10: Made):
    with pytest.raises(UserError, match="folder"):
        load_cifar("cifar10", c10.folder, md5="0" * 32)


def test_unknown_name_and_missing_path(tmp_path: Path):
    with pytest.raises(UserError, match="cifar10, cifar100"):
        load_cifar("cifar1000", tmp_path)
    with pytest.raises(UserError, match="nothing-here"):
        load_cifar("cifar10", tmp_path / "nothing-here")
    with pytest.raises(UserError, match="cifar-10-python.tar.gz"):
        load_cifar("cifar10", tmp_path)  # an empty folder


# --- recognising ------------------------------------------------------------------------------------------


def test_is_cifar_path_looks_at_content(tmp_path: Path, c10: Made):
    c100 = make_cifar100(tmp_path / "c100")
    archive = make_archive(c10.folder, tmp_path / "renamed.bin")
    assert is_cifar_path(archive) == "cifar10"
    assert is_cifar_path(c10.folder) == "cifar10"
    assert is_cifar_path(c10.folder.parent) == "cifar10"
    assert is_cifar_path(make_archive(c100.folder, tmp_path / "x.tar.gz")) == "cifar100"
    assert is_cifar_path(c100.folder.parent) == "cifar100"

    # Names alone are not enough.
    fake_folder = tmp_path / "fake" / "cifar-10-batches-py"
    fake_folder.mkdir(parents=True)
    (fake_folder / "batches.meta").write_text("not a pickle")
    (fake_folder / "data_batch_1").write_text("not a pickle")
    assert is_cifar_path(fake_folder.parent) is None
    fake_archive = tmp_path / "cifar-10-python.tar.gz"
    fake_archive.write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    assert is_cifar_path(fake_archive) is None
    image_folder = tmp_path / "images" / "cat"
    image_folder.mkdir(parents=True)
    assert is_cifar_path(image_folder.parent) is None
    assert is_cifar_path(make_archive(image_folder.parent, tmp_path / "images.tar.gz")) is None
    assert is_cifar_path(tmp_path / "absent") is None


# --- finding and downloading ------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real HTTP server on 127.0.0.1 serving ``served/``, with a log of the paths requested."""
    monkeypatch.setenv("no_proxy", "*")  # a proxy set in the environment must not see the local server
    served = tmp_path / "served"
    served.mkdir()
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            requested.append(self.path)
            if self.path == "/cut-short":  # the connection drops in the middle of the file
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(b"x" * 1000)
                self.close_connection = True
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield SimpleNamespace(dir=served, url=f"http://127.0.0.1:{httpd.server_address[1]}", requested=requested)
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def served_archive(server, c10: Made) -> tuple[str, str]:
    """The URL and MD5 of a tiny CIFAR-10 archive on the local server."""
    archive = make_archive(c10.folder, server.dir / "tiny.tar.gz")
    return f"{server.url}/tiny.tar.gz", md5_of(archive)


def test_download_lands_atomically_and_loads(tmp_path: Path, server, served_archive, c10: Made):
    url, md5 = served_archive
    root = tmp_path / "new" / "root"  # created on the way
    path = download_cifar("cifar10", root, url=url, md5=md5)
    assert path == root / "cifar-10-python.tar.gz"
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]  # no .part left
    assert md5_of(path) == md5
    assert_matches(load_cifar("cifar10", path, md5=md5), c10)
    assert server.requested == ["/tiny.tar.gz"]

    # Already there with the right MD5: no second request.
    assert download_cifar("cifar10", root, url=url, md5=md5) == path
    assert server.requested == ["/tiny.tar.gz"]


def test_download_replaces_a_bad_existing_file(tmp_path: Path, server, served_archive):
    url, md5 = served_archive
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"half a file")
    path = download_cifar("cifar10", tmp_path, url=url, md5=md5)
    assert md5_of(path) == md5 and len(server.requested) == 1


def test_download_with_wrong_md5_leaves_nothing(tmp_path: Path, server, served_archive):
    url, _ = served_archive
    root = tmp_path / "root"
    with pytest.raises(UserError, match="MD5") as info:
        download_cifar("cifar10", root, url=url, md5="0" * 32)
    assert url in str(info.value)
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("path", ["/absent.tar.gz", "/cut-short"])
def test_download_failures_name_the_url_and_leave_nothing(tmp_path: Path, server, path: str):
    url = server.url + path
    with pytest.raises(UserError, match="404" if path == "/absent.tar.gz" else "download of") as info:
        download_cifar("cifar10", tmp_path, url=url, md5="0" * 32)
    assert url in str(info.value)
    assert list(tmp_path.glob("cifar-10-python.tar.gz*")) == []


def test_download_interrupted_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    class Response(io.BytesIO):  # a first chunk arrives, then Ctrl-C
        def read(self, size: int = -1) -> bytes:
            if self.tell():
                raise KeyboardInterrupt
            return super().read(10)

    monkeypatch.setattr(cifar.urllib.request, "urlopen", lambda url, timeout: Response(b"x" * 100))
    with pytest.raises(KeyboardInterrupt):
        download_cifar("cifar10", tmp_path, url="http://example.invalid/c.tar.gz", md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_download_from_nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("no_proxy", "*")
    url = "http://127.0.0.1:1/x.tar.gz"  # port 1: nothing listens there
    with pytest.raises(UserError, match="x.tar.gz"):
        download_cifar("cifar10", tmp_path, url=url, md5="0" * 32, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_find_without_download_says_how(tmp_path: Path):
    with pytest.raises(UserError, match="--download") as info:
        find_cifar("cifar10", tmp_path / "cache", download=False)
    assert str(tmp_path / "cache") in str(info.value) and "--data" in str(info.value)


def test_find_prefers_what_is_there(tmp_path: Path, c10: Made):
    assert find_cifar("cifar10", c10.folder.parent, download=False) == c10.folder
    archive = make_archive(c10.folder, tmp_path / "cifar-10-python.tar.gz")
    assert find_cifar("cifar10", tmp_path, download=True) == archive  # present: no download


def test_find_downloads_when_asked(tmp_path: Path, server, served_archive, c10: Made, monkeypatch):
    url, md5 = served_archive
    monkeypatch.setitem(CIFAR_FILES, "cifar10", replace(CIFAR_FILES["cifar10"], url=url, md5=md5))
    root = tmp_path / "cache"
    path = find_cifar("cifar10", root, download=True)
    assert path == root / "cifar-10-python.tar.gz"
    assert_matches(load_cifar("cifar10", path), c10)  # "auto": the (patched) official MD5 matches
    assert cifar.CIFAR_FILES["cifar10"].url == url
