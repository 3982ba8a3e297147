"""``resnetlab study lesion``: delete blocks from trained networks (Veit et al. 2016, "Residual
Networks Behave Like Ensembles of Relatively Shallow Networks").

From a trained ResNet, one residual block at a time is removed, keeping its shortcut (the block then
computes ``post_activation(shortcut(x))``); from its trained plain twin, one block at a time is
replaced by the identity, where its input and output shapes agree. Then several blocks at once:
random sets of k blocks for growing k. Veit et al. found that removing a single block barely changes a
ResNet's accuracy but ruins a plain network.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..blocks.residual import ResidualBlock
from ..checkpoint import load_model
from ..data.prepare import prepare_data
from ..errors import UserError
from ..training.config import TrainConfig, knob
from ..training.evaluate import evaluate
from ..training.progress import RunProgress
from ..training.setup import Preprocess, make_loader
from .study import Study, check_settings, fmt_mean_std, markdown_table, mean_std, measure_speed, pyplot, run_seconds


class Skip(nn.Module):
    """A lesioned block: only its shortcut path remains (the identity for a plain block)."""

    def __init__(self, block: ResidualBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.block.has_shortcut:
            return x
        return self.block.post_activation(self.block.shortcut(x))


def removable(block: ResidualBlock) -> bool:
    """A plain block can only be dropped where it keeps the shape; a residual block always can."""
    if block.has_shortcut:
        return True
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return convs[0].in_channels == convs[-1].out_channels and all(c.stride == (1, 1) for c in convs)


def lesioned(model: nn.Module, remove: set[int]) -> nn.Module:
    """A copy of ``model`` whose blocks at the given indices (forward order) are replaced by ``Skip``."""
    import copy

    clone = copy.deepcopy(model)
    blocks = clone.residual_blocks()
    for name in clone.stage_names:
        stage = getattr(clone, name)
        for j, block in enumerate(stage):
            i = next(k for k, b in enumerate(blocks) if b is block)
            if i in remove:
                stage[j] = Skip(block)
    return clone


@dataclass
class LesionSettings:
    """Removing blocks from a trained ResNet and layers from its trained plain twin (Veit et al. 2016)."""

    data: str = knob("cifar10", "data set name or path (see resnetlab train --data)")
    depth: int = knob(56, "depth of the ResNet and its plain twin (6n+2)")
    budget: float = knob(0.1, "fraction of the training images used")
    epochs: int = knob(20, "training epochs")
    seeds: int = knob(1, "seeds (mean and spread)")
    samples: int = knob(10, "random sets of blocks per size in the several-blocks lesion")
    batch_size: int = knob(128, "images per step")
    threads: int = knob(0, "CPU threads; 0 = PyTorch's default")


def _config(s: LesionSettings, plain: bool, seed: int) -> TrainConfig:
    return TrainConfig(
        model="resnet_cifar",
        model_args={"depth": s.depth},
        plain=plain,
        data=s.data,
        train_fraction=s.budget,
        epochs=s.epochs,
        batch_size=s.batch_size,
        lr=0.1,
        weight_decay=5e-4,
        schedule="cosine",
        warmup_epochs=1.0,
        channels_last=True,
        threads=s.threads,
        seed=seed,
        keep_checkpoints=1,
    )


def _set_sizes(candidates: int) -> list[int]:
    """How many blocks the random lesions remove at once: up to 10 sizes from 1 to ``candidates``."""
    return sorted({1, 2, 3, 4, 6, 8, 10, 12, 16, 20} & set(range(1, candidates + 1)))


def run_lesion(s: LesionSettings, out: str | None = None, progress: bool = True) -> dict[str, Any]:
    if s.depth < 8 or (s.depth - 2) % 6:
        raise UserError(f"--depth {s.depth}: CIFAR ResNets have 6n+2 layers")
    check_settings(s, [_config(s, p, 0) for p in (True, False)])
    study = Study.open("lesion", out, progress=False, threads=s.threads)
    data = prepare_data(s.data, train_fraction=s.budget)
    n_blocks = 3 * (s.depth - 2) // 6
    n_val = len(data.val) if data.val else 0
    estimate = 0.0
    for plain in (False, True):  # training, then an evaluation of each lesion (at most as slow as the whole net)
        config = _config(s, plain, 0)
        speed = measure_speed(config, data)
        evaluations = 1 + n_blocks + len(_set_sizes(n_blocks)) * s.samples
        estimate += run_seconds(speed, config, data) + evaluations * n_val / speed.infer_img_per_s
    study.announce(
        f"train ResNet-{s.depth} and its plain twin on {len(data.train)} images of {data.name} for {s.epochs} epochs, "
        f"then remove blocks one at a time and in random sets; {s.seeds} seed(s)",
        estimate * s.seeds,
    )

    device = torch.device("cpu")
    loader = make_loader(data.val, 256, train=False, device=device, input_shape=data.input_shape)
    single: list[dict[str, Any]] = []
    multi: list[dict[str, Any]] = []
    baseline: dict[tuple[str, int], float] = {}
    with RunProgress(s.seeds * 2 * (1 + n_blocks + 10), "lesion", unit="step", enabled=progress) as bar:
        for seed in range(s.seeds):
            for plain in (False, True):
                kind = "plain" if plain else "resnet"
                bar.set_postfix_str(f"training {kind}-{s.depth} seed {seed}")
                study.run(f"{kind}{s.depth}-s{seed}", _config(s, plain, seed))
                bar.update(1)
                model, info = load_model(study.out / "runs" / f"{kind}{s.depth}-s{seed}")
                pre = Preprocess(info.mean, info.std)

                def acc(net: nn.Module) -> float:
                    return evaluate(net, loader, pre, len(info.classes)).acc  # noqa: B023

                baseline[kind, seed] = acc(model)
                blocks = model.residual_blocks()
                bar.set_postfix_str(f"lesions {kind}-{s.depth} seed {seed}")
                for i, block in enumerate(blocks):
                    row = {"net": kind, "seed": seed, "block": i + 1, "removable": removable(block)}
                    row["val_acc"] = acc(lesioned(model, {i})) if row["removable"] else None
                    single.append(row)
                    bar.update(1)
                candidates = [i for i, b in enumerate(blocks) if removable(b)]
                rng = random.Random(seed)
                ks = _set_sizes(len(candidates))
                for k in ks:
                    accs = [acc(lesioned(model, set(rng.sample(candidates, k)))) for _ in range(s.samples)]
                    multi.append(
                        {
                            "net": kind,
                            "seed": seed,
                            "k": k,
                            "val_acc_mean": mean_std(accs)[0],
                            "val_acc_std": mean_std(accs)[1],
                            "samples": len(accs),
                        }
                    )
                    bar.update(1)
                bar.update(10 - len(ks))
    chance = 100 / len(data.classes)
    return _summarise(study, s, data.name, len(data.train), chance, baseline, single, multi)


def kept_above_chance(intact: float, lesioned: float, chance: float) -> float:
    """The share of a net's accuracy above chance that it keeps after a lesion (1: all, 0: down to chance).

    Drops in points cannot compare two nets fairly: a plain net at 55% can lose at most 45 points
    (to the 10% of chance on CIFAR-10) while it is ruined, and a ResNet at 65% that loses 26 still works.
    """
    return (lesioned - chance) / (intact - chance) if intact > chance else math.nan


def verdict(resnet_kept: float, plain_kept: float) -> str:
    """The report's reading of the mean shares kept after one block is removed (:func:`kept_above_chance`).

    The contrast counts as clear when the ResNet keeps at least 3x the share the plain net keeps; the
    ResNet degrades gracefully, as in Veit et al. (2016), when it also keeps at least 90% of it.
    """
    share = f"the ResNet keeps {resnet_kept:.0%} of its accuracy above chance, the plain net {plain_kept:.0%}"
    if not resnet_kept >= 3 * max(plain_kept, 0.0):  # also when a share is NaN (a net at chance when intact)
        contrast = "The contrast Veit et al. report (graceful for ResNets, ruinous for plain nets)"
        return f"- {contrast} is not clear: {share}."
    if resnet_kept >= 0.9:
        return f"- As Veit et al. found, the residual network degrades gracefully, the plain network does not: {share}."
    return (
        f"- Removing a block ruins the plain network far more than the residual one: {share}. The ResNet still "
        "loses a good part of it, more than the small changes Veit et al. report for most single blocks of "
        "their ResNet-110."
    )


def _summarise(study, s, data_name, n_train, chance, baseline, single, multi) -> dict[str, Any]:
    study.write_csv("single_block.csv", single)
    study.write_csv("multi_block.csv", multi)
    summary = {}
    for kind in ("resnet", "plain"):
        base = [baseline[kind, seed] for seed in range(s.seeds)]
        lesions = [r for r in single if r["net"] == kind and r["removable"]]
        drops = [baseline[kind, r["seed"]] - r["val_acc"] for r in lesions]
        kept = [kept_above_chance(baseline[kind, r["seed"]], r["val_acc"], chance) for r in lesions]
        summary[kind] = {
            "val_acc": mean_std(base)[0],
            "mean_drop": mean_std(drops)[0],
            "mean_kept_above_chance": mean_std(kept)[0],
            "max_drop": max(drops),
            "removable_blocks": len({r["block"] for r in single if r["net"] == kind and r["removable"]}),
        }
    headline = {f"{k}_{m}": round(v, 3) for k, d in summary.items() for m, v in d.items()}
    study.write_json(
        "results.json",
        {
            "settings": asdict(s),
            "data": data_name,
            "train_images": n_train,
            "summary": summary,
            "baseline": {f"{k}-s{sd}": v for (k, sd), v in baseline.items()},
            "headline": headline,
        },
    )
    _figure(study, s, baseline, single, multi)
    table = [
        [
            kind,
            fmt_mean_std([baseline[kind, sd] for sd in range(s.seeds)]),
            summary[kind]["removable_blocks"],
            f"{summary[kind]['mean_drop']:.2f}",
            f"{summary[kind]['max_drop']:.2f}",
        ]
        for kind in ("resnet", "plain")
    ]
    header = ["network", "val acc % (intact)", "removable blocks", "mean drop (points)", "largest drop"]
    study.write_report(_report(study, s, data_name, n_train, table, header, summary, multi))
    print()
    print(markdown_table(header, table))
    print(f"\nfigure: {study.out / 'lesion.png'}   report: {study.out / 'report.md'}")
    return {"out": str(study.out), **headline}


def _figure(study, s, baseline, single, multi) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    colors = {"resnet": "tab:blue", "plain": "tab:red"}
    for kind in ("resnet", "plain"):
        blocks = sorted({r["block"] for r in single if r["net"] == kind and r["removable"]})
        accs = [mean_std([r["val_acc"] for r in single if r["net"] == kind and r["block"] == b])[0] for b in blocks]
        base = mean_std([baseline[kind, sd] for sd in range(s.seeds)])[0]
        ax1.plot(blocks, accs, "o-", ms=3, color=colors[kind], label=f"{kind}-{s.depth}, one block removed")
        ax1.axhline(base, color=colors[kind], linestyle=":", label=f"{kind}-{s.depth} intact")
        ks = sorted({r["k"] for r in multi if r["net"] == kind})
        means = [mean_std([r["val_acc_mean"] for r in multi if r["net"] == kind and r["k"] == k])[0] for k in ks]
        stds = [mean_std([r["val_acc_std"] for r in multi if r["net"] == kind and r["k"] == k])[0] for k in ks]
        ax2.errorbar([0, *ks], [base, *means], yerr=[0, *stds], marker="o", capsize=3, color=colors[kind], label=kind)
    ax1.set(xlabel="removed block (input to output)", ylabel="validation accuracy (%)", title="removing one block")
    ax2.set(
        xlabel="blocks removed at once (random sets)",
        ylabel="validation accuracy (%)",
        title=f"removing several blocks (mean ± std of {s.samples} sets)",
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Lesions of a trained ResNet-{s.depth} and its plain twin ({s.seeds} seed(s); plain blocks that "
        "change shape cannot be removed)"
    )
    study.save_figure(fig, "lesion")


def _report(study, s, data_name, n_train, table, header, summary, multi) -> str:
    r, p = summary["resnet"], summary["plain"]
    lines = [
        f"# Lesion study: ResNet-{s.depth} and its plain twin on {data_name}",
        "",
        f"Both trained with one recipe on {n_train} training images ({s.budget:.0%} of the split after holding out "
        f"validation) for {s.epochs} epochs (SGD lr 0.1 cosine, weight decay 5e-4); {s.seeds} seed(s). A removed "
        "residual block keeps its shortcut; a removed plain block becomes the identity "
        "(only where it keeps the shape). "
        "Batch-norm statistics are not recomputed after a removal (as in Veit et al. 2016).",
        "",
        markdown_table(header, table),
        "",
        "![lesion](lesion.png)",
        "",
        "## What the numbers show",
        "",
        f"- Removing one block from the ResNet costs {r['mean_drop']:.2f} points of validation accuracy on average "
        f"(at most {r['max_drop']:.2f}); from the plain net, {p['mean_drop']:.2f} on average "
        f"(at most {p['max_drop']:.2f}).",
        verdict(r["mean_kept_above_chance"], p["mean_kept_above_chance"]),
    ]
    big = [m for m in multi if m["net"] == "resnet"]
    if big:
        worst = max(big, key=lambda m: m["k"])
        lines.append(
            f"- With {worst['k']} random blocks removed at once the ResNet keeps {worst['val_acc_mean']:.2f}% "
            "accuracy on average (see the right panel for the whole curve)."
        )
    lines += [
        "",
        f"Raw numbers: `single_block.csv`, `multi_block.csv`, `results.json`. Study time: {study.elapsed():.0f} s.",
    ]
    return "\n".join(lines)
