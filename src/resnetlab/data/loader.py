"""Batches for training and evaluation, from memory or streamed from files.

Both loaders yield uint8 image batches (B, C, H, W) with int64 labels; the trainer normalises them.
The order of an epoch and every random augmentation depend only on ``(seed, epoch, step)``, so a run
resumed at any step sees exactly the batches the uninterrupted run saw, and ``world_size`` processes
each take their slice of the same global batch a single process would have drawn.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ..errors import UserError
from .augment import BatchAugment, alternating_flips
from .types import FileList, ImageArray

if TYPE_CHECKING:
    from .folder import ImageFileDataset, Item

Batch = tuple[torch.Tensor, torch.Tensor]


def _generator(*keys: int) -> torch.Generator:
    # A fresh generator per (seed, epoch[, step]): nothing to save for resumption, identical on every rank.
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of the ``n`` training images in ``epoch``."""
    return torch.randperm(n, generator=_generator(seed, epoch))


class _Loader:
    def __init__(self, n: int, batch_size: int, train: bool, seed: int, rank: int, world_size: int) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must divide evenly among {world_size} processes")
        if train and n < batch_size:
            raise ValueError(f"the training split has {n} images, fewer than one batch of {batch_size}")
        self.n = n
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        # Image files found unreadable while streaming and left out (skip_bad_images), in the order met.
        self.skipped: list[str] = []

    def __len__(self) -> int:
        """Steps per epoch: full batches only when training (every step sees ``batch_size`` images)."""
        return self.n // self.batch_size if self.train else math.ceil(self.n / self.batch_size)

    def _global_batches(self, epoch: int, start: int) -> Iterator[tuple[int, torch.Tensor]]:
        order = epoch_order(self.n, self.seed, epoch) if self.train else torch.arange(self.n)
        for step in range(start, len(self)):
            yield step, order[step * self.batch_size : (step + 1) * self.batch_size]

    def _local(self, batch: torch.Tensor) -> slice:
        per_rank = math.ceil(len(batch) / self.world_size)
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


class InMemoryLoader(_Loader):
    """Batches sliced from one uint8 tensor that lives on the training device.

    Training batches are augmented as whole batches (:class:`BatchAugment`) with parameters drawn for
    the global batch, then sliced for this process. With ``augment.alternate_flip`` each image's flip
    alternates between epochs from a start drawn per image from ``seed`` (:func:`alternating_flips`).
    """

    def __init__(
        self,
        data: ImageArray,
        batch_size: int,
        *,
        train: bool,
        augment: BatchAugment | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(len(data), batch_size, train, seed, rank, world_size)
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.augment = augment if train else None
        self.flip_start = None
        if self.augment is not None and self.augment.alternate_flip:
            # -1 is never an epoch: a stream of its own, drawn once for the run.
            self.flip_start = torch.rand(len(data), generator=_generator(seed, -1)) < 0.5

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        for step, index in self._global_batches(epoch, start):
            local = self._local(index)
            mine = index[local].to(self.images.device)
            x = self.images[mine]
            y = self.labels[mine]
            if self.augment is not None:
                dy, dx, flips = self.augment.params(len(index), _generator(self.seed, epoch, step))
                if self.flip_start is not None:
                    flips = alternating_flips(self.flip_start[index], epoch)
                x = self.augment.apply(x, dy[local], dx[local], flips[local])
            yield x, y


class _Items(torch.utils.data.Dataset):
    """An ImageFileDataset as the workers read it: :meth:`ImageFileDataset.item`, which returns bad files."""

    def __init__(self, dataset: ImageFileDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Item:
        return self.dataset.item(index)


def _collate(items: list[Item]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Stack the images that decoded (DataLoader's own collation, shared memory in workers); list the rest."""
    good = [(x, y) for x, y, _ in items if x is not None]
    bad = [b for _, _, found in items for b in found]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), bad
    images, labels = torch.utils.data.default_collate(good)
    return images, labels, bad


class StreamingLoader(_Loader):
    """Batches decoded from image files by DataLoader worker processes (for large images).

    A file that does not decode is an error naming it, raised here in the main process; with
    ``skip_bad_images`` it is left out (see :meth:`ImageFileDataset.item`) and listed in ``skipped``.
    """

    def __init__(
        self,
        files: FileList,
        batch_size: int,
        *,
        train: bool,
        image_size: int,
        channels: int,
        alternate_flip: bool = False,
        seed: int = 0,
        workers: int = 2,
        skip_bad_images: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        from .folder import ImageFileDataset

        super().__init__(len(files), batch_size, train, seed, rank, world_size)
        self.dataset = ImageFileDataset(
            files,
            image_size=image_size,
            channels=channels,
            train=train,
            alternate_flip=alternate_flip,
            seed=seed,
            skip_bad_images=skip_bad_images,
        )
        self.workers = workers

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        from .folder import MAX_BAD_IN_A_ROW, bad_images_error

        batches = [index[self._local(index)].tolist() for _, index in self._global_batches(epoch, start)]
        self.dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            _Items(self.dataset),
            batch_sampler=batches,
            num_workers=self.workers,
            persistent_workers=False,
            collate_fn=_collate,
        )
        for (x, y, bad), index in zip(loader, batches, strict=True):
            if bad and not self.dataset.skip_bad_images:
                raise bad_images_error(bad)
            for path, _ in bad:
                if path not in self.skipped:  # a file is met again in every epoch
                    self.skipped.append(path)
            if self.train and len(y) < len(index):  # no readable stand-in within reach
                raise UserError(
                    f"more than {MAX_BAD_IN_A_ROW} image files in a row (or all of them) do not decode, such as "
                    f"{bad[-1][0]} ({bad[-1][1]}): that is a broken folder, not a few bad files to skip"
                )
            if len(y):  # a validation batch of bad files only is left out whole
                yield x, y
