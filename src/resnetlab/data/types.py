"""What every data source returns: images with labels per split, and the class names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class ImageArray:
    """Decoded images held in memory.

    ``images`` is uint8 of shape (N, C, H, W), values 0..255; ``labels`` is int64 of shape (N,).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be int64 with one entry per image")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor) -> ImageArray:
        return ImageArray(self.images[index], self.labels[index])


@dataclass
class FileList:
    """Image files not yet decoded (an image folder too large to hold in memory), with labels.

    ``paths`` are files on disk, or ``archive::member`` names inside a tar archive.
    """

    paths: list[str]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: torch.Tensor) -> FileList:
        return FileList([self.paths[i] for i in index.tolist()], self.labels[index])


Split = ImageArray | FileList


@dataclass
class DataSource:
    """A data set as read from disk: named splits ("train", and where present "val"/"test")."""

    name: str
    classes: list[str]
    splits: dict[str, Split] = field(default_factory=dict)
    origin: Path | None = None  # the file or folder it was read from, for messages
    skipped: list[str] = field(default_factory=list)  # unreadable files skipped (--skip-bad-images)
