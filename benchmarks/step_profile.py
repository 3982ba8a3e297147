"""Where a training step's time goes: resnetlab's step under torch.profiler, grouped by kind of work.

Runs resnetlab's training step (the ``Trainer`` of ``resnetlab train``, in-memory batches) for a few
warm-up steps, then profiles ``--steps`` more and sums each operator's *self* time (time not spent in
the operators it calls) into groups: convolution forward and backward, batch norm, ReLU, the other
element-wise work (residual adds, casts, copies), kernels that ``--compile`` fused, the optimiser
and the rest. It answers the question behind a throughput figure: how much of the step an
optimisation can still reach (removing all batch-norm time, say, bounds what a faster batch norm buys).

    python benchmarks/step_profile.py --model resnet20 --batch-size 128 --channels-last --amp bf16

The profiler adds a little overhead, so the images/s printed under it are for orientation; throughput
figures come from ``train_throughput.py`` and ``suite.py``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from common import (  # benchmarks/common.py, beside this script
    add_step_flags,
    at_least,
    describe_machine,
    machine_info,
    resnetlab_steps,
    run_script,
    step_flags,
    step_trainer,
)
from torch.profiler import ProfilerActivity, profile

from resnetlab.data import prepare_data

# An operator counts towards the first group whose pattern it matches (re.search on its name).
GROUPS: tuple[tuple[str, str], ...] = (
    ("convolution backward", r"convolution_backward"),
    ("convolution forward", r"convolution|conv2d"),
    ("batch norm", r"batch_norm"),
    ("ReLU", r"threshold_backward|relu|clamp_min"),
    ("fused by --compile", r"CompiledFxGraph"),
    ("optimiser, gradient norm", r"^Optimizer\.|_foreach|vector_norm|AccumulateGrad"),
    ("other element-wise (adds, casts, copies)", r"^aten::(add|add_|mul|mul_|copy_|_to_copy|fill_)$"),
)
OTHER = "other operators"


def group_of(name: str) -> str:
    """The group an operator's self time counts towards."""
    for group, pattern in GROUPS:
        if re.search(pattern, name):
            return group
    return OTHER


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_flags(ap)
    ap.add_argument("--steps", type=at_least(1), default=20, help="profiled steps")
    ap.add_argument("--warmup", type=at_least(1), default=5, help="untimed steps before profiling")
    ap.add_argument("--top", type=at_least(0), default=8, help="also list this many single operators")
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    args = ap.parse_args()

    print(describe_machine(machine_info()))
    data = prepare_data(args.data, val_fraction=0.1)
    trainer = step_trainer(args, data)
    warmup = resnetlab_steps(trainer, args.warmup, 0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        resnetlab_steps(trainer, args.steps, 1)
        wall = time.perf_counter() - t0

    ms_per_step: dict[str, float] = {g: 0.0 for g, _ in GROUPS} | {OTHER: 0.0}
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    for e in ops:
        ms_per_step[group_of(e.key)] += e.self_cpu_time_total / 1e3 / args.steps
    step_ms = wall * 1e3 / args.steps
    ms_per_step["outside operators (Python, waiting)"] = max(0.0, step_ms - sum(ms_per_step.values()))

    flags = step_flags(args)
    print(
        f"{args.model}, batch {args.batch_size}, {'+'.join(flags) or 'float32 NCHW'}: {step_ms:.1f} ms per step "
        f"under the profiler ({args.batch_size / step_ms * 1e3:.0f} img/s), {args.steps} steps after "
        f"{args.warmup} warm-up steps ({warmup:.1f} s)"
    )
    width = max(len(g) for g in ms_per_step)
    print(f"{'group':<{width}} {'ms/step':>8} {'share':>6}")
    for g, ms in sorted(ms_per_step.items(), key=lambda kv: -kv[1]):
        print(f"{g:<{width}} {ms:>8.1f} {ms / step_ms:>6.1%}")
    print("\nlargest single operators (self time):")
    for e in ops[: args.top]:
        ms = e.self_cpu_time_total / 1e3 / args.steps
        print(f"  {e.key[:60]:<60} {ms:>7.1f} ms/step {e.count // args.steps:>4} calls/step")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "batch_size": args.batch_size,
                    "flags": flags,
                    "steps": args.steps,
                    "step_ms": step_ms,
                    "warmup_seconds": warmup,
                    "ms_per_step": ms_per_step,
                    "machine": machine_info(),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    run_script(main)
