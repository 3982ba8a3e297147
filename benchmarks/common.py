"""What the benchmarks share: the plain eager baseline and timing helpers."""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab import TrainConfig
from resnetlab.data import ImageArray, PreparedData
from resnetlab.errors import UserError
from resnetlab.summary import saved_activation_bytes
from resnetlab.training.distributed import SINGLE_PROCESS
from resnetlab.training.engine import Trainer


class PerImageDataset(torch.utils.data.Dataset):
    """The tutorial pipeline: one image at a time, padded, cropped, flipped and normalised."""

    def __init__(self, data: ImageArray, mean: list[float], std: list[float], pad: int = 4) -> None:
        self.images, self.labels, self.pad = data.images, data.labels, pad
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].float() / 255
        h, w = x.shape[1:]
        x = F.pad(x.unsqueeze(0), (self.pad,) * 4, mode="reflect").squeeze(0)
        top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        x = x[:, top : top + h, left : left + w]
        if torch.rand(()) < 0.5:
            x = x.flip(2)
        return (x - self.mean) / self.std, self.labels[i]


def baseline_steps(model: nn.Module, loader: torch.utils.data.DataLoader, opt, steps: int) -> float:
    """Run ``steps`` eager NCHW steps; returns the seconds they took."""
    model.train()
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def resnetlab_steps(trainer: Trainer, steps: int, epoch: int) -> float:
    """Run ``steps`` of resnetlab's training step; returns the seconds they took."""
    trainer.model.train()
    batches = trainer.train_loader.batches(epoch)
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        for x, y in batches:
            stats = trainer.step(x, y)
            done += 1
            if done == steps:
                break
        batches = trainer.train_loader.batches(epoch + 1)
    float(stats[0])  # wait for the device
    return time.perf_counter() - t0


def training_memory(model: nn.Module, size: int, batch: int) -> int:
    """Bytes a float32 training step of ``model`` on ``batch`` images of ``size`` x ``size`` needs:
    the activations saved for backward, measured at batch 1 and 2 and extrapolated (they grow
    linearly with the batch), with a quarter on top for the gradients that backward holds at once.
    On this project's machine the figure was 15-17% above the peak resident memory of real float32
    steps (resnet18 at batch 64 and resnet50 at batch 32, 224 px): a slightly cautious estimate."""
    one, two = (saved_activation_bytes(model, torch.randn(b, 3, size, size)) for b in (1, 2))
    return int(1.25 * (one + (two - one) * (batch - 1)))


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get without swapping (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """What a figure was measured on: the CPU's model name and the matrix units it offers (from
    ``/proc/cpuinfo``), the cores PyTorch uses and its kernel level. The project's machines have
    changed between sessions (AVX-512 with AVX-512 BF16 only; later with AMX tiles, where oneDNN runs
    bfloat16 convolutions on them), and the bfloat16 figures depend on which one ran them.
    ``platform.processor()`` is empty on most Linux machines, so it is not used."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    units = [name for flag, name in (("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX BF16")) if flag in flags]
    return {
        "cpu": model,
        "cpu_units": units,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }


def describe_machine(info: dict) -> str:
    """One line for a benchmark's printout: ``Intel(R) Xeon(R) Processor, 2 threads, AVX512 + AMX BF16``."""
    units = " + ".join([info["cpu_capability"], *info["cpu_units"]])
    return f"{info['cpu']}, {info['threads']} threads, {units}, torch {info['torch']}"


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """This machine's measured GFLOP/s for an n x n matrix product (median of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer no smaller than ``minimum``, else a message naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def run_script(main: Callable[[], None]) -> None:
    """Run a benchmark's ``main``; a user mistake resnetlab reports (an unknown model or data set, a
    bad value) ends the script with its message and exit status 2, as ``resnetlab`` does, not a traceback."""
    try:
        main()
    except UserError as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        sys.exit(2)


def add_step_flags(ap: argparse.ArgumentParser) -> None:
    """The flags that choose the training step a benchmark runs: data, model, batch and resnetlab's path."""
    ap.add_argument("--data", default="synthetic:3x32x32:10:5120", help="resnetlab --data value")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=at_least(1), default=128)
    ap.add_argument("--channels-last", action="store_true", help="resnetlab: NHWC memory format")
    ap.add_argument("--compile", action="store_true", help="resnetlab: torch.compile the model")
    ap.add_argument("--amp", choices=["none", "bf16"], default="none", help="resnetlab: bf16 mixed precision")


def step_flags(args: argparse.Namespace) -> list[str]:
    """resnetlab's options that ``args`` turns on, in a fixed order (channels_last, compile, bf16)."""
    on = (("channels_last", args.channels_last), ("compile", args.compile), ("bf16", args.amp == "bf16"))
    return [name for name, used in on if used]


def step_trainer(args: argparse.Namespace, data: PreparedData) -> Trainer:
    """The ``Trainer`` of ``resnetlab train`` for the flags of :func:`add_step_flags` (CPU, one process)."""
    config = TrainConfig(
        model=args.model,
        data=args.data,
        batch_size=args.batch_size,
        epochs=1,
        lr=0.05,
        augment="crop+flip",
        channels_last=args.channels_last,
        compile=args.compile,
        amp=args.amp,
        device="cpu",
    )
    return Trainer(config, torch.device("cpu"), SINGLE_PROCESS, data=data)
