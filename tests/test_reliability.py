"""Faults injected for real: killed processes, damaged and foreign checkpoints, full and read-only disks,
two runs on one folder, non-finite steps."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from resnetlab import TrainConfig
from resnetlab.checkpoint import CHECKSUM_FILE, intact_checkpoints, latest_checkpoint, load_model, verify_checkpoint
from resnetlab.errors import UserError
from resnetlab.training.distributed import SINGLE_PROCESS
from resnetlab.training.engine import NonFiniteStep, Trainer, train

MLP = ["--model", "residual_mlp", "--batch-size", "64", "--no-progress"]


def cli(*argv: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resnetlab", *argv], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run) / "model.safetensors")


def epochs_in(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- 1. SIGKILL at any moment ------------------------------------------------------------------


@pytest.mark.slow
def test_twenty_kills_lose_nothing(tmp_path):
    args = [*MLP, "--epochs", "40", "--keep-checkpoints", "1"]
    # The reference run also measures this machine: `start` from launch to the run's config being in
    # place (Python, torch, data, model), `total` to the end. Kill times are drawn from them, so the
    # test makes progress on a slow CI machine as on a fast one.
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnetlab", "train", *args, "--out", str(tmp_path / "reference")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    while proc.poll() is None and not (tmp_path / "reference" / "config.toml").exists():
        time.sleep(0.01)
    start = time.monotonic() - t0
    _, err = proc.communicate(timeout=300)
    total = time.monotonic() - t0
    assert proc.returncode == 0, err.decode()
    reference = final_weights(tmp_path / "reference")

    def launch(run: Path) -> subprocess.Popen:
        cmd = (
            ["train", "--resume", str(run), "--no-progress"]
            if (run / "config.toml").exists()
            else ["train", *args, "--out", str(run)]
        )
        return subprocess.Popen(
            [sys.executable, "-m", "resnetlab", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    def check_finished(run: Path, proc: subprocess.Popen, err: bytes) -> None:
        assert proc.returncode == 0, err.decode()
        weights = final_weights(run)
        assert all(torch.equal(reference[k], weights[k]) for k in reference)
        assert epochs_in(run) == list(range(1, 41))

    # Runs are killed and restarted until one finishes, then the next run starts: twenty kills in all,
    # each anywhere from late start-up (before the config is written) to the end of the run, checkpoint
    # writes (one per epoch) and the final evaluation and plot included.
    rng = random.Random(0)
    kills = finished = 0
    run = tmp_path / "killed0"
    for _ in range(200):
        if kills >= 20:
            break
        proc = launch(run)
        time.sleep(rng.uniform(0.5 * start, total))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate(timeout=60)
        for ckpt in intact_checkpoints(run):  # never an unreadable checkpoint
            verify_checkpoint(ckpt)
            load_model(ckpt)
        if proc.returncode == 0:
            check_finished(run, proc, err)
            finished += 1
            run = tmp_path / f"killed{finished}"
    assert kills >= 20
    proc = launch(run)
    _, err = proc.communicate(timeout=300)
    check_finished(run, proc, err)


# --- 2. Ctrl-C / SIGTERM: covered by test_training.test_resumed_run_ends_with_the_same_weights...


# --- 3. damaged and foreign checkpoints --------------------------------------------------------


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    run = tmp_path_factory.mktemp("rel") / "run"
    train(TrainConfig(model="residual_mlp", epochs=2, batch_size=64, out=str(run)), progress=False, verbose=False)
    return run


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    (dest / ".lock").unlink(missing_ok=True)
    return dest


def test_a_flipped_byte_is_detected_and_resume_falls_back_to_the_previous_checkpoint(two_epochs, tmp_path):
    run = copy_run(two_epochs, tmp_path / "run")
    newest, older = intact_checkpoints(run)
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # a weight byte
    (newest / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum"):
        verify_checkpoint(newest)
    with pytest.raises(UserError, match="stored checksum"):
        load_model(newest)
    proc = cli("train", "--resume", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "does not match its checksum" in proc.stderr and "trying an older checkpoint" in proc.stderr
    assert f"from {older.name}" in proc.stdout
    assert epochs_in(run) == [1, 2]


def test_a_truncated_weights_file_is_a_clear_error(two_epochs, tmp_path):
    path = tmp_path / "model.safetensors"
    data = (latest_checkpoint(two_epochs) / "model.safetensors").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="damaged or truncated"):
        load_model(path)


def test_a_checkpoint_of_another_model_is_refused(two_epochs, tmp_path):
    other = tmp_path / "other"
    train(
        TrainConfig(model="resnet_cifar", model_args={"depth": 8}, epochs=1, batch_size=64, out=str(other)),
        progress=False,
        verbose=False,
    )
    run = copy_run(two_epochs, tmp_path / "run")
    for ckpt in intact_checkpoints(run):
        shutil.rmtree(ckpt)
        shutil.copytree(latest_checkpoint(other), ckpt)
    proc = cli("train", "--resume", str(run), "--no-progress")
    assert proc.returncode == 2
    assert "holds a resnet_cifar" in proc.stderr and "another run" in proc.stderr


def test_a_checkpoint_with_another_class_count_is_refused(two_epochs, tmp_path):
    from resnetlab.checkpoint import read_model_file, save_model_file

    run = copy_run(two_epochs, tmp_path / "run")
    ckpt = latest_checkpoint(run)
    weights, info = read_model_file(ckpt / "model.safetensors")
    info.classes = info.classes[:5]
    save_model_file(ckpt / "model.safetensors", weights, info)
    sums = json.loads((ckpt / CHECKSUM_FILE).read_text())
    from resnetlab.checkpoint import _file_sha256

    sums["model.safetensors"] = _file_sha256(ckpt / "model.safetensors")
    (ckpt / CHECKSUM_FILE).write_text(json.dumps(sums))
    with pytest.raises(UserError, match="5 classes"):
        trainer = Trainer(
            TrainConfig(model="residual_mlp", epochs=2, batch_size=64), torch.device("cpu"), SINGLE_PROCESS
        )
        trainer.restore(ckpt)


def test_a_newer_format_is_refused(two_epochs, tmp_path):
    from safetensors.torch import load, save

    source = latest_checkpoint(two_epochs) / "model.safetensors"
    data = source.read_bytes()
    from resnetlab.checkpoint import _safetensors_metadata

    meta = _safetensors_metadata(data)
    meta["format_version"] = "99"
    (tmp_path / "model.safetensors").write_bytes(save(load(data), metadata=meta))
    with pytest.raises(UserError, match="newer resnetlab"):
        load_model(tmp_path / "model.safetensors")


# --- 4. full disk, read-only folder ------------------------------------------------------------


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if not _can_mount() or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)]).returncode:
        pytest.skip("needs root and mount for a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_a_full_disk_stops_cleanly_and_keeps_the_previous_checkpoint(small_disk):
    run = small_disk / "run"
    args = [
        "train",
        "--model",
        "residual_mlp",
        "--batch-size",
        "64",
        "--no-progress",
        "--keep-checkpoints",
        "1",
    ]
    first = cli(*args, "--epochs", "1", "--out", str(run))
    assert first.returncode == 0, first.stderr
    size = sum(f.stat().st_size for f in latest_checkpoint(run).iterdir())
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * max(0, free - size // 2))  # room for half a checkpoint
    # Continue the same run for more epochs: the next checkpoint cannot be written.
    config = (run / "config.toml").read_text().replace("epochs = 1", "epochs = 3")
    (run / "config.toml").write_text(config)
    proc = cli("train", "--resume", str(run), "--no-progress")
    assert proc.returncode == 1, proc.stderr
    assert "cannot write to" in proc.stderr and str(run / "checkpoints") in proc.stderr
    assert "Traceback" not in proc.stderr and "previous checkpoint (e0001-s000000) is intact" in proc.stderr
    verify_checkpoint(latest_checkpoint(run))
    assert latest_checkpoint(run).name == "e0001-s000000" and epochs_in(run) == [1]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    (small_disk / "filler").unlink()
    resumed = cli("train", "--resume", str(run), "--no-progress")
    assert resumed.returncode == 0 and epochs_in(run) == [1, 2, 3]


def test_a_read_only_output_folder_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        if (
            not _can_mount()
            or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode
        ):
            pytest.skip("root ignores permissions and cannot mount a read-only tmpfs here")
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
    try:
        proc = cli("train", *MLP, "--epochs", "1", "--out", str(ro / "run"))
        assert proc.returncode == 2
        assert str(ro / "run") in proc.stderr and "cannot write the run folder" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(ro)])


# --- 5. two runs, one folder -------------------------------------------------------------------


def test_a_second_process_on_the_same_run_folder_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "resnetlab",
            "train",
            "--model",
            "resnet20",
            "--epochs",
            "50",
            "--out",
            str(run),
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = cli("train", "--resume", str(run), "--no-progress")
    assert second.returncode == 2
    assert "in use by another resnetlab process" in second.stderr and str(first.pid) in second.stderr
    first.send_signal(signal.SIGKILL)
    first.communicate()
    again = subprocess.Popen(
        [sys.executable, "-m", "resnetlab", "train", "--resume", str(run), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first_line = again.stdout.readline()  # it got the lock: the killed process left none behind
    again.send_signal(signal.SIGTERM)
    _, err = again.communicate(timeout=120)
    assert first_line.startswith("resuming"), (first_line, err)
    assert again.returncode == 130 and "Resume with" in err


def test_a_run_killed_before_its_config_was_written_starts_again_with_the_same_out(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("12345\n")  # what a process killed inside atomic_write_text leaves
    (run / ".config.toml.x1y2.tmp").write_text('model = "res')
    done = cli("train", *MLP, "--epochs", "1", "--out", str(run))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in run.glob(".*.tmp")) == []
    assert (run / "result.json").is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")  # anything else is the user's: refused
    refused = cli("train", *MLP, "--epochs", "1", "--out", str(tmp_path / "other"))
    assert refused.returncode == 2 and "already exists and is not empty" in refused.stderr


def test_a_run_that_failed_before_its_first_checkpoint_starts_again_with_the_same_out(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('model = "densenet121"\n')  # a run that died before any checkpoint
    done = cli("train", *MLP, "--epochs", "1", "--out", str(run))
    assert done.returncode == 0, done.stderr
    assert 'model = "residual_mlp"' in (run / "config.toml").read_text()
    again = cli("train", *MLP, "--epochs", "1", "--out", str(run))  # now it has checkpoints: refused
    assert again.returncode == 2 and "already exists and is not empty" in again.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "densenet121"],  # its transitions pool the 8x8 digits down to nothing
            "--model densenet121: cannot take the 8x8 images of digits (",
        ),
        (["--model", "resnet20", "--min-image-size", "4", "--epochs", "4"], None),  # fits: trains
        (
            ["--model", "residual_mlp", "--min-image-size", "4", "--epochs", "4"],
            "--min-image-size 4: residual_mlp cannot take 4x4 images (",
        ),
        (
            ["--model", "resnet20", "--augment", "crop", "--crop-padding", "8"],
            "--crop-padding 8: reflect padding needs images larger than that, and the smallest training "
            "images here are 8x8",
        ),
    ],
)
def test_images_the_model_or_augmentation_cannot_take_are_refused_before_the_run_folder(tmp_path, args, message):
    run = tmp_path / "run"
    result = cli("train", "--epochs", "1", "--batch-size", "64", *args, "--out", str(run))
    if message is None:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not run.exists()


# --- 8. numerical faults -----------------------------------------------------------------------


def test_a_non_finite_step_is_refused_and_leaves_weights_and_bn_statistics_untouched():
    trainer = Trainer(TrainConfig(model="resnet20", batch_size=64, epochs=1), torch.device("cpu"), SINGLE_PROCESS)
    batches = trainer.train_loader.batches(0)
    trainer.step(*next(batches))
    with torch.no_grad():
        trainer.core.fc.bias[0] = float("nan")  # the loss of the next batch is NaN
    before = {k: v.clone() for k, v in trainer.core.state_dict().items()}
    with pytest.raises(NonFiniteStep):
        trainer.step(*next(batches))
    after = trainer.core.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]) or (value.isnan() == after[key].isnan()).all(), key
    stats = [k for k in before if "running" in k]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)


def test_a_prune_killed_midway_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    from resnetlab import checkpoint

    for name in ("e0001-s000000", "e0002-s000000"):
        (tmp_path / name).mkdir()
        for f in ("a", "b"):
            (tmp_path / name / f).write_text(f)
    real_rmtree = checkpoint.shutil.rmtree

    def killed_inside(path, ignore_errors=False):  # deletes one file, then the process "dies"
        next(p for p in sorted(Path(path).iterdir())).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_inside)
    with pytest.raises(KeyboardInterrupt):
        checkpoint._prune(tmp_path, 1, "e0002-s000000")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "e0001-s000000" not in names and "e0002-s000000" in names  # renamed away before deletion
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    checkpoint._prune(tmp_path, 1, "e0002-s000000")  # the next prune clears what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e0002-s000000"]
