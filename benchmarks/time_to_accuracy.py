"""Time to accuracy on CIFAR-10 against the reference ResNet-20 run of ``../shared/bench``.

The reference (``python ../shared/bench/baseline_resnet20.py > reference.jsonl``, 30 epochs, plain eager
PyTorch) ends at a validation accuracy A after a wall time T. This script runs resnetlab's recipe for
several seeds (or reads finished run folders) and reports, per seed, when the validation accuracy first
reaches A, the accuracy at T/3 and the final accuracy, with mean and spread:

    python benchmarks/time_to_accuracy.py --reference reference.jsonl --seeds 0 1 2 \\
        --config configs/cifar_fast_cpu.toml --data ../shared/data/cifar10-jpeg-train.tar.gz --out runs/tta

Times are the runs' own ``elapsed_seconds`` (wall time from the start of training, evaluation included,
like the reference's ``wall_minutes``); the process start-up and data loading are reported apart. Each
run starts with an empty inductor cache, so a recipe that compiles pays for its compilation in full.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]


def first_reaching(history: list[dict], target: float) -> float | None:
    """Seconds of training (elapsed) at the end of the first epoch whose validation accuracy >= target."""
    for r in history:
        if r["val_acc"] is not None and r["val_acc"] >= target:
            return r["elapsed_seconds"]
    return None


def acc_at(history: list[dict], seconds: float) -> float | None:
    """Validation accuracy of the last epoch finished within ``seconds``."""
    done = [r for r in history if r["elapsed_seconds"] <= seconds and r["val_acc"] is not None]
    return done[-1]["val_acc"] if done else None


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="the reference script's JSON lines")
    ap.add_argument("--config", default="configs/cifar_fast_cpu.toml")
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg-train.tar.gz")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/time-to-accuracy"))
    # One quoted string: argparse would take a bare "--epochs" after --extra for an option of its own.
    ap.add_argument(
        "--extra",
        type=shlex.split,
        default=[],
        help='more resnetlab train flags, quoted: --extra "--epochs 40"; a lone flag after =: --extra=--alternate-flip',
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    if not args.reference.is_file():
        sys.exit(f"--reference {args.reference}: no such file")
    ref = read_jsonl(args.reference)
    if not ref:
        sys.exit(f"--reference {args.reference}: no epochs")
    target, t_ref = ref[-1]["val_acc"], 60 * ref[-1]["wall_minutes"]
    print(f"reference: {len(ref)} epochs, final validation accuracy A = {target:.2f}% after T = {t_ref / 60:.1f} min")

    runs = {}
    for seed in args.seeds:
        run = args.out / f"seed{seed}"
        if not (run / "result.json").is_file():
            t0 = time.monotonic()
            cmd = [
                sys.executable,
                "-m",
                "resnetlab",
                "train",
                "--config",
                args.config,
                "--data",
                args.data,
                "--seed",
                str(seed),
                "--out",
                str(run),
                "--no-progress",
                *args.extra,
            ]
            if (run / "config.toml").is_file():
                cmd = [sys.executable, "-m", "resnetlab", "train", "--resume", str(run), "--no-progress"]
            print("+", " ".join(cmd), flush=True)
            # A recipe with --compile compiles inside its timed training, from an empty inductor cache
            # as on a fresh machine, not from the files an earlier seed (or test) left behind.
            with tempfile.TemporaryDirectory() as cache:
                done = subprocess.run(cmd, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
            if done.returncode != 0:  # resnetlab has printed why
                sys.exit(f"seed {seed}: resnetlab train failed; run folder {run}")
            (run / "process_seconds.txt").write_text(f"{time.monotonic() - t0:.1f}\n")
        runs[seed] = read_jsonl(run / "metrics.jsonl")

    rows = []
    for seed, hist in runs.items():
        reach = first_reaching(hist, target)
        rows.append(
            {
                "seed": seed,
                "epochs": len(hist),
                "reach_A_seconds": reach,
                "acc_at_T_over_3": acc_at(hist, t_ref / 3),
                "final_acc": hist[-1]["val_acc"],
                "final_seconds": hist[-1]["elapsed_seconds"],
                "mean_img_per_s": statistics.fmean(r["img_per_s"] for r in hist),
            }
        )
    print(
        f"\n{'seed':>4} {'epochs':>6} {'reaches A at':>13} {'acc at T/3':>10} {'final acc':>9} "
        f"{'final at':>9} {'img/s':>6}"
    )
    for r in rows:
        reach = f"{r['reach_A_seconds'] / 60:.2f} min" if r["reach_A_seconds"] is not None else "never"
        at3 = f"{r['acc_at_T_over_3']:.2f}" if r["acc_at_T_over_3"] is not None else "n/a"
        print(
            f"{r['seed']:>4} {r['epochs']:>6} {reach:>13} {at3:>10} {r['final_acc']:>9.2f} "
            f"{r['final_seconds'] / 60:>7.2f} m {r['mean_img_per_s']:>6.0f}"
        )
    reached = [r["reach_A_seconds"] for r in rows]
    print(f"\nA = {target:.2f}%, T = {t_ref / 60:.1f} min, T/3 = {t_ref / 180:.2f} min ({t_ref / 3:.1f} s)")
    print(
        f"time to A (min): {mean_std([s / 60 for s in reached if s is not None])} "
        f"({sum(s is not None for s in reached)}"
        f"/{len(rows)} seeds reach it)"
    )
    print(
        f"accuracy at T/3: {mean_std([r['acc_at_T_over_3'] for r in rows])}; "
        f"final: {mean_std([r['final_acc'] for r in rows])}"
    )
    if args.json:
        args.json.write_text(json.dumps({"A": target, "T_seconds": t_ref, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
