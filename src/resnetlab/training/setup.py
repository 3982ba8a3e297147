"""The parts a run is assembled from: device, model, input normalisation, augmentation, loaders."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.augment import BatchAugment
from ..data.loader import InMemoryLoader, StreamingLoader
from ..data.prepare import PreparedData
from ..data.types import ImageArray, Split
from ..errors import UserError
from ..models import create_model, model_entry
from ..models.registry import check_arguments
from .config import TrainConfig
from .distributed import SINGLE_PROCESS, DistInfo


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"--device {spec!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        # PyTorch parses every device type it knows (mps, xpu, meta, ...); resnetlab trains on these two.
        raise UserError(f"--device {spec!r}: resnetlab runs on cpu or cuda[:N] (or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


class Preprocess(nn.Module):
    """uint8 images (0..255) -> normalised float input, optionally channels_last."""

    def __init__(self, mean: list[float], std: list[float], channels_last: bool = False) -> None:
        super().__init__()
        self.register_buffer("scale", 1 / (255 * torch.tensor(std)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1), persistent=False)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * self.scale - self.shift  # (x / 255 - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


_SET_BY_THE_RUN = ("num_classes", "in_chans", "input_size", "plain", "zero_init_residual")


def model_kwargs(config: TrainConfig, data: PreparedData) -> dict[str, Any]:
    """Constructor arguments: ``--model-args`` plus what the data set and the flags decide."""
    clash = [k for k in config.model_args if k in _SET_BY_THE_RUN]
    if clash:
        raise UserError(f"--model-args {clash[0]}: set by the data or by its own flag, not here")
    c, h, w = data.input_shape
    kwargs: dict[str, Any] = {**config.model_args, "num_classes": len(data.classes), "in_chans": c}
    kwargs["input_size"] = (h, w)
    if config.plain:
        kwargs["plain"] = True
    return kwargs


def build_model(config: TrainConfig, data: PreparedData) -> tuple[nn.Module, dict[str, Any]]:
    kwargs = model_kwargs(config, data)
    try:
        model_entry(config.model)
    except ValueError as err:
        raise UserError(f"--model {config.model}: {err}") from None
    try:
        check_arguments(config.model, config.model_args)
    except ValueError as err:
        raise UserError(f"--model-args {err}") from None
    try:
        model = create_model(config.model, zero_init_residual=config.zero_init_residual, **kwargs)
    except (ValueError, TypeError) as err:  # unknown name, bad value, or an argument it does not take
        raise UserError(f"--model {config.model}: {err}") from None
    if config.grad_checkpointing:
        model.set_grad_checkpointing()
    return model, kwargs


def choose_augment(config: TrainConfig, data: PreparedData) -> BatchAugment | None:
    kind = config.augment
    if kind == "auto":
        # Digits are not mirror-symmetric and synthetic data has nothing to learn.
        natural = not (data.name == "digits" or data.name.startswith("synthetic"))
        kind = "crop+flip" if natural else "none"
    if config.alternate_flip and "flip" not in kind:
        raise UserError(f"--alternate-flip needs flips in the training augmentation, which is {kind} here")
    if kind == "none":
        return None
    return BatchAugment(
        crop_padding=config.crop_padding if "crop" in kind else 0,
        flip="flip" in kind,
        pad_mode=config.pad_mode,
        alternate_flip=config.alternate_flip,
    )


def make_loader(
    split: Split,
    batch_size: int,
    *,
    train: bool,
    device: torch.device,
    input_shape: tuple[int, int, int],
    augment: BatchAugment | None = None,
    seed: int = 0,
    workers: int = 2,
    skip_bad_images: bool = False,
    dist: DistInfo = SINGLE_PROCESS,
) -> InMemoryLoader | StreamingLoader:
    """In-memory batches for decoded images, worker processes for files streamed from disk (which crop
    and flip on their own, alternating the flips as ``augment`` says, and skip the files that do not
    decode when ``skip_bad_images``: in-memory data left them out when it was loaded)."""
    common = dict(train=train, seed=seed, rank=dist.rank, world_size=dist.world_size)
    try:
        if isinstance(split, ImageArray):
            return InMemoryLoader(split, batch_size, augment=augment if train else None, device=device, **common)
        c, h, _ = input_shape
        alternate = train and augment is not None and augment.alternate_flip
        return StreamingLoader(
            split,
            batch_size,
            image_size=h,
            channels=c,
            alternate_flip=alternate,
            workers=workers,
            skip_bad_images=skip_bad_images,
            **common,
        )
    except ValueError as err:
        raise UserError(f"--batch-size {batch_size}: {err}") from None
