"""What every study shares: its folder, resumable training runs, results as JSON/CSV, figures as PNG
and SVG, mean and spread over seeds, and the report.

A study folder holds ``runs/<name>/`` (ordinary run folders, so ``resnetlab eval`` works on them),
``results.json`` and ``*.csv`` (the raw numbers), ``*.png``/``*.svg`` figures and ``report.md``.
Running the same command again with the same ``--out`` continues: finished runs are read back,
an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..data.prepare import PreparedData
from ..errors import UserError
from ..fileio import atomic_write_bytes, atomic_write_text
from ..training.config import TrainConfig, to_toml
from ..training.engine import load_run_config, train
from ..training.progress import format_duration
from ..training.setup import build_model

# Settings that count something (runs, images, epochs, blocks): 0 would leave the study nothing to do.
_COUNTS = ("seeds", "epochs", "finetune_epochs", "batch_size", "samples", "width", "insert")


def check_settings(settings: Any, configs: Iterable[TrainConfig] = ()) -> None:
    """Raise :class:`UserError` naming the first flag of a study's ``settings`` with an impossible value.

    Called by every study before it writes anything: each number finite and not negative, counts >= 1,
    ``budget`` in (0, 1], ``distance`` > 0; then each of the study's training ``configs`` as ``resnetlab
    train`` checks its own (``--lr`` > 0, ...), so a value that only the runs would refuse fails here
    and not after the study folder is made. The settings' flags share their names with the configs'.
    """
    for f in fields(settings):
        value = getattr(settings, f.name)
        numbers = value if isinstance(value, list) else [value]
        if not numbers or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers):
            continue  # names and choices (data, models, norm, amp) are checked by each study
        flag = f"--{f.name.replace('_', '-')}"
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise UserError(f"{flag} must be a finite number")
        if any(v < 0 for v in numbers):
            raise UserError(f"{flag} must not be negative")
        if f.name in _COUNTS and value < 1:
            raise UserError(f"{flag} must be >= 1")
        if f.name == "budget" and not 0 < value <= 1:
            raise UserError("--budget must be in (0, 1]")
        if f.name == "distance" and value <= 0:
            raise UserError("--distance must be > 0 (the nearby input must differ from the image)")
    for config in configs:
        config.validate()


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def final_errors(
    histories: dict[tuple[int, bool, int], list[dict[str, Any]]],
    depths: Sequence[int],
    seeds: int,
    names: dict[bool, str],
) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Final training and validation error (%) of plain and residual runs per depth, over seeds.

    ``histories[depth, plain, seed]`` is a run's per-epoch history; ``names`` maps ``plain`` to the
    label used in the outputs. Returns CSV rows and the markdown table's cells (one row per depth:
    plain train, plain val, residual train, residual val). The rows keep each seed's error under
    ``errors`` for the JSON; :meth:`Study.write_final_errors` also writes them as a CSV.
    """
    rows, table = [], []
    for depth in depths:
        cells = [str(depth)]
        for plain in (True, False):
            for key, split in (("train_acc", "train"), ("val_acc", "val")):
                errors = [100 - histories[depth, plain, seed][-1][key] for seed in range(seeds)]
                m, sd = mean_std(errors)
                rows.append(
                    {
                        "depth": depth,
                        "net": names[plain],
                        "split": split,
                        "error_mean": m,
                        "error_std": sd,
                        "errors": errors,
                    }
                )
                cells.append(fmt_mean_std(errors))
        table.append(cells)
    return rows, table


def fmt_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``"12.34 ± 0.56"``; a single value without the spread."""
    m, s = mean_std(values)
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


@dataclass
class Study:
    """A study's folder and its outputs."""

    name: str
    out: Path
    progress: bool = True
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def open(cls, name: str, out: str | Path | None, progress: bool = True, threads: int = 0) -> Study:
        """Check ``out`` (a new folder, or this same study's to continue) and apply ``--threads``.

        ``threads`` (0: PyTorch's default) is set here, once, for all the study does in this process:
        the speed measurements behind its time estimate, its training runs, its evaluations.
        """
        folder = Path(out) if out else Path("studies") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out {folder}: exists and is not a folder")
        marker = folder / "study.json"
        if marker.exists():
            try:
                kind = json.loads(marker.read_text())["study"]
            except (OSError, ValueError, KeyError):
                kind = None
            if kind != name:
                raise UserError(f"--out {folder}: holds a {kind!r} study, not {name!r}; choose another folder")
        elif folder.exists() and any(folder.iterdir()):
            raise UserError(f"--out {folder}: already exists and holds something else; choose another folder")
        if threads:
            torch.set_num_threads(threads)
        # The folder is made by announce(), after the study has loaded its data: a --data that fails
        # leaves no study folder behind.
        return cls(name, folder, progress)

    def say(self, text: str) -> None:
        print(text, flush=True)

    def announce(self, what: str, seconds: float) -> None:
        """State the plan and the expected run time before starting, and make the study's folder."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "study.json", json.dumps({"study": self.name}) + "\n")
        self.say(f"{self.name}: {what}; expected run time about {format_duration(seconds)} on this machine")
        self.say(f"results go to {self.out}")

    # --- training runs ----------------------------------------------------------------------------

    def run(self, name: str, config: TrainConfig) -> list[dict[str, Any]]:
        """Train (or finish, or read back) the run ``runs/<name>``; returns its per-epoch history."""
        folder = self.out / "runs" / name
        config.out = str(folder)
        # Compared as train() saves them: data and weight paths absolute (a relative --data or --out is
        # the same run when the study is run again from the same folder).
        same = config.with_absolute_paths()
        if (folder / "result.json").is_file():
            if load_run_config(folder).with_absolute_paths() != same:
                raise UserError(
                    f"{folder}: was trained with other settings than this study now asks for; use a new --out"
                )
            return read_history(folder)
        if (folder / "config.toml").is_file():
            if load_run_config(folder).with_absolute_paths() != same:
                raise UserError(f"{folder}: an unfinished run with other settings; use a new --out")
            return train(resume=folder, progress=self.progress, verbose=False).history
        return train(config, progress=self.progress, verbose=False).history

    # --- outputs ----------------------------------------------------------------------------------

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.out / name
        atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")
        return path

    def write_final_errors(
        self, histories: dict, depths: Sequence[int], seeds: int, names: dict[bool, str]
    ) -> tuple[list[dict[str, Any]], list[list[str]]]:
        """:func:`final_errors`, with its rows (less the per-seed lists) written to ``final_errors.csv``."""
        rows, table = final_errors(histories, depths, seeds, names)
        self.write_csv("final_errors.csv", [{k: v for k, v in r.items() if k != "errors"} for r in rows])
        return rows, table

    def write_csv(self, name: str, rows: list[dict[str, Any]]) -> Path:
        path = self.out / name
        buf = io.StringIO()
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        atomic_write_text(path, buf.getvalue())
        return path

    def save_figure(self, fig: Any, stem: str) -> list[Path]:
        """The figure as ``<stem>.png`` and ``<stem>.svg``, each written atomically."""
        paths = []
        for ext in ("png", "svg"):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, dpi=130)
            path = self.out / f"{stem}.{ext}"
            atomic_write_bytes(path, buf.getvalue())
            paths.append(path)
        import matplotlib.pyplot as plt

        plt.close(fig)
        return paths

    def write_report(self, markdown: str) -> Path:
        path = self.out / "report.md"
        atomic_write_text(path, markdown.rstrip() + "\n")
        return path

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def seconds_per_step(
    model: torch.nn.Module, input_shape: tuple[int, int, int], batch_size: int, amp: str = "none", steps: int = 3
) -> float:
    """Median wall time of ``steps`` SGD training steps (forward, loss, backward, update) on random
    inputs in channels_last, after two warm-up steps: what the studies scale up to state their run
    time before they start. Measured, not derived from MACs: on a CPU depthwise convolutions and
    concatenations run far below the multiply-add rate of dense convolutions. Two warm-up steps,
    because the second step of a fresh MobileNetV2 or DenseNet still ran ~1.5x slower than later ones."""
    model = model.train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, *input_shape).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(batch_size, dtype=torch.long)
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


@torch.no_grad()
def inference_speed(model: torch.nn.Module, shape: tuple[int, int, int], batch: int = 256, repeats: int = 5) -> float:
    """Images per second of the model in eval mode on random inputs: the median of ``repeats`` timed
    batches after two warm-up batches (a single warm-up left EfficientNet's figure varying 1.7x
    between two runs of the families study)."""
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times[2:])


# Seconds each run spends outside its training steps and validation: start, data loader, checkpoints,
# metrics and the curves figure (1-3 s a run in a CIFAR-10 study with 2,250 training images).
RUN_OVERHEAD_S = 3.0


@dataclass(frozen=True)
class Speed:
    """A model's speed on this machine, measured before a study starts."""

    step_s: float  # one training step at the study's batch size (seconds_per_step)
    infer_img_per_s: float  # evaluation (inference_speed)


def measure_speed(config: TrainConfig, data: PreparedData) -> Speed:
    """The speed of the model that ``config`` trains on ``data``, built as ``train`` builds it."""
    model, _ = build_model(config, data)
    step_s = seconds_per_step(model, data.input_shape, min(config.batch_size, len(data.train)), config.amp)
    return Speed(step_s, inference_speed(model, data.input_shape))


def run_seconds(speed: Speed, config: TrainConfig, data: PreparedData) -> float:
    """Expected seconds of one training run: its steps, its validation passes (every ``eval_every``
    epochs and after the last) and :data:`RUN_OVERHEAD_S`."""
    n_val = len(data.val) if data.val else 0
    steps = len(data.train) // config.batch_size * config.epochs  # full batches only, as the loader trains
    validations = math.ceil(config.epochs / config.eval_every)
    return speed.step_s * steps + validations * n_val / speed.infer_img_per_s + RUN_OVERHEAD_S


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def config_block(config: TrainConfig) -> str:
    """The shared training settings, for the report."""
    return "```toml\n" + to_toml(config) + "```"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)
