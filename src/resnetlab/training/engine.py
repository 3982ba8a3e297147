"""The training loop: a :class:`Trainer` owns one run's state; :func:`train` drives it epoch by epoch.

A run is resumable at any step: the data order and augmentation depend only on (seed, epoch, step),
and a checkpoint holds the model, optimiser, scheduler, EMA, scaler and random-generator states
with the position in the run and the metrics so far.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..capabilities import require_cpp_compiler, warn_if_bfloat16_is_slow
from ..checkpoint import (
    ModelInfo,
    classifier_key,
    intact_checkpoints,
    latest_checkpoint,
    load_train_state,
    misfit,
    read_model_file,
    save_checkpoint,
)
from ..data.augment import BatchAugment
from ..data.prepare import PreparedData, prepare_data
from ..data.types import FileList
from ..errors import UserError
from ..fileio import FolderLock, atomic_write_text
from .allocator import keep_freed_memory
from .config import TrainConfig, config_from_toml_text, to_toml
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, init_distributed, shutdown
from .evaluate import EvalResult, evaluate
from .optim import make_optimizer, make_scheduler
from .progress import EpochProgress, format_duration
from .setup import Preprocess, build_model, choose_augment, make_loader, resolve_device


class TrainingStopped(Exception):
    """The run stopped before its last epoch; the message says why and how to continue."""

    exit_code = 1


class NonFiniteLoss(TrainingStopped):
    pass


class Interrupted(TrainingStopped):
    exit_code = 130


class CheckpointError(TrainingStopped):
    """A checkpoint could not be written (disk full, folder not writable)."""


class NonFiniteStep(Exception):
    """Raised by :meth:`Trainer.step` for a non-finite loss or gradient (the step was not applied)."""

    def __init__(self, loss: float, grad_norm: float) -> None:
        super().__init__(f"loss {loss}, gradient norm {grad_norm}")
        self.loss, self.grad_norm = loss, grad_norm


@dataclass
class TrainResult:
    run_dir: Path
    config: TrainConfig
    history: list[dict[str, Any]]
    checkpoint: Path
    wall_seconds: float
    params: int
    val_source: str

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "model": self.config.model + (" (plain)" if self.config.plain else ""),
            "data": self.config.data,
            "epochs": len(self.history),
            "params": self.params,
            "seed": self.config.seed,
            "validation": self.val_source,
            "final": self.final,
            "wall_seconds": round(self.wall_seconds, 2),
            "checkpoint": str(self.checkpoint),
        }


@dataclass
class Position:
    """Where a run is: whole epochs done, steps into the next one and that epoch's partial sums."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    train_seconds: float = 0.0
    elapsed: float = 0.0  # wall time of the run so far, all sessions together
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """One run's data, model, optimiser and position; :meth:`step` is one optimisation step."""

    def __init__(
        self,
        config: TrainConfig,
        device: torch.device,
        dist: DistInfo,
        data: PreparedData | None = None,
    ) -> None:
        if config.amp == "fp16" and device.type != "cuda":
            raise UserError("--amp fp16 needs a CUDA device (use bf16 on CPU)")
        if config.batch_size % dist.world_size:
            raise UserError(f"--batch-size {config.batch_size} must divide among {dist.world_size} processes")
        if config.compile and device.type == "cpu":
            require_cpp_compiler("--compile")
        if config.amp == "bf16":
            warn_if_bfloat16_is_slow("--amp bf16", device)
        self.config = config
        self.device = device
        self.dist = dist
        self.data = data or prepare_data(
            config.data,
            val_fraction=config.val_fraction,
            split_seed=config.split_seed,
            train_fraction=config.train_fraction,
            data_root=config.data_root,
            download=config.download and dist.is_main,
            image_size=config.image_size or None,
            skip_bad_images=config.skip_bad_images,
            seed=config.seed,
        )
        data = self.data
        if config.eval_translate >= min(data.input_shape[1:]):
            raise UserError(
                f"--eval-translate {config.eval_translate}: must be smaller than the images "
                f"({data.input_shape[1]}x{data.input_shape[2]})"
            )
        loader_args = dict(
            device=device,
            input_shape=data.input_shape,
            seed=config.seed,
            workers=config.workers,
            skip_bad_images=config.skip_bad_images,
            dist=dist,
        )
        augment = choose_augment(config, data)
        self.train_loader = make_loader(data.train, config.batch_size, train=True, augment=augment, **loader_args)
        self.val_loader = make_loader(data.val, config.batch_size, train=False, **loader_args) if data.val else None

        torch.manual_seed(config.seed)
        core, kwargs = build_model(config, data)
        self._check_sizes(core, augment)
        if config.init_weights:
            load_initial_weights(core, config.init_weights)
        core.to(device)
        if config.channels_last:
            core.to(memory_format=torch.channels_last)
        if config.sync_bn and dist.enabled:
            core = nn.SyncBatchNorm.convert_sync_batchnorm(core)
        self.core = core
        self.params = sum(p.numel() for p in core.parameters())
        from ..data.folder import EVAL_CROP_FRACTION  # here: Pillow is only needed for image folders

        self.info = ModelInfo(
            model=config.model,
            model_kwargs=kwargs,
            classes=data.classes,
            mean=data.mean,
            std=data.std,
            input_shape=data.input_shape,
            # Streamed validation crops as ImageFileDataset does; in-memory images were fitted whole.
            crop_fraction=EVAL_CROP_FRACTION if isinstance(data.train, FileList) else 1.0,
            config=to_toml(config),
        )
        self.preprocess = Preprocess(data.mean, data.std, config.channels_last).to(device)
        self.optimizer = make_optimizer(core, config)
        self.scheduler = make_scheduler(self.optimizer, config, len(self.train_loader))
        self.ema = None
        if config.ema_decay:
            self.ema = torch.optim.swa_utils.AveragedModel(
                core,
                multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema_decay),
                use_buffers=True,
            )
        self.scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

        model: nn.Module = core
        if dist.enabled:
            model = nn.parallel.DistributedDataParallel(
                core, device_ids=[device.index] if device.type == "cuda" else None
            )
        if config.compile and device.type == "cpu":
            keep_freed_memory()  # the compiled step's buffers would otherwise fault back in every step
        self.model = torch.compile(model) if config.compile else model
        # Progressive resizing with --compile: the reduced sizes run eagerly. Each size would be compiled
        # anew (resnet20 bf16 here: 35 s for the first size, 18-31 s for each further one, and the
        # dynamic-shape graph inductor falls back to ran no faster than eager), more than those
        # few short epochs could gain; the full-size steps are compiled once.
        self.eager_model = model
        self.position = Position()
        self.last_lr: float | None = None  # the learning rate of the latest step
        self.train_size: int | None = None  # progressive resizing: the side of this epoch's training images
        # Batch-norm running statistics, saved before each step so a refused step can put them back.
        self._norm_stats = [
            b for m in core.modules() if isinstance(m, nn.modules.batchnorm._NormBase) for b in m.buffers(recurse=False)
        ]
        self._norm_stats_saved = [b.clone() for b in self._norm_stats]

    def _check_sizes(self, model: nn.Module, augment: BatchAugment | None) -> None:
        """Refuse, before the run folder is written, images the model or the augmentation cannot take.

        Found at the first step instead, such a mistake would leave a run folder that holds only its
        config: not resumable, and in the way of the same ``--out``. The model sees the full-size images
        and, with progressive resizing, the smallest training ones (one forward pass each, on one image).
        """
        channels, height, width = self.data.input_shape
        smallest = self.image_size_at(0)
        sizes = [(height, width)] + ([(smallest, smallest)] if smallest else [])
        side = min(min(size) for size in sizes)
        if augment is not None and augment.crop_padding >= side and augment.pad_mode == "reflect":
            raise UserError(
                f"--crop-padding {augment.crop_padding}: reflect padding needs images larger than that, and "
                f"the smallest training images here are {side}x{side}"
            )
        was_training = model.training
        model.eval()
        try:
            for size in sizes:
                try:
                    with torch.no_grad():
                        model(torch.zeros(1, channels, *size))
                except (RuntimeError, ValueError) as err:  # e.g. a pooling window larger than its map
                    first = str(err).splitlines()[0]
                    model_name, low = self.config.model, self.config.min_image_size
                    if size == (height, width):
                        where = f"--model {model_name}: cannot take the {height}x{width} images of {self.data.name}"
                        hint = "--image-size resizes them"
                    else:
                        where = f"--min-image-size {low}: {model_name} cannot take {size[0]}x{size[1]} images"
                        hint = "raise it"
                    raise UserError(f"{where} ({first}); {hint}") from None
        finally:
            model.train(was_training)

    def image_size_at(self, epoch: int) -> int | None:
        """Progressive resizing (Howard's fast.ai DAWNBench entry; FFCV): the training images' side grows
        linearly from ``min_image_size`` to full size over the first ``resize_until`` of the epochs, in
        steps of 4 pixels. Evaluation always sees full-size images."""
        full = self.data.input_shape[-1]
        low = self.config.min_image_size
        if not low or low >= full:
            return None
        ramp = max(1.0, self.config.resize_until * self.config.epochs - 1)
        size = low + (full - low) * min(1.0, epoch / ramp)
        return min(full, int(round(size / 4) * 4))

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and saved for inference: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.core

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimisation step on a uint8 batch; returns ``[loss * n, correct, n]`` (on the device).

        A non-finite loss or gradient raises :class:`NonFiniteStep` *before* the weights change, with
        the batch-norm running statistics of that forward pass put back, so the model in memory is the
        one of the previous step. (With fp16 the gradient scaler skips overflowing steps itself.)
        """
        inputs = self.preprocess(x.to(self.device, non_blocking=True))
        model = self.model
        if self.train_size is not None and self.train_size != inputs.shape[-1]:
            inputs = nn.functional.interpolate(inputs, size=self.train_size, mode="bilinear", antialias=True)
            if self.config.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            model = self.eager_model
        y = y.to(self.device, non_blocking=True)
        if self._norm_stats:
            torch._foreach_copy_(self._norm_stats_saved, self._norm_stats)
        with self.autocast():
            out = model(inputs)
            loss = self.criterion(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grads = [p.grad for p in self.core.parameters() if p.grad is not None]
        if self.config.grad_clip:
            norm = nn.utils.clip_grad_norm_(self.core.parameters(), self.config.grad_clip)
        else:
            norm = nn.utils.get_total_norm(grads)
        finite = torch.isfinite(loss) if self.scaler is not None else torch.isfinite(loss) & torch.isfinite(norm)
        if not bool(finite):  # a host sync per step; it is what lets a bad step be refused, not just noticed
            if self._norm_stats:
                torch._foreach_copy_(self._norm_stats, self._norm_stats_saved)
            raise NonFiniteStep(float(loss.detach()), float(norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used, for the epoch's record
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.core)
        n = torch.tensor(float(len(y)), device=self.device)
        return torch.stack([loss.detach().float() * n, (out.argmax(1) == y).sum().float(), n])

    def evaluate(self) -> EvalResult | None:
        if self.val_loader is None:
            return None
        return evaluate(
            self.eval_model,
            self.val_loader,
            self.preprocess,
            len(self.data.classes),
            dist=self.dist,
            autocast=self.autocast(),
            flip=self.config.eval_flip,
            translate=self.config.eval_translate,
        )

    # --- checkpoints ------------------------------------------------------------------------------

    def save(self, run_dir: Path) -> Path | None:
        """Checkpoint the current position (rank 0 writes; every rank waits for it)."""
        barrier(self.dist)
        path = None
        if self.dist.is_main:
            pos = self.position
            state: dict[str, Any] = {
                "format_version": 1,
                "epoch": pos.epoch,
                "step": pos.step,
                "position": asdict(pos),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state()},
            }
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
                state["model"] = self.core.state_dict()  # model.safetensors holds the EMA weights
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            self.info.epoch = pos.epoch
            try:
                path = save_checkpoint(
                    run_dir, self.eval_model.state_dict(), self.info, state, keep=self.config.keep_checkpoints
                )
                # Rewritten whole from the checkpointed history: after a crash and resume each epoch appears once.
                atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in pos.history))
            except OSError as err:
                where = err.filename or run_dir / "checkpoints"
                previous = latest_checkpoint(run_dir)
                kept = f"the previous checkpoint ({previous.name}) is intact" if previous else "no checkpoint yet"
                raise CheckpointError(
                    f"cannot write to {where}: {err.strerror or err}; {kept}. Make room (or make the folder "
                    f"writable) and resume with: resnetlab train --resume {run_dir}"
                ) from None
        barrier(self.dist)
        return path

    def restore(self, ckpt: Path) -> None:
        """Load a checkpoint of this run (verified against its checksums) into the trainer."""
        state = load_train_state(ckpt)
        weights, info = read_model_file(ckpt / "model.safetensors")
        if info.model != self.info.model or info.classes != self.info.classes:
            raise UserError(
                f"{ckpt}: holds a {info.model} for {len(info.classes)} classes, but this run trains a "
                f"{self.info.model} for {len(self.info.classes)} classes (a checkpoint of another run?)"
            )
        try:
            self.core.load_state_dict(state.get("model", weights))
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"]["torch"])
            self.position = Position(**state["position"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise UserError(f"{ckpt}: does not fit this run ({misfit(err)})") from None


def load_initial_weights(model: nn.Module, source: str) -> None:
    """Load ``--init-weights`` into ``model``: every tensor must fit, except a classifier of another
    size (fine-tuning on a data set with other classes), which keeps its fresh initialisation."""
    from ..checkpoint import resolve_model_file

    weights, _ = read_model_file(resolve_model_file(source))
    own = model.state_dict()
    prefix = f"{classifier_key(model)}."
    head = [k for k in weights if k.startswith(prefix) and k in own and weights[k].shape != own[k].shape]
    for k in head:
        del weights[k]
    try:
        model.load_state_dict(weights, strict=not head)
    except RuntimeError as err:
        raise UserError(f"--init-weights {source}: the weights do not fit --model ({misfit(err)})") from None
    missing = set(own) - set(weights)
    if missing - set(head):
        raise UserError(f"--init-weights {source}: no weights for {sorted(missing - set(head))[:3]}")


@contextlib.contextmanager
def stop_requests() -> Iterator[list[str]]:
    """SIGINT/SIGTERM set a flag the loop checks after every step (the step in flight completes).

    A second signal stops at once (KeyboardInterrupt).
    """
    requested: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signal.Signals(signum).name)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _new_run_dir(config: TrainConfig) -> Path:
    if config.out:
        run_dir = Path(config.out)
    else:
        data = Path(config.data).name if ("/" in config.data or "\\" in config.data) else config.data
        data = data.replace(":", "-") or "data"
        run_dir = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model}-{data}"
    if run_dir.exists() and not run_dir.is_dir():  # a file: --resume could not continue it either
        raise UserError(f"--out {run_dir}: is a file, not a folder; name a new folder for the run")
    if run_dir.exists() and any(not _leftover(p) for p in run_dir.iterdir()):
        raise UserError(f"--out {run_dir}: already exists and is not empty; continue it with --resume {run_dir}")
    return run_dir


def _leftover(path: Path) -> bool:
    """What a run that never reached its first checkpoint leaves: the lock, a half-written temporary file,
    its config. A folder holding only these counts as empty, so the same ``--out`` starts the run again
    (with corrected settings, which ``--resume`` would not take)."""
    if path.name == "config.toml":
        return not (path.parent / "checkpoints").exists() and not (path.parent / "metrics.jsonl").exists()
    return path.name == ".lock" or (path.name.startswith(".") and path.name.endswith(".tmp"))


def _take(lock: FolderLock, run_dir: Path) -> None:
    """Lock the run folder, then remove what a killed process left half-written in it."""
    lock.acquire()
    for path in run_dir.iterdir():
        if path.name not in (".lock", "config.toml") and _leftover(path):
            path.unlink(missing_ok=True)


def load_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.toml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        raise UserError(f"--resume {run_dir}: not a run folder (no readable config.toml)") from None
    return config_from_toml_text(text, str(path))


def train(
    config: TrainConfig | None = None,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> TrainResult:
    """Train a model as ``config`` says, or continue the run in folder ``resume``.

    Writes the run folder (``config.toml``, ``metrics.jsonl``, ``checkpoints/``, ``result.json``,
    ``curves.png``) and returns the per-epoch history. ``progress`` shows a bar per epoch, ``verbose``
    prints a line per epoch. Raises :class:`UserError` for bad input and :class:`TrainingStopped` when
    a non-finite loss or a signal ends the run early (the last good checkpoint is kept and the message
    says how to resume).
    """
    t_start = time.monotonic()
    if resume is not None:
        run_dir = Path(resume)
        config = load_run_config(run_dir)
    else:
        config = config or TrainConfig()
        config.validate()
        config = config.with_absolute_paths()
        run_dir = _new_run_dir(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    dist = init_distributed(device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    trainer = None
    try:
        trainer = Trainer(config, device, dist)
        # From here on a first SIGINT/SIGTERM ends the run cleanly: with a checkpoint after the next step.
        with stop_requests() as stop:
            return _run(trainer, run_dir, resume is not None, progress, verbose, t_start, stop)
    finally:
        # DistributedDataParallel holds the process group, which shutdown() can only end once nothing else
        # does; see shutdown().
        del trainer
        shutdown(dist)


def _run(
    trainer: Trainer, run_dir: Path, resuming: bool, progress: bool, verbose: bool, t_start: float, stop: list[str]
) -> TrainResult:
    config, dist, data = trainer.config, trainer.dist, trainer.data
    say = (lambda *a: print(*a, flush=True)) if dist.is_main and verbose else (lambda *a: None)
    if data.skipped:
        say(f"skipped {len(data.skipped)} unreadable images: " + ", ".join(data.skipped[:10]))
    lock = FolderLock(run_dir, "run folder") if dist.is_main else None
    ckpt = None
    if resuming:
        if lock is not None:
            _take(lock, run_dir)
        for candidate in intact_checkpoints(run_dir):
            try:
                trainer.restore(candidate)
            except UserError as err:
                print(f"warning: {err}; trying an older checkpoint", file=sys.stderr, flush=True)
                continue
            ckpt = candidate
            break
        else:
            if intact_checkpoints(run_dir):
                raise UserError(f"--resume {run_dir}: no intact checkpoint left (see the warnings above)")
    if ckpt is not None:
        pos = trainer.position
        say(f"resuming {run_dir} from {ckpt.name} (epoch {pos.epoch}, step {pos.step})")
    else:
        if dist.is_main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                if not resuming:
                    _take(lock, run_dir)
                atomic_write_text(run_dir / "config.toml", to_toml(config))
            except OSError as err:
                raise UserError(f"--out {run_dir}: cannot write the run folder ({err.strerror or err})") from None
        n_val = len(data.val) if data.val else 0
        say(
            f"training {config.model}{' (plain)' if config.plain else ''} ({trainer.params:,} parameters) on "
            f"{data.name}: {len(data.train)} train / {n_val} val images ({data.val_source}), "
            f"{config.epochs} epochs of {len(trainer.train_loader)} steps, on {trainer.device}"
            + (f" x {dist.world_size} processes" if dist.enabled else "")
            + f"; run folder {run_dir}"
        )
    barrier(dist)
    try:
        return _loop(trainer, run_dir, ckpt, progress, say, t_start, stop)
    finally:
        if lock is not None:
            lock.release()


def _loop(
    trainer: Trainer, run_dir: Path, ckpt: Path | None, progress: bool, say, t_start: float, stop: list[str]
) -> TrainResult:
    config, dist, data = trainer.config, trainer.dist, trainer.data
    pos = trainer.position
    last_ckpt = ckpt
    session_start, elapsed_before = time.monotonic(), pos.elapsed
    epochs_at_start = pos.epoch
    steps = len(trainer.train_loader)
    sync_every = 1 if trainer.device.type == "cpu" else 25  # a host sync is free on CPU, costly on a GPU
    while pos.epoch < config.epochs:
        epoch = pos.epoch
        trainer.train_size = trainer.image_size_at(epoch)
        bar = EpochProgress(epoch + 1, config.epochs, steps, pos.step, enabled=progress and dist.is_main)
        trainer.model.train()
        pending: list[torch.Tensor] = []
        t0 = time.perf_counter()
        for x, y in trainer.train_loader.batches(epoch, pos.step):
            try:
                pending.append(trainer.step(x, y))
            except NonFiniteStep as bad:
                bar.close()
                kept = f"the last good checkpoint is kept ({last_ckpt.name})" if last_ckpt else "no checkpoint yet"
                raise NonFiniteLoss(
                    f"non-finite loss or gradients at epoch {epoch + 1}, step {pos.step + 1} ({bad}); the step "
                    f"was not applied and the run stopped, {kept}. Lower --lr or set --grad-clip, then start "
                    "a new run"
                ) from None
            pos.step += 1
            if len(pending) < sync_every and pos.step < steps and not stop:
                continue
            sums = torch.stack(pending).cpu()
            pos.loss_sum += float(sums[:, 0].sum())
            pos.correct += int(sums[:, 1].sum())
            pos.seen += int(sums[:, 2].sum())
            pending.clear()
            now = time.perf_counter()
            pos.train_seconds, t0 = pos.train_seconds + now - t0, now
            rate = pos.seen * dist.world_size / pos.train_seconds
            bar.update(pos.loss_sum / pos.seen, pos.correct / pos.seen, rate)
            if stop:
                bar.close()
                pos.elapsed = elapsed_before + time.monotonic() - session_start
                saved = trainer.save(run_dir)
                raise Interrupted(
                    f"stopped by {stop[0]} at epoch {epoch + 1}, step {pos.step}; checkpoint "
                    f"{saved}. Resume with: resnetlab train --resume {run_dir}"
                )
        bar.close()

        totals = torch.tensor([pos.loss_sum, pos.correct, pos.seen], dtype=torch.float64)
        totals = all_reduce_sum(totals, dist)
        due = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
        val = trainer.evaluate() if due else None
        # Streamed files are only decoded now, so --skip-bad-images lists them as they turn up, in the words
        # of the list in-memory loading prints before training.
        loaders = [trainer.train_loader] + ([trainer.val_loader] if trainer.val_loader else [])
        fresh = list(dict.fromkeys(p for ld in loaders for p in ld.skipped if p not in data.skipped))
        if fresh:
            data.skipped.extend(fresh)
            say(f"skipped {len(fresh)} unreadable images: " + ", ".join(fresh[:10]))
        pos.elapsed = elapsed_before + time.monotonic() - session_start
        record = {
            "epoch": epoch + 1,
            "train_loss": round(float(totals[0] / totals[2]), 6),
            "train_acc": round(float(100 * totals[1] / totals[2]), 4),
            "val_loss": round(val.loss, 6) if val else None,
            "val_acc": round(val.acc, 4) if val else None,
            # The rate of the epoch's last step (the optimiser's is already the next step's).
            "lr": trainer.optimizer.param_groups[0]["lr"] if trainer.last_lr is None else trainer.last_lr,
            "img_per_s": round(float(totals[2]) / max(pos.train_seconds, 1e-9), 1),
            "image_size": trainer.train_size or data.input_shape[-1],
            "epoch_seconds": round(pos.train_seconds, 3),
            "elapsed_seconds": round(pos.elapsed, 3),
        }
        pos.history.append(record)
        pos.epoch, pos.step = epoch + 1, 0
        pos.loss_sum, pos.correct, pos.seen, pos.train_seconds = 0.0, 0, 0, 0.0
        last_ckpt = trainer.save(run_dir) or last_ckpt
        left = (config.epochs - pos.epoch) * (pos.elapsed / len(pos.history))
        say(_epoch_line(record, config.epochs) + (f"  ({format_duration(left)} left)" if left else ""))

    result = TrainResult(
        run_dir=run_dir,
        config=config,
        history=pos.history,
        checkpoint=Path(str(broadcast_object(str(last_ckpt), dist))),
        wall_seconds=time.monotonic() - t_start,
        params=trainer.params,
        val_source=data.val_source,
    )
    # A run resumed when already finished trains nothing: its result.json (with the wall time of the
    # session that trained it) stays as it is.
    finished_before = epochs_at_start == config.epochs and (run_dir / "result.json").is_file()
    if dist.is_main and not finished_before:
        atomic_write_text(run_dir / "result.json", json.dumps(result.to_dict(), indent=2) + "\n")
        try:
            from .plots import plot_history

            plot_history(pos.history, run_dir / "curves.png", title=f"{config.model} on {data.name}")
        except Exception as err:  # a missing font or backend must not lose a finished run
            print(f"warning: could not draw curves.png ({err})", file=sys.stderr)
    return result


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    val = f"{record['val_loss']:.4f} acc {record['val_acc']:6.2f}%" if record["val_acc"] is not None else "-"
    return (
        f"epoch {record['epoch']:>3}/{epochs}  train loss {record['train_loss']:.4f} "
        f"acc {record['train_acc']:6.2f}%  |  val loss {val}  |  {record['img_per_s']:.0f} img/s  "
        f"{format_duration(record['epoch_seconds'])}"
    )
