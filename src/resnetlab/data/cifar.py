"""CIFAR-10 and CIFAR-100 in their official "python version" archives, read safely and downloaded atomically.

The batches are Python 2 pickles, so reading them means unpickling files from the internet. A restricted
unpickler accepts only the few globals that a pickled numpy uint8 array needs: a file that asks for anything
else (``os.system``, ``builtins.eval``, ...) is refused before that object is ever looked up.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import UserError
from .types import DataSource, ImageArray

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2 has no numpy._core
    from numpy.core.multiarray import _reconstruct


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant lives: its archive, the folder inside it, and the files in that folder."""

    name: str
    archive: str  # the official archive's file name
    folder: str  # the folder the archive holds
    url: str
    md5: str  # of the archive
    train: tuple[str, ...]  # batch files of the training split, in order
    test: tuple[str, ...]
    meta: str
    label_key: str  # key of the labels in a batch
    names_key: str  # key of the class names in the meta file
    num_classes: int


CIFAR_FILES: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        name="cifar10",
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
    ),
    "cifar100": CifarSpec(
        name="cifar100",
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=("train",),
        test=("test",),
        meta="meta",
        label_key="fine_labels",  # the 100 classes; the 20 coarse superclasses are not used
        names_key="fine_label_names",
        num_classes=100,
    ),
}

_PIXELS = 3 * 32 * 32  # one row of a batch: 1024 red, then 1024 green, then 1024 blue values, row-major


def _spec(name: str) -> CifarSpec:
    if name not in CIFAR_FILES:
        raise UserError(f"unknown CIFAR data set {name!r}: expected one of {', '.join(CIFAR_FILES)}")
    return CIFAR_FILES[name]


# --- safe unpickling -------------------------------------------------------------------------------------


def _latin1_bytes(text: str, encoding: str) -> bytes:
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(text, "latin1"); allow only that use.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# Everything a CIFAR batch may name. The official files (Python 2, numpy of 2009) use the
# numpy.core names; files re-written by numpy 2 use numpy._core, and by Python 3 also _codecs.encode.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``_ALLOWED_GLOBALS`` and never imports anything."""

    def __init__(self, data: bytes, where: str) -> None:
        # encoding="bytes": the Python 2 str keys and values come back as bytes, not decoded text.
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UserError(f"not a CIFAR batch file: {self.where} refuses to load {module}.{name}") from None


def _unpickle(data: bytes, where: str) -> dict[str, Any]:
    """The dict stored in one batch or meta file, with its keys as str."""
    try:
        obj = _CifarUnpickler(data, where).load()
    except UserError:
        raise
    except Exception as exc:  # any failure on untrusted bytes just means "not a valid file"
        raise UserError(f"not a CIFAR batch file: {where} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise UserError(f"not a CIFAR batch file: {where} holds a {type(obj).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _entry(batch: dict[str, Any], key: str, where: str) -> Any:
    if key not in batch:
        raise UserError(f"not a CIFAR batch file: {where} has no {key!r} entry (it has {sorted(batch)})")
    return batch[key]


def _parse_batch(data: bytes, where: str, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one batch file."""
    batch = _unpickle(data, where)
    pixels = _entry(batch, "data", where)
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise UserError(f"{where}: 'data' must be a uint8 array of shape (N, {_PIXELS})")
    if pixels.shape[1] != _PIXELS:
        raise UserError(f"{where}: 'data' has shape {pixels.shape}, expected (N, {_PIXELS})")
    raw_labels = _entry(batch, spec.label_key, where)
    if isinstance(raw_labels, list) and all(type(x) is int for x in raw_labels):
        labels = np.array(raw_labels, dtype=np.int64)
    elif isinstance(raw_labels, np.ndarray) and raw_labels.ndim == 1 and raw_labels.dtype.kind in "iu":
        labels = raw_labels.astype(np.int64)
    else:
        raise UserError(f"{where}: {spec.label_key!r} must be a list of integers")
    if len(labels) != len(pixels):
        raise UserError(f"{where}: {len(labels)} labels for {len(pixels)} images")
    bad = labels[(labels < 0) | (labels >= spec.num_classes)]
    if len(bad):
        raise UserError(f"{where}: label {bad[0]} out of range 0..{spec.num_classes - 1}")
    # Each row is the channel-major, row-major flattening of one (3, 32, 32) image.
    return pixels.reshape(-1, 3, 32, 32), labels


def _parse_meta(data: bytes, where: str, spec: CifarSpec) -> list[str]:
    names = _entry(_unpickle(data, where), spec.names_key, where)
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise UserError(f"{where}: {spec.names_key!r} must be a list of names")
    if len(names) != spec.num_classes:
        raise UserError(f"{where}: {len(names)} class names, expected {spec.num_classes}")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


# --- where the files are ---------------------------------------------------------------------------------


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):  # in chunks: the archives are 160 MB
            digest.update(chunk)
    return digest.hexdigest()


def _check_md5(path: Path, expected: str) -> None:
    actual = _file_md5(path)
    if actual != expected.lower():
        raise UserError(
            f"{path}: MD5 is {actual}, expected {expected.lower()}: the file is corrupt or incomplete; "
            "delete it and re-download it"
        )


def _resolve(spec: CifarSpec, path: Path) -> Path:
    """The archive or the extracted folder that ``path`` is or contains."""
    if path.is_file():
        return path
    if path.is_dir():
        if (path / spec.meta).is_file():  # the extracted folder itself, maybe renamed
            return path
        if (path / spec.folder).is_dir():
            return path / spec.folder
        if (path / spec.archive).is_file():
            return path / spec.archive
        raise UserError(
            f"{path}: no {spec.name} data here (expected {spec.archive}, a {spec.folder} folder, "
            f"or the files of that folder)"
        )
    raise UserError(f"{path}: no such file or folder")


def _archive_members(archive: Path, folder: str, names: set[str]) -> Iterator[tuple[str, bytes]]:
    """(name, content) of the wanted files in ``folder`` of a tar archive, in archive order.

    The archive is read once, front to back: random access in a .tar.gz would decompress it again and again.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parent, _, name = member.name.removeprefix("./").rpartition("/")
                if member.isfile() and parent == folder and name in names:
                    names = names - {name}  # a name listed twice: the first copy counts
                    f = tar.extractfile(member)
                    assert f is not None  # a regular file always has content
                    yield name, f.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise UserError(
            f"cannot read CIFAR archive {archive}: {exc} (truncated or corrupt? delete it and download again)"
        ) from exc


def _folder_members(folder: Path, names: set[str]) -> Iterator[tuple[str, bytes]]:
    for name in sorted(names):
        if (folder / name).is_file():
            try:
                data = (folder / name).read_bytes()
            except OSError as exc:
                raise UserError(f"cannot read {folder / name}: {exc}") from exc
            yield name, data


def load_cifar(name: str, path: Path, *, md5: str | None | Literal["auto"] = "auto") -> DataSource:
    """Read CIFAR-10 or CIFAR-100 from its .tar.gz archive, its extracted folder, or a folder holding either.

    ``md5``: "auto" checks an archive bearing the official file name against the official MD5 (other
    names are someone's own files); a hex string checks the archive against it; None checks nothing.
    """
    spec = _spec(name)
    source = _resolve(spec, Path(path))
    is_archive = source.is_file()
    if md5 == "auto":
        md5 = spec.md5 if is_archive and source.name == spec.archive else None
    if md5 is not None:
        if not is_archive:
            raise UserError(f"{source}: an MD5 was given, but this is a folder, not an archive")
        _check_md5(source, md5)

    wanted = {*spec.train, *spec.test, spec.meta}
    if is_archive:
        members = _archive_members(source, spec.folder, wanted)
        where = {n: f"{source}::{spec.folder}/{n}" for n in wanted}
    else:
        members = _folder_members(source, wanted)
        where = {n: str(source / n) for n in wanted}
    # Parse each file as it is read, so only one file's raw bytes are held at a time.
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    classes: list[str] = []
    with contextlib.closing(members):
        for member, data in members:
            if member == spec.meta:
                classes = _parse_meta(data, where[member], spec)
            else:
                batches[member] = _parse_batch(data, where[member], spec)
    missing = sorted(wanted - set(batches) - ({spec.meta} if classes else set()))
    if missing:
        raise UserError(f"{source}: not a complete {name} data set, missing {', '.join(where[n] for n in missing)}")

    def split(files: tuple[str, ...]) -> ImageArray:
        images = np.concatenate([batches[f][0] for f in files])  # a copy: writable, owned by torch
        labels = np.concatenate([batches[f][1] for f in files])
        return ImageArray(torch.from_numpy(images), torch.from_numpy(labels))

    return DataSource(
        name=name, classes=classes, splits={"train": split(spec.train), "test": split(spec.test)}, origin=path
    )


def is_cifar_path(path: Path) -> str | None:
    """Which CIFAR ("cifar10", "cifar100" or None) ``path`` is, or holds, as an archive or extracted folder.

    Judged by content: an archive's first entry must lie in the official folder, whatever the archive's
    name; a folder must hold a meta file with the class names. Never raises: anything unreadable is None.
    """
    path = Path(path)
    for spec in CIFAR_FILES.values():
        try:
            source = _resolve(spec, path)
            if source.is_file():
                if _archive_top_folder(source) == spec.folder:
                    return spec.name
            elif (source / spec.train[0]).is_file():
                _parse_meta((source / spec.meta).read_bytes(), str(source / spec.meta), spec)
                return spec.name
        except (UserError, OSError, tarfile.TarError, EOFError, zlib.error):
            continue
    return None


def _archive_top_folder(archive: Path) -> str | None:
    # Only the first real entry is read: a .tar.gz cannot be listed without decompressing all of it.
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name not in ("", "."):
                return name.split("/")[0]
    return None


# --- finding and downloading -----------------------------------------------------------------------------


def find_cifar(name: str, root: Path, *, download: bool) -> Path:
    """The extracted folder or the official archive in ``root``; downloaded there if absent and asked to."""
    spec = _spec(name)
    root = Path(root)
    for candidate in (root / spec.folder, root / spec.archive):
        if candidate.exists():
            return candidate
    if download:
        return download_cifar(name, root)
    raise UserError(
        f"{name} not found: looked for {root / spec.archive} and {root / spec.folder}; pass --download "
        f"to fetch it from {spec.url}, or point --data at the archive"
    )


def download_cifar(
    name: str, root: Path, *, url: str | None = None, md5: str | None = None, timeout: float = 60
) -> Path:
    """Download the archive to ``root`` (default: the official URL and MD5) and return its path.

    The file is written as ``<archive>.part`` and renamed only once its MD5 is right, so the final name
    never holds a partial or wrong file. An existing file with the right MD5 is kept without downloading.
    """
    spec = _spec(name)
    url = url or spec.url
    expected = (md5 or spec.md5).lower()
    root = Path(root)
    final = root / spec.archive
    if final.is_file() and _file_md5(final) == expected:
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the data folder {root}: {exc}") from exc
    part = final.with_name(final.name + ".part")
    try:
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=timeout) as response, part.open("wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected:
            raise UserError(
                f"download of {url} failed: MD5 is {digest.hexdigest()}, expected {expected}; "
                "try again later (the download was deleted)"
            )
        os.replace(part, final)  # atomic: the final name appears only with the complete file
    except BaseException as exc:  # also Ctrl-C: never leave the .part file behind
        part.unlink(missing_ok=True)
        if isinstance(exc, urllib.error.HTTPError):
            exc.close()  # it holds the open connection, and the UserError below keeps it alive
        if isinstance(exc, (OSError, http.client.HTTPException, ValueError)):
            # URLError and HTTPError are OSErrors; ValueError is a malformed URL
            raise UserError(f"download of {url} failed: {exc}") from exc
        raise
    return final
