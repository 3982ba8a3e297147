"""Random command lines and config files for every command: each ends in success or one readable error
with exit status 2, never a traceback, never a partial output file (hypothesis)."""

import contextlib
import io
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resnetlab.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent
BAD_VALUES = ["0", "-1", "x", "", "nan", "inf", "1e309", "-0.5", "3.5", "[1,", "None", "../..", "résumé", "--", "-"]
GOOD_VALUES = ["1", "2", "0.01", "0.5", "8", "16"]
MODELS = ["resnet20", "residual_mlp", "plain_mlp", "resnet5", "densenet_bc_100", "Resnet20"]
DATA = ["digits", "synthetic:1x8x8:2:64", "synthetic:3x8", "cifar10", "/no/such/folder", "{notimage}", "{emptydir}"]

FLAGS = {
    "train": {
        "--epochs": BAD_VALUES + ["1"],
        "--batch-size": BAD_VALUES + ["16", "64"],
        "--lr": BAD_VALUES + GOOD_VALUES,
        "--model": MODELS,
        "--data": DATA,
        "--val-fraction": BAD_VALUES + ["0.2"],
        "--optimizer": ["sgd", "adam", "x"],
        "--schedule": ["cosine", "step", "linear", "exp"],
        "--milestones": ["0.5", "2", "x"],
        "--amp": ["none", "fp16", "x"],
        "--device": ["cpu", "cuda", "tpu", "auto"],
        "--config": ["{badtoml}", "{goodtoml}", "/no/such.toml"],
        "--model-args": ["depth=8", "depth", "width=x", "num_classes=3", "=1"],
        "--resume": ["{emptydir}", "/no/run"],
        "--image-size": BAD_VALUES,
        "--augment": ["auto", "none", "warp"],
        "--label-smoothing": BAD_VALUES,
        "--train-fraction": BAD_VALUES + ["0.5"],
        "--workers": BAD_VALUES,
        "--init-weights": ["/no/w", "{notimage}"],
    },
    "eval": {"--data": DATA, "--split": ["val", "test", "dev"], "--batch-size": BAD_VALUES, "--device": ["cpu", "x"]},
    "predict": {"--top-k": BAD_VALUES + ["3"], "--device": ["cpu", "gpu"]},
    "export": {"--format": ["onnx", "torchscript", "tflite"], "--model": MODELS, "--output": ["/no/dir/m.onnx"]},
    "summary": {"--input-size": BAD_VALUES + ["32", "3 32 32", "1 2 3 4"], "--num-classes": BAD_VALUES},
    "list": {},
    "study degradation": {
        "--depths": ["21", "8", "x", "-8"],
        "--budget": BAD_VALUES,
        "--data": DATA,
        "--seeds": BAD_VALUES,
    },
    "study lesion": {"--depth": ["21", "x", "0"], "--samples": BAD_VALUES, "--data": DATA},
    "study identity": {"--depth": ["21", "x"], "--insert": BAD_VALUES, "--data": DATA},
    "study gradients": {"--steps": ["2 1", "-1", "x"], "--depths": ["9"], "--data": DATA},
    "demo": {
        "--depths": ["3", "x", "-2"],
        "--width": BAD_VALUES,
        "--seeds": BAD_VALUES,
        "--norm": ["group", "x"],
        "--epochs": BAD_VALUES,
    },
}
# Put first, so that a random flag overrides them: a valid random line then still runs in seconds.
CHEAP = {
    "train": ["--epochs", "1", "--model", "residual_mlp"],
    "demo": ["--seeds", "1", "--epochs", "1", "--width", "8", "--depths", "2"],
    "study degradation": [
        "--seeds",
        "1",
        "--budget",
        "0.05",
        "--depths",
        "8",
        "--batch-size",
        "16",
        "--data",
        "digits",
    ],
    "study lesion": [
        "--depth",
        "8",
        "--budget",
        "0.1",
        "--epochs",
        "1",
        "--samples",
        "1",
        "--batch-size",
        "16",
        "--data",
        "digits",
    ],
    "study identity": [
        "--depth",
        "8",
        "--budget",
        "0.1",
        "--epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--seeds",
        "1",
        "--batch-size",
        "16",
        "--data",
        "digits",
    ],
    "study gradients": [
        "--depth",
        "8",
        "--depths",
        "8",
        "--steps",
        "0",
        "1",
        "--seeds",
        "1",
        "--batch-size",
        "16",
        "--data",
        "digits",
    ],
}
POSITIONAL = {
    "eval": ["{emptydir}", "/no/run"],
    "predict": ["/no/run"],
    "export": ["/no/run", "{notimage}"],
    "summary": MODELS,
    "list": ["res*", "x"],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "empty").mkdir()
    (root / "notimage.jpg").write_text("this is not an image")
    (root / "bad.toml").write_text('epochs = "ten"\nlr = [\n')
    (root / "good.toml").write_text('model = "residual_mlp"\nepochs = 1\nbatch_size = 64\n')
    return {
        "emptydir": str(root / "empty"),
        "notimage": str(root / "notimage.jpg"),
        "badtoml": str(root / "bad.toml"),
        "goodtoml": str(root / "good.toml"),
        "root": root,
    }


@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(sorted(FLAGS)))
    argv = command.split()
    if command in POSITIONAL:
        argv.append(draw(st.sampled_from(POSITIONAL[command])))
    argv += CHEAP.get(command, [])
    flags = FLAGS[command]
    for flag in draw(st.lists(st.sampled_from(sorted(flags)), max_size=4, unique=True)) if flags else []:
        argv += [flag, *draw(st.sampled_from(flags[flag])).split()]
    if draw(st.booleans()):
        argv.append(draw(st.sampled_from(["--json", "--bogus", "--help-me"])))
    noise = draw(st.text(alphabet=string.ascii_letters + "-=./", max_size=6))
    if noise:
        argv.append(noise)
    return argv


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse
            code = exit.code
    return code, out.getvalue(), err.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=command_lines())
def test_random_command_lines(files, tmp_path_factory, argv):
    out_dir = tmp_path_factory.mktemp("out") / "result"
    argv = [a.format(**files) for a in argv]
    if argv[0] in ("train", "demo", "study"):
        argv += ["--out", str(out_dir)]  # every run writes into a fresh folder
    code, stdout, stderr = run(argv)
    assert code in (0, 2), (argv, code, stderr[-2000:])
    assert "Traceback" not in stderr, (argv, stderr)
    if code == 2:
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("resnetlab") and "error" in last, (argv, stderr)
        assert not out_dir.exists() or not any(out_dir.rglob("*.safetensors")), argv


TOML_KEYS = ["model", "epochs", "lr", "data", "batch_size", "milestones", "model_args", "nesterov", "unknown_key"]
TOML_VALUES = [
    '"resnet20"',
    '"residual_mlp"',
    "1",
    "0",
    "-3",
    "0.1",
    "nan",
    "true",
    '"digits"',
    "[0.5]",
    "[",
    "{ depth = 8 }",
    '"x"',
    "[1, 2]",
    "{}",
    "1e400",
    "inf",
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pairs=st.lists(st.tuples(st.sampled_from(TOML_KEYS), st.sampled_from(TOML_VALUES)), max_size=5),
    garbage=st.text(max_size=8),
)
def test_random_config_files(tmp_path_factory, pairs, garbage):
    folder = tmp_path_factory.mktemp("cfg")
    text = "".join(f"{k} = {v}\n" for k, v in pairs) + garbage
    (folder / "c.toml").write_text(text, encoding="utf-8", errors="surrogatepass")
    code, _, stderr = run(["train", "--config", str(folder / "c.toml"), "--epochs", "1", "--out", str(folder / "run")])
    assert code in (0, 2), (text, stderr[-2000:])
    assert "Traceback" not in stderr
    if code == 2:
        assert stderr.strip().splitlines()[-1].startswith("resnetlab train: error:"), (text, stderr)
        assert not (folder / "run").exists(), text
