"""``resnetlab study gradients``: how gradients reach the early layers of plain and residual nets.

Two stories from the literature, kept apart:

1. *Without normalisation*, the gradient of a plain network changes geometrically with depth from
   the output layer to the input layer (vanishing or exploding; Glorot & Bengio 2010, He et al. 2015);
   an identity shortcut adds a direct path, ``dL/dx_l = dL/dx_L (1 + d/dx_l sum F)`` (He et al.
   2016, eq. 5), so every block receives the top gradient unattenuated.
2. *With batch normalisation*, He et al. 2015 (sec. 4.1) checked that their plain nets' gradients
   had healthy norms, yet the deeper plain nets still trained worse. Balduzzi et al. 2017 ("The
   Shattered Gradients Problem") offer one reason: in deep plain nets the gradients at nearby inputs
   become uncorrelated, like white noise, while residual nets keep them correlated.

Panel 1: the norm of each convolution's weight gradient against its layer index (log scale), at
initialisation and after some training steps, for plain and residual nets with and without BN.
Panel 2: the cosine similarity of the input gradients at ``x`` and at a nearby ``x + r d`` against depth.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..data.loader import Batch, InMemoryLoader, StreamingLoader
from ..data.prepare import prepare_data
from ..errors import UserError
from ..training.config import TrainConfig, knob
from ..training.distributed import SINGLE_PROCESS
from ..training.engine import NonFiniteStep, Trainer
from ..training.progress import RunProgress
from .study import Study, check_settings, fmt_mean_std, markdown_table, mean_std, pyplot, seconds_per_step

VARIANTS = [(norm, plain) for norm in ("batch", "none") for plain in (True, False)]


@dataclass
class GradientSettings:
    """Per-layer gradient norms of plain and residual nets, with and without batch norm, and the correlation
    of gradients between nearby inputs (shattered gradients)."""

    data: str = knob("cifar10", "data set name or path (see resnetlab train --data)")
    depth: int = knob(56, "depth of the networks whose per-layer gradients are drawn")
    depths: list[int] = knob([8, 20, 56, 110], "depths for the input-gradient similarity panel")
    steps: list[int] = knob([0, 10, 100], "record gradients after these SGD steps (0: at initialisation)")
    batch_size: int = knob(128, "images per step")
    lr: float = knob(0.01, "SGD learning rate (a net that diverges is recorded as such, from that step on)")
    distance: float = knob(0.01, "distance of the nearby input, relative to the image's norm")
    seeds: int = knob(2, "seeds per network")
    threads: int = knob(0, "CPU threads; 0 = PyTorch's default")


def _name(norm: str, plain: bool) -> str:
    return f"{'plain' if plain else 'resnet'}-{'bn' if norm == 'batch' else 'nobn'}"


def _config(s: GradientSettings, depth: int, norm: str, plain: bool, seed: int) -> TrainConfig:
    return TrainConfig(
        model="resnet_cifar",
        model_args={"depth": depth, "norm_layer": norm},
        plain=plain,
        data=s.data,
        batch_size=s.batch_size,
        epochs=1,
        lr=s.lr,
        optimizer="sgd",
        weight_decay=1e-4,
        schedule="constant",
        warmup_epochs=0.0,
        augment="crop+flip",
        seed=seed,
    )


def conv_grad_norms(model: nn.Module) -> list[float]:
    """Norm of each convolution's weight gradient, in forward order (shortcut projections excluded)."""
    return [
        float(m.weight.grad.norm()) if m.weight.grad is not None else float("nan")
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and "downsample" not in name
    ]


def input_gradient_similarity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, distance: float, seed: int) -> float:
    """Mean cosine similarity of d(logit of the true class)/d(input) at ``x`` and at ``x + r d``.

    ``d`` is a random direction per image, scaled so ``||r d|| = distance * ||x||``. The model runs in
    training mode (batch statistics, as when it trains); near 1 means smooth, near 0 shattered.
    """
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(x.shape, generator=gen)
    scale = distance * x.flatten(1).norm(dim=1) / direction.flatten(1).norm(dim=1)
    grads = []
    for inputs in (x, x + scale.view(-1, 1, 1, 1) * direction):
        inputs = inputs.clone().requires_grad_(True)
        out = model(inputs)
        (g,) = torch.autograd.grad(out.gather(1, y.view(-1, 1)).sum(), inputs)
        grads.append(g.flatten(1))
    return float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=1).mean())


def run_gradients(s: GradientSettings, out: str | None = None, progress: bool = True) -> dict[str, Any]:
    if s.depth not in s.depths:
        s.depths = sorted({*s.depths, s.depth})
    for d in s.depths:
        if d < 8 or (d - 2) % 6:
            raise UserError(f"--depths {d}: CIFAR ResNets have 6n+2 layers (8, 14, 20, 32, 44, 56, 110, ...)")
    if sorted(s.steps) != s.steps or s.steps[0] < 0:
        raise UserError("--steps must be increasing numbers of training steps, starting at 0 or more")
    check_settings(s, [_config(s, d, n, p, 0) for d in s.depths for n, p in VARIANTS])
    study = Study.open("gradients", out, progress=False, threads=s.threads)
    data = prepare_data(s.data)
    jobs = [(seed, norm, plain) for seed in range(s.seeds) for norm, plain in VARIANTS]
    study.announce(
        f"per-layer gradients of plain/residual {s.depth}-layer nets with and without BN over {s.steps[-1]} "
        f"training steps, and input-gradient similarity at depths {s.depths}; {s.seeds} seeds, {data.name}",
        _estimate(s),
    )

    norms: dict[str, dict[int, list[list[float]]]] = {}  # variant -> step -> per seed: per-layer norms
    losses: dict[str, dict[int, list[float]]] = {}
    similarity: dict[str, dict[int, list[float]]] = {}  # variant -> depth -> per seed
    diverged: dict[str, list[int | None]] = {}  # variant -> per seed: the first non-finite step, if any
    with RunProgress(len(jobs) * (1 + len(s.depths)), "gradients", unit="step", enabled=progress) as bar:
        for seed, norm, plain in jobs:
            key = _name(norm, plain)
            bar.set_postfix_str(f"{key} seed {seed}")
            trainer = Trainer(_config(s, s.depth, norm, plain, seed), torch.device("cpu"), SINGLE_PROCESS, data=data)
            batches = _endless_batches(trainer.train_loader)
            diverged.setdefault(key, []).append(None)
            for step in range(s.steps[-1] + 1):
                x, y = next(batches)
                try:
                    stats = trainer.step(x, y)  # leaves this step's gradients in .grad
                except NonFiniteStep:
                    # Un-normalised residual nets can: their activations grow with depth (He init, no BN).
                    # The net stops here; this and every later recorded step are recorded as undefined.
                    diverged[key][-1] = step
                    n = len(conv_grad_norms(trainer.core))
                    for later in [t for t in s.steps if t >= step]:
                        norms.setdefault(key, {}).setdefault(later, []).append([float("nan")] * n)
                        losses.setdefault(key, {}).setdefault(later, []).append(float("nan"))
                    break
                if step in s.steps:
                    norms.setdefault(key, {}).setdefault(step, []).append(conv_grad_norms(trainer.core))
                    losses.setdefault(key, {}).setdefault(step, []).append(float(stats[0] / stats[2]))
            bar.update(1)
            x, y = data.train.images[:64], data.train.labels[:64]
            for depth in s.depths:
                torch.manual_seed(seed)
                trainer = Trainer(_config(s, depth, norm, plain, seed), torch.device("cpu"), SINGLE_PROCESS, data=data)
                model = trainer.core.train()
                sim = input_gradient_similarity(model, trainer.preprocess(x), y, s.distance, seed)
                similarity.setdefault(key, {}).setdefault(depth, []).append(sim)
                bar.update(1)
    return _summarise(study, s, data.name, norms, losses, similarity, diverged)


def _endless_batches(loader: InMemoryLoader | StreamingLoader) -> Iterator[Batch]:
    """The loader's batches epoch after epoch, each epoch reshuffled as training reshuffles it.

    ``--steps`` counts SGD steps, not epochs: the default 100 steps of 128 images are several epochs of
    a small data set (digits has 11 batches), so one epoch's iterator would run out mid-study.
    """
    for epoch in itertools.count():
        yield from loader.batches(epoch)


def _estimate(s: GradientSettings) -> float:
    from ..models import cifar_resnet

    step = seconds_per_step(cifar_resnet(s.depth), (3, 32, 32), s.batch_size)
    sims = sum(d / s.depth for d in s.depths) * 64 / s.batch_size * 4 * step
    return (step * (s.steps[-1] + 1) + sims) * len(VARIANTS) * s.seeds + 10


def _summarise(
    study: Study, s: GradientSettings, data_name: str, norms, losses, similarity, diverged
) -> dict[str, Any]:
    rows = []
    for key, by_step in norms.items():
        for step, per_seed in by_step.items():
            for seed, layer_norms in enumerate(per_seed):
                for i, value in enumerate(layer_norms):
                    rows.append({"variant": key, "step": step, "seed": seed, "layer": i + 1, "grad_norm": value})
    study.write_csv("grad_norms.csv", rows)
    sim_rows = [
        {"variant": key, "depth": d, "seed": i, "cosine_similarity": v}
        for key, by_depth in similarity.items()
        for d, values in by_depth.items()
        for i, v in enumerate(values)
    ]
    study.write_csv("gradient_similarity.csv", sim_rows)

    table, headline = [], {}
    for key in norms:
        for step in s.steps:
            per_seed = torch.tensor(norms[key][step])  # seeds x layers
            first, last = per_seed[:, 0], per_seed[:, -1]
            ratio = (first / last).tolist()
            headline[f"{key}_step{step}_first_over_last"] = _finite_or_none(mean_std(ratio)[0], 4)
            table.append(
                [
                    key,
                    step,
                    fmt_mean_std(first.tolist(), 4),
                    fmt_mean_std(last.tolist(), 4),
                    fmt_mean_std(ratio, 3),
                    fmt_mean_std(losses[key][step], 3),
                ]
            )
    sim_table = [[key] + [fmt_mean_std(similarity[key][d], 3) for d in s.depths] for key in similarity]
    for key in similarity:
        headline[f"{key}_similarity_d{s.depths[-1]}"] = _finite_or_none(mean_std(similarity[key][s.depths[-1]])[0], 4)
    study.write_json(
        "results.json",
        {
            "settings": asdict(s),
            "data": data_name,
            "headline": headline,
            "grad_norm_table": table,
            "similarity": similarity,
            "diverged_at_step": diverged,
        },
    )
    _figure(study, s, data_name, norms, similarity)
    header = ["net", "step", "first conv grad norm", "last conv grad norm", "first / last", "batch loss"]
    sim_header = ["net"] + [f"depth {d}" for d in s.depths]
    study.write_report(
        _report(study, s, data_name, table, header, sim_table, sim_header, norms, losses, similarity, diverged)
    )
    print()
    print(markdown_table(header, table))
    print()
    print(markdown_table(sim_header, sim_table))
    print(f"\nfigure: {study.out / 'gradients.png'}   report: {study.out / 'report.md'}")
    return {"out": str(study.out), **headline}


def _figure(study: Study, s: GradientSettings, data_name: str, norms, similarity) -> None:
    plt = pyplot()
    fig = plt.figure(figsize=(15, 4.8), constrained_layout=True)
    grid = fig.add_gridspec(1, 3)
    colors = {"plain": "tab:red", "resnet": "tab:blue"}
    styles = {s.steps[0]: "-", s.steps[-1]: "--"}
    for col, norm in enumerate(("bn", "nobn")):
        ax = fig.add_subplot(grid[0, col])
        for key in norms:
            if not key.endswith("-" + norm):
                continue
            for step, style in styles.items():
                per_seed = torch.tensor(norms[key][step])
                if per_seed.isnan().all():
                    continue  # every seed diverged before this step: nothing to draw (the report says so)
                mean = torch.nanmean(per_seed, 0).tolist()  # over the seeds that had not diverged
                layers = range(1, len(mean) + 1)
                ax.semilogy(
                    layers,
                    mean,
                    style,
                    color=colors[key.split("-")[0]],
                    label=f"{key.split('-')[0]}, step {step}",
                )
        ax.set_title(f"{s.depth}-layer nets, {'with BN' if norm == 'bn' else 'without normalisation'}")
        ax.set_xlabel("convolution (layer index, input to output)")
        ax.set_ylabel("weight-gradient norm")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[0, 2])
    for key, by_depth in similarity.items():
        kind, norm = key.split("-")
        means = [mean_std(by_depth[d])[0] for d in s.depths]
        stds = [mean_std(by_depth[d])[1] for d in s.depths]
        ax.errorbar(
            s.depths,
            means,
            yerr=stds,
            marker="o",
            capsize=3,
            color=colors[kind],
            linestyle="-" if norm == "bn" else ":",
            label=f"{kind}, {'BN' if norm == 'bn' else 'no norm'}",
        )
    ax.set_xscale("log")
    ax.set_xticks(s.depths, [str(d) for d in s.depths])
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel(f"cosine similarity of input gradients (r = {s.distance:g}·||x||)")
    ax.set_title("shattered gradients (Balduzzi et al. 2017)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(
        f"Gradients of plain and residual CIFAR nets on {data_name} at initialisation (solid) and after "
        f"{s.steps[-1]} SGD steps (dashed), batch {s.batch_size}, lr {s.lr}; mean of {s.seeds} seeds"
    )
    study.save_figure(fig, "gradients")


def _finite_or_none(value: float, digits: int) -> float | None:
    """A figure for JSON, which has no NaN: ``None`` where every seed diverged."""
    return round(value, digits) if math.isfinite(value) else None


def _report(study, s, data_name, table, header, sim_table, sim_header, norms, losses, similarity, diverged) -> str:
    def ratio(key: str, step: int) -> float:  # mean over the seeds that had not diverged (NaN: none)
        per_seed = torch.tensor(norms[key][step])
        return mean_std((per_seed[:, 0] / per_seed[:, -1]).tolist())[0]

    def sim(key: str, depth: int) -> float:
        return mean_std(similarity[key][depth])[0]

    step0, deep = s.steps[0], s.depths[-1]
    lines = [
        f"# Gradients of plain and residual networks ({data_name})",
        "",
        f"CIFAR networks of {s.depth} layers (option A shortcuts; plain twins without them), with batch norm and "
        f"with every normalisation removed (`norm_layer=none`), He initialisation. Gradients of the cross-entropy on "
        f"real batches of {s.batch_size} augmented training images, recorded at steps {s.steps} of SGD "
        f"(lr {s.lr}, momentum 0.9). {s.seeds} seeds.",
        "",
        "## Per-layer gradient norms",
        "",
        markdown_table(header, table),
        "",
        "`first / last`: the first convolution's weight-gradient norm over the last one's; far below 1 means the "
        "gradient shrinks on its way to the input, far above 1 that it grows.",
        "",
        "![gradients](gradients.png)",
        "",
        "## Input-gradient similarity (shattered gradients)",
        "",
        markdown_table(sim_header, sim_table),
        "",
        f"Cosine similarity between the input gradients at a training image and at a point {s.distance:g}·||x|| "
        "away in a random direction, in training mode, at initialisation.",
        "",
        "## What the numbers show",
        "",
        "**Without normalisation** (the first story):",
        f"- plain: first/last gradient ratio {ratio('plain-nobn', step0):.3g} at initialisation; "
        f"residual: {ratio('resnet-nobn', step0):.3g}.",
        *_divergence_lines(diverged, losses, step0),
        "",
        "**With batch normalisation** (the second story):",
        f"- plain: first/last ratio {ratio('plain-bn', step0):.3g}; residual: {ratio('resnet-bn', step0):.3g}. "
        f"After {s.steps[-1]} steps: plain {ratio('plain-bn', s.steps[-1]):.3g}, "
        f"residual {ratio('resnet-bn', s.steps[-1]):.3g}.",
        f"- input-gradient similarity at depth {deep}: plain {sim('plain-bn', deep):.3f}, residual "
        f"{sim('resnet-bn', deep):.3f} (at depth {s.depths[0]}: plain {sim('plain-bn', s.depths[0]):.3f}, residual "
        f"{sim('resnet-bn', s.depths[0]):.3f}).",
        "",
        _interpret(ratio, sim, s),
        "",
        "Raw numbers: `grad_norms.csv`, `gradient_similarity.csv`, `results.json`. "
        f"Study time: {study.elapsed():.0f} s.",
    ]
    return "\n".join(lines)


def _divergence_lines(diverged: dict[str, list[int | None]], losses, step0: int) -> list[str]:
    """A bullet per variant whose training went non-finite: which seeds, at which step, from what loss."""
    lines = []
    for key, steps in diverged.items():
        hit = [(seed, step) for seed, step in enumerate(steps) if step is not None]
        if hit:
            where = ", ".join(f"step {step} (seed {seed})" for seed, step in hit)
            start = fmt_mean_std(losses[key][step0], 0)
            lines.append(
                f"- {key} diverged (a non-finite loss or gradient) at {where}, from a loss of {start} at step "
                f"{step0}; its later rows are n/a. Without normalisation the residual additions let the "
                "activations grow with depth, which He initialisation does not correct (Fixup and SkipInit, "
                "Zhang et al. 2019 and De & Smith 2020, rescale or zero the branches for this)."
            )
    return lines


def _interpret(ratio, sim, s: GradientSettings) -> str:
    step0, deep, shallow = s.steps[0], s.depths[-1], s.depths[0]
    parts = []
    bn_plain = ratio("plain-bn", step0)
    if 0.1 < bn_plain < 10:
        parts.append(
            f"With BN the plain net's gradient norms stay within an order of magnitude from last layer to first "
            f"(ratio {bn_plain:.2g}), as He et al. observed, so vanishing gradients do not explain its worse training."
        )
    else:
        parts.append(
            f"With BN the plain net's first-to-last gradient ratio is {bn_plain:.2g}: "
            "the gradient norms change by more "
            "than an order of magnitude across the network at this depth."
        )
    drop_plain = sim("plain-bn", shallow) - sim("plain-bn", deep)
    drop_res = sim("resnet-bn", shallow) - sim("resnet-bn", deep)
    if drop_plain > drop_res:
        parts.append(
            f"The input gradients of plain BN nets decorrelate faster with depth (similarity falls by {drop_plain:.2f} "
            f"from depth {shallow} to {deep}, against {drop_res:.2f} for residual nets): "
            "the shattering Balduzzi et al. "
            "describe, which the shortcut resists."
        )
    else:
        parts.append(
            f"Here the plain BN nets' input-gradient similarity fell by {drop_plain:.2f} "
            f"from depth {shallow} to {deep}, "
            f"the residual nets' by {drop_res:.2f}: no stronger shattering in the plain nets at this distance."
        )
    return " ".join(parts)
