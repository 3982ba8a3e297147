"""From a ``--data`` argument to the splits a run trains and evaluates on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from .split import stratified_split
from .types import DataSource, FileList, ImageArray, Split

DATA_NAMES = ("digits", "cifar10", "cifar100", "synthetic")


def default_data_root() -> Path:
    """Where ``cifar10``/``cifar100`` are looked for and downloaded: ``$RESNETLAB_DATA`` or the cache."""
    if os.environ.get("RESNETLAB_DATA"):
        return Path(os.environ["RESNETLAB_DATA"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "resnetlab" / "data"


def load_source(
    spec: str,
    *,
    data_root: str | Path = "",
    download: bool = False,
    image_size: int | None = None,
    channels: int | None = None,
    skip_bad_images: bool = False,
    seed: int = 0,
    in_memory: bool | None = None,
) -> DataSource:
    """Read the data set named or located by ``spec`` (see ``DATA_NAMES``, or a path); ``in_memory``
    decides for image folders, see :func:`~resnetlab.data.folder.load_image_folder`."""
    if spec == "digits":
        from .digits import load_digits

        return load_digits()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from .synthetic import load_synthetic

        return load_synthetic(spec, seed)
    from .cifar import find_cifar, is_cifar_path, load_cifar

    if spec in ("cifar10", "cifar100"):
        root = Path(data_root) if data_root else default_data_root()
        return load_cifar(spec, find_cifar(spec, root, download=download))
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"--data {spec!r}: no such file or folder, and not a data set name ({', '.join(DATA_NAMES)})")
    kind = is_cifar_path(path)
    if kind is not None:
        return load_cifar(kind, path)
    from .folder import load_image_folder

    return load_image_folder(
        path, image_size=image_size, channels=channels, skip_bad_images=skip_bad_images, in_memory=in_memory
    )


@dataclass
class PreparedData:
    """The splits of a run: training, validation (held out from training) and, if any, test."""

    name: str
    classes: list[str]
    train: Split
    val: Split | None
    test: Split | None
    input_shape: tuple[int, int, int]  # (C, H, W) the network sees
    mean: list[float]  # per channel, on the 0..1 scale, from the training split
    std: list[float]
    val_source: str  # "held out x% of train (seed s)", "val folder" or "none"
    skipped: list[str] = field(default_factory=list)


def prepare_data(
    spec: str,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    train_fraction: float = 1.0,
    data_root: str | Path = "",
    download: bool = False,
    image_size: int | None = None,
    channels: int | None = None,
    skip_bad_images: bool = False,
    seed: int = 0,
) -> PreparedData:
    """Load ``spec`` and split it: a ``val`` split of the source is used as is; otherwise a stratified
    ``val_fraction`` of the training split is held out. ``train_fraction`` < 1 then keeps only that
    stratified part of the rest for training. The test split is kept apart, unused unless a command
    asks for it by name.
    """
    source = load_source(
        spec,
        data_root=data_root,
        download=download,
        image_size=image_size,
        channels=channels,
        skip_bad_images=skip_bad_images,
        seed=seed,
    )
    train = source.splits.get("train", source.splits.get("images"))
    if train is None:
        raise UserError(f"--data {spec!r}: no training split (expected a 'train' folder or class folders)")
    if len(source.classes) < 2:
        # A classifier of one class is right without looking (100% from the first step), as synthetic
        # data refuses; evaluation (load_source) still takes a folder of one class the model knows.
        raise UserError(
            f"--data {spec!r}: has only one class folder, {source.classes[0]!r}; training a classifier "
            "needs at least 2 classes"
        )
    val = source.splits.get("val")
    if val is not None:
        val_source = "the data set's own val split"
    elif val_fraction > 0:
        train_idx, val_idx = stratified_split(train.labels, val_fraction, split_seed)
        train, val = train.subset(train_idx), train.subset(val_idx)
        val_source = f"{val_fraction:.0%} of the training split held out (stratified, split seed {split_seed})"
    else:
        val_source = "none"
    if train_fraction < 1:
        # A stratified subset for quick studies; the validation split stays whole.
        keep, _ = stratified_split(train.labels, 1 - train_fraction, split_seed + 1)
        train = train.subset(keep)
    mean, std = channel_stats(train, skip_bad_images=skip_bad_images)
    return PreparedData(
        name=source.name,
        classes=source.classes,
        train=train,
        val=val,
        test=source.splits.get("test"),
        input_shape=sample_shape(train, image_size),
        mean=mean,
        std=std,
        val_source=val_source,
        skipped=source.skipped,
    )


def sample_shape(split: Split, image_size: int | None) -> tuple[int, int, int]:
    if isinstance(split, ImageArray):
        return tuple(split.images.shape[1:])  # type: ignore[return-value]
    from .folder import ImageFileDataset

    if not image_size:
        raise UserError("images too large to hold in memory are streamed; pass --image-size for them")
    c = ImageFileDataset(split, image_size=image_size, channels=None, train=False).channels
    return (c, image_size, image_size)


def channel_stats(
    split: Split, sample: int = 2000, *, skip_bad_images: bool = False
) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation on the 0..1 scale (streamed splits: a sample, in which a
    file that does not decode is an error, or with ``skip_bad_images`` left out)."""
    if isinstance(split, FileList):
        from .folder import ImageFileDataset

        ds = ImageFileDataset(split, image_size=64, channels=None, train=False)
        pick = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:sample]
        decoded = []
        for i in pick.tolist():
            try:
                decoded.append(ds[i][0])
            except UserError:
                if not skip_bad_images:
                    raise
                # Not listed here: the training loader meets the file too, skips it and lists it.
        if not decoded:
            raise UserError(f"none of {len(pick)} image files sampled from the training split decodes")
        images = torch.stack(decoded)
    else:
        images = split.images
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(4096):  # float64 in chunks: exact enough, bounded memory
        x = chunk.to(torch.float64) / 255
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()
