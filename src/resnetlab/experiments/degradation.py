"""``resnetlab study degradation``: the ResNet paper's figure 6 on CIFAR-10 or any image folder.

Plain and residual CIFAR networks at several depths (default 20, 32, 44, 56) are trained with one
recipe, the paper's (SGD, lr 0.1 divided by 10 at 50% and 75% of training, weight decay 1e-4, batch
128, pad-4 crop and flip). ``--budget F`` trains on the fraction F of the training images for
``ceil(164 F)`` epochs (so about F^2 of the paper's compute) so that a CPU can finish in reasonable
time; the report records it. Training error (running average over each epoch, dashed) and validation
error (solid) are plotted against iterations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..data.prepare import PreparedData, prepare_data
from ..training.config import TrainConfig, knob
from ..training.progress import RunProgress
from .study import Study, check_settings, config_block, markdown_table, measure_speed, pyplot, run_seconds

PAPER_EPOCHS = 164
_NAMED = (20, 32, 44, 56, 110, 1202)  # depths with a registered name


@dataclass
class DegradationSettings:
    """Plain and residual CIFAR nets at growing depth, trained with one recipe (the paper's figure 6)."""

    data: str = knob("cifar10", "cifar10, cifar100, an image folder or archive (see resnetlab train --data)")
    depths: list[int] = knob([20, 32, 44, 56], "network depths (6n+2)")
    budget: float = knob(1.0, "fraction of the training images; epochs become ceil(164 x budget)")
    seeds: int = knob(1, "seeds per network (mean and spread)")
    batch_size: int = knob(128, "images per step (the paper's 128)")
    threads: int = knob(0, "CPU threads; 0 = PyTorch's default")

    @property
    def epochs(self) -> int:
        return max(1, math.ceil(PAPER_EPOCHS * self.budget))


def degradation_config(s: DegradationSettings, depth: int, plain: bool, seed: int) -> TrainConfig:
    return TrainConfig(
        model=f"resnet{depth}" if depth in _NAMED else "resnet_cifar",
        model_args={} if depth in _NAMED else {"depth": depth},
        plain=plain,
        data=s.data,
        train_fraction=s.budget,
        epochs=s.epochs,
        batch_size=s.batch_size,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=False,
        weight_decay=1e-4,
        decay_norm_and_bias=True,
        schedule="step",
        milestones=[0.5, 0.75],
        warmup_epochs=0.0,
        augment="crop+flip",
        pad_mode="zeros",
        channels_last=True,
        threads=s.threads,
        seed=seed,
        keep_checkpoints=1,
    )


def estimate_seconds(s: DegradationSettings, data: PreparedData) -> float:
    """Each network's training step and evaluation timed on this machine, scaled up to the study."""
    configs = [degradation_config(s, depth, plain, 0) for depth in s.depths for plain in (True, False)]
    return s.seeds * sum(run_seconds(measure_speed(c, data), c, data) for c in configs)


def run_degradation(s: DegradationSettings, out: str | None = None, progress: bool = True) -> dict[str, Any]:
    for depth in s.depths:
        if depth < 8 or (depth - 2) % 6:
            from ..errors import UserError

            raise UserError(f"--depths {depth}: CIFAR ResNets have 6n+2 layers (8, 14, 20, 32, 44, 56, 110, ...)")
    if s.depths != sorted(set(s.depths)):
        s.depths = sorted(set(s.depths))
    check_settings(s, [degradation_config(s, d, p, 0) for d in s.depths for p in (True, False)])
    study = Study.open("degradation", out, progress=False, threads=s.threads)
    data = prepare_data(s.data, train_fraction=s.budget)
    runs = [(d, p, seed) for seed in range(s.seeds) for d in s.depths for p in (True, False)]
    study.announce(
        f"{len(runs)} runs: plain and residual CIFAR nets of depths {s.depths} on {data.name}, "
        f"{len(data.train)} training images (budget {s.budget:g}), {s.epochs} epochs, {s.seeds} seed(s)",
        estimate_seconds(s, data),
    )

    steps_per_epoch = len(data.train) // s.batch_size
    histories = {}
    with RunProgress(len(runs), "degradation", enabled=progress) as bar:
        for depth, plain, seed in runs:
            kind = "plain" if plain else "resnet"
            bar.set_postfix_str(f"{kind}-{depth} seed {seed}")
            histories[depth, plain, seed] = study.run(
                f"{kind}{depth}-s{seed}", degradation_config(s, depth, plain, seed)
            )
            bar.update()
    return _summarise(study, s, histories, steps_per_epoch, data.name, len(data.train), len(data.val or []))


def _summarise(study, s, histories, steps_per_epoch, data_name, n_train, n_val) -> dict[str, Any]:
    rows, table = study.write_final_errors(histories, s.depths, s.seeds, {True: "plain", False: "resnet"})
    curves = [
        {
            "depth": d,
            "net": "plain" if p else "resnet",
            "seed": seed,
            "epoch": r["epoch"],
            "iteration": r["epoch"] * steps_per_epoch,
            "train_error": round(100 - r["train_acc"], 4),
            "val_error": round(100 - r["val_acc"], 4),
            "lr": r["lr"],
            "epoch_seconds": r["epoch_seconds"],
        }
        for (d, p, seed), hist in histories.items()
        for r in hist
    ]
    study.write_csv("curves.csv", curves)
    headline = {f"{r['net']}{r['depth']}_{r['split']}_error": round(r["error_mean"], 2) for r in rows}
    study.write_json(
        "results.json",
        {
            "settings": {**asdict(s), "epochs": s.epochs},
            "data": data_name,
            "train_images": n_train,
            "val_images": n_val,
            "final": rows,
            "headline": headline,
        },
    )
    _figure(study, s, histories, steps_per_epoch, data_name, n_train)
    header = ["depth", "plain train err %", "plain val err %", "ResNet train err %", "ResNet val err %"]
    study.write_report(_report(study, s, table, header, rows, data_name, n_train, n_val))
    print()
    print(markdown_table(header, table))
    print(f"\nfigure: {study.out / 'errors.png'}   report: {study.out / 'report.md'}")
    return {"out": str(study.out), **headline}


def _figure(study, s, histories, steps_per_epoch, data_name, n_train) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True, constrained_layout=True)
    colors = plt.cm.plasma([0.1 + 0.7 * i / max(1, len(s.depths) - 1) for i in range(len(s.depths))])
    for ax, plain in zip(axes, (True, False), strict=True):
        for color, depth in zip(colors, s.depths, strict=True):
            hists = [histories[depth, plain, seed] for seed in range(s.seeds)]
            its = [r["epoch"] * steps_per_epoch for r in hists[0]]
            for key, style, label in (("train_acc", "--", "train"), ("val_acc", "-", "val")):
                err = torch.tensor([[100 - r[key] for r in h] for h in hists])
                mean = err.mean(0).numpy()
                ax.plot(its, mean, style, color=color, label=f"{'plain' if plain else 'ResNet'}-{depth} {label}")
                if s.seeds > 1:
                    sd = err.std(0).numpy()
                    ax.fill_between(its, mean - sd, mean + sd, color=color, alpha=0.15, linewidth=0)
        ax.set_title(f"{'plain' if plain else 'residual'} networks")
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("error (%)  (dashed: training, solid: validation)")
    fig.suptitle(
        f"{data_name}: plain vs residual CIFAR nets, depths {', '.join(map(str, s.depths))}; {n_train} training "
        f"images, {s.epochs} epochs (budget {s.budget:g}), {s.seeds} seed(s)"
    )
    study.save_figure(fig, "errors")


def _report(study, s, table, header, rows, data_name, n_train, n_val) -> str:
    def err(net, split, depth):
        return next(r["error_mean"] for r in rows if (r["net"], r["split"], r["depth"]) == (net, split, depth))

    lo, hi = s.depths[0], s.depths[-1]
    lines = [
        f"# Degradation study on {data_name}",
        "",
        "Plain CIFAR networks and their residual twins (option A shortcuts) at depths "
        f"{', '.join(map(str, s.depths))}, "
        f"trained with the same recipe (He et al. 2015, sec. 4.2). Budget {s.budget:g}: {n_train} training images "
        f"(a stratified {s.budget:.0%} of the training split after holding out {n_val} for validation) for "
        f"{s.epochs} epochs, {s.seeds} seed(s). Errors are of the final epoch; training error is the running "
        "average over that epoch (with augmentation), validation error is on the held-out images.",
        "",
        markdown_table(header, table),
        "",
        "![errors against iterations](errors.png)",
        "",
        "## What the numbers show",
        "",
    ]
    p_lo, p_hi, r_lo, r_hi = (
        err("plain", "train", lo),
        err("plain", "train", hi),
        err("resnet", "train", lo),
        err("resnet", "train", hi),
    )
    if p_hi > p_lo:
        lines.append(
            f"- Plain nets: the {hi}-layer net ends with higher training error than the {lo}-layer one "
            f"({p_hi:.2f}% against {p_lo:.2f}%): the degradation the paper reports (its figure 6, left)."
        )
    else:
        lines.append(
            f"- Plain nets: no degradation here: training error {p_lo:.2f}% at {lo} layers, {p_hi:.2f}% at {hi}."
        )
    if r_hi < r_lo:
        lines.append(
            f"- Residual nets: deeper is better: training error {r_lo:.2f}% at {lo} layers, {r_hi:.2f}% at {hi} "
            "(figure 6, middle)."
        )
    else:
        lines.append(f"- Residual nets: training error {r_lo:.2f}% at {lo} layers and {r_hi:.2f}% at {hi}.")
    lines.append(
        f"- At {hi} layers the residual net's validation error is {err('resnet', 'val', hi):.2f}% against "
        f"{err('plain', 'val', hi):.2f}% for its plain twin."
    )
    if s.budget < 1:
        lines.append(
            f"- With budget {s.budget:g} these are short runs ({s.epochs} epochs on {n_train} images): absolute errors "
            "are far above the paper's; the comparison between depths is what the study measures."
        )
    lines += [
        "",
        "## Recipe (one run; depth, plain and seed vary)",
        "",
        config_block(degradation_config(s, lo, True, 0)),
    ]
    lines += [
        "",
        "Raw numbers: `final_errors.csv`, `curves.csv`, `results.json`; runs in `runs/`. "
        f"Study time this session: {study.elapsed():.0f} s.",
    ]
    return "\n".join(lines)
