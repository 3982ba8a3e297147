"""The training loop: data, model, optimiser and run folder put together, resumable at any step."""

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
import torch.nn.functional as F
from torch import nn

from ..checkpoint import ModelInfo, latest_checkpoint, load_train_state, read_model_file, save_checkpoint
from ..data.augment import BatchAugment
from ..data.loader import InMemoryLoader, StreamingLoader
from ..data.prepare import PreparedData, prepare_data
from ..data.types import ImageArray, Split
from ..errors import UserError
from ..fileio import atomic_write_text
from ..models import create_model, model_entry
from .config import TrainConfig, config_from_toml_text, to_toml
from .distributed import (
    SINGLE_PROCESS,
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown,
)
from .optim import make_optimizer, make_scheduler
from .progress import EpochProgress, format_duration


class TrainingStopped(Exception):
    """The run stopped before its last epoch; the message says why and how to continue."""

    exit_code = 1


class NonFiniteLoss(TrainingStopped):
    pass


class Interrupted(TrainingStopped):
    exit_code = 130


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


# --- pieces ---------------------------------------------------------------------------------------


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"--device {spec!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: CUDA is not available on this machine")
    return device


class Preprocess(nn.Module):
    """uint8 images (0..255) -> normalised float input, optionally channels_last."""

    def __init__(self, mean: list[float], std: list[float], channels_last: bool = False) -> None:
        super().__init__()
        self.register_buffer("scale", 1 / (255 * torch.tensor(std)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer(
            "shift", (torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1), persistent=False
        )
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * self.scale - self.shift  # (x / 255 - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def model_kwargs(config: TrainConfig, data: PreparedData) -> dict[str, Any]:
    c, h, w = data.input_shape
    kwargs: dict[str, Any] = {"num_classes": len(data.classes), "in_chans": c, "input_size": (h, w)}
    if config.plain:
        kwargs["plain"] = True
    return kwargs


def build_model(config: TrainConfig, data: PreparedData) -> tuple[nn.Module, dict[str, Any]]:
    kwargs = model_kwargs(config, data)
    try:
        model_entry(config.model)
        model = create_model(config.model, zero_init_residual=config.zero_init_residual, **kwargs)
    except ValueError as err:
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
    if kind == "none":
        return None
    return BatchAugment(
        crop_padding=config.crop_padding if "crop" in kind else 0,
        flip="flip" in kind,
        pad_mode=config.pad_mode,
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
    dist: DistInfo = SINGLE_PROCESS,
) -> InMemoryLoader | StreamingLoader:
    """In-memory batches for decoded images, worker processes for files streamed from disk."""
    common = dict(train=train, seed=seed, rank=dist.rank, world_size=dist.world_size)
    try:
        if isinstance(split, ImageArray):
            return InMemoryLoader(
                split, batch_size, augment=augment if train else None, device=device, **common
            )
        c, h, _ = input_shape
        return StreamingLoader(split, batch_size, image_size=h, channels=c, workers=workers, **common)
    except ValueError as err:
        raise UserError(f"--batch-size {batch_size}: {err}") from None


@dataclass
class EvalResult:
    loss: float
    acc: float  # percent
    images: int
    confusion: torch.Tensor  # (classes, classes): rows are true classes, columns predictions

    def per_class_acc(self) -> list[float]:
        totals = self.confusion.sum(1).clamp_min(1)
        return (100 * self.confusion.diag() / totals).tolist()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: InMemoryLoader | StreamingLoader,
    preprocess: nn.Module,
    num_classes: int,
    *,
    dist: DistInfo = SINGLE_PROCESS,
    autocast: contextlib.AbstractContextManager | None = None,
) -> EvalResult:
    """Cross-entropy (without label smoothing), accuracy and confusion matrix over ``loader``."""
    was_training = model.training
    model.eval()
    device = preprocess.scale.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for x, y in loader.batches():
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast or contextlib.nullcontext():
            out = model(preprocess(x))
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + out.argmax(1), minlength=num_classes**2).view(
            num_classes, num_classes
        )
    all_reduce_sum(loss_sum, dist)
    all_reduce_sum(confusion, dist)
    model.train(was_training)
    n = int(confusion.sum())
    return EvalResult(
        loss=float(loss_sum) / max(n, 1),
        acc=100 * float(confusion.diag().sum()) / max(n, 1),
        images=n,
        confusion=confusion.cpu(),
    )


@contextlib.contextmanager
def stop_requests() -> Iterator[list[str]]:
    """SIGINT/SIGTERM set a flag the loop checks after every step (the step in flight completes)."""
    requested: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        if requested:  # asked twice: stop now
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


# --- the run --------------------------------------------------------------------------------------


@dataclass
class _Position:
    """Where the run is: whole epochs done, steps into the next, and that epoch's partial sums."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    train_seconds: float = 0.0
    elapsed: float = 0.0  # wall time of the run so far, all sessions together
    history: list[dict[str, Any]] = field(default_factory=list)


def _new_run_dir(config: TrainConfig) -> Path:
    if config.out:
        run_dir = Path(config.out)
    else:
        data = Path(config.data).name if ("/" in config.data or "\\" in config.data) else config.data
        data = data.replace(":", "-") or "data"
        run_dir = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model}-{data}"
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UserError(
            f"--out {run_dir}: already exists and is not empty; continue it with --resume {run_dir}"
        )
    return run_dir


def load_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.toml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        raise UserError(f"--resume {run_dir}: not a run folder (no readable config.toml)") from None
    return config_from_toml_text(text, str(path))


def train(
    config: TrainConfig | None = None, *, resume: str | Path | None = None, progress: bool = True
) -> TrainResult:
    """Train a model as ``config`` says, or continue the run in folder ``resume``.

    Writes the run folder (``config.toml``, ``metrics.jsonl``, ``checkpoints/``, ``result.json``,
    ``curves.png``) and returns the per-epoch history. Raises :class:`UserError` for bad input and
    :class:`TrainingStopped` when a non-finite loss or a signal ends the run early (the last good
    checkpoint is kept and the message says how to resume).
    """
    t_start = time.monotonic()
    if resume is not None:
        run_dir = Path(resume)
        config = load_run_config(run_dir)
    else:
        config = config or TrainConfig()
        config.validate()
        run_dir = _new_run_dir(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    dist = init_distributed(device)
    try:
        return _train(config, run_dir, resume is not None, device, dist, progress, t_start)
    finally:
        shutdown(dist)


def _train(
    config: TrainConfig,
    run_dir: Path,
    resuming: bool,
    device: torch.device,
    dist: DistInfo,
    progress: bool,
    t_start: float,
) -> TrainResult:
    say = (lambda *a: print(*a, flush=True)) if dist.is_main else (lambda *a: None)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if config.amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device (use bf16 on CPU)")
    if config.batch_size % dist.world_size:
        raise UserError(f"--batch-size {config.batch_size} must divide among {dist.world_size} processes")

    data = prepare_data(
        config.data,
        val_fraction=config.val_fraction,
        split_seed=config.split_seed,
        data_root=config.data_root,
        download=config.download and dist.is_main,
        image_size=config.image_size or None,
        skip_bad_images=config.skip_bad_images,
        seed=config.seed,
    )
    if data.skipped:
        say(f"skipped {len(data.skipped)} unreadable images: " + ", ".join(data.skipped[:10]))
    loader_args = dict(
        device=device, input_shape=data.input_shape, seed=config.seed, workers=config.workers, dist=dist
    )
    train_loader = make_loader(
        data.train, config.batch_size, train=True, augment=choose_augment(config, data), **loader_args
    )
    val_loader = make_loader(data.val, config.batch_size, train=False, **loader_args) if data.val else None

    torch.manual_seed(config.seed)
    core, kwargs = build_model(config, data)
    core.to(device)
    if config.channels_last:
        core.to(memory_format=torch.channels_last)
    if config.sync_bn and dist.enabled:
        core = nn.SyncBatchNorm.convert_sync_batchnorm(core)
    info = ModelInfo(
        model=config.model,
        model_kwargs=kwargs,
        classes=data.classes,
        mean=data.mean,
        std=data.std,
        input_shape=data.input_shape,
        config=to_toml(config),
    )
    preprocess = Preprocess(data.mean, data.std, config.channels_last).to(device)
    optimizer = make_optimizer(core, config)
    scheduler = make_scheduler(optimizer, config, len(train_loader))
    ema = None
    if config.ema_decay:
        ema = torch.optim.swa_utils.AveragedModel(
            core, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema_decay), use_buffers=True
        )
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if config.amp == "bf16" else torch.float16)
        if config.amp != "none"
        else contextlib.nullcontext()
    )

    pos = _Position()
    ckpt = latest_checkpoint(run_dir) if resuming else None
    if ckpt is not None:
        state = load_train_state(ckpt)
        weights, _ = read_model_file(ckpt / "model.safetensors")
        core.load_state_dict(state.get("model", weights))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        pos = _Position(**state["position"])
        say(f"resuming {run_dir} from {ckpt.name} (epoch {pos.epoch}, step {pos.step})")
    elif dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.toml", to_toml(config))
    barrier(dist)

    model: nn.Module = core
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(
            core, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        model = torch.compile(model)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    params = sum(p.numel() for p in core.parameters())
    eval_model = ema.module if ema is not None else core
    if not resuming:
        say(
            f"training {config.model}{' (plain)' if config.plain else ''} ({params:,} parameters) on "
            f"{data.name}: {len(data.train)} train / {len(data.val) if data.val else 0} val images "
            f"({data.val_source}), {config.epochs} epochs of {len(train_loader)} steps, on {device}"
            + (f" x {dist.world_size} processes" if dist.enabled else "")
            + f"; run folder {run_dir}"
        )

    def checkpoint() -> Path:
        nonlocal last_ckpt
        barrier(dist)
        if dist.is_main:
            train_state = {
                "format_version": 1,
                "epoch": pos.epoch,
                "step": pos.step,
                "position": asdict(pos),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state()},
            }
            if ema is not None:
                train_state["ema"] = ema.state_dict()
                train_state["model"] = core.state_dict()  # model.safetensors holds the EMA weights
            if scaler is not None:
                train_state["scaler"] = scaler.state_dict()
            info.epoch = pos.epoch
            weights = eval_model.state_dict()
            last_ckpt = save_checkpoint(run_dir, weights, info, train_state, keep=config.keep_checkpoints)
            _write_metrics(run_dir, pos.history)
        barrier(dist)
        return last_ckpt

    last_ckpt = ckpt if ckpt is not None else run_dir / "checkpoints"
    session_start = time.monotonic()
    elapsed_before = pos.elapsed
    sync_every = 1 if device.type == "cpu" else 25  # host syncs cost little on CPU, a lot on a GPU
    with stop_requests() as stop:
        while pos.epoch < config.epochs:
            epoch = pos.epoch
            bar = EpochProgress(
                epoch + 1, config.epochs, len(train_loader), pos.step, enabled=progress and dist.is_main
            )
            model.train()
            pending: list[torch.Tensor] = []
            step_t0 = time.perf_counter()
            for x, y in train_loader.batches(epoch, pos.step):
                inputs = preprocess(x.to(device, non_blocking=True))
                y = y.to(device, non_blocking=True)
                with autocast:
                    out = model(inputs)
                    loss = criterion(out, y)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if config.grad_clip:
                    nn.utils.clip_grad_norm_(core.parameters(), config.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(core)
                n = torch.tensor(float(len(y)), device=device)
                pending.append(
                    torch.stack([loss.detach().float() * n, (out.argmax(1) == y).sum().float(), n])
                )
                pos.step += 1
                if len(pending) >= sync_every or pos.step == len(train_loader) or stop:
                    sums = torch.stack(pending).cpu()
                    if not torch.isfinite(sums[:, 0]).all():
                        bad = pos.step - len(pending) + int((~torch.isfinite(sums[:, 0])).nonzero()[0])
                        bar.close()
                        raise NonFiniteLoss(
                            f"the loss became non-finite at epoch {epoch + 1}, step {bad + 1}; stopped. The "
                            f"last good checkpoint is kept ({Path(last_ckpt).name}); lower --lr or set "
                            f"--grad-clip, then start a new run"
                        )
                    pos.loss_sum += float(sums[:, 0].sum())
                    pos.correct += int(sums[:, 1].sum())
                    pos.seen += int(sums[:, 2].sum())
                    pending.clear()
                    now = time.perf_counter()
                    pos.train_seconds += now - step_t0
                    step_t0 = now
                    bar.update(
                        pos.loss_sum / pos.seen,
                        pos.correct / pos.seen,
                        pos.seen * dist.world_size / pos.train_seconds,
                    )
                if stop:
                    bar.close()
                    pos.elapsed = elapsed_before + time.monotonic() - session_start
                    saved = checkpoint()
                    raise Interrupted(
                        f"stopped by {stop[0]} at epoch {epoch + 1}, step {pos.step}; checkpoint "
                        f"{saved}. Resume with: resnetlab train --resume {run_dir}"
                    )
            bar.close()

            sums = all_reduce_sum(
                torch.tensor([pos.loss_sum, pos.correct, pos.seen], dtype=torch.float64), dist
            )
            val = (
                evaluate(eval_model, val_loader, preprocess, len(data.classes), dist=dist, autocast=autocast)
                if val_loader
                else None
            )
            pos.elapsed = elapsed_before + time.monotonic() - session_start
            record = {
                "epoch": epoch + 1,
                "train_loss": round(float(sums[0] / sums[2]), 6),
                "train_acc": round(float(100 * sums[1] / sums[2]), 4),
                "val_loss": round(val.loss, 6) if val else None,
                "val_acc": round(val.acc, 4) if val else None,
                "lr": optimizer.param_groups[0]["lr"],
                "img_per_s": round(float(sums[2]) / max(pos.train_seconds, 1e-9), 1),
                "epoch_seconds": round(pos.train_seconds, 3),
                "elapsed_seconds": round(pos.elapsed, 3),
            }
            pos.history.append(record)
            pos.epoch, pos.step = epoch + 1, 0
            pos.loss_sum, pos.correct, pos.seen, pos.train_seconds = 0.0, 0, 0, 0.0
            checkpoint()
            left = (config.epochs - pos.epoch) * (pos.elapsed / max(len(pos.history), 1))
            say(
                f"epoch {record['epoch']:>3}/{config.epochs}  train loss {record['train_loss']:.4f} "
                f"acc {record['train_acc']:6.2f}%  |  val loss "
                + (f"{record['val_loss']:.4f} acc {record['val_acc']:6.2f}%" if val else "-")
                + f"  |  {record['img_per_s']:.0f} img/s  {format_duration(record['epoch_seconds'])}"
                + (f"  ({format_duration(left)} left)" if pos.epoch < config.epochs else "")
            )

    result = TrainResult(
        run_dir=run_dir,
        config=config,
        history=pos.history,
        checkpoint=Path(broadcast_object(str(last_ckpt), dist)),
        wall_seconds=time.monotonic() - t_start,
        params=params,
        val_source=data.val_source,
    )
    if dist.is_main:
        atomic_write_text(run_dir / "result.json", json.dumps(result.to_dict(), indent=2) + "\n")
        try:
            from .plots import plot_history

            plot_history(pos.history, run_dir / "curves.png", title=f"{config.model} on {data.name}")
        except Exception as err:  # a missing font or backend must not lose a finished run
            print(f"warning: could not draw curves.png ({err})", file=sys.stderr)
    return result


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    # Rewritten whole from the checkpointed history: after any crash and resume every epoch appears once.
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
