"""resnetlab's speed suite: every figure against a baseline measured in the same process.

    python benchmarks/suite.py [--sections peak,train,infer,depth] [--quick] [--json results.json]

- **peak**: this machine's matrix-product rate (float32 and bfloat16), the ceiling for the rest.
- **train**: training images/s on synthetic data for resnet20/56/110 at 32x32 and resnet18/50 at
  224x224, batch 128 and 256: the plain eager baseline (NCHW float32, eager, a per-image DataLoader)
  against resnetlab's training step (channels_last, in-memory batches) in float32 and in bfloat16
  mixed precision (labelled: a different precision), each eager and compiled by ``torch.compile``,
  with the ratios and the achieved GFLOP/s.
  A case whose float32 step needs more memory than the machine has (autograd's saved activations,
  measured at batch 1 and 2) is reported as skipped rather than run into the out-of-memory killer.
- **infer**: resnet50 latency at batch 1 and throughput at batch 32, resnet20 throughput at batch
  256: eager against resnetlab's inference paths (BN folded, channels_last; compiled by inductor;
  oneDNN Graph through TorchScript) and onnxruntime on the exported model, all in float32; then
  the compiled and oneDNN Graph paths in bfloat16 (labelled: a different precision).
- **depth**: time per training step and peak memory against depth (ResNet-20 ... 1202), with and
  without gradient checkpointing, each in a fresh process.

bfloat16 is measured only on a CPU where oneDNN has bfloat16 kernels (AVX-512 or AMX): with AVX2
alone it falls back to reference code, 10x slower than float32 (``resnetlab.capabilities``), and
would take the suite hours to measure nothing of use; the printout says when it was left out.

Warm-up and compilation are timed apart and never inside a throughput figure. Every row processes
the same images with the same model as its baseline. The paths compared in a row take turns (rounds
of steps for training, rounds of consecutive calls for inference), so that a drift of the machine's
speed hits all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    PerImageDataset,
    available_memory,
    baseline_steps,
    describe_machine,
    machine_info,
    matmul_peak,
    resnetlab_steps,
    training_memory,
)

from resnetlab import TrainConfig, create_model
from resnetlab.capabilities import fast_bfloat16
from resnetlab.data import prepare_data
from resnetlab.inference import prepare_inference
from resnetlab.summary import summarize
from resnetlab.training.distributed import SINGLE_PROCESS
from resnetlab.training.engine import Trainer

# resnetlab's training paths in the suite: (label, --amp, --compile, column heading). All use
# channels_last and in-memory batches. Compiling fuses the batch-norm, ReLU and add work around the
# convolutions.
TRAIN_PATHS = (
    ("resnetlab_fp32", "none", False, "resnetlab fp32"),
    ("resnetlab_fp32_compiled", "none", True, "fp32 compiled"),
    ("resnetlab_bf16", "bf16", False, "resnetlab bf16*"),
    ("resnetlab_bf16_compiled", "bf16", True, "bf16* compiled"),
)
PEAK_KEY = {"none": "fp32_gflops", "bf16": "bf16_gflops"}
BF16 = fast_bfloat16(torch.device("cpu"))
NO_BF16 = (
    f"bfloat16 left out: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bfloat16 kernels in oneDNN "
    "(they need AVX-512 or AMX)"
)
TRAIN_CASES = [("resnet20", 32), ("resnet56", 32), ("resnet110", 32), ("resnet18", 224), ("resnet50", 224)]


def table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def section_peak() -> dict:
    fp32 = matmul_peak(torch.float32)
    bf16 = matmul_peak(torch.bfloat16) if BF16 else None
    said = f"bfloat16 {bf16:.0f}" if BF16 else NO_BF16
    print(f"\nmatmul peak (2048^3, {torch.get_num_threads()} threads): float32 {fp32:.0f} GFLOP/s; {said}")
    return {"fp32_gflops": fp32, "bf16_gflops": bf16}


def section_train(
    quick: bool, peak: dict, batches: list[int], batches_224: list[int], max_memory: int | None
) -> list[dict]:
    rows, out = [], []
    paths = [p for p in TRAIN_PATHS if p[1] == "none" or BF16]
    cases = TRAIN_CASES[:2] if quick else TRAIN_CASES
    for model_name, size in cases:
        for batch in [128] if quick else (batches_224 if size > 64 else batches):
            steps = (2 if size > 64 else 12) if not quick else 2
            n = max(batch * 2, 512 if size > 64 else 4096)
            data = prepare_data(f"synthetic:3x{size}x{size}:10:{n}", val_fraction=0)
            macs = summarize(create_model(model_name, num_classes=10), (3, size, size)).macs
            torch.manual_seed(0)
            model = create_model(model_name, num_classes=10, input_size=(size, size))
            # A case that cannot fit in memory is reported as skipped, not left to the kernel's OOM
            # killer, which would end the suite without a word (resnet50 at 224 px, batch 256: about
            # 26 GiB by this estimate, on a machine with 24).
            free = max_memory if max_memory is not None else available_memory()
            if free is not None and (need := training_memory(model, size, batch)) > free:
                word = "allowed" if max_memory is not None else "available"
                reason = f"needs about {need / 2**30:.1f} GiB for a float32 step, {free / 2**30:.1f} GiB {word}"
                out.append({"model": model_name, "size": size, "batch": batch, "macs": macs, "skipped": reason})
                print(f"  {model_name} {size}px batch {batch}: skipped, {reason}", flush=True)
                continue
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            loader = torch.utils.data.DataLoader(
                PerImageDataset(data.train, data.mean, data.std, pad=size // 8),
                batch_size=batch,
                shuffle=True,
                drop_last=True,
            )
            result = {"model": model_name, "size": size, "batch": batch, "macs": macs}
            trainers = {}
            for label, amp, compile_, _ in paths:
                config = TrainConfig(
                    model=model_name,
                    batch_size=batch,
                    epochs=1,
                    lr=0.01,
                    augment="crop+flip",
                    crop_padding=size // 8,
                    channels_last=True,
                    amp=amp,
                    compile=compile_,
                    device="cpu",
                )
                trainers[label] = Trainer(config, torch.device("cpu"), SINGLE_PROCESS, data=data)
            warm = {"baseline": baseline_steps(model, loader, opt, 1)}
            warm |= {k: resnetlab_steps(t, 1, 0) for k, t in trainers.items()}
            # Rounds alternate between the paths so that a drift of the machine (10-20% here over
            # minutes) hits all of them alike; the figure is the median round.
            rounds: dict[str, list[float]] = {k: [] for k in warm}
            for r in range(1 if size > 64 else 3):
                rounds["baseline"].append(steps * batch / baseline_steps(model, loader, opt, steps))
                for k, t in trainers.items():
                    rounds[k].append(steps * batch / resnetlab_steps(t, steps, r + 1))
            rate = {k: statistics.median(v) for k, v in rounds.items()}
            result["rounds_img_per_s"] = rounds
            result.update({f"{k}_img_per_s": v for k, v in rate.items()})
            result["warmup_seconds"] = warm
            for k, *_ in paths:
                result[f"{k}_ratio"] = rate[k] / rate["baseline"]
            gflops = {k: 6 * macs * v / 1e9 for k, v in rate.items()}  # forward + backward = 3x, 2 FLOPs per MAC
            result["gflops"] = gflops
            out.append(result)
            # Achieved GFLOP/s of the faster path in each precision, against that precision's peak.
            best = {
                amp: max((k for k, a, *_ in paths if a == amp), key=rate.__getitem__)
                for amp in ("none", "bf16")
                if any(a == amp for _, a, *_ in paths)
            }
            rows.append(
                [
                    model_name,
                    size,
                    batch,
                    f"{rate['baseline']:.0f}",
                    *[cell for k, *_ in paths for cell in (f"{rate[k]:.0f}", f"{result[f'{k}_ratio']:.2f}x")],
                    *[f"{gflops[k]:.0f} ({100 * gflops[k] / peak[PEAK_KEY[amp]]:.0f}%)" for amp, k in best.items()],
                ]
            )
            print(
                f"  {model_name} {size}px batch {batch}: baseline {rate['baseline']:.0f}, "
                + ", ".join(f"{k.removeprefix('resnetlab_')} {rate[k]:.0f}" for k, *_ in paths)
                + " img/s",
                flush=True,
            )
    print("\nTraining throughput (images/s; baseline = eager NCHW float32 with a per-image DataLoader)")
    print(
        table(
            [
                "model",
                "px",
                "batch",
                "baseline",
                *[heading for *_, heading in paths for heading in (heading, "ratio")],
                "fp32 GFLOP/s (% peak)",
                *(["bf16 GFLOP/s (% peak)"] if BF16 else []),
            ],
            rows,
        )
    )
    print(
        "* bf16: mixed precision (a different precision from the baseline); compiled: torch.compile (inductor), "
        "its compilation inside the warm-up time of the JSON; GFLOP/s: the faster path of each precision"
    )
    if not BF16:
        print(NO_BF16)
    for r in out:
        if "skipped" in r:
            print(f"skipped: {r['model']} at {r['size']} px, batch {r['batch']}: {r['skipped']}")
    return out


def _time_calls(fn, x, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return times


# prepare_inference's modes, in float32 and (labelled: a different precision) in bfloat16.
INFER_MODES = {
    "fold": ("fold", torch.float32),
    "compile": ("compile", torch.float32),
    "onednn": ("onednn", torch.float32),
    "compile_bf16": ("compile", torch.bfloat16),
    "onednn_bf16": ("onednn", torch.bfloat16),
}
# Every inference path in the table's order, with its column heading.
INFER_HEADINGS = {
    "eager": "eager NCHW",
    "fold": "folded BN, NHWC",
    "compile": "folded + compiled",
    "onednn": "oneDNN Graph",
    "onnxruntime": "onnxruntime",
    "compile_bf16": "compiled bf16*",
    "onednn_bf16": "oneDNN Graph bf16*",
}
INFER_PATHS = tuple(INFER_HEADINGS)


@torch.no_grad()
def section_infer(quick: bool) -> list[dict]:
    import onnxruntime as ort

    from resnetlab.export import _to_onnx

    out, rows = [], []
    modes = {k: v for k, v in INFER_MODES.items() if v[1] == torch.float32 or BF16}
    paths = [k for k in INFER_PATHS if k in modes or k in ("eager", "onnxruntime")]
    cases = [("resnet50", 224, 1, "latency"), ("resnet50", 224, 32, "throughput"), ("resnet20", 32, 256, "throughput")]
    for model_name, size, batch, kind in cases[-1:] if quick else cases:
        torch.manual_seed(0)
        model = create_model(model_name).eval()
        x = torch.randn(batch, 3, size, size)
        rounds, calls_per_round = (6, 10) if batch == 1 else (3, 3)
        xc = x.contiguous(memory_format=torch.channels_last)
        calls = {"eager": (model, x)}
        setup = {"eager": 0.0}
        for path, (mode, dtype) in modes.items():
            t0 = time.perf_counter()
            m = prepare_inference(model, mode, dtype=dtype)
            m(xc)  # first call: compiles
            if mode == "onednn":
                m(xc)  # oneDNN Graph fuses during the profiling executor's first calls
            setup[path] = time.perf_counter() - t0
            calls[path] = (m, xc)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            _to_onnx(model, torch.randn(2, 3, size, size), Path(tmp) / "m.onnx", {})
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(str(Path(tmp) / "m.onnx"), options, providers=["CPUExecutionProvider"])
            setup["onnxruntime"] = time.perf_counter() - t0
        calls["onnxruntime"] = (lambda a, s=session: torch.from_numpy(s.run(None, {"input": a})[0]), x.numpy())
        # The paths take turns in rounds, so that a drift of the machine hits all alike; within a round
        # one path runs several calls in a row, the first untimed, so each is measured with its own
        # weights in the caches (as a server that runs one model sees it), not the previous path's.
        timings: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(rounds):
            for k, (fn, arg) in calls.items():
                fn(arg)
                timings[k] += _time_calls(fn, arg, calls_per_round)
        ref = model(x)
        diffs = {k: float((fn(arg) - ref).abs().max()) for k, (fn, arg) in calls.items() if k != "eager"}
        # How far bfloat16's rounding moves the outputs, against their size (float32 paths: about 1e-6).
        relative = {k: v / float(ref.abs().max()) for k, v in diffs.items()}
        median = {k: statistics.median(v) for k, v in timings.items()}
        result = {
            "model": model_name,
            "size": size,
            "batch": batch,
            "kind": kind,
            "median_seconds": median,
            "setup_seconds": setup,
            "max_abs_diff": diffs,
            "max_rel_diff": relative,
        }
        out.append(result)
        if kind == "latency":
            cells = [f"{1000 * median[k]:.1f} ms" for k in paths]
        else:
            cells = [f"{batch / median[k]:.0f} img/s" for k in paths]
        rows.append([model_name, size, batch, kind, *cells])
        print(
            f"  {model_name} batch {batch}: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in median.items()),
            flush=True,
        )
    print(
        "\nInference (median call, the paths taking turns in rounds of consecutive calls;"
        " set-up time excluded, see JSON)"
    )
    print(
        table(
            [
                "model",
                "px",
                "batch",
                "measure",
                *[INFER_HEADINGS[k] for k in paths],
            ],
            rows,
        )
    )
    if BF16:
        print(
            "* bf16: weights and activations in bfloat16 (a different precision; the other columns are float32); "
            "largest output difference from eager float32, relative to the largest output: "
            + ", ".join(
                f"{r['model']} b{r['batch']} {max(r['max_rel_diff'][k] for k in INFER_PATHS[-2:]):.1e}" for r in out
            )
        )
    else:
        print(NO_BF16)
    return out


DEPTH_PROBE = r"""
import json, sys, time, torch, resnetlab
depth, ckpt, batch = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
torch.manual_seed(0)
model = resnetlab.models.cifar_resnet(depth).to(memory_format=torch.channels_last)
if ckpt:
    model.set_grad_checkpointing()
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (batch,))
def step():
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
def vm(key):  # /proc/self/status in kB; VmHWM is this process image's peak (ru_maxrss survives exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) / 1024
built = vm("VmRSS")
step()
times = []
for _ in range(3):
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"step_seconds": sorted(times)[1], "peak_rss_mib": vm("VmHWM"), "built_rss_mib": built,
                  "params": params}))
"""


def section_depth(quick: bool) -> list[dict]:
    depths = [20, 56, 110] if quick else [20, 56, 110, 218, 434, 1202]
    batch = 64
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed memory goes back, so peak RSS is honest
    out, rows = [], []
    for depth in depths:
        row = [depth]
        for ckpt in (False, True):
            proc = subprocess.run(
                [sys.executable, "-c", DEPTH_PROBE, str(depth), str(int(ckpt)), str(batch)],
                capture_output=True,
                text=True,
                env=env,
                timeout=1800,
            )
            if proc.returncode:
                raise RuntimeError(proc.stderr)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r.update(depth=depth, checkpointing=ckpt, batch=batch)
            out.append(r)
            row += [f"{r['step_seconds']:.2f}", f"{r['peak_rss_mib'] - r['built_rss_mib']:.0f}"]
        print(f"  depth {depth}: " + " ".join(row[1:]), flush=True)
        rows.append(row)
    base = {c: next(r for r in out if r["depth"] == depths[0] and r["checkpointing"] == c) for c in (False, True)}
    for row, depth in zip(rows, depths, strict=True):
        for c in (False, True):
            r = next(x for x in out if x["depth"] == depth and x["checkpointing"] == c)
            row.append(f"{r['step_seconds'] / base[c]['step_seconds'] / (depth / depths[0]):.2f}")
    print(
        f"\nCost against depth (CIFAR ResNets, batch {batch}, one training step; peak resident memory of a fresh "
        "process above the built model, MiB)"
    )
    print(
        table(["depth", "s/step", "peak MiB", "s/step ckpt", "peak MiB ckpt", "time/depth vs d20", "same, ckpt"], rows)
    )
    print("time/depth vs d20 near 1.0 means time grows linearly with depth")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="peak,train,infer,depth")
    ap.add_argument("--quick", action="store_true", help="a few cases only (a smoke run)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256], help="training batches at 32x32")
    ap.add_argument(
        "--batch-sizes-224",
        type=int,
        nargs="+",
        default=[128, 256],
        help="training batches at 224x224 (a resnet50 step at batch 256 takes about a minute on 2 cores)",
    )
    ap.add_argument(
        "--max-memory",
        type=float,
        metavar="GIB",
        help="skip training cases whose float32 step needs more memory than this (default: what is available)",
    )
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_memory is not None and args.max_memory <= 0:
        ap.error(f"--max-memory: must be a positive number of GiB, got {args.max_memory}")
    max_memory = None if args.max_memory is None else int(args.max_memory * 2**30)  # None: what is available
    sections = args.sections.split(",")
    results: dict = {"machine": machine_info()}
    print(describe_machine(results["machine"]))
    runs = {
        "train": lambda: section_train(args.quick, results["peak"], args.batch_sizes, args.batch_sizes_224, max_memory),
        "infer": lambda: section_infer(args.quick),
        "depth": lambda: section_depth(args.quick),
    }
    unknown = [s for s in sections if s not in ("peak", *runs)]
    if unknown:
        ap.error(f"--sections: unknown section {unknown[0]!r}; choose from peak, {', '.join(runs)}")
    results["peak"] = section_peak()  # always: the other sections report against it
    for name, run in runs.items():
        if name in sections:
            results[name] = run()
            if args.json:  # after every section, so that a long suite stopped half-way keeps what it measured
                args.json.write_text(json.dumps(results, indent=2))
    if args.json:
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
