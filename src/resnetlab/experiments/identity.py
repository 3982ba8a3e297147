"""``resnetlab study identity``: a residual block can be the identity, and networks use that.

(a) A block whose residual branch is zero is the identity: checked numerically, block by block, on
    real images flowing through a trained network.
(b) Deepening without harm (He et al. 2015, sec. 1: "the added layers are identity mappings"): insert
    zero-initialised blocks into a trained network; its outputs and accuracy do not change. Then
    fine-tune the deepened and the original network with the same recipe and compare.
(c) Over a training run with weight decay, the size of what each block adds, ``||F(x)|| / ||x||``,
    against depth and time (He et al. 2015, sec. 4.2 / fig. 7 measured the responses' spread).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import ModelInfo, load_model, read_model_file, save_model_file
from ..data.prepare import prepare_data
from ..data.types import ImageArray
from ..errors import UserError
from ..models import create_model
from ..training.config import TrainConfig, knob
from ..training.evaluate import evaluate
from ..training.progress import RunProgress
from ..training.setup import Preprocess, make_loader
from .study import Study, check_settings, fmt_mean_std, markdown_table, mean_std, measure_speed, pyplot, run_seconds


@dataclass
class IdentitySettings:
    """Zero branches are identities; deepening a trained net with zero-initialised blocks; ||F(x)|| / ||x||
    of every block over training."""

    data: str = knob("cifar10", "data set name or path (see resnetlab train --data)")
    depth: int = knob(20, "depth of the trained base network (CIFAR ResNet, 6n+2)")
    insert: int = knob(1, "zero-initialised blocks added at the end of each stage")
    budget: float = knob(0.1, "fraction of the training images used")
    epochs: int = knob(15, "epochs of base training")
    finetune_epochs: int = knob(5, "epochs of fine-tuning, for the original and the deepened network")
    weight_decay: float = knob(5e-4, "weight decay of the base training")
    seeds: int = knob(2, "seeds (mean and spread)")
    batch_size: int = knob(128, "images per step")
    threads: int = knob(0, "CPU threads; 0 = PyTorch's default")


def _base_config(s: IdentitySettings, seed: int) -> TrainConfig:
    return TrainConfig(
        model="resnet_cifar",
        model_args={"depth": s.depth},
        data=s.data,
        train_fraction=s.budget,
        epochs=s.epochs,
        batch_size=s.batch_size,
        lr=0.1,
        weight_decay=s.weight_decay,
        schedule="cosine",
        warmup_epochs=1.0,
        channels_last=True,
        threads=s.threads,
        seed=seed,
        keep_checkpoints=s.epochs + 1,  # every epoch's weights, for part (c)
    )


def _finetune_config(s: IdentitySettings, seed: int, depth: int, init: Path) -> TrainConfig:
    config = _base_config(s, seed)
    config.model_args = {"depth": depth}
    config.epochs = s.finetune_epochs
    config.lr = 0.01
    config.warmup_epochs = 0.0
    config.init_weights = str(init)
    config.keep_checkpoints = 1
    return config


def deepen(model: nn.Module, depth: int, insert: int) -> nn.Module:
    """The CIFAR ResNet ``model`` with ``insert`` zero-initialised blocks appended to every stage."""
    deeper = create_model(
        "resnet_cifar",
        depth=depth + 6 * insert,
        num_classes=model.num_classes,
        in_chans=model.in_chans,
        input_size=model.input_size,
    )
    result = deeper.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    n = (depth - 2) // 6
    for name in deeper.stage_names:
        for block in list(getattr(deeper, name))[n:]:
            block.zero_init_last()
    return deeper


@torch.no_grad()
def zero_branch_check(model: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """For every block: run the real activations that reach it through a copy whose residual branch is
    zeroed, and compare with the shortcut path alone (exact equality expected)."""
    rows = []
    h = model.forward_stem(x)
    for i, block in enumerate(model.residual_blocks()):
        zeroed = copy.deepcopy(block)
        zeroed.zero_init_last()
        out = zeroed(h)
        expected = block.post_activation(block.shortcut(h))
        rows.append(
            {
                "block": i + 1,
                "max_abs_difference": float((out - expected).abs().max()),
                "branch_output_max": float(zeroed.residual(h).abs().max()),
                "input_norm": float(h.norm()),
            }
        )
        h = block(h)
    return rows


@torch.no_grad()
def branch_ratios(model: nn.Module, x: torch.Tensor) -> list[float]:
    """``||F(x)|| / ||x||`` for every block, with ``x`` the block's input on the batch ``x``."""
    ratios = []
    h = model.forward_stem(x)
    for block in model.residual_blocks():
        ratios.append(float(block.residual(h).norm() / h.norm()))
        h = block(h)
    return ratios


def run_identity(s: IdentitySettings, out: str | None = None, progress: bool = True) -> dict[str, Any]:
    if s.depth < 8 or (s.depth - 2) % 6:
        raise UserError(f"--depth {s.depth}: CIFAR ResNets have 6n+2 layers")
    if s.insert < 1:
        raise UserError("--insert must be >= 1")
    base = _base_config(s, 0)  # these three for the checks and the estimate; the runs are made per seed below
    deeper = _finetune_config(s, 0, s.depth + 6 * s.insert, Path("base.safetensors"))
    original = _finetune_config(s, 0, s.depth, Path("base.safetensors"))
    check_settings(s, [base, deeper])
    study = Study.open("identity", out, progress=False, threads=s.threads)
    data = prepare_data(s.data, train_fraction=s.budget)
    if not isinstance(data.val, ImageArray):
        raise UserError(f"--data {s.data}: the identity study needs a data set that fits in memory")
    base_speed = measure_speed(base, data)
    per_run = run_seconds(base_speed, base, data) + run_seconds(base_speed, original, data)
    per_run += run_seconds(measure_speed(deeper, data), deeper, data)
    study.announce(
        f"train ResNet-{s.depth} on {len(data.train)} images of {data.name} for {s.epochs} epochs, insert {s.insert} "
        f"zero-initialised block(s) per stage, fine-tune {s.finetune_epochs} epochs; {s.seeds} seeds",
        per_run * s.seeds,
    )

    device = torch.device("cpu")
    val_loader = make_loader(data.val, 256, train=False, device=device, input_shape=data.input_shape)
    x_val = data.val.images[:256]
    results: list[dict[str, Any]] = []
    ratio_rows: list[dict[str, Any]] = []
    zero_rows: list[dict[str, Any]] = []
    with RunProgress(s.seeds * 3, "identity", enabled=progress) as bar:
        for seed in range(s.seeds):
            base_name = f"base-resnet{s.depth}-s{seed}"
            study.run(base_name, _base_config(s, seed))
            bar.update(1)
            base_dir = study.out / "runs" / base_name
            model, info = load_model(base_dir)
            pre = Preprocess(info.mean, info.std)
            x = pre(x_val)

            # (a) zero branches are identities on real activations
            for row in zero_branch_check(model, x):
                zero_rows.append({"seed": seed, **row})

            # (b) deepen: same outputs, same accuracy; then fine-tune both
            deeper = deepen(model, s.depth, s.insert).eval()
            with torch.no_grad():
                out_diff = float((deeper(x) - model(x)).abs().max())
            acc_before = evaluate(model, val_loader, pre, len(info.classes)).acc
            acc_deeper = evaluate(deeper, val_loader, pre, len(info.classes)).acc
            deeper_info = ModelInfo(
                **{
                    **asdict(info),
                    "model": "resnet_cifar",
                    "model_kwargs": {**info.model_kwargs, "depth": s.depth + 6 * s.insert},
                }
            )
            deep_file = study.out / f"deepened-s{seed}.safetensors"
            save_model_file(deep_file, deeper.state_dict(), deeper_info)
            tuned = {}
            for label, depth, init in (
                ("original", s.depth, base_dir),
                ("deepened", s.depth + 6 * s.insert, deep_file),
            ):
                hist = study.run(f"finetune-{label}-s{seed}", _finetune_config(s, seed, depth, init))
                tuned[label] = hist[-1]["val_acc"]
                bar.update(1)
            results.append(
                {
                    "seed": seed,
                    "base_val_acc": acc_before,
                    "deepened_val_acc": acc_deeper,
                    "max_output_difference": out_diff,
                    "finetuned_original_val_acc": tuned["original"],
                    "finetuned_deepened_val_acc": tuned["deepened"],
                }
            )

            # (c) ||F(x)|| / ||x|| per block over the base run's epochs
            ckpts = sorted(
                p for p in (base_dir / "checkpoints").iterdir() if p.is_dir() and p.name.endswith("-s000000")
            )
            for ckpt in ckpts:
                weights, ck_info = read_model_file(ckpt / "model.safetensors")
                net = ck_info.build()
                net.load_state_dict(weights)
                net.eval()
                for i, r in enumerate(branch_ratios(net, x)):
                    ratio_rows.append({"seed": seed, "epoch": ck_info.epoch, "block": i + 1, "ratio": r})
            torch.manual_seed(seed)  # the base run's initialisation: same seed, same constructor arguments
            initial = info.build()
            for i, r in enumerate(branch_ratios(initial.eval(), x)):
                ratio_rows.append({"seed": seed, "epoch": 0, "block": i + 1, "ratio": r})
    return _summarise(study, s, data.name, len(data.train), len(x_val), results, zero_rows, ratio_rows)


def _summarise(study, s, data_name, n_train, n_check, results, zero_rows, ratio_rows) -> dict[str, Any]:
    study.write_csv("deepening.csv", results)
    study.write_csv("zero_branch.csv", zero_rows)
    study.write_csv("branch_ratios.csv", ratio_rows)
    worst = max(r["max_abs_difference"] for r in zero_rows)
    col = {k: [r[k] for r in results] for k in results[0]}
    headline = {
        "zero_branch_max_abs_difference": worst,
        "deepening_max_output_difference": max(col["max_output_difference"]),
        "base_val_acc": round(mean_std(col["base_val_acc"])[0], 2),
        "deepened_val_acc": round(mean_std(col["deepened_val_acc"])[0], 2),
        "finetuned_original_val_acc": round(mean_std(col["finetuned_original_val_acc"])[0], 2),
        "finetuned_deepened_val_acc": round(mean_std(col["finetuned_deepened_val_acc"])[0], 2),
    }
    study.write_json(
        "results.json",
        {
            "settings": asdict(s),
            "data": data_name,
            "train_images": n_train,
            "check_images": n_check,
            "headline": headline,
            "deepening": results,
        },
    )
    _figure(study, s, ratio_rows, n_check)
    table = [
        [f"ResNet-{s.depth} trained (base)", fmt_mean_std(col["base_val_acc"])],
        [
            f"+ {s.insert} zero block(s) per stage (ResNet-{s.depth + 6 * s.insert}), no training",
            fmt_mean_std(col["deepened_val_acc"]),
        ],
        [f"base fine-tuned {s.finetune_epochs} epochs", fmt_mean_std(col["finetuned_original_val_acc"])],
        [f"deepened fine-tuned {s.finetune_epochs} epochs", fmt_mean_std(col["finetuned_deepened_val_acc"])],
    ]
    study.write_report(_report(study, s, data_name, n_train, n_check, worst, headline, table, ratio_rows, zero_rows))
    print()
    print(markdown_table(["network", "val acc %"], table))
    print(f"\nzero-branch blocks: largest difference from the identity path {worst:g}")
    print(f"figure: {study.out / 'branch_ratios.png'}   report: {study.out / 'report.md'}")
    return {"out": str(study.out), **headline}


def _figure(study: Study, s: IdentitySettings, ratio_rows: list[dict[str, Any]], n_check: int) -> None:
    plt = pyplot()
    epochs = sorted({r["epoch"] for r in ratio_rows})
    blocks = sorted({r["block"] for r in ratio_rows})
    grid = torch.full((len(epochs), len(blocks)), math.nan)
    for i, e in enumerate(epochs):
        for j, b in enumerate(blocks):
            vals = [r["ratio"] for r in ratio_rows if r["epoch"] == e and r["block"] == b]
            grid[i, j] = sum(vals) / len(vals)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    cmap = plt.cm.viridis
    for i, e in enumerate(epochs):
        ax1.plot(
            blocks, grid[i].tolist(), marker="o", ms=3, color=cmap(i / max(1, len(epochs) - 1)), label=f"epoch {e}"
        )
    ax1.set_xlabel("block (input to output)")
    ax1.set_ylabel("||F(x)|| / ||x||")
    ax1.set_yscale("log")
    ax1.set_title("what each block adds, relative to its input")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7, ncol=2)
    image = ax2.imshow(
        grid.T.numpy(),
        aspect="auto",
        origin="lower",
        cmap="magma",
        extent=(epochs[0] - 0.5, epochs[-1] + 0.5, blocks[0] - 0.5, blocks[-1] + 0.5),
    )
    fig.colorbar(image, ax=ax2, label="||F(x)|| / ||x||")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("block")
    ax2.set_title("over training")
    fig.suptitle(
        f"ResNet-{s.depth}: relative size of the residual branches during training "
        f"(weight decay {s.weight_decay:g}, mean of {s.seeds} seeds, {n_check} validation images)"
    )
    study.save_figure(fig, "branch_ratios")


def _report(study, s, data_name, n_train, n_check, worst, headline, table, ratio_rows, zero_rows) -> str:
    last_epoch = max(r["epoch"] for r in ratio_rows)
    final = {}
    for r in ratio_rows:
        if r["epoch"] == last_epoch:
            final.setdefault(r["block"], []).append(r["ratio"])
    finals = [sum(v) / len(v) for _, v in sorted(final.items())]
    small = sum(f < 1 for f in finals)
    lines = [
        f"# Identity study: ResNet-{s.depth} on {data_name}",
        "",
        f"Base networks: ResNet-{s.depth} trained on {n_train} training images ({s.budget:.0%} of the split after "
        f"holding out validation) for {s.epochs} epochs, SGD lr 0.1 cosine, weight decay {s.weight_decay:g}; "
        f"{s.seeds} seeds.",
        "",
        "## (a) A zero residual branch is the identity",
        "",
        f"Every block of each trained network was copied with its last BN weight set to zero and run on the real "
        f"activations that reach it from {n_check} validation images. Largest absolute difference between its output "
        f"and the "
        f"shortcut path alone (`post_activation(shortcut(x))`), over all {len(zero_rows)} block checks: **{worst:g}**.",
        "",
        "## (b) Deepening without harm",
        "",
        markdown_table(["network", "validation accuracy %"], table),
        "",
        f"Inserting {s.insert} zero-initialised block(s) at the end of each stage changed the outputs by at most "
        f"{headline['deepening_max_output_difference']:g} and the validation accuracy from "
        f"{headline['base_val_acc']:.2f}% to {headline['deepened_val_acc']:.2f}%: the deeper network starts as "
        "the trained one. Fine-tuning both with the same recipe (lr 0.01 cosine, "
        f"{s.finetune_epochs} epochs) gave {headline['finetuned_original_val_acc']:.2f}% (original) and "
        f"{headline['finetuned_deepened_val_acc']:.2f}% (deepened).",
        "",
        "## (c) How much each block adds",
        "",
        "![branch ratios](branch_ratios.png)",
        "",
        f"After {last_epoch} epochs, {small} of {len(finals)} blocks add a branch smaller than their input "
        f"(||F(x)|| / ||x|| < 1); the ratios range from {min(finals):.3f} to {max(finals):.3f} (mean of seeds).",
        "",
        f"Raw numbers: `zero_branch.csv`, `deepening.csv`, `branch_ratios.csv`, `results.json`. "
        f"Study time: {study.elapsed():.0f} s.",
    ]
    return "\n".join(lines)
