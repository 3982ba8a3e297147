"""Model summary: each stage's output shape, parameters and multiply-accumulates (MACs), with totals.

MACs count convolutions and linear layers only, torchvision's convention for its published figures
(4.09 G for ResNet-50 at 224x224); they are read off PyTorch's ``FlopCounterMode`` (two FLOPs per MAC)
on a real forward pass of one image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models.base import Classifier


@dataclass
class SummaryRow:
    name: str
    output_shape: tuple[int, ...]  # without the batch dimension
    params: int
    macs: int


@dataclass
class ModelSummary:
    model: str
    input_size: tuple[int, ...]  # (channels, height, width)
    rows: list[SummaryRow] = field(default_factory=list)
    params: int = 0
    trainable_params: int = 0
    macs: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        shape = lambda s: "x".join(map(str, s))  # noqa: E731
        table = [("stage", "output", "params", "MACs")]
        table += [(r.name, shape(r.output_shape), f"{r.params:,}", format_count(r.macs)) for r in self.rows]
        table.append(("total", "", f"{self.params:,}", format_count(self.macs)))
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        lines = [f"{self.model}: input {shape(self.input_size)}"]
        for i, row in enumerate(table):
            if i == len(table) - 1:
                lines.append("-" * (sum(widths) + 6))
            lines.append(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}")
        lines.append(f"trainable params: {self.trainable_params:,}")
        return "\n".join(lines)


def format_count(n: float) -> str:
    """``4_089_184_256 -> '4.09 G'``, ``40_553_472 -> '40.6 M'`` (three significant digits)."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f}"


def summarize(model: Classifier, input_size: Sequence[int] | None = None, name: str = "") -> ModelSummary:
    """Run one input of ``input_size`` (default: the model's own) through ``model`` and tabulate it.

    Rows are the stem (everything before the first stage), each stage of ``model.stages()`` (with
    whatever runs between it and the previous stage), and the head (everything after the last stage:
    final normalisation, pooling, classifier).
    """
    size = tuple(input_size or model.default_input_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input size must be (channels, height, width) of positive ints, got {size}")
    if size[0] != model.in_chans:
        raise ValueError(f"the model takes {model.in_chans} input channels, the input size says {size[0]}")
    stages = model.stages()
    names = [n for n, _ in stages]
    starts = {id(mods[0]): n for n, mods in stages}
    ends = {id(mods[-1]): i for i, (_, mods) in enumerate(stages)}
    phase = ["stem"]
    params: dict[str, int] = {}
    counted: set[int] = set()
    shapes: dict[str, tuple[int, ...]] = {}
    flops_at: dict[str, int] = {}
    counter = FlopCounterMode(display=False)

    def pre(module: nn.Module, args: tuple) -> None:
        if id(module) in starts and "stem" not in shapes:
            shapes["stem"] = tuple(args[0].shape[1:])
            flops_at["stem"] = counter.get_total_flops()
        if id(module) in starts:
            phase[0] = starts[id(module)]
        if id(module) not in counted:
            counted.add(id(module))
            own = sum(p.numel() for p in module.parameters(recurse=False))
            params[phase[0]] = params.get(phase[0], 0) + own

    def post(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if id(module) in ends:
            i = ends[id(module)]
            shapes[names[i]] = tuple(output.shape[1:])
            flops_at[names[i]] = counter.get_total_flops()
            phase[0] = names[i + 1] if i + 1 < len(names) else "head"

    hooks = []
    for module in model.modules():
        hooks.append(module.register_forward_pre_hook(pre))
        if id(module) in ends:
            hooks.append(module.register_forward_hook(post))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        x = torch.zeros(1, *size, device=param.device if param is not None else "cpu")
        with torch.no_grad(), counter:
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    shapes["head"] = tuple(out.shape[1:])
    flops_at["head"] = counter.get_total_flops()

    summary = ModelSummary(model=name or type(model).__name__, input_size=size)
    previous = 0
    for group in ["stem", *names, "head"]:
        summary.rows.append(SummaryRow(group, shapes[group], params.get(group, 0), (flops_at[group] - previous) // 2))
        previous = flops_at[group]
    summary.params = sum(p.numel() for p in model.parameters())
    summary.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary.macs = flops_at["head"] // 2
    return summary


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes that autograd keeps for the backward pass after one training-mode forward of ``model``
    on ``x``: the activation memory of a training step, less the transient gradients, plus the
    parameters that layers save (a convolution saves its weight; the difference between two batch
    sizes cancels them). Each storage counts once (a tensor saved by two operations is one
    allocation). Runs ``model.train()``."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())
