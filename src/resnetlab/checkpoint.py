"""Checkpoints on disk.

A trained model is one ``model.safetensors`` file: the weights, plus metadata naming the model, its
constructor arguments, the class names and the input normalisation, so that evaluation, prediction
and export need nothing else. A training checkpoint is a folder ``checkpoints/e0003-s000000/`` with
that file and ``state.pt`` (optimiser, scheduler, random-generator states, position, metrics so far).
Folders are written under a temporary name and renamed into place, then ``checkpoints/latest`` is
updated atomically: a reader never sees half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .errors import UserError
from .fileio import atomic_write_bytes, atomic_write_text, fsync_dir
from .models import create_model

FORMAT = "resnetlab"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CHECKSUM_FILE = "checksums.json"
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")  # what a bare torch.save state_dict is named
_CKPT_NAME = re.compile(r"e(\d{4,})-s(\d{6,})")


@dataclass
class ModelInfo:
    """What it takes to rebuild a trained model and feed it: stored in the weights file's metadata."""

    model: str
    model_kwargs: dict[str, Any]
    classes: list[str]
    mean: list[float]  # per-channel input normalisation on the 0..1 scale
    std: list[float]
    input_shape: tuple[int, int, int]  # (C, H, W) of the training images
    # How validation images were cropped (resnetlab.data.folder.fit_image): 1.0 when the data was decoded
    # into memory, EVAL_CROP_FRACTION when it was streamed; predict and eval prepare images the same way.
    crop_fraction: float = 1.0
    epoch: int = 0
    config: str = ""  # the training configuration, as TOML
    extra: dict[str, Any] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        meta = {k: json.dumps(v) for k, v in asdict(self).items()}
        meta.update(format=FORMAT, format_version=str(FORMAT_VERSION))
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str] | None, where: str) -> ModelInfo:
        if not meta or meta.get("format") != FORMAT:
            raise UserError(f"{where}: not a resnetlab model file (no resnetlab metadata)")
        version = int(meta.get("format_version", "0"))
        if version > FORMAT_VERSION:
            raise UserError(
                f"{where}: written by a newer resnetlab (format {version}, this one reads up to "
                f"{FORMAT_VERSION}); upgrade resnetlab"
            )
        try:
            values = {k: json.loads(meta[k]) for k in cls.__dataclass_fields__ if k in meta}
            values["input_shape"] = tuple(values["input_shape"])
            if "crop_fraction" not in values:
                values["crop_fraction"] = _unrecorded_crop_fraction(values["input_shape"])
            return cls(**values)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{where}: damaged resnetlab metadata ({err})") from None

    def build(self) -> nn.Module:
        """A fresh model of the recorded architecture (weights not loaded)."""
        return create_model(self.model, **self.model_kwargs)


def _unrecorded_crop_fraction(input_shape: tuple[int, int, int]) -> float:
    """The validation crop of a model file written before it was recorded: images larger than the
    in-memory limit were always streamed (smaller ones only when the data set passed 2 GiB, rarely)."""
    from .data.folder import EVAL_CROP_FRACTION, IN_MEMORY_MAX_SIDE

    return EVAL_CROP_FRACTION if max(input_shape[1:]) > IN_MEMORY_MAX_SIDE else 1.0


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_model_file(path: Path, state_dict: dict[str, torch.Tensor], info: ModelInfo) -> str:
    """Write weights and metadata atomically, with a checksum of the weights in the metadata (so a
    damaged or altered file is detected when read); returns the file's SHA-256."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    data = st_save(tensors, metadata={**info.to_metadata(), "weights_sha256": tensors_digest(tensors)})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], ModelInfo]:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror})") from None
    try:
        state = st_load(data)
        meta = _safetensors_metadata(data)
    except (SafetensorError, ValueError) as err:
        raise UserError(f"{path}: not a readable safetensors file, damaged or truncated ({err})") from None
    info = ModelInfo.from_metadata(meta, str(path))
    expected = (meta or {}).get("weights_sha256")
    if expected is not None and tensors_digest(state) != expected:
        raise UserError(f"{path}: the weights do not match their stored checksum (the file is damaged)")
    return state, info


def _safetensors_metadata(data: bytes) -> dict[str, str] | None:
    # The format: an 8-byte little-endian header length, then a JSON header whose "__metadata__" holds
    # the string map (https://github.com/huggingface/safetensors#format).
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or n > len(data) - 8:
        raise ValueError("bad header length")
    return json.loads(data[8 : 8 + n]).get("__metadata__")


# --- training checkpoints -------------------------------------------------------------------------


def checkpoint_name(epoch: int, step: int) -> str:
    """``e0003-s000000``: after 3 whole epochs; ``e0003-s000120``: 120 steps into the fourth."""
    return f"e{epoch:04d}-s{step:06d}"


def save_checkpoint(
    run_dir: Path,
    state_dict: dict[str, torch.Tensor],
    info: ModelInfo,
    train_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write a training checkpoint folder atomically, point ``latest`` at it, prune old ones."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(train_state["epoch"], train_state["step"])
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        digest = save_model_file(tmp / MODEL_FILE, state_dict, info)
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save({**train_state, "model_sha256": digest}, f)
            f.flush()
            os.fsync(f.fileno())
        sums = {name: _file_sha256(tmp / name) for name in (MODEL_FILE, STATE_FILE)}
        atomic_write_text(tmp / CHECKSUM_FILE, json.dumps(sums, indent=1) + "\n")
        final = root / name
        if final.exists():  # a duplicate left by a run killed before it updated `latest`
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", name + "\n")
    _prune(root, keep, name)
    return final


def _prune(root: Path, keep: int, newest: str) -> None:
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and _CKPT_NAME.fullmatch(p.name))
    names = [n for n in names if n <= newest]
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in names[:-keep]:
        # Renamed first (atomic), then deleted: a run killed inside the deletion leaves a .tmp- folder
        # that the next prune removes, never a checkpoint name over a half-deleted folder.
        doomed = root / f".tmp-pruned-{old}"
        try:
            (root / old).rename(doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` points to; without a readable pointer, the newest complete folder."""
    root = run_dir / "checkpoints"
    try:
        name = (root / "latest").read_text().strip()
        if _CKPT_NAME.fullmatch(name) and (root / name / STATE_FILE).is_file():
            return root / name
    except OSError:
        pass
    if not root.is_dir():
        return None
    complete = sorted(p for p in root.iterdir() if _CKPT_NAME.fullmatch(p.name) and (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def intact_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders to try on resume: ``latest`` first, then the others, newest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = sorted((p for p in root.iterdir() if _CKPT_NAME.fullmatch(p.name) and p.is_dir()), reverse=True)
    newest = latest_checkpoint(run_dir)
    if newest is not None and newest in found:
        found.remove(newest)
        found.insert(0, newest)
    return found


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(ckpt: Path) -> None:
    """Raise :class:`UserError` unless both files of ``ckpt`` match the checksums stored beside them."""
    try:
        sums = json.loads((ckpt / CHECKSUM_FILE).read_text())
    except (OSError, ValueError):
        raise UserError(f"{ckpt}: no readable {CHECKSUM_FILE} (incomplete or damaged checkpoint)") from None
    for name in (MODEL_FILE, STATE_FILE):
        try:
            actual = _file_sha256(ckpt / name)
        except OSError as err:
            raise UserError(f"{ckpt / name}: cannot read it ({err.strerror})") from None
        if actual != sums.get(name):
            raise UserError(f"{ckpt / name}: does not match its checksum in {CHECKSUM_FILE} (damaged)")


def load_train_state(ckpt: Path) -> dict[str, Any]:
    verify_checkpoint(ckpt)
    try:
        with open(ckpt / STATE_FILE, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for damaged files
        raise UserError(f"{ckpt / STATE_FILE}: cannot read the training state ({err})") from None
    version = state.get("format_version", 0) if isinstance(state, dict) else None
    if version is None or version > FORMAT_VERSION:
        raise UserError(
            f"{ckpt / STATE_FILE}: training state of format {version}, this resnetlab reads up to {FORMAT_VERSION}"
        )
    return state


def is_checkpoint_part(path: Path) -> bool:
    """Whether ``path`` is one of the files a training checkpoint is made of (its weights, training
    state, checksums, or the ``latest`` pointer): replacing one damages or loses the checkpoint.

    Other files in a checkpoint folder are not its parts (an export beside the weights, ``model.onnx``).
    """
    folder = path.parent
    if path.name == "latest" and folder.name == "checkpoints":
        return True
    in_checkpoint = bool(_CKPT_NAME.fullmatch(folder.name)) or (folder / STATE_FILE).is_file()
    return in_checkpoint and path.name in (MODEL_FILE, STATE_FILE, CHECKSUM_FILE)


# --- loading a trained model ----------------------------------------------------------------------


def resolve_model_file(path: str | Path) -> Path:
    """A run folder, a checkpoint folder or a weights file -> the weights file to load."""
    path = Path(path)
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise UserError(f"{path}: no checkpoint in this folder (expected a run or checkpoint folder)")
        return ckpt / MODEL_FILE
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    return path


def is_state_dict_file(path: Path) -> bool:
    """Whether ``path`` is named as a ``torch.save`` file: torchvision's ``.pth``, ``.pt``, Hugging Face's
    ``pytorch_model.bin``, Lightning's ``.ckpt`` and timm's ``.pth.tar`` (the last two keep the weights
    under ``"state_dict"``)."""
    return path.suffix in STATE_DICT_SUFFIXES


def load_model(
    path: str | Path,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    map_location: str | torch.device = "cpu",
    model_option: str = "model_name=NAME",
) -> tuple[nn.Module, ModelInfo | None]:
    """Load a trained model in eval mode from a run folder, a checkpoint or a weights file.

    A plain ``state_dict`` saved with ``torch.save`` (for example a torchvision checkpoint, ``.pth``)
    loads too when ``model_name`` says which architecture it is; its class count is read off the
    classifier unless given. Such files are read with ``weights_only=True`` (no code runs).
    ``model_option``: how the error for a state_dict without ``model_name`` tells the caller to name the
    model (the command line passes its own flag, ``--model NAME``).
    """
    file = resolve_model_file(path)
    if file.suffix == ".safetensors":
        state, info = read_model_file(file)
        if model_name is not None and model_name != info.model:
            raise UserError(f"{file}: holds a {info.model}, not a {model_name}")
        model = info.build()
    elif not is_state_dict_file(file):
        raise UserError(
            f"{file}: not a model file (expected a run or checkpoint folder, a resnetlab .safetensors file or "
            f"a PyTorch state_dict: {', '.join(STATE_DICT_SUFFIXES)})"
        )
    else:
        if model_name is None:
            raise UserError(f"{file}: a bare state_dict; say which model it is ({model_option})")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for foreign or damaged files
            raise UserError(f"{file}: not a loadable PyTorch state_dict ({_load_error_line(err)})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UserError(f"{file}: expected a state_dict (a dict of tensors)")
        model = create_model(model_name, **_shape_of_bare_state(model_name, state, num_classes))
        info = None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(f"{file}: the weights do not fit the {model_name or info.model} ({misfit(err)})") from None
    return model.to(map_location).eval(), info


def misfit(err: Exception) -> str:
    """One line from the error of a ``load_state_dict`` that failed: the first two differences.

    PyTorch's first line is only a header ("Error(s) in loading state_dict for ResNet:"); the next ones
    name the keys and shapes that differ, with every key listed.
    """
    lines = str(err).splitlines()
    if not lines:
        return type(err).__name__
    details = [_shorten_key_list(line.strip()) for line in lines[1:] if line.strip()] or [lines[0]]
    more = f"; {len(details) - 2} more differences" if len(details) > 2 else ""
    return "; ".join(details[:2]) + more


def classifier_key(model: nn.Module) -> str | None:
    """The state_dict prefix of ``model``'s classifier (its last linear layer: ``fc``, ``classifier.1``)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def load_trained_model(
    path: str | Path, command: str, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelInfo]:
    """A model with its class names and normalisation, for ``command`` (eval, predict) that needs them:
    only a resnetlab model file has them, so a bare state_dict or any other file is refused up front."""
    file = resolve_model_file(path)
    if file.suffix != ".safetensors":
        what = (
            "a bare state_dict, without class names or normalisation"
            if is_state_dict_file(file)
            else "not a model file"
        )
        raise UserError(
            f"{file}: {what}; {command} takes a run folder, a checkpoint folder or a resnetlab .safetensors file"
        )
    model, info = load_model(file, map_location=map_location)
    assert info is not None  # a .safetensors file loads with its metadata or is refused
    return model, info


def _load_error_line(err: Exception) -> str:
    """One informative line of a ``torch.load`` error, whose messages run to paragraphs.

    A ``weights_only`` refusal opens with advice to load with ``weights_only=False`` (which runs code from
    the file: not advice to pass on) and gives its reason after ``WeightsUnpickler error:``; other
    errors lead with the reason and follow it with guesses (``. This is an internal miniz error...``).
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # terminal colour codes
    _, marker, reason = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (reason if marker else text).splitlines() if line.strip()]
    line = lines[0].split(". ")[0].rstrip(".") if lines else ""
    # A bare KeyError or index from the unpickler ('101') says nothing without its type.
    return line if any(c.isalpha() for c in line) else f"{type(err).__name__}: {line}".rstrip(": ")


def _shorten_key_list(line: str, keep: int = 3) -> str:
    """PyTorch's 'Missing key(s) in state_dict: "a", "b", ...' with only the first keys and a count."""
    head, sep, tail = line.partition(": ")
    keys = re.findall(r'"([^"]+)"', tail)
    if not sep or len(keys) <= keep:
        return line
    return f"{head}: {', '.join(keys[:keep])} and {len(keys) - keep} more"


def _shape_of_bare_state(model_name: str, state: dict, num_classes: int | None) -> dict[str, int]:
    """``num_classes`` and ``in_chans`` for ``model_name`` read off a bare state_dict's weights.

    The model is built once on the meta device (no memory, no initialisation) to learn the names of its
    classifier and first layer; where ``state`` has them, their shapes give the class count and (for a
    convolutional stem) the input channels. Otherwise the builder's defaults stand, and
    ``load_state_dict`` names what does not fit.
    """
    with torch.device("meta"):
        reference = create_model(model_name)
    ref_state = reference.state_dict()
    kwargs: dict[str, int] = {}
    head = classifier_key(reference)
    classifier = state.get(f"{head}.weight") if head else None
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    elif isinstance(classifier, torch.Tensor) and classifier.ndim == 2:
        kwargs["num_classes"] = classifier.shape[0]
    first_name, first_ref = next(iter(ref_state.items()))
    first = state.get(first_name)
    if isinstance(first, torch.Tensor) and first.ndim == first_ref.ndim == 4 and first.shape[1] > 0:
        kwargs["in_chans"] = first.shape[1]  # an ungrouped stem convolution: (out, in, kh, kw)
    return kwargs
