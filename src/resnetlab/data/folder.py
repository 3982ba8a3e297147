"""Image folders in the ImageFolder layout, as folders or tar archives: decoded into memory or streamed.

Layouts (hidden names and non-image files are ignored at every level)::

    root/train/<class>/<images>, root/val/..., root/test/...   -> splits "train", "val", "test"
    root/<class>/<images>                                       -> one split, "images"

``root`` may also be a ``.tar``, ``.tar.gz`` or ``.tgz`` archive holding either layout, optionally below
one top-level folder. Small data sets are decoded once into a uint8 array and cached on disk, so later
runs start in seconds; large ones are returned as lists of files that :class:`ImageFileDataset` decodes
one image at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
import tempfile
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import UserError
from .augment import alternating_flips
from .types import DataSource, FileList, ImageArray

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
ARCHIVE_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")
# Pillow modes that hold one channel; everything else (RGB, RGBA, P, CMYK, LA, ...) becomes RGB.
GRAY_MODES = frozenset({"1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})

# The automatic in-memory choice: small images (CIFAR-like) whose decoded array fits comfortably in RAM.
IN_MEMORY_MAX_BYTES = 2 * 1024**3
IN_MEMORY_MAX_SIDE = 64
# Eval-time resize for streamed data: shorter side to size / 0.875, then a center crop (the ImageNet habit,
# which goes with the random resized crops streamed training draws). In-memory data is cropped whole (1.0).
EVAL_CROP_FRACTION = 0.875
CACHE_FORMAT = 1
# Below this many images a process pool costs more to start than it saves.
POOL_MIN_IMAGES = 1024
_CHUNK = 256

_Result = np.ndarray | str  # a decoded image (H, W) or (H, W, 3), or why it could not be decoded


# --- decoding one image --------------------------------------------------------------------------------


def _load(source: bytes | str | os.PathLike[str]) -> Image.Image:
    """Open and fully decode one image (in its own mode), raising whatever Pillow raises."""
    # A process-wide Pillow switch that some libraries turn on; with it, truncated files decode silently.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        img.load()  # Image.open reads only the header: force the decode so broken files fail here
        return img


def _convert(img: Image.Image, channels: int) -> Image.Image:
    """Convert to "L" (channels=1) or "RGB" (channels=3)."""
    if img.mode.startswith("I;16"):
        # Pillow's I;16 -> L conversion clips at 255, which would turn a 16-bit image white: scale instead.
        img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8))
    return img.convert("L" if channels == 1 else "RGB")


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file Pillow can read (or empty)"
    return f"{type(exc).__name__}: {exc}"


def decode_image(data_or_path: bytes | str | os.PathLike[str], *, channels: int) -> Image.Image:
    """Decode an image (file path or encoded bytes) fully and convert it to "L" (1 channel) or "RGB" (3).

    Raises UserError naming the file when it cannot be decoded (truncated, empty, not an image).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    name = "image data" if isinstance(data_or_path, bytes) else str(data_or_path)
    try:
        return _convert(_load(data_or_path), channels)
    except Exception as exc:  # Pillow's decoders raise many types (OSError, SyntaxError, ValueError, ...)
        raise UserError(f"cannot decode image {name}: {_reason(exc)}") from None


def _resize_shorter(img: Image.Image, shorter: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == shorter:
        return img  # keep the pixels exactly when no resize is needed
    scale = shorter / min(w, h)
    size = (shorter, max(shorter, round(h * scale))) if w <= h else (max(shorter, round(w * scale)), shorter)
    return img.resize(size, Image.Resampling.BILINEAR)  # Pillow antialiases when shrinking


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if (w, h) == (size, size):
        return img
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def fit_image(img: Image.Image, size: int, crop_fraction: float = 1.0) -> Image.Image:
    """Resize the shorter side to ``round(size / crop_fraction)`` and centre-crop ``size`` x ``size``
    (unchanged if already so).

    The one way evaluation images are prepared: decoding into memory (``crop_fraction=1``), streamed
    validation (:data:`EVAL_CROP_FRACTION`) and ``predict`` (the fraction the model was validated with).
    """
    return _center_crop(_resize_shorter(img, round(size / crop_fraction)), size)


def bad_images_error(bad: Sequence[tuple[str, str]]) -> UserError:
    """The error for image files that do not decode, given as (name, reason): the first three are named."""
    listed = "; ".join(f"{name} ({reason})" for name, reason in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return UserError(
        f"cannot decode {len(bad)} image file(s): {listed}{more}. "
        "Remove or replace them, or pass --skip-bad-images to leave them out"
    )


def _decode_chunk(sources: list[bytes | str], image_size: int | None, channels: int | None) -> list[_Result]:
    """Decode a batch of images (runs in pool workers): an array per image, or an error string."""
    out: list[_Result] = []
    for source in sources:
        try:
            img = _load(source)
            img = _convert(img, channels or (1 if img.mode in GRAY_MODES else 3))
            if image_size is not None:
                img = fit_image(img, image_size)
            out.append(np.asarray(img))
        except Exception as exc:  # recorded per file; the caller decides to skip or to raise
            out.append(_reason(exc))
    return out


def _worker_count() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 8))


class _Decoder:
    """Decodes images in chunks, in a process pool once there is enough work; results in input order.

    Tracks the decoded bytes and largest side so a caller can stop early when the data turns out too
    large to hold in memory.
    """

    def __init__(self, image_size: int | None, channels: int | None) -> None:
        self.image_size, self.channels = image_size, channels
        self.results: list[_Result] = []
        self.nbytes = 0
        self.max_side = 0
        self._chunk: list[bytes | str] = []
        self._pending: deque[Future[list[_Result]]] = deque()
        self._submitted = 0
        self._workers = _worker_count()
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, source: bytes | str) -> None:
        self._chunk.append(source)
        # Small first chunks, so that a caller learns early that images are too large for memory.
        if len(self._chunk) >= (16 if self._submitted < 64 else _CHUNK):
            self._flush()
        self._collect(block=len(self._pending) > 2 * self._workers)  # bound the work held in flight

    def finish(self) -> list[_Result]:
        self._flush()
        while self._pending:
            self._collect(block=True)
        self.close()
        return self.results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()

    def _flush(self) -> None:
        if not self._chunk:
            return
        chunk, self._chunk = self._chunk, []
        self._submitted += len(chunk)
        if self._pool is None and self._workers > 1 and self._submitted >= POOL_MIN_IMAGES:
            self._pool = ProcessPoolExecutor(self._workers)
        if self._pool is None:
            self._accept(_decode_chunk(chunk, self.image_size, self.channels))
        else:
            self._pending.append(self._pool.submit(_decode_chunk, chunk, self.image_size, self.channels))

    def _collect(self, *, block: bool) -> None:
        while self._pending and (block or self._pending[0].done()):
            self._accept(self._pending.popleft().result())
            block = False

    def _accept(self, results: list[_Result]) -> None:
        for r in results:
            if isinstance(r, np.ndarray):
                self.nbytes += r.nbytes
                self.max_side = max(self.max_side, *r.shape[:2])
        self.results.extend(results)

    def too_large(self) -> bool:
        """Whether the images decoded so far already rule out the automatic in-memory choice."""
        return self.max_side > IN_MEMORY_MAX_SIDE or self.nbytes > IN_MEMORY_MAX_BYTES


# --- finding the files ---------------------------------------------------------------------------------


def _is_image_name(parts: tuple[str, ...]) -> bool:
    return os.path.splitext(parts[-1])[1].lower() in IMAGE_EXTENSIONS


def _is_hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") for p in parts)


def _is_archive(root: Path) -> bool:
    return root.name.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass
class _Scan:
    """Where the images are: keys are paths relative to a folder, or member names in an archive."""

    root: Path
    archive: bool
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]  # split -> [(key, label)], sorted by label then key

    def display(self, key: str) -> str:
        return f"{self.root}::{key}" if self.archive else str(self.root / key)

    def file_lists(self) -> dict[str, FileList]:
        return {
            split: FileList([self.display(k) for k, _ in items], torch.tensor([lb for _, lb in items]))
            for split, items in self.splits.items()
        }


@dataclass
class _Tree:
    """Image files ({path parts: key}) and folders (path parts) found below a root, hidden names left out.

    ``prefix`` is a top-level folder of an archive that was stripped from the parts (not from the keys).
    """

    files: dict[tuple[str, ...], str]
    dirs: set[tuple[str, ...]]
    prefix: tuple[str, ...] = ()


def _walk_folder(root: Path) -> _Tree:
    """The image files and folders below ``root``."""
    with os.scandir(root) as entries:
        tops = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if any(t in SPLIT_NAMES for t in tops):
        tops = [t for t in tops if t in SPLIT_NAMES]  # don't walk folders the split layout ignores
    files: dict[tuple[str, ...], str] = {}
    dirs: set[tuple[str, ...]] = set()
    for top in tops:
        # followlinks: class folders are often symlinks into a shared data set.
        for here, dirnames, filenames in os.walk(root / top, followlinks=True):
            rel = Path(here).relative_to(root).parts
            dirs.add(rel)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                parts = (*rel, f)
                if not f.startswith(".") and _is_image_name(parts):
                    files[parts] = "/".join(parts)
    return _Tree(files, dirs)


def _walk_archive(root: Path, on_image: Callable[[str, bytes], None] | None = None) -> _Tree:
    """The image members (keys: member names) and folders of an archive, read once from start to end.

    Stream mode ("r|*") never seeks back, which keeps a .tar.gz fast. ``on_image`` gets each image's
    member name and bytes as it passes by.
    """
    files: dict[tuple[str, ...], str] = {}
    dirs: set[tuple[str, ...]] = set()
    try:
        with tarfile.open(root, "r|*") as tar:
            for member in tar:
                parts = tuple(p for p in member.name.split("/") if p not in ("", "."))
                if not parts or _is_hidden(parts):
                    continue
                if member.isdir():
                    dirs.add(parts)
                elif member.isfile() and _is_image_name(parts):
                    files[parts] = member.name  # a later member of the same name replaces it, as in tar
                    dirs.update(parts[:i] for i in range(1, len(parts)))
                    if on_image is not None:
                        handle = tar.extractfile(member)
                        assert handle is not None
                        on_image(member.name, handle.read())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read archive {root}: {exc}") from None
    # A single top-level folder around the layout (e.g. "cifar/train/cat/1.jpg") is just packaging.
    tops = {p[0] for p in dirs} | {p[0] for p in files}
    if len(tops) == 1 and not tops & set(SPLIT_NAMES) and files and all(len(p) >= 3 for p in files):
        return _Tree({p[1:]: key for p, key in files.items()}, {p[1:] for p in dirs if len(p) > 1}, (*tops,))
    return _Tree(files, dirs)


def _layout(root: Path, archive: bool, tree: _Tree, classes: Sequence[str] | None) -> _Scan:
    """Assign splits and labels; the class list comes from "train" (or ``classes`` when given)."""
    files, dirs = tree.files, tree.dirs
    tops = {p[0] for p in dirs if p} | {p[0] for p in files if len(p) > 1}
    split_prefix = {s: (s,) for s in SPLIT_NAMES if s in tops} or {"images": ()}
    scan = _Scan(root, archive, [], {})

    def folder(parts: tuple[str, ...]) -> str:
        return f"{root}::{'/'.join(tree.prefix + parts)}/" if archive else str(root.joinpath(*parts))

    by_split: dict[str, dict[str, list[str]]] = {}
    for split, prefix in split_prefix.items():
        n = len(prefix)
        # Class folders: every folder right below the split, with images or not (empty ones are errors).
        found: dict[str, list[str]] = {p[n]: [] for p in dirs if len(p) > n and p[:n] == prefix}
        for parts, key in files.items():
            if len(parts) > n + 1 and parts[:n] == prefix:  # files directly in a split folder are ignored
                found.setdefault(parts[n], []).append(key)
        by_split[split] = found

    reference = "train" if "train" in by_split else next(iter(by_split))
    if classes is not None:
        scan.classes = list(classes)
    elif reference == "train" or len(by_split) == 1:
        scan.classes = sorted(by_split[reference])
    else:  # only val/test: there is no train split to take the classes from, so take them all
        scan.classes = sorted({c for found in by_split.values() for c in found})
    if not scan.classes:
        raise UserError(
            f"no class folders found in {root}: expected <root>/<class>/<image> or "
            f"<root>/train/<class>/<image> (image files: {', '.join(IMAGE_EXTENSIONS)})"
        )
    index = {c: i for i, c in enumerate(scan.classes)}
    for split, found in by_split.items():
        for cls in sorted(found):
            where = folder((*split_prefix[split], cls))
            if cls not in index:
                source = "the given classes" if classes is not None else f"the {reference} split"
                raise UserError(
                    f"class folder {where} is not a class of {source} ({', '.join(scan.classes)}); "
                    "labels would not match: rename or remove it"
                )
            if not found[cls] and split in ("train", "images"):
                raise UserError(
                    f"class folder {where} has no image files ({', '.join(IMAGE_EXTENSIONS)}): "
                    "add images or remove the folder"
                )
        items = [(key, index[cls]) for cls in sorted(found, key=index.__getitem__) for key in sorted(found[cls])]
        if items:  # an empty val/ or test/ folder is left out rather than giving an empty split
            scan.splits[split] = items
    return scan


def _check_root(root: Path) -> None:
    if not root.exists():
        raise UserError(f"image folder {root} does not exist")
    if root.is_file() and not _is_archive(root):
        raise UserError(f"{root} is neither a folder nor a {'/'.join(ARCHIVE_SUFFIXES)} archive")


def scan_image_folder(root: Path, *, classes: Sequence[str] | None = None) -> tuple[list[str], dict[str, FileList]]:
    """Find the images of a folder or archive without decoding them: (classes, {split: FileList}).

    ``classes`` fixes the class list (e.g. a trained model's) instead of taking the train split's.
    """
    root = Path(root)
    _check_root(root)
    archive = _is_archive(root)
    scan = _layout(root, archive, _walk_archive(root) if archive else _walk_folder(root), classes)
    return scan.classes, scan.file_lists()


# --- the decode cache ----------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$RESNETLAB_CACHE``, else ``$XDG_CACHE_HOME/resnetlab``, else ``~/.cache/resnetlab``."""
    if os.environ.get("RESNETLAB_CACHE"):
        return Path(os.environ["RESNETLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "resnetlab"


@dataclass
class _Decoded:
    classes: list[str]
    splits: dict[str, ImageArray]
    skipped: list[str]  # keys (relative paths or member names)


def _read_cache(path: Path, key: str) -> _Decoded | None:
    """The cached arrays, or None when missing or unreadable (a broken cache is rebuilt, never an error)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                return None
            splits = {
                s: ImageArray(torch.from_numpy(z[f"images_{s}"]), torch.from_numpy(z[f"labels_{s}"]))
                for s in meta["splits"]
            }
            return _Decoded(list(meta["classes"]), splits, list(meta["skipped"]))
    except FileNotFoundError:
        return None
    except Exception as exc:  # truncated zip, bad JSON, missing entries, wrong dtypes: rebuild it
        warnings.warn(f"ignoring unreadable image cache {path} ({exc}); decoding again", stacklevel=3)
        return None


def _write_cache(path: Path, key: str, decoded: _Decoded) -> None:
    """Write atomically (temp file + fsync + rename) so a crash never leaves a half-written cache."""
    meta = {
        "format": CACHE_FORMAT,
        "key": key,
        "classes": decoded.classes,
        "splits": list(decoded.splits),
        "skipped": decoded.skipped,
    }
    arrays = {"meta": np.array(json.dumps(meta))}
    for s, arr in decoded.splits.items():
        arrays[f"images_{s}"] = arr.images.numpy()
        arrays[f"labels_{s}"] = arr.labels.numpy()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".images-", suffix=".tmp", delete=False) as f:
            tmp = f.name
            np.savez(f, **arrays)  # uncompressed: loading is a plain read, the point of the cache
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # a read-only or full disk costs speed next time, nothing else
        warnings.warn(f"could not write image cache {path}: {exc}", stacklevel=3)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _cache_key(payload: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --- loading -------------------------------------------------------------------------------------------


def _assemble(
    scan: _Scan,
    results: dict[str, _Result],
    *,
    channels: int | None,
    skip_bad_images: bool,
    auto: bool,
) -> _Decoded | None:
    """Stack decoded images into arrays per split; None when ``auto`` finds them too large for memory."""
    bad = [k for items in scan.splits.values() for k, _ in items if isinstance(results[k], str)]
    if bad and not skip_bad_images:
        raise bad_images_error([(scan.display(k), str(results[k])) for k in bad])
    decoded = {k: r for k, r in results.items() if isinstance(r, np.ndarray)}
    good = {s: [(k, lb) for k, lb in items if k in decoded] for s, items in scan.splits.items()}
    good = {s: items for s, items in good.items() if items}
    reference = "train" if "train" in scan.splits else next(iter(scan.splits))
    counts = np.bincount([lb for _, lb in good.get(reference, [])], minlength=len(scan.classes))
    if reference in ("train", "images") and (lost := [c for c, n in zip(scan.classes, counts, strict=True) if n == 0]):
        raise UserError(f"no readable images left for class(es) {', '.join(lost)} in {scan.root}")

    first_of_size: dict[tuple[int, int], str] = {}
    for items in good.values():
        for k, _ in items:
            first_of_size.setdefault(decoded[k].shape[:2], k)
    if len(first_of_size) > 1:  # only without image_size: with it, every image is cropped to S x S
        (s1, k1), (s2, k2) = list(first_of_size.items())[:2]
        raise UserError(
            f"images have different sizes: {scan.display(k1)} is {s1[1]}x{s1[0]} and {scan.display(k2)} is "
            f"{s2[1]}x{s2[0]} (width x height); pass --image-size to resize them all to one size"
        )
    (h, w) = next(iter(first_of_size))
    if channels is None:  # one channel only when every image is grayscale
        channels = 1 if all(decoded[k].ndim == 2 for items in good.values() for k, _ in items) else 3
    n = sum(len(items) for items in good.values())
    if auto and (max(h, w) > IN_MEMORY_MAX_SIDE or n * channels * h * w > IN_MEMORY_MAX_BYTES):
        return None

    splits: dict[str, ImageArray] = {}
    for split, items in good.items():
        images = np.empty((len(items), channels, h, w), dtype=np.uint8)
        for i, (k, _) in enumerate(items):
            arr = decoded[k]
            # A grayscale (H, W) image broadcasts over 3 channels, which is what Pillow's L -> RGB does.
            images[i] = arr.transpose(2, 0, 1) if arr.ndim == 3 else arr
        labels = torch.tensor([lb for _, lb in items], dtype=torch.int64)
        splits[split] = ImageArray(torch.from_numpy(images), labels)
    return _Decoded(scan.classes, splits, bad)


def _fingerprint(root: Path, scan: _Scan | None) -> list[object]:
    """What the decoded arrays depend on: the archive's identity, or every file's name, size and mtime."""
    if scan is None:  # an archive: no need to read it to look the cache up
        st = root.stat()
        return [str(root.resolve()), st.st_size, st.st_mtime_ns]
    keys = sorted(k for items in scan.splits.values() for k, _ in items)
    return [(k, st.st_size, st.st_mtime_ns) for k in keys for st in [os.stat(root / k)]]


def _fits_in_memory(arrays: list[ImageArray]) -> bool:
    n_bytes = sum(a.images.numel() for a in arrays)
    return n_bytes <= IN_MEMORY_MAX_BYTES and max(max(a.images.shape[2:]) for a in arrays) <= IN_MEMORY_MAX_SIDE


def _decode_all(
    root: Path,
    scan: _Scan | None,
    image_size: int | None,
    channels: int | None,
    auto: bool,
    classes: Sequence[str] | None,
) -> tuple[_Scan, dict[str, _Result] | None]:
    """Decode every image of a folder (``scan`` given) or archive (scanned while it streams past).

    Results are keyed by relative path or member name; None when ``auto`` and the images turned out
    too large to hold in memory, which stops the decoding early.
    """
    keys: list[str] = []
    gave_up = False
    with _Decoder(image_size, channels) as decoder:

        def add(name: str, item: bytes | str) -> None:
            nonlocal gave_up
            if not gave_up:
                keys.append(name)
                decoder.add(item)
                if auto and decoder.too_large():
                    gave_up = True
                    decoder.close()  # stop the workers and free what they decoded
                    decoder.results.clear()

        if scan is None:  # images in folders the layout ignores get decoded too: a pass can't go back
            scan = _layout(root, True, _walk_archive(root, add), classes)
        else:
            for k in (k for items in scan.splits.values() for k, _ in items):
                add(k, str(root / k))
                if gave_up:
                    break
        if gave_up:
            return scan, None
        return scan, dict(zip(keys, decoder.finish(), strict=True))


def _source_name(root: Path) -> str:
    name = root.resolve().name
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_image_folder(
    root: Path,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    skip_bad_images: bool = False,
    in_memory: bool | None = None,
    cache_dir: Path | None = None,
    classes: Sequence[str] | None = None,
) -> DataSource:
    """Read an image folder or archive into a DataSource: ImageArray splits, or FileList splits to stream.

    ``in_memory=None`` decodes into memory when the uint8 array takes at most 2 GiB and images are at
    most 64x64 (after ``image_size``), and streams otherwise. ``image_size=S`` resizes the shorter side
    to S and center-crops SxS; ``None`` keeps the native size, which must then be the same for all
    images. ``channels=None`` gives 1 when every image is grayscale, else 3. Decoded arrays are cached
    in ``cache_dir`` (default :func:`default_cache_dir`) under a key of the files' names, sizes and
    modification times. When streaming, ``channels`` and bad files are not looked at here: see
    :func:`sniff_channels` and :class:`ImageFileDataset`.
    """
    root = Path(root)
    _check_root(root)
    if image_size is not None and image_size < 1:
        raise UserError(f"--image-size must be a positive number of pixels, got {image_size}")
    if channels not in (None, 1, 3):
        # No command has a --channels flag: the count comes from a model (eval of a 4-channel model, say).
        raise UserError(f"{root}: image files are read as grayscale (1 channel) or RGB (3), not as {channels} channels")
    archive = _is_archive(root)
    auto = in_memory is None
    source = DataSource(_source_name(root), [], origin=root)

    def streaming(scan: _Scan | None = None) -> DataSource:
        if scan is None:
            scan = _layout(root, archive, _walk_archive(root) if archive else _walk_folder(root), classes)
        if archive and not root.name.lower().endswith(".tar"):
            warnings.warn(
                f"streaming images from the compressed archive {root} is slow (each read decompresses from "
                "the start); extract it, or repack it as a plain .tar",
                stacklevel=3,
            )
        source.classes, source.splits = scan.classes, dict(scan.file_lists())
        return source

    if in_memory is False or (auto and image_size is not None and image_size > IN_MEMORY_MAX_SIDE):
        return streaming()

    settings = {
        "image_size": image_size,
        "channels": channels,
        "skip_bad_images": skip_bad_images,
        "classes": None if classes is None else list(classes),
    }
    scan = None if archive else _layout(root, archive, _walk_folder(root), classes)
    key = _cache_key({"format": CACHE_FORMAT, "files": _fingerprint(root, scan), **settings})
    cache_path = Path(cache_dir or default_cache_dir()) / f"images-{key}.npz"

    decoded = _read_cache(cache_path, key)
    if decoded is not None and auto and not _fits_in_memory(list(decoded.splits.values())):
        decoded = None  # cached by a forced in-memory run, while the automatic choice is to stream
    if decoded is None:
        scan, results = _decode_all(root, scan, image_size, channels, auto, classes)
        if results is not None:
            decoded = _assemble(scan, results, channels=channels, skip_bad_images=skip_bad_images, auto=auto)
        if decoded is None:
            return streaming(scan)
        _write_cache(cache_path, key, decoded)

    source.classes = decoded.classes
    source.splits = dict(decoded.splits)
    source.skipped = [f"{root}::{k}" if archive else str(root / k) for k in decoded.skipped]
    return source


# --- streaming -----------------------------------------------------------------------------------------


def _split_archive_path(path: str) -> tuple[str, str] | None:
    """("archive", "member") for an ``archive::member`` path, else None."""
    archive, sep, member = path.partition("::")
    if sep and _is_archive(Path(archive)):
        return archive, member
    return None


def _read_files(paths: Sequence[str]) -> Iterator[tuple[str, bytes | str]]:
    """(path, bytes or file path) for each path; archive members are read in one pass per archive."""
    wanted: dict[str, dict[str, str]] = {}
    for path in paths:
        parsed = _split_archive_path(path)
        if parsed is None:
            yield path, path
        else:
            wanted.setdefault(parsed[0], {})[parsed[1]] = path
    for archive, members in wanted.items():
        try:
            with tarfile.open(archive, "r|*") as tar:
                for member in tar:
                    if member.name in members and member.isfile():
                        handle = tar.extractfile(member)
                        assert handle is not None
                        yield members.pop(member.name), handle.read()
                        if not members:
                            break
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise UserError(f"cannot read archive {archive}: {exc}") from None


def sniff_channels(file_list: FileList, *, sample: int = 200) -> int:
    """1 if a sample of up to ``sample`` images (evenly spread over the list) are all grayscale, else 3.

    For streamed data, where decoding every image first would defeat the purpose; only headers are read.
    """
    n, k = len(file_list), min(len(file_list), sample)
    picks = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})
    modes = []
    for _path, item in _read_files([file_list.paths[i] for i in picks]):
        try:
            with Image.open(io.BytesIO(item) if isinstance(item, bytes) else item) as img:
                modes.append(img.mode)
        except Exception:  # an unreadable file says nothing about the others
            continue
    return 1 if modes and all(m in GRAY_MODES for m in modes) else 3


def _random_resized_crop_box(w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box (left, top, right, bottom) covering 8%..100% of the area, aspect ratio 3/4..4/3.

    Szegedy et al. 2015 ("Going deeper with convolutions"), as torchvision's RandomResizedCrop: ten tries,
    then the largest centered box within the ratio range.
    """
    lo, hi = 3 / 4, 4 / 3
    for _ in range(10):
        area = w * h * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return left, top, left + cw, top + ch
    if w / h < lo:
        cw, ch = w, round(w / lo)
    elif w / h > hi:
        cw, ch = round(h * hi), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


# One item as the streaming loader reads it (see ImageFileDataset.item): the image, None when no file
# could be used; its label; the files that did not decode on the way, as (path, reason).
Item = tuple[torch.Tensor | None, int, list[tuple[str, str]]]

# Training with skip_bad_images takes the next readable file in place of a bad one, looking this far
# ahead: a longer run of unreadable files is a broken folder, not a few bad files, and is an error.
MAX_BAD_IN_A_ROW = 64


class ImageFileDataset(torch.utils.data.Dataset):
    """Decodes the images of a FileList one at a time: items are (uint8 tensor (C, S, S), int label).

    ``channels=None`` takes 1 when a sample of up to 200 files are all grayscale, else 3 (the choice is
    kept in ``.channels``).

    ``train=True``: a random resized crop to ``image_size`` and a random horizontal flip, drawn from a
    generator seeded by (seed, epoch, index), so a run is reproducible whatever the worker count (with
    ``alternate_flip`` each image's flip alternates between epochs, see ``alternating_flips``); call
    :meth:`set_epoch` before each epoch (with ``persistent_workers=True`` workers keep the epoch they
    started with). ``train=False``: :func:`fit_image` with :data:`EVAL_CROP_FRACTION` (shorter side to
    ``round(image_size / 0.875)``, then a center crop).

    Archive members (``archive::member`` paths) are read through a tar file opened lazily in each
    worker. That is fine for a plain ``.tar``; from a ``.tar.gz`` or ``.tgz`` every read decompresses
    from the start of the archive, which is very slow: extract it first. ``ds[i]`` raises UserError
    naming an unreadable file; :meth:`item`, what the streaming loader reads, returns it instead and
    applies ``skip_bad_images``.
    """

    def __init__(
        self,
        file_list: FileList,
        *,
        image_size: int,
        channels: int | None,
        train: bool,
        alternate_flip: bool = False,
        seed: int = 0,
        skip_bad_images: bool = False,
    ) -> None:
        if channels is None:  # decided from a sample of the files: see sniff_channels
            channels = sniff_channels(file_list)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.paths = list(file_list.paths)
        self.labels = file_list.labels.tolist()
        self.image_size, self.channels, self.train, self.seed = image_size, channels, train, seed
        self.alternate_flip = alternate_flip
        self.skip_bad_images = skip_bad_images
        self.epoch = 0
        # archive -> (pid, open tar, member index); reopened in each process, since a forked worker
        # must not share the parent's file position.
        self._tars: dict[str, tuple[int, tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select the random crops and flips of this epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_tars"] = {}  # open files don't travel to spawned workers
        return state

    def _read(self, path: str) -> bytes | str:
        parsed = _split_archive_path(path)
        if parsed is None:
            return path
        archive, member = parsed
        entry = self._tars.get(archive)
        if entry is None or entry[0] != os.getpid():
            tar = tarfile.open(archive)  # noqa: SIM115 (stays open for the dataset's life in this worker)
            # getmember() searches the member list linearly on every call; one dict makes it O(1).
            entry = (os.getpid(), tar, {m.name: m for m in tar.getmembers()})
            self._tars[archive] = entry
        info = entry[2].get(member)
        handle = entry[1].extractfile(info) if info is not None else None
        if handle is None:
            raise FileNotFoundError("no such file in the archive")
        return handle.read()

    def _decode(self, index: int) -> Image.Image | str:
        """The image of file ``index`` in the dataset's channels, or why it could not be read."""
        try:
            return _convert(_load(self._read(self.paths[index])), self.channels)
        except Exception as exc:  # Pillow's decoders and tarfile raise many types; each is one bad file
            return _reason(exc)

    def _tensor(self, img: Image.Image, index: int) -> torch.Tensor:
        """Crop (and when training, flip) the image for position ``index`` of the epoch."""
        size = self.image_size
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            box = _random_resized_crop_box(*img.size, rng)
            img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
            if self.alternate_flip:  # the start is drawn from (seed, index) alone, the same in every epoch
                flip = alternating_flips(bool(np.random.default_rng([self.seed, index]).random() < 0.5), self.epoch)
            else:
                flip = rng.random() < 0.5
            if flip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            img = fit_image(img, size, EVAL_CROP_FRACTION)
        arr = np.array(img)  # a writable copy, which torch.from_numpy wants
        tensor = torch.from_numpy(arr).unsqueeze(0) if arr.ndim == 2 else torch.from_numpy(arr).permute(2, 0, 1)
        return tensor.contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self._decode(index)
        if isinstance(img, str):
            raise bad_images_error([(self.paths[index], img)])
        return self._tensor(img, index), self.labels[index]

    def item(self, index: int) -> Item:
        """``(image, label, bad)`` without raising for unreadable files, which ``bad`` lists.

        Raised in a DataLoader worker, the error would reach the user wrapped in the worker's traceback;
        returned, the loader raises it in the main process or, with ``skip_bad_images``, lists the file.
        Without ``skip_bad_images``, or when validating, a bad file gives image None: the loader raises,
        or leaves the file out of the batch as in-memory loading leaves it out of the data set. When
        training with ``skip_bad_images`` the next readable file of the list stands in (up to
        :data:`MAX_BAD_IN_A_ROW` files on): every training step keeps its ``batch_size`` images, which
        the step count, the position a resumed run restarts from, the processes' equal shares and
        compiled graphs rely on. A file seen twice per bad file in an epoch is cheap next to the
        alternative, checking every file before training, which decodes the whole data set once more.
        """
        bad: list[tuple[str, str]] = []
        tries = min(len(self), MAX_BAD_IN_A_ROW + 1) if self.train and self.skip_bad_images else 1
        for k in range(tries):
            j = (index + k) % len(self)
            img = self._decode(j)
            if not isinstance(img, str):
                # Augmented as position ``index``: a stand-in does not repeat the crop of its own position.
                return self._tensor(img, index), self.labels[j], bad
            bad.append((self.paths[j], img))
        return None, self.labels[index], bad
