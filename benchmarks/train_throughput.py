"""Training throughput: resnetlab's training step against a plain eager PyTorch baseline, one process.

Both train the same registered model on the same decoded images with the same optimiser and the
same augmentation (pad-4 random crop and flip):

- **baseline**: what a user writes from the tutorials: NCHW float32, eager, a ``Dataset`` that
  augments and normalises one image at a time, a standard ``DataLoader`` (shuffle, ``num_workers``).
- **resnetlab**: the ``Trainer`` that ``resnetlab train`` uses, with the flags given here
  (``--channels-last`` and ``--compile`` are resnetlab's options; the default is its plain path).

Rounds alternate between the two so that drifts of the machine hit both; warm-up steps (and any
compilation) are timed separately and never counted in the images per second. Prints a table and,
with ``--json FILE``, writes the figures.

    python benchmarks/train_throughput.py --data ../shared/data/cifar10-jpeg-train.tar.gz --channels-last
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import (  # benchmarks/common.py, beside this script
    PerImageDataset,
    add_step_flags,
    at_least,
    baseline_steps,
    describe_machine,
    machine_info,
    resnetlab_steps,
    run_script,
    step_flags,
    step_trainer,
)

from resnetlab import create_model
from resnetlab.data import prepare_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_flags(ap)
    ap.add_argument("--steps", type=at_least(1), default=40, help="timed steps per round")
    ap.add_argument("--warmup", type=at_least(1), default=5, help="untimed steps before the first round")
    ap.add_argument("--rounds", type=at_least(1), default=3)
    ap.add_argument("--workers", type=at_least(0), default=0, help="baseline DataLoader workers")
    ap.add_argument("--threads", type=at_least(0), default=0)
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(describe_machine(machine_info()))
    data = prepare_data(args.data, val_fraction=0.1)
    print(f"data {data.name}: {len(data.train)} training images {data.input_shape}; model {args.model}")
    trainer = step_trainer(args, data)
    torch.manual_seed(0)
    c = data.input_shape[0]
    model = create_model(args.model, num_classes=len(data.classes), in_chans=c, input_size=data.input_shape[1:])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(
        PerImageDataset(data.train, data.mean, data.std),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )

    warm = {
        "baseline": baseline_steps(model, loader, opt, args.warmup),
        "resnetlab": resnetlab_steps(trainer, args.warmup, 0),
    }
    rates: dict[str, list[float]] = {"baseline": [], "resnetlab": []}
    for r in range(args.rounds):
        rates["baseline"].append(args.steps * args.batch_size / baseline_steps(model, loader, opt, args.steps))
        rates["resnetlab"].append(args.steps * args.batch_size / resnetlab_steps(trainer, args.steps, r + 1))
        print(
            f"round {r + 1}: baseline {rates['baseline'][-1]:.0f} img/s, resnetlab {rates['resnetlab'][-1]:.0f} img/s"
        )

    base, ours = statistics.median(rates["baseline"]), statistics.median(rates["resnetlab"])
    path = "+".join(step_flags(args))
    print(f"\n{'pipeline':<44} {'img/s (median)':>15} {'warm-up s':>10}")
    print(f"{'baseline: eager NCHW, per-image DataLoader':<44} {base:>15.0f} {warm['baseline']:>10.1f}")
    print(
        f"{'resnetlab: in-memory batches' + (', ' + path if path else ''):<44} {ours:>15.0f} {warm['resnetlab']:>10.1f}"
    )
    print(
        f"ratio resnetlab / baseline: {ours / base:.2f}x  "
        f"({args.rounds} rounds of {args.steps} steps, batch {args.batch_size})"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "data": data.name,
                    "model": args.model,
                    "batch_size": args.batch_size,
                    "steps": args.steps,
                    "rounds": args.rounds,
                    "resnetlab_flags": path or "none",
                    "baseline_img_per_s": rates["baseline"],
                    "resnetlab_img_per_s": rates["resnetlab"],
                    "ratio": ours / base,
                    "warmup_seconds": warm,
                    "machine": machine_info(),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    run_script(main)
