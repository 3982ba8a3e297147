"""The speed scripts run end to end on a small case and write figures that agree with each other.

Speed itself is measured by running them (see README, Speed), never asserted here."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnetlab.capabilities import fast_bfloat16

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def bench(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *argv], capture_output=True, text=True, timeout=900, cwd=BENCH
    )


@pytest.mark.slow
def test_suite_quick_train_and_infer(tmp_path):
    # bfloat16 is measured where oneDNN has bfloat16 kernels, and left out, saying so, where it has not.
    bf16 = fast_bfloat16(torch.device("cpu"))
    out = tmp_path / "suite.json"
    done = bench("suite.py", "--quick", "--sections", "train,infer", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["peak"]["fp32_gflops"] > 0
    assert (results["peak"]["bf16_gflops"] > 0) if bf16 else results["peak"]["bf16_gflops"] is None
    assert [(r["model"], r["batch"]) for r in results["train"]] == [("resnet20", 128), ("resnet56", 128)]
    paths = ["resnetlab_fp32", "resnetlab_fp32_compiled"] + bf16 * ["resnetlab_bf16", "resnetlab_bf16_compiled"]
    for row in results["train"]:
        rounds = row["rounds_img_per_s"]
        assert set(rounds) == {"baseline", *paths}
        assert all(len(v) == 3 and min(v) > 0 for v in rounds.values())
        for path in paths:
            assert row[f"{path}_ratio"] == pytest.approx(row[f"{path}_img_per_s"] / row["baseline_img_per_s"])
    (infer,) = results["infer"]
    assert (infer["model"], infer["batch"]) == ("resnet20", 256)
    # every float32 path computes what eager computes (folding and ONNX only reorder rounding);
    # the bfloat16 ones within bfloat16's rounding
    diffs = infer["max_rel_diff"]
    assert max(v for k, v in diffs.items() if not k.endswith("_bf16")) < 1e-4
    float32_paths = {"eager", "fold", "compile", "onednn", "onnxruntime"}
    if bf16:
        assert 1e-4 < diffs["compile_bf16"] < 0.02 and 1e-4 < diffs["onednn_bf16"] < 0.02
        assert set(infer["median_seconds"]) == float32_paths | {"compile_bf16", "onednn_bf16"}
        assert "Inference (median call" in done.stdout and "oneDNN Graph bf16*" in done.stdout
    else:
        assert set(infer["median_seconds"]) == float32_paths
        assert "bf16" not in done.stdout.split("Inference (median call")[1].splitlines()[1]  # the heading
        assert done.stdout.count("bfloat16 left out: this CPU") == 3  # peak, train, infer


def test_suite_rejects_an_unknown_section():
    done = bench("suite.py", "--sections", "train,speed")
    assert done.returncode == 2
    assert "--sections: unknown section 'speed'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_train_throughput_writes_matching_json(tmp_path):
    out = tmp_path / "tp.json"
    done = bench(
        "train_throughput.py", "--steps", "2", "--rounds", "2", "--warmup", "1", "--amp", "bf16", "--json", str(out)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["resnetlab_flags"] == "bf16" and len(figures["baseline_img_per_s"]) == 2
    median = {k: statistics.median(figures[f"{k}_img_per_s"]) for k in ("baseline", "resnetlab")}
    assert figures["ratio"] == pytest.approx(median["resnetlab"] / median["baseline"])
    assert f"ratio resnetlab / baseline: {figures['ratio']:.2f}x" in done.stdout


def test_suite_skips_training_cases_that_do_not_fit_in_memory(tmp_path):
    out = tmp_path / "suite.json"
    done = bench("suite.py", "--quick", "--sections", "train", "--max-memory", "0.001", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["train"]
    assert [(r["model"], r["batch"]) for r in rows] == [("resnet20", 128), ("resnet56", 128)]
    for row in rows:
        assert "img_per_s" not in json.dumps(row)  # nothing was timed
        assert row["skipped"].startswith("needs about ") and row["skipped"].endswith(
            "GiB for a float32 step, 0.0 GiB allowed"
        )
    assert "resnet20 32px batch 128: skipped, needs about" in done.stdout
    assert "skipped: resnet56 at 32 px, batch 128: needs about" in done.stdout


def test_suite_rejects_a_memory_limit_that_is_not_positive():
    done = bench("suite.py", "--sections", "train", "--max-memory", "0")
    assert done.returncode == 2
    assert "--max-memory: must be a positive number of GiB, got 0.0" in done.stderr
    assert "Traceback" not in done.stderr


def test_training_memory_extrapolates_the_saved_activations_exactly(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    from common import training_memory

    from resnetlab import create_model
    from resnetlab.summary import saved_activation_bytes

    # activations grow linearly with the batch, so batches 1 and 2 predict batch 5 to the byte
    model = create_model("resnet20", num_classes=10)
    assert training_memory(model, 32, 5) == int(1.25 * saved_activation_bytes(model, torch.randn(5, 3, 32, 32)))


def test_time_to_accuracy_passes_the_extra_flags_to_each_run(tmp_path):
    reference = tmp_path / "reference.jsonl"
    reference.write_text('{"epoch": 1, "wall_minutes": 60.0, "val_acc": 101.0}\n')
    config = tmp_path / "tiny.toml"
    config.write_text('model = "residual_mlp"\nepochs = 5\nbatch_size = 64\nlr = 0.05\n')
    out, summary = tmp_path / "runs", tmp_path / "t.json"
    done = bench(
        "time_to_accuracy.py", "--reference", str(reference), "--config", str(config), "--data", "digits",
        "--seeds", "0", "1", "--out", str(out), "--extra", "--epochs 2 --eval-every 2", "--json", str(summary),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for seed in (0, 1):
        hist = [json.loads(line) for line in (out / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
        assert [h["epoch"] for h in hist] == [1, 2] and hist[0]["val_acc"] is None and hist[1]["val_acc"] > 0
    figures = json.loads(summary.read_text())
    assert figures["A"] == 101.0 and figures["T_seconds"] == 3600.0
    assert [(r["seed"], r["epochs"], r["reach_A_seconds"]) for r in figures["runs"]] == [(0, 2, None), (1, 2, None)]
    assert "(0/2 seeds reach it)" in done.stdout and "T/3 = 20.00 min (1200.0 s)" in done.stdout


def test_time_to_accuracy_names_a_missing_reference_and_a_failed_run(tmp_path):
    done = bench("time_to_accuracy.py", "--reference", str(tmp_path / "none.jsonl"))
    assert done.returncode == 1 and f"--reference {tmp_path / 'none.jsonl'}: no such file" in done.stderr
    reference = tmp_path / "reference.jsonl"
    reference.write_text('{"epoch": 1, "wall_minutes": 1.0, "val_acc": 50.0}\n')
    out = tmp_path / "runs"
    done = bench("time_to_accuracy.py", "--reference", str(reference), "--data", "digits", "--seeds", "0",
                 "--out", str(out), "--extra", "--epochs x")  # fmt: skip
    assert done.returncode == 1
    assert "argument --epochs: invalid int value: 'x'" in done.stderr
    assert f"seed 0: resnetlab train failed; run folder {out / 'seed0'}" in done.stderr
    assert "Traceback" not in done.stderr


def test_step_profile_groups_operators_by_kind_of_work(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from step_profile import OTHER, group_of

    assert group_of("aten::convolution_backward") == "convolution backward"
    assert group_of("aten::mkldnn_convolution") == "convolution forward"
    assert group_of("aten::native_batch_norm_backward") == "batch norm"
    assert group_of("aten::threshold_backward") == "ReLU"
    assert group_of("aten::clamp_min_") == "ReLU"
    assert group_of("## Call CompiledFxGraph fe4ctcz6 ##") == "fused by --compile"
    assert group_of("Optimizer.step#SGD.step") == "optimiser, gradient norm"
    assert group_of("aten::_foreach_add_") == "optimiser, gradient norm"
    assert group_of("aten::add_") == "other element-wise (adds, casts, copies)"
    assert group_of("aten::addmm") == OTHER  # the classifier's matrix product is not an element-wise add
    assert group_of("aten::gather") == OTHER


def test_machine_info_names_the_cpu_and_its_matrix_units(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    from common import describe_machine, machine_info

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
        "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\nprocessor\t: 1\n"
    )
    info = machine_info(cpuinfo)
    assert info["cpu"] == "Intel(R) Xeon(R) Processor" and info["cpu_units"] == ["AVX-512 BF16", "AMX BF16"]
    assert info["threads"] == torch.get_num_threads() and info["torch"] == torch.__version__
    cpuinfo.write_text("model name\t: AMD EPYC 9R14\nflags\t\t: avx512f avx512_bf16\n")
    assert machine_info(cpuinfo)["cpu_units"] == ["AVX-512 BF16"]
    assert machine_info(tmp_path / "missing")["cpu_units"] == []  # not Linux: no units claimed
    described = describe_machine(info | {"threads": 2, "cpu_capability": "AVX512", "torch": "2.13.0+cpu"})
    assert described == "Intel(R) Xeon(R) Processor, 2 threads, AVX512 + AVX-512 BF16 + AMX BF16, torch 2.13.0+cpu"


def test_step_profile_accounts_for_the_whole_step(tmp_path):
    out = tmp_path / "profile.json"
    done = bench(
        "step_profile.py",
        "--batch-size",
        "16",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--amp",
        "bf16",
        "--channels-last",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["flags"] == ["channels_last", "bf16"] and figures["steps"] == 2
    ms = figures["ms_per_step"]
    assert min(ms["convolution forward"], ms["convolution backward"], ms["batch norm"], ms["ReLU"]) > 0
    assert ms["fused by --compile"] == 0  # not compiled
    # the groups and the time outside operators add up to the measured step (up to rounding)
    assert sum(ms.values()) == pytest.approx(figures["step_ms"], rel=0.02)
    assert f"{figures['step_ms']:.1f} ms per step" in done.stdout
    assert figures["machine"]["threads"] == torch.get_num_threads() and figures["machine"]["cpu"]


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("step_profile.py", ["--model", "resnet21"], "step_profile.py: error: --model resnet21: unknown model"),
        ("step_profile.py", ["--steps", "0"], "argument --steps: must be at least 1, got 0"),
        ("train_throughput.py", ["--data", "missing.tar"], "train_throughput.py: error: --data 'missing.tar': no such"),
        ("train_throughput.py", ["--rounds", "two"], "argument --rounds: expected an integer, got 'two'"),
    ],
)
def test_training_benchmarks_name_a_bad_flag_without_a_traceback(script, argv, message):
    done = bench(script, *argv)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
