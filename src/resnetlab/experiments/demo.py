"""``resnetlab demo``: deeper plain MLPs train worse; their residual twins do not (He et al. 2015, fig. 1).

Residual MLPs built from the fully connected block and their plain twins, at several depths of equal
width, are trained identically on the bundled 8x8 digits; the demo tabulates final training and
validation error per depth and plots training error against steps, plain and residual side by side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..data.prepare import prepare_data
from ..errors import UserError
from ..training.config import TrainConfig, knob
from ..training.progress import RunProgress
from .study import Study, check_settings, markdown_table, measure_speed, pyplot, run_seconds


@dataclass
class DemoSettings:
    """The demo's setup; every run uses the same recipe, only depth and the shortcut differ."""

    depths: list[int] = knob([2, 8, 32, 64], "hidden layers of the MLPs compared (even numbers)")
    width: int = knob(64, "width of every hidden layer")
    norm: str = knob("batch", "normalisation before each ReLU: batch, layer or none")
    epochs: int = knob(20, "training epochs of every run")
    batch_size: int = knob(64, "images per step")
    lr: float = knob(0.05, "SGD learning rate (constant)")
    seeds: int = knob(3, "seeds per network (mean and spread)")


def demo_config(settings: DemoSettings, depth: int, plain: bool, seed: int) -> TrainConfig:
    model_args: dict[str, Any] = {"depth": depth, "width": settings.width, "norm": settings.norm}
    return TrainConfig(
        model="residual_mlp",
        plain=plain,
        model_args=model_args,
        data="digits",
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        optimizer="sgd",
        weight_decay=0.0,
        warmup_epochs=0.0,
        schedule="constant",
        seed=seed,
        keep_checkpoints=1,
    )


def estimate_seconds(settings: DemoSettings) -> float:
    """Each network's training step and evaluation timed on this machine, scaled up to the demo."""
    data = prepare_data("digits")
    configs = [demo_config(settings, depth, plain, 0) for depth in settings.depths for plain in (False, True)]
    return settings.seeds * sum(run_seconds(measure_speed(c, data), c, data) for c in configs)


def run_demo(settings: DemoSettings, out: str | None = None, progress: bool = True) -> dict[str, Any]:
    bad = [d for d in settings.depths if d < 2 or d % 2]
    if bad:
        raise UserError(f"--depths {bad[0]}: hidden layers come two per block, so an even number >= 2")
    if settings.norm not in ("batch", "layer", "none"):
        raise UserError(f"--norm {settings.norm}: choose batch, layer or none")
    settings.depths = sorted(set(settings.depths))
    check_settings(settings, [demo_config(settings, d, p, 0) for d in settings.depths for p in (True, False)])
    study = Study.open("demo", out, progress=False)
    runs = [(d, p, s) for s in range(settings.seeds) for d in settings.depths for p in (True, False)]
    study.announce(
        f"{len(runs)} runs: residual MLPs and their plain twins with {settings.depths} hidden layers of width "
        f"{settings.width} on the 8x8 digits, {settings.seeds} seeds",
        estimate_seconds(settings),
    )

    histories: dict[tuple[int, bool, int], list[dict[str, Any]]] = {}
    with RunProgress(len(runs), "demo", enabled=progress) as bar:
        for depth, plain, seed in runs:
            bar.set_postfix_str(f"{'plain' if plain else 'residual'} depth {depth} seed {seed}")
            name = f"{'plain' if plain else 'residual'}-d{depth}-s{seed}"
            histories[depth, plain, seed] = study.run(name, demo_config(settings, depth, plain, seed))
            bar.update()
    return summarise(study, settings, histories)


def summarise(study: Study, settings: DemoSettings, histories: dict) -> dict[str, Any]:
    steps_per_epoch = len(prepare_data("digits").train) // settings.batch_size
    rows, table = study.write_final_errors(
        histories, settings.depths, settings.seeds, {True: "plain", False: "residual"}
    )
    curves = [
        {
            "depth": d,
            "net": "plain" if p else "residual",
            "seed": s,
            "epoch": r["epoch"],
            "step": r["epoch"] * steps_per_epoch,
            "train_error": 100 - r["train_acc"],
            "val_error": 100 - r["val_acc"],
        }
        for (d, p, s), hist in histories.items()
        for r in hist
    ]
    study.write_csv("curves.csv", curves)
    headline = {f"{r['net']}_{r['split']}_error_d{r['depth']}": round(r["error_mean"], 2) for r in rows}
    study.write_json("results.json", {"settings": asdict(settings), "final": rows, "headline": headline})
    _figure(study, settings, histories, steps_per_epoch)
    header = [
        "hidden layers",
        "plain train err %",
        "plain val err %",
        "residual train err %",
        "residual val err %",
    ]
    study.write_report(_report(settings, table, header, rows, study))
    print()
    print(markdown_table(header, table))
    print(f"\nfigure: {study.out / 'training_error.png'}   report: {study.out / 'report.md'}")
    return {"out": str(study.out), **headline}


def _figure(study: Study, settings: DemoSettings, histories: dict, steps_per_epoch: int) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, constrained_layout=True)
    colors = plt.cm.viridis_r([0.15 + 0.75 * i / max(1, len(settings.depths) - 1) for i in range(len(settings.depths))])
    for ax, plain in zip(axes, (True, False), strict=True):
        for color, depth in zip(colors, settings.depths, strict=True):
            runs = [histories[depth, plain, s] for s in range(settings.seeds)]
            steps = [r["epoch"] * steps_per_epoch for r in runs[0]]
            err = torch.tensor([[100 - r["train_acc"] for r in h] for h in runs])
            mean = err.mean(0).numpy()
            std = (err.std(0) if settings.seeds > 1 else torch.zeros(err.shape[1])).numpy()
            ax.plot(steps, mean, color=color, label=f"{depth} layers")
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        ax.set_title(f"{'plain' if plain else 'residual'} MLP")
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
        ax.legend(title="hidden layers")
    axes[0].set_ylabel("training error (%)")
    norm = f", {settings.norm} norm" if settings.norm != "none" else ", no normalisation"
    fig.suptitle(
        f"Training error on 8x8 digits: plain vs residual MLPs of width {settings.width}{norm} "
        f"(SGD lr {settings.lr}, batch {settings.batch_size}; mean ± std of {settings.seeds} seeds)"
    )
    study.save_figure(fig, "training_error")


def _report(settings: DemoSettings, table: list, header: list, rows: list, study: Study) -> str:
    def err(net: str, split: str, depth: int) -> float:
        return next(r["error_mean"] for r in rows if r["net"] == net and r["split"] == split and r["depth"] == depth)

    shallow, deep = settings.depths[0], settings.depths[-1]
    lines = [f"# Demo: plain against residual MLPs at depths {', '.join(map(str, settings.depths))}", ""]
    lines += [
        f"Residual MLPs (`residual_mlp`, fully connected blocks `out = ReLU(W2 ReLU(W1 a + b1) + b2 + a)`) and their "
        f"plain twins (the same layers without `+ a`) with {', '.join(map(str, settings.depths))} hidden layers of "
        f"width {settings.width}{', batch norm before each ReLU' if settings.norm == 'batch' else ''}, trained "
        f"identically on scikit-learn's 8x8 digits (1,797 images, 10% held out for validation, stratified): "
        f"SGD with momentum 0.9, learning rate {settings.lr} constant, batch {settings.batch_size}, "
        f"{settings.epochs} epochs, no weight decay, no augmentation; {settings.seeds} seeds (mean ± std).",
        "",
        "## Final errors (last epoch)",
        "",
        markdown_table(header, table),
        "",
        "![training error against steps](training_error.png)",
        "",
        "## What the numbers show",
        "",
    ]
    p_shallow, p_deep = err("plain", "train", shallow), err("plain", "train", deep)
    r_shallow, r_deep = err("residual", "train", shallow), err("residual", "train", deep)
    if p_deep > p_shallow + 1:
        lines.append(
            f"- The plain nets train worse as they get deeper: final training error {p_shallow:.2f}% with "
            f"{shallow} hidden layers against {p_deep:.2f}% with {deep}. Since a deeper plain net could copy the "
            "shallow one and set its extra layers to the identity, this is an optimisation failure, not "
            "overfitting: the degradation problem of He et al. 2015."
        )
    else:
        lines.append(
            f"- The plain nets did not get clearly worse with depth here: final training error {p_shallow:.2f}% "
            f"with {shallow} hidden layers and {p_deep:.2f}% with {deep}."
        )
    if r_deep <= p_deep - 1:
        worse = (
            f"they too end somewhat higher than with {shallow} ({r_shallow:.2f}%), but far below their plain twins"
            if r_deep > r_shallow + 1
            else f"as low as with {shallow} ({r_shallow:.2f}%)"
        )
        lines.append(
            f"- The residual nets of the same depths train to {r_deep:.2f}% training error at {deep} hidden layers: "
            f"{worse}. With the shortcut each block only has to learn a correction to the identity."
        )
    else:
        lines.append(
            f"- The residual nets reached {r_deep:.2f}% training error at {deep} hidden layers ({r_shallow:.2f}% at "
            f"{shallow}), not clearly better than their plain twins in this setting."
        )
    pv, rv = err("plain", "val", deep), err("residual", "val", deep)
    lines.append(f"- Validation error follows: {pv:.2f}% (plain) against {rv:.2f}% (residual) at {deep} hidden layers.")
    lines += [
        "",
        "Raw numbers: `final_errors.csv`, `curves.csv`, `results.json`; every run is in `runs/`.",
        "",
    ]
    lines.append(f"Study time: {study.elapsed():.0f} s.")
    return "\n".join(lines)
