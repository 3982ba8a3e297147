import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from resnetlab import TrainConfig, load_model, train
from resnetlab.checkpoint import latest_checkpoint, load_train_state
from resnetlab.cli import main
from resnetlab.errors import UserError
from resnetlab.training.config import add_config_flags, config_from_args, load_toml, to_toml

FAST = dict(model="residual_mlp", data="digits", epochs=2, batch_size=64, lr=0.05)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run_dir) / "model.safetensors")


def cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resnetlab", *argv], capture_output=True, text=True, timeout=timeout)


# --- configuration --------------------------------------------------------------------------------


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_flags(parser)
    return config_from_args(parser.parse_args(argv))


def test_flags_override_the_toml_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model = "resnet56"\nlr = 0.2\nepochs = 7\nmilestones = [0.25, 0.5]\nnesterov = false\n')
    config = _parse(["--config", str(path), "--lr", "0.3", "--channels-last"])
    assert (config.model, config.lr, config.epochs, config.nesterov) == ("resnet56", 0.3, 7, False)
    assert config.milestones == [0.25, 0.5] and config.channels_last is True
    assert config.batch_size == TrainConfig().batch_size


def test_toml_round_trip_documents_every_field(tmp_path):
    config = TrainConfig(model="resnet32", milestones=[0.3], data='my folder/with "quotes"', lr=1e-3)
    text = to_toml(config)
    assert text.count("# ") >= len(TrainConfig.__dataclass_fields__)
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert TrainConfig(**load_toml(path)) == config


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.toml")), ids=lambda p: p.name
)
def test_the_shipped_recipes_load_and_validate(path):
    config = TrainConfig(**load_toml(path))
    config.validate()
    assert config.model == "resnet20"  # both recipes train the paper's network, unchanged


@pytest.mark.parametrize(
    "content, message",
    [
        ("lrr = 0.1\n", "unknown setting 'lrr'"),
        ('epochs = "ten"\n', "epochs must be int"),
        ("epochs = [\n", "not valid TOML"),
    ],
)
def test_bad_config_files_name_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        load_toml(path)
    assert str(path) in str(err.value)


def test_impossible_values_are_refused():
    with pytest.raises(UserError, match="--epochs must be >= 1"):
        TrainConfig(epochs=0).validate()
    with pytest.raises(UserError, match="--milestones"):
        TrainConfig(milestones=[1.5]).validate()


def test_help_documents_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in out
    assert "(default: 0.1)" in out and "--no-nesterov" in out


# --- a run ----------------------------------------------------------------------------------------


def test_a_run_writes_its_folder_and_learns(tmp_path):
    run = tmp_path / "run"
    result = train(TrainConfig(**FAST, out=str(run)), progress=False)
    assert {p.name for p in run.iterdir()} >= {
        "config.toml",
        "metrics.jsonl",
        "checkpoints",
        "result.json",
        "curves.png",
    }
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert set(lines[0]) == {
        "epoch",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "lr",
        "img_per_s",
        "image_size",
        "epoch_seconds",
        "elapsed_seconds",
    }
    assert lines == result.history and lines[-1]["val_acc"] > 80  # 10 classes: chance is 10%
    assert json.loads((run / "result.json").read_text())["final"] == lines[-1]
    state = load_train_state(latest_checkpoint(run))
    assert state["epoch"] == 2 and state["step"] == 0 and "optimizer" in state and "rng" in state
    model, info = load_model(run)
    assert info.classes == [str(i) for i in range(10)] and info.input_shape == (1, 8, 8)
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_an_existing_run_folder_is_not_overwritten(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="--resume"):
        train(TrainConfig(**FAST, out=str(tmp_path / "run")), progress=False)


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path):
    # Interrupt a real training process with SIGTERM mid-epoch, resume it, and compare bit for bit.
    common = ["train", "--model", "resnet20", "--epochs", "3", "--batch-size", "32", "--no-progress"]
    straight = cli(*common, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr

    run = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnetlab", *common, "--out", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived (machine too fast for this timing)")
    assert proc.returncode == 130, err
    assert "Resume with: resnetlab train --resume" in err
    state = load_train_state(latest_checkpoint(run))
    assert state["step"] > 0, "the signal should have produced a mid-epoch checkpoint"

    resumed = cli("train", "--resume", str(run), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(tmp_path / "straight"), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(s)["epoch"] for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_resume_refuses_other_settings(tmp_path):
    proc = cli("train", "--resume", str(tmp_path), "--lr", "0.5")
    assert proc.returncode == 2 and "drop --lr" in proc.stderr


def test_a_non_finite_loss_stops_the_run_and_writes_no_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = cli(
        "train",
        "--model",
        "residual_mlp",
        "--epochs",
        "2",
        "--lr",
        "1e30",
        "--optimizer",
        "sgd",
        "--warmup-epochs",
        "0",
        "--out",
        str(run),
        "--no-progress",
    )
    assert proc.returncode == 1
    assert "non-finite loss or gradients at epoch 1, step" in proc.stderr and "Traceback" not in proc.stderr
    assert latest_checkpoint(run) is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "resnet5"], "unknown model 'resnet5'"),
        (["--data", "/no/such/dir"], "no such file or folder"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--batch-size", "5000"], "fewer than one batch"),
        (["--config", "/no/such.toml"], "no such file"),
        (["--device", "cuda:7"], "--device"),
        (["--device", "meta"], "--device 'meta': resnetlab runs on cpu or cuda[:N] (or auto)"),
        (["--threads", "99999999999"], "--threads must be between 0 and 4096, got 99999999999"),
        (["--model", "resnet_cifar", "--model-args", "depth=abc"], "--model-args depth='abc': resnet_cifar takes an"),
    ],
)
def test_user_mistakes_exit_2_without_traceback_or_files(tmp_path, argv, message):
    run = tmp_path / "run"
    proc = cli("train", *argv, "--out", str(run))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not run.exists()


def test_a_bad_value_in_a_config_file_names_the_file_and_the_value(tmp_path):
    config = tmp_path / "recipe.toml"
    config.write_text("lr = -1\n")
    with pytest.raises(UserError, match=r"^--config .*recipe.toml: --lr must be a positive number, got -1.0$"):
        _parse(["--config", str(config)])
    # The same value given as a flag is the flag's mistake, not the file's.
    with pytest.raises(UserError, match=r"^--lr must be a positive number, got -1.0$"):
        _parse(["--config", str(config), "--lr", "-1"])


def test_init_weights_fine_tunes_with_a_new_classifier_and_names_what_does_not_fit(tmp_path):
    def run(name, model, data, **kwargs):
        config = TrainConfig(model=model, data=data, epochs=1, batch_size=16, out=str(tmp_path / name), **kwargs)
        return train(config, progress=False, verbose=False)

    # MobileNetV2's classifier is classifier.1: a 10-class one is replaced for 3 classes, the rest loaded.
    from resnetlab.training.distributed import SINGLE_PROCESS
    from resnetlab.training.engine import Trainer

    source = run("ten", "mobilenet_v2_cifar", "synthetic:3x32x32:10:64")
    config = TrainConfig(
        model="mobilenet_v2_cifar", data="synthetic:3x32x32:3:48", batch_size=16, init_weights=str(source.run_dir)
    )
    loaded = Trainer(config, torch.device("cpu"), SINGLE_PROCESS).core.state_dict()
    trained = weights(source.run_dir)
    assert loaded["classifier.1.weight"].shape == (3, 1280)
    assert all(torch.equal(loaded[k], v) for k, v in trained.items() if not k.startswith("classifier."))
    # Another architecture: refused, naming the keys.
    small = run("r20", "resnet20", "synthetic:3x32x32:10:64")
    with pytest.raises(UserError, match=r"the weights do not fit --model \(Missing key\(s\) in state_dict: layer1.3"):
        run("r32", "resnet32", "synthetic:3x32x32:10:64", init_weights=str(small.run_dir))


def test_resuming_a_finished_run_leaves_its_result_as_it_was(tmp_path):
    run = tmp_path / "r"
    train(TrainConfig(model="residual_mlp", epochs=1, batch_size=64, out=str(run)), progress=False, verbose=False)
    before = (run / "result.json").read_bytes()
    again = train(resume=run, progress=False, verbose=False)
    assert len(again.history) == 1
    assert (run / "result.json").read_bytes() == before  # not the no-op session's wall time


def test_each_epoch_records_the_learning_rate_its_last_step_used(tmp_path):
    config = TrainConfig(
        model="residual_mlp", epochs=2, batch_size=64, schedule="onecycle", lr=0.1, out=str(tmp_path / "r")
    )
    history = train(config, progress=False, verbose=False).history
    # OneCycleLR ends at lr / (div_factor * final_div_factor) = 0.1 / 25 / 1e4 on the last step; the
    # optimiser's own rate after it would be one step past the end, where the cosine turns back up.
    assert history[-1]["lr"] == pytest.approx(0.1 / 25 / 1e4, rel=1e-6)
    metrics = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics] == [h["lr"] for h in history]


# --- multi-process ------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    args = [
        "train",
        "--model",
        "residual_mlp",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--no-progress",
        "--threads",
        "1",
    ]
    single = cli(*args, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "resnetlab",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("done: validation accuracy") == 1, two.stdout  # rank 0 alone reports
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    one_hist = [json.loads(s) for s in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two_hist = [json.loads(s) for s in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_acc"] for r in one_hist] == [r["val_acc"] for r in two_hist]


@pytest.mark.parametrize("rank", [None, "x"])
def test_a_half_set_multi_process_environment_is_a_clear_error(tmp_path, monkeypatch, capsys, rank):
    monkeypatch.setenv("WORLD_SIZE", "2")
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    code = main(["train", "--model", "residual_mlp", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert "WORLD_SIZE='2'" in err and f"RANK={rank!r}" in err and "torchrun" in err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_an_out_that_is_a_file_is_refused_as_a_file(tmp_path, capsys):
    for name, content in (("afile", "mine\n"), ("empty", "")):
        (tmp_path / name).write_text(content)
        argv = ["train", "--model", "residual_mlp", "--epochs", "1", "--no-progress", "--out", str(tmp_path / name)]
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == (
            f"resnetlab train: error: --out {tmp_path / name}: is a file, not a folder; name a new folder for the run"
        )
        assert (tmp_path / name).read_text() == content


SHUTDOWN_SCRIPT = """
import os, sys
from resnetlab import TrainConfig, train

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
train(TrainConfig(model="residual_mlp", epochs=1, batch_size=64, threads=1, out=sys.argv[1]), verbose=False)
print(f"rank {os.environ['RANK']}: {before} -> {threads()} threads", flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_two_process_training_ends_with_the_process_group_gone(tmp_path):
    # A process group that outlives train() keeps gloo's worker threads running into interpreter
    # shutdown, where one of them can abort the process (see resnetlab.training.distributed); so the
    # threads train() started must be gone when it returns.
    script = tmp_path / "run.py"
    script.write_text(SHUTDOWN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, str(script), str(tmp_path / "run")], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr
    counts = [line.split(": ")[1] for line in sorted(done.stdout.splitlines()) if line.startswith("rank ")]
    assert len(counts) == 2, done.stdout
    for count in counts:
        before, after = count.removesuffix(" threads").split(" -> ")
        assert after == before, done.stdout  # unfixed: 1 -> 4 (gloo's two workers and its event loop)


def test_progressive_resizing_schedule_and_record(tmp_path):
    from resnetlab.training.distributed import SINGLE_PROCESS
    from resnetlab.training.engine import Trainer

    config = TrainConfig(
        model="resnet20",
        data="synthetic:3x32x32:4:256",
        epochs=10,
        batch_size=32,
        min_image_size=16,
        resize_until=0.5,
        augment="crop+flip",
    )
    trainer = Trainer(config, torch.device("cpu"), SINGLE_PROCESS)
    assert [trainer.image_size_at(e) for e in range(6)] == [16, 20, 24, 28, 32, 32]
    config = TrainConfig(
        model="resnet20",
        data="synthetic:3x32x32:4:256",
        epochs=2,
        batch_size=32,
        min_image_size=16,
        resize_until=1.0,
        out=str(tmp_path / "run"),
    )
    history = train(config, progress=False, verbose=False).history
    assert [r["image_size"] for r in history] == [16, 32]


def test_a_compiled_run_takes_the_reduced_sizes_eagerly():
    from resnetlab.training.distributed import SINGLE_PROCESS
    from resnetlab.training.engine import Trainer

    config = TrainConfig(
        model="resnet20", data="synthetic:3x32x32:4:64", batch_size=16, compile=True, min_image_size=16
    )
    trainer = Trainer(config, torch.device("cpu"), SINGLE_PROCESS)
    assert trainer.model is not trainer.eager_model and trainer.eager_model is trainer.core
    sizes = []  # what reaches the compiled model (a stand-in that records, so nothing is compiled here)
    trainer.model = lambda x: sizes.append(x.shape[-1]) or trainer.core(x)
    x, y = next(iter(trainer.train_loader.batches(0)))
    for size in (16, 24, None):
        trainer.train_size = size
        before = [p.detach().clone() for p in trainer.core.parameters()]
        trainer.step(x, y)
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.core.parameters(), strict=True))
    assert sizes == [32]  # only the full-size step went through the compiled model


def test_compile_without_a_cpp_compiler_is_refused_before_the_run_folder(tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config

    from resnetlab.inference import prepare_inference

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    config = TrainConfig(model="resnet20", data="synthetic:3x32x32:4:64", compile=True, out=str(tmp_path / "run"))
    with pytest.raises(UserError, match=r"^--compile: torch.compile on the CPU .* found no working compiler"):
        train(config, progress=False, verbose=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match=r'^mode="compile": .* found no working compiler'):
        prepare_inference(torch.nn.Conv2d(3, 4, 3), "compile")


@pytest.mark.parametrize("amp", ["bf16", "none"])
def test_bfloat16_on_a_cpu_without_its_kernels_is_one_warning_line(tmp_path, capsys, monkeypatch, amp):
    import resnetlab.capabilities

    monkeypatch.setattr(resnetlab.capabilities, "fast_bfloat16", lambda device: False)
    argv = ["train", "--data", "synthetic:3x8x8:2:32", "--epochs", "1", "--batch-size", "16", "--amp", amp]
    assert main([*argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    if amp == "none":
        assert warned == []
    else:
        assert len(warned) == 1 and warned[0].startswith("resnetlab train: warning: --amp bf16: this CPU (")
        assert "no bfloat16 kernels in oneDNN" in warned[0]


def test_alternating_flips_without_flips_in_the_augmentation_are_refused(tmp_path):
    config = TrainConfig(data="digits", epochs=1, alternate_flip=True, out=str(tmp_path / "r"))
    with pytest.raises(UserError, match="--alternate-flip needs flips in the training augmentation, which is none"):
        train(config, progress=False)
    assert not (tmp_path / "r" / "result.json").exists()
