"""Every study at tiny sizes: its outputs exist and agree with the JSON it prints."""

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch

from resnetlab.cli import main
from resnetlab.data.prepare import prepare_data
from resnetlab.experiments import STUDIES, LesionSettings, lesion, run_lesion
from resnetlab.experiments.identity import branch_ratios, deepen, zero_branch_check
from resnetlab.experiments.lesion import Skip, kept_above_chance, lesioned, removable, verdict
from resnetlab.experiments.study import RUN_OVERHEAD_S, Speed, Study, fmt_mean_std, mean_std, run_seconds
from resnetlab.models import create_model
from resnetlab.training.config import TrainConfig

SYNTH = "synthetic:3x16x16:4:600"


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1]), captured.out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_outputs(folder, figure):
    for name in ("report.md", "results.json", f"{figure}.png", f"{figure}.svg", "study.json"):
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    assert f"({figure}.png)" in (folder / "report.md").read_text()


def test_demo_outputs_agree_with_its_json_and_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--depths", "2", "4", "--width", "8", "--epochs", "2", "--seeds", "2", "--out", str(out)]
    result, text = run_cli(capsys, *args, "--json", "--no-progress")
    assert "expected run time" in text and "| hidden layers |" in text
    assert_outputs(out, "training_error")
    rows = read_csv(out / "final_errors.csv")
    assert len(rows) == 2 * 2 * 2  # depths x nets x splits
    for row in rows:
        key = f"{row['net']}_{row['split']}_error_d{row['depth']}"
        assert result[key] == pytest.approx(round(float(row["error_mean"]), 2))
    saved = json.loads((out / "results.json").read_text())["headline"]
    assert {k: v for k, v in result.items() if k != "out"} == saved
    curves = read_csv(out / "curves.csv")
    assert len(curves) == 2 * 2 * 2 * 2  # depths x nets x seeds x epochs
    assert len(list((out / "runs").iterdir())) == 8
    again, _ = run_cli(capsys, *args, "--json", "--no-progress")  # finished runs are read back, not retrained
    assert again == result


def test_a_study_folder_is_not_reused_for_another_study(tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.json").write_text('{"study": "lesion"}')
    assert main(["demo", "--out", str(tmp_path / "s")]) == 2
    assert "holds a 'lesion' study" in capsys.readouterr().err


TINY = "synthetic:3x8x8:2:64"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--lr", "0"], "--lr must be a positive number, got 0.0"),
        (["demo", "--lr", "inf"], "--lr must be a finite number"),
        (["study", "families", "--models", "resnet20", "--lr", "0"], "--lr must be a positive number, got 0.0"),
        (["study", "families", "--models", "resnet20", "--lr", "nan"], "--lr must be a finite number"),
        (
            ["study", "identity", "--depth", "8", "--epochs", "1", "--finetune-epochs", "0"],
            "--finetune-epochs must be >= 1",
        ),
        (
            ["study", "gradients", "--depth", "8", "--depths", "8", "--distance", "nan"],
            "--distance must be a finite number",
        ),
        (
            ["study", "gradients", "--depth", "8", "--depths", "8", "--distance", "0"],
            "--distance must be > 0 (the nearby input must differ from the image)",
        ),
        (["study", "lesion", "--depth", "8", "--epochs", "0"], "--epochs must be >= 1"),
    ],
)
def test_study_settings_are_checked_before_anything_is_written(tmp_path, capsys, argv, message):
    # Cheap settings, so that a study which missed the check ends soon instead of training for long.
    cheap = [] if argv[0] == "demo" else ["--data", TINY, "--seeds", "1", "--batch-size", "8"]
    assert main([*argv, *cheap, "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"resnetlab {argv[0]}: error: {message}"
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("study", ["degradation", "gradients", "identity", "lesion", "families"])
def test_a_study_whose_data_fails_leaves_no_folder(tmp_path, capsys, study):
    extra = ["--depths", "8"] if study in ("degradation", "gradients") else ["--models", "resnet20"]
    extra = extra if study in ("degradation", "gradients", "families") else ["--depth", "8"]
    missing = tmp_path / "no-such-folder"
    assert main(["study", study, *extra, "--data", str(missing), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


class _Announced(Exception):
    """Stops a study where it states its plan, before any training."""


@pytest.mark.parametrize("name", ["degradation", "gradients", "identity", "lesion", "families"])
def test_a_studys_threads_flag_is_set_before_it_measures_or_trains(tmp_path, monkeypatch, name):
    calls, seen_at_announce = [], []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)

    def announce(self, what, seconds):
        seen_at_announce.append(list(calls))
        raise _Announced

    monkeypatch.setattr(Study, "announce", announce)
    settings_type, run, _ = STUDIES[name]
    small = {
        "degradation": {"depths": [8]},
        "gradients": {"depth": 8, "depths": [8], "steps": [0]},
        "identity": {"depth": 8},
        "lesion": {"depth": 8},
        "families": {"models": ["resnet20"]},
    }[name]
    settings = settings_type(data=TINY, seeds=1, batch_size=8, threads=1, **small)
    with pytest.raises(_Announced):
        run(settings, out=str(tmp_path / "s"), progress=False)
    assert seen_at_announce == [[1]]


def test_run_seconds_counts_steps_validations_and_the_run_overhead():
    data = SimpleNamespace(train=range(25), val=range(50))
    config = TrainConfig(epochs=3, batch_size=10, eval_every=2)
    # 2 steps per epoch (the 5 images left over make no step) x 3 epochs x 0.5 s, validation after epochs 2 and 3
    assert run_seconds(Speed(step_s=0.5, infer_img_per_s=100.0), config, data) == 3.0 + 2 * 0.5 + RUN_OVERHEAD_S
    assert run_seconds(Speed(0.5, 100.0), config, SimpleNamespace(train=range(25), val=None)) == 3.0 + RUN_OVERHEAD_S


def test_lesion_estimate_adds_each_lesions_evaluation_to_the_two_runs(tmp_path, monkeypatch):
    announced = []

    def announce(self, what, seconds):
        announced.append(seconds)
        raise _Announced

    monkeypatch.setattr(Study, "announce", announce)
    monkeypatch.setattr(lesion, "measure_speed", lambda config, data: Speed(step_s=1.0, infer_img_per_s=8.0))
    settings = LesionSettings(data=TINY, depth=8, budget=1.0, epochs=2, samples=2, seeds=3, batch_size=8)
    with pytest.raises(_Announced):
        run_lesion(settings, out=str(tmp_path / "s"), progress=False)
    data = prepare_data(TINY)  # 58 training images (7 full batches an epoch), 6 held out
    assert (len(data.train), len(data.val)) == (58, 6)
    one_run = 7 * 2 * 1.0 + 2 * 6 / 8.0 + RUN_OVERHEAD_S
    evaluations = 1 + 3 + 3 * 2  # intact, each of the 3 blocks, 2 random sets of 1, 2 and 3 blocks
    assert announced == [pytest.approx(3 * 2 * (one_run + evaluations * 6 / 8.0))]


def test_lesion_verdict_measures_what_each_net_keeps_above_chance():
    # The CIFAR-10 run of docs/studies.md: ResNet-20 65.18% intact, 39.54% on average with one block
    # removed; its plain twin 54.88% and 12.93%. In points the plain net drops only 1.6x as far (41.9
    # against 25.6): the floor at chance (10%) caps its drop. Above chance it keeps 6.5% against 53.5%.
    resnet, plain = kept_above_chance(65.18, 39.54, 10.0), kept_above_chance(54.88, 12.93, 10.0)
    assert resnet == pytest.approx(0.535, abs=1e-3) and plain == pytest.approx(0.065, abs=1e-3)
    assert "ruins the plain network far more" in verdict(resnet, plain)
    assert "keeps 54% of its accuracy above chance, the plain net 7%" in verdict(resnet, plain)
    assert "degrades gracefully" in verdict(0.95, 0.05)
    assert "is not clear" in verdict(0.6, 0.3)
    assert "is not clear" in verdict(0.2, 0.1)
    assert "ruins the plain network far more" in verdict(0.2, -0.05)  # below chance counts as a share of 0
    assert math.isnan(kept_above_chance(10.0, 12.0, 10.0))  # a net at chance keeps no share to speak of
    assert "is not clear" in verdict(math.nan, 0.0)


def test_degradation_study(tmp_path, capsys):
    out = tmp_path / "deg"
    result, _ = run_cli(
        capsys,
        "study",
        "degradation",
        "--data",
        SYNTH,
        "--depths",
        "8",
        "14",
        "--budget",
        "0.01",
        "--batch-size",
        "4",
        "--out",
        str(out),
        "--json",
        "--no-progress",
    )
    assert_outputs(out, "errors")
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["epochs"] == 2 and {k: v for k, v in result.items() if k != "out"} == saved["headline"]
    assert set(result) >= {"plain8_train_error", "resnet14_val_error"}
    assert "budget 0.01" in (out / "report.md").read_text()


def test_degradation_rejects_bad_depths(capsys):
    assert main(["study", "degradation", "--depths", "21"]) == 2
    assert "6n+2" in capsys.readouterr().err


def test_gradients_study(tmp_path, capsys):
    out = tmp_path / "grad"
    result, _ = run_cli(
        capsys,
        "study",
        "gradients",
        "--data",
        SYNTH,
        "--depth",
        "8",
        "--depths",
        "8",
        "14",
        "--steps",
        "0",
        "2",
        "--batch-size",
        "16",
        "--seeds",
        "1",
        "--out",
        str(out),
        "--json",
        "--no-progress",
    )
    assert_outputs(out, "gradients")
    rows = read_csv(out / "grad_norms.csv")
    layers = {int(r["layer"]) for r in rows}
    assert layers == set(range(1, 8))  # ResNet-8: stem + 3 blocks x 2 convs (projections excluded)
    assert {r["variant"] for r in rows} == {"plain-bn", "resnet-bn", "plain-nobn", "resnet-nobn"}
    saved = json.loads((out / "results.json").read_text())["headline"]
    assert {k: v for k, v in result.items() if k != "out"} == saved
    sims = read_csv(out / "gradient_similarity.csv")
    assert all(-1 <= float(r["cosine_similarity"]) <= 1 for r in sims)


def test_gradients_study_steps_beyond_one_epoch(tmp_path, capsys):
    # 40 images, 90% or less for training: 2 batches of 16 an epoch, so step 5 is in the third epoch.
    out = tmp_path / "grad"
    args = ["--depth", "8", "--depths", "8", "--steps", "0", "5", "--batch-size", "16", "--seeds", "1"]
    run_cli(capsys, "study", "gradients", "--data", "synthetic:3x8x8:2:40", *args, "--out", str(out), "--json")
    steps = {int(r["step"]) for r in read_csv(out / "grad_norms.csv")}
    assert steps == {0, 5}


def test_gradients_study_records_a_net_that_diverges_instead_of_crashing(tmp_path, capsys):
    # A learning rate no net survives: the first step is finite, the next ones are not (the default
    # settings did this to the un-normalised ResNet-56 on CIFAR-10 at step 1).
    out = tmp_path / "grad"
    args = ["--depth", "8", "--depths", "8", "--steps", "0", "3", "--batch-size", "16", "--seeds", "1"]
    result, _ = run_cli(
        capsys, "study", "gradients", "--data", SYNTH, *args, "--lr", "1e6", "--out", str(out), "--json"
    )
    saved = json.loads((out / "results.json").read_text())
    diverged = {k: v[0] for k, v in saved["diverged_at_step"].items()}
    assert any(step is not None and 0 < step <= 3 for step in diverged.values()), diverged
    rows = read_csv(out / "grad_norms.csv")
    for key, step in diverged.items():
        at_start = [float(r["grad_norm"]) for r in rows if r["variant"] == key and r["step"] == "0"]
        assert all(math.isfinite(v) for v in at_start)  # step 0 came before the divergence
        if step is not None:
            later = [r["grad_norm"] for r in rows if r["variant"] == key and r["step"] == "3"]
            assert later and all(v == "nan" for v in later)
    assert "diverged (a non-finite loss or gradient) at step" in (out / "report.md").read_text()
    assert result == {"out": str(out), **saved["headline"]}


def test_identity_study_shows_exact_identities(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ident"
    args = ["study", "identity", "--data", SYNTH, "--depth", "8", "--budget", "0.5", "--epochs", "2"]
    args += [
        "--finetune-epochs",
        "1",
        "--seeds",
        "1",
        "--batch-size",
        "32",
        "--out",
        "ident",
        "--json",
        "--no-progress",
    ]
    result, _ = run_cli(capsys, *args)
    # Run again with the same relative --out (its fine-tuning runs start from weights saved in it): the
    # finished runs are read back, not refused as 'trained with other settings'.
    again, _ = run_cli(capsys, *args)
    assert again == result
    assert_outputs(out, "branch_ratios")
    assert result["zero_branch_max_abs_difference"] == 0.0
    assert result["deepening_max_output_difference"] == 0.0
    assert result["deepened_val_acc"] == result["base_val_acc"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["check_images"] == 60  # the 10% of 600 images held out, fewer than the 256 it takes at most
    report = (out / "report.md").read_text()
    assert "from 60 validation images" in report
    base = f"{result['base_val_acc']:.2f}"
    assert f"| ResNet-8 trained (base) | {base} |" in report and f"accuracy from {base}% to {base}%" in report
    ratios = read_csv(out / "branch_ratios.csv")
    assert {int(r["epoch"]) for r in ratios} == {0, 1, 2} and {int(r["block"]) for r in ratios} == {1, 2, 3}


def test_lesion_study(tmp_path, capsys):
    out = tmp_path / "lesion"
    result, _ = run_cli(
        capsys,
        "study",
        "lesion",
        "--data",
        SYNTH,
        "--depth",
        "14",
        "--budget",
        "0.5",
        "--epochs",
        "1",
        "--samples",
        "2",
        "--batch-size",
        "32",
        "--out",
        str(out),
        "--json",
        "--no-progress",
    )
    assert_outputs(out, "lesion")
    single = read_csv(out / "single_block.csv")
    assert len(single) == 2 * 6  # two nets x six blocks
    plain = [r for r in single if r["net"] == "plain"]
    assert [r["removable"] for r in plain] == ["True", "True", "False", "True", "False", "True"]
    assert result["resnet_removable_blocks"] == 6 and result["plain_removable_blocks"] == 4


# --- the pieces ---------------------------------------------------------------------------------


def test_deepen_keeps_outputs_exactly_and_adds_blocks():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).eval()
    for m in model.modules():  # non-trivial statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2)
    deeper = deepen(model, 20, 2).eval()
    assert len(deeper.residual_blocks()) == len(model.residual_blocks()) + 6
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(deeper(x), model(x))


def test_zero_branch_check_and_branch_ratios_on_a_trained_like_model():
    torch.manual_seed(0)
    model = create_model("preact_resnet110", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    rows = zero_branch_check(model, x)
    assert len(rows) == 54 and all(r["max_abs_difference"] == 0 for r in rows)
    assert all(r > 0 for r in branch_ratios(model, x))


def test_lesioning_a_residual_block_keeps_its_shortcut():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    cut = lesioned(model, {4})
    assert isinstance(cut.layer2[1], Skip) and not isinstance(model.layer2[1], Skip)
    with torch.no_grad():
        h = model.layer2[0](model.layer1(model.forward_stem(x)))
        torch.testing.assert_close(cut.layer2[1](h), h, rtol=0, atol=0)  # relu(x) == x for x >= 0
    plain = create_model("plain20")
    assert [removable(b) for b in plain.residual_blocks()] == [True] * 3 + [False, True, True] * 2


def test_mean_std_formatting():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert fmt_mean_std([1.0, 3.0], 1) == "2.0 ± 1.4" and fmt_mean_std([5.0]) == "5.00"
