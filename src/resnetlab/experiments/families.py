"""``resnetlab study families``: residual designs compared at one recipe and one budget.

Each chosen model (ResNets, MobileNetV2, EfficientNet-B0, DenseNet-BC, their plain twins: any
registered name) is trained with the same recipe on the same data; the study reports validation
accuracy against parameters, multiply-accumulates and the training and inference speed measured on
this machine, as a table and an accuracy-versus-cost figure, with mean and spread over seeds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..data.prepare import prepare_data
from ..errors import UserError
from ..models import is_model
from ..summary import format_count, summarize
from ..training.config import TrainConfig, knob
from ..training.progress import RunProgress
from ..training.setup import build_model
from .study import Study, check_settings, fmt_mean_std, markdown_table, mean_std, measure_speed, pyplot, run_seconds


@dataclass
class FamilySettings:
    """Residual designs trained with one recipe and one budget: accuracy against parameters, MACs and speed."""

    data: str = knob("cifar10", "data set name or path (see resnetlab train --data)")
    models: list[str] = knob(
        ["resnet20", "resnet56", "mobilenet_v2_cifar", "efficientnet_b0_cifar", "densenet_bc_100"],
        "registered models to compare (any name from resnetlab list)",
    )
    budget: float = knob(0.1, "fraction of the training images used")
    epochs: int = knob(4, "training epochs of every run")
    seeds: int = knob(2, "seeds per model (mean and spread)")
    batch_size: int = knob(128, "images per step")
    lr: float = knob(0.1, "peak learning rate (SGD, cosine with one warm-up epoch)")
    amp: str = knob("none", "mixed precision for every run: none or bf16")
    threads: int = knob(0, "CPU threads; 0 = PyTorch's default")


def _config(s: FamilySettings, model: str, seed: int) -> TrainConfig:
    return TrainConfig(
        model=model,
        data=s.data,
        train_fraction=s.budget,
        epochs=s.epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        weight_decay=5e-4,
        schedule="cosine",
        warmup_epochs=1.0,
        label_smoothing=0.1,
        channels_last=True,
        amp=s.amp,  # type: ignore[arg-type]
        threads=s.threads,
        seed=seed,
        keep_checkpoints=1,
        # Only the final accuracy is reported: validating after every epoch would cost the slow
        # models (DenseNet evaluates ~130 images/s here) a third of the study's time for nothing.
        eval_every=s.epochs,
    )


def run_families(s: FamilySettings, out: str | None = None, progress: bool = True) -> dict[str, Any]:
    unknown = [m for m in s.models if not is_model(m)]
    if unknown:
        raise UserError(f"--models {unknown[0]}: not a registered model (resnetlab list)")
    if s.amp not in ("none", "bf16"):
        raise UserError("--amp must be none or bf16")
    check_settings(s, [_config(s, m, 0) for m in s.models])
    study = Study.open("families", out, progress=False, threads=s.threads)
    data = prepare_data(s.data, train_fraction=s.budget)
    n_train = len(data.train)

    # Costs first, and the speeds measured on this machine: they are results and they give the estimate.
    study.say(f"families: measuring parameters, MACs and speed of {len(s.models)} models on this machine")
    costs, estimate = {}, 0.0
    for name in s.models:
        config = _config(s, name, 0)
        summary = summarize(build_model(config, data)[0], data.input_shape)
        speed = measure_speed(config, data)  # a few SGD steps do not change its inference speed
        costs[name] = {"params": summary.params, "macs": summary.macs, "infer_img_per_s": speed.infer_img_per_s}
        estimate += s.seeds * run_seconds(speed, config, data)
    study.announce(
        f"{len(s.models)} models x {s.seeds} seeds on {n_train} images of {data.name} for {s.epochs} epochs",
        estimate,
    )

    results: dict[str, dict[str, Any]] = {}
    with RunProgress(len(s.models) * s.seeds, "families", enabled=progress) as bar:
        for name in s.models:
            accs, train_speed = [], []
            for seed in range(s.seeds):
                bar.set_postfix_str(f"{name} seed {seed}")
                history = study.run(f"{name}-s{seed}", _config(s, name, seed))
                accs.append(history[-1]["val_acc"])
                train_speed.append(sum(r["img_per_s"] for r in history) / len(history))
                bar.update(1)
            results[name] = {**costs[name], "val_acc": accs, "train_img_per_s": train_speed}
    return _summarise(study, s, data.name, n_train, results)


def _summarise(study: Study, s: FamilySettings, data_name: str, n_train: int, results: dict) -> dict[str, Any]:
    rows, table = [], []
    for name, r in results.items():
        m, sd = mean_std(r["val_acc"])
        speed = mean_std(r["train_img_per_s"])[0]
        rows.append(
            {
                "model": name,
                "params": r["params"],
                "macs": r["macs"],
                "val_acc_mean": m,
                "val_acc_std": sd,
                "train_img_per_s": round(speed, 1),
                "infer_img_per_s": round(r["infer_img_per_s"], 1),
            }
        )
        table.append(
            [
                name,
                f"{r['params']:,}",
                format_count(r["macs"]),
                fmt_mean_std(r["val_acc"]),
                f"{speed:.0f}",
                f"{r['infer_img_per_s']:.0f}",
            ]
        )
    study.write_csv("families.csv", rows)
    headline = {f"{r['model']}_val_acc": round(r["val_acc_mean"], 2) for r in rows}
    study.write_json(
        "results.json",
        {"settings": asdict(s), "data": data_name, "train_images": n_train, "models": rows, "headline": headline},
    )
    _figure(study, s, data_name, n_train, rows, results)
    header = ["model", "parameters", "MACs", "val acc %", "train img/s", "inference img/s"]
    best = max(rows, key=lambda r: r["val_acc_mean"])
    cheapest = min(rows, key=lambda r: r["macs"])
    fastest = max(rows, key=lambda r: r["train_img_per_s"])
    lines = [
        f"# Residual families on {data_name}",
        "",
        f"Every model trained with one recipe: {n_train} training images ({s.budget:.0%} of the split after holding "
        f"out validation), {s.epochs} epochs, SGD lr {s.lr} cosine with one warm-up epoch, weight decay 5e-4, "
        f"label smoothing 0.1, batch {s.batch_size}, crop and flip, precision {s.amp}; {s.seeds} seeds. Speeds are "
        "measured on this machine: training as the mean images/s of the runs' epochs, inference in eval mode at "
        "batch 256 (channels_last, float32). MACs per image at the data's size. Validation accuracy after the "
        "last epoch.",
        "",
        markdown_table(header, table),
        "",
        "![accuracy against cost](families.png)",
        "",
        "## What the numbers show",
        "",
        f"- Most accurate at this budget: {best['model']} ({best['val_acc_mean']:.2f}%); fewest MACs: "
        f"{cheapest['model']} ({format_count(cheapest['macs'])}); fastest to train here: {fastest['model']} "
        f"({fastest['train_img_per_s']:.0f} images/s).",
        "- MACs are not time on a CPU: depthwise convolutions (MobileNetV2, EfficientNet) and concatenations "
        "(DenseNet) run far below the machine's multiply-add rate, so compare the measured speeds.",
        f"- With {s.epochs} epochs on {s.budget:.0%} of the data these are early-training accuracies, not the "
        "models' converged ones; bigger models usually need longer to pull ahead.",
        "",
        f"Raw numbers: `families.csv`, `results.json`; runs in `runs/`. Study time: {study.elapsed():.0f} s.",
    ]
    study.write_report("\n".join(lines))
    print()
    print(markdown_table(header, table))
    print(f"\nfigure: {study.out / 'families.png'}   report: {study.out / 'report.md'}")
    return {"out": str(study.out), **headline}


def _figure(study: Study, s: FamilySettings, data_name: str, n_train: int, rows: list, results: dict) -> None:
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), constrained_layout=True)
    keys = [
        ("macs", "multiply-accumulates per image"),
        ("params", "parameters"),
        ("train_img_per_s", "training images per second (this machine)"),
    ]
    colors = plt.cm.tab10.colors
    for ax, (key, label) in zip(axes, keys, strict=True):
        for i, r in enumerate(rows):
            sd = r["val_acc_std"]
            ax.errorbar(r[key], r["val_acc_mean"], yerr=sd, fmt="o", capsize=4, color=colors[i % 10], label=r["model"])
        ax.set_xscale("log")  # the costs span one to two orders of magnitude
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_count(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)  # colours name the models (labels next to the points collide)
    fig.suptitle(
        f"Accuracy against cost on {data_name}: {n_train} training images, {s.epochs} epochs, one recipe; "
        f"mean ± std of {s.seeds} seeds"
    )
    study.save_figure(fig, "families")
