"""eval, predict and export against a real trained run."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from resnetlab import TrainConfig, create_model, export_model, load_model, train
from resnetlab.capabilities import fast_bfloat16
from resnetlab.cli import main
from resnetlab.data.digits import load_digits
from resnetlab.errors import UserError
from resnetlab.inference import prepare_inference


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    train(TrainConfig(model="resnet20", data="digits", epochs=2, batch_size=64, out=str(out)), progress=False)
    return out


def _json_tail(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_on_the_held_out_split_reproduces_the_runs_final_validation(run, capsys):
    final = json.loads((run / "result.json").read_text())["final"]
    assert main(["eval", str(run), "--json"]) == 0
    result = _json_tail(capsys)
    assert result["images"] == 179 and result["split"] == "val"
    assert result["acc"] == pytest.approx(final["val_acc"], abs=1e-3)
    assert result["loss"] == pytest.approx(final["val_loss"], rel=1e-4)
    confusion = np.array(result["confusion"])
    assert confusion.sum() == 179 and confusion.shape == (10, 10)
    assert result["acc"] == pytest.approx(100 * np.trace(confusion) / 179, abs=1e-3)
    assert set(result["per_class_acc"]) == set(str(i) for i in range(10))


def test_eval_reproduces_the_validation_of_a_bfloat16_run(tmp_path):
    from resnetlab import evaluate_checkpoint

    out = tmp_path / "bf16"
    train(TrainConfig(model="resnet20", epochs=1, batch_size=64, amp="bf16", out=str(out)), progress=False)
    final = json.loads((out / "result.json").read_text())["final"]
    result = evaluate_checkpoint(out)
    assert result["amp"] == "bf16"
    assert result["acc"] == pytest.approx(final["val_acc"], abs=1e-3)
    assert result["loss"] == pytest.approx(final["val_loss"], rel=1e-4)


def test_eval_train_is_what_the_run_could_train_on_and_val_needs_a_held_out_part(run, tmp_path):
    from resnetlab import evaluate_checkpoint

    val = evaluate_checkpoint(run, split="val", tta=False)["images"]
    assert evaluate_checkpoint(run, split="train", tta=False)["images"] == 1797 - val
    mlp = tmp_path / "no_val"
    train(TrainConfig(model="residual_mlp", epochs=1, batch_size=64, val_fraction=0, out=str(mlp)), progress=False)
    with pytest.raises(UserError, match=r"--split val: the run held none of digits's training images out"):
        evaluate_checkpoint(mlp, split="val")
    assert evaluate_checkpoint(mlp, split="train")["images"] == 1797


def test_a_run_on_a_relative_folder_is_evaluated_and_resumed_from_anywhere(tmp_path, monkeypatch):
    from resnetlab import evaluate_checkpoint

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "work" / "imgs" / "train" / cls).mkdir(parents=True)
        for i in range(40):
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "work" / "imgs" / "train" / cls / f"{i}.png")
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path / "work")
    config = TrainConfig(model="resnet20", data="imgs", epochs=2, batch_size=16, out="run")
    train(config, progress=False)
    assert f'data = "{tmp_path / "work" / "imgs"}"' in (tmp_path / "work" / "run" / "config.toml").read_text()
    monkeypatch.chdir(tmp_path)
    assert evaluate_checkpoint("work/run", split="val")["images"] == 8
    assert train(resume="work/run", progress=False).history[-1]["epoch"] == 2  # finished: nothing to redo


def test_eval_prints_per_class_accuracy_and_the_confusion_matrix(run, capsys):
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "per-class accuracy" in out and "confusion matrix" in out


def _digit_folder(root, classes):
    source = load_digits().splits["train"]
    for c in classes:
        (root / c).mkdir(parents=True)
        for i, idx in enumerate(torch.nonzero(source.labels == int(c)).flatten()[:5].tolist()):
            Image.fromarray(source.images[idx, 0].numpy(), mode="L").save(root / c / f"{i}.png")


def test_eval_on_a_folder_of_class_folders_maps_classes_by_name(run, tmp_path, capsys):
    _digit_folder(tmp_path / "digits", ["3", "7"])
    assert main(["eval", str(run), "--data", str(tmp_path / "digits"), "--json"]) == 0
    result = _json_tail(capsys)
    assert result["split"] == "images" and result["images"] == 10
    confusion = np.array(result["confusion"])
    assert confusion[[3, 7]].sum() == 10 and confusion.sum() == 10  # labels land on the model's classes 3 and 7


def test_eval_refuses_classes_the_model_does_not_know(run, tmp_path, capsys):
    _digit_folder(tmp_path / "digits", ["3"])
    (tmp_path / "digits" / "3").rename(tmp_path / "digits" / "three")
    assert main(["eval", str(run), "--data", str(tmp_path / "digits")]) == 2
    assert "three" in capsys.readouterr().err


def test_eval_test_split_of_digits_does_not_exist(run, capsys):
    assert main(["eval", str(run), "--split", "test"]) == 2
    assert "no 'test' split" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch(run, tmp_path, fmt):
    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt")
    result = export_model(run, fmt, out)
    assert out.is_file() and result["max_abs_diff"] < 1e-4 and result["input_shape"] == [1, 8, 8]


def test_onnx_export_carries_classes_and_normalisation(run, tmp_path):
    import onnx

    out = tmp_path / "m.onnx"
    export_model(run, "onnx", out)
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    _, info = load_model(run)
    assert meta["classes"] == info.classes and meta["mean"] == info.mean and meta["model"] == "resnet20"


def test_export_of_a_torchvision_format_state_dict(tmp_path):
    model = create_model("resnet18", num_classes=5)
    torch.save(model.state_dict(), tmp_path / "tv.pth")
    result = export_model(tmp_path / "tv.pth", "torchscript", tmp_path / "tv.pt", model_name="resnet18")
    assert result["max_abs_diff"] < 1e-4
    with pytest.raises(UserError, match="--model"):
        export_model(tmp_path / "tv.pth", "onnx")


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("mobilenet_v2_cifar", {}),  # classifier.1, not fc
        ("densenet_bc_100", {"num_classes": 7}),  # classifier
        ("resnet20", {"in_chans": 1}),  # a model trained on the 1-channel digits
        ("residual_mlp", {"num_classes": 4}),
    ],
)
def test_a_bare_state_dict_loads_with_its_class_count_and_input_channels(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    loaded, info = load_model(tmp_path / "w.pth", model_name=name)
    assert info is None
    assert (loaded.num_classes, loaded.in_chans) == (model.num_classes, model.in_chans)
    x = torch.randn(2, model.in_chans, *model.input_size)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_weights_that_do_not_fit_are_refused_naming_the_key_and_shapes(tmp_path):
    torch.save(create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError, match=r"r18.pth: the weights do not fit the resnet34 \(Missing key\(s\).*layer1.2"):
        load_model(tmp_path / "r18.pth", model_name="resnet34")
    state = create_model("resnet20").state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(16, 16, 1, 1)
    torch.save(state, tmp_path / "r20.pth")
    with pytest.raises(UserError, match=r"size mismatch for layer1.0.conv1.weight.*\[16, 16, 1, 1\].*\[16, 16, 3, 3\]"):
        load_model(tmp_path / "r20.pth", model_name="resnet20")


def test_files_without_a_model_are_refused_with_advice_each_command_can_follow(tmp_path, capsys):
    torch.save(create_model("resnet20").state_dict(), tmp_path / "w.pth")
    (tmp_path / "config.toml").write_text('model = "resnet20"\n')
    (tmp_path / "garbage.pth").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "x.png").write_bytes(b"")

    def error(*argv):
        assert main(list(argv)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    for command, extra in (("eval", []), ("predict", [str(tmp_path / "x.png")])):
        assert error(command, str(tmp_path / "w.pth"), *extra) == (
            f"resnetlab {command}: error: {tmp_path / 'w.pth'}: a bare state_dict, without class names or "
            f"normalisation; {command} takes a run folder, a checkpoint folder or a resnetlab .safetensors file"
        )
        assert f"{tmp_path / 'config.toml'}: not a model file; {command} takes" in error(
            command, str(tmp_path / "config.toml"), *extra
        )
    assert error("export", str(tmp_path / "w.pth"), "--format", "onnx").endswith("(--model NAME)")
    assert f"{tmp_path / 'config.toml'}: not a model file (expected" in error(
        "export", str(tmp_path / "config.toml"), "--format", "onnx", "--model", "resnet20"
    )
    # PyTorch's reason alone (here 'Unsupported operand 0'), not its paragraphs on weights_only=False.
    garbage = error("export", str(tmp_path / "garbage.pth"), "--format", "onnx", "--model", "resnet20")
    assert "garbage.pth: not a loadable PyTorch state_dict (Unsupported" in garbage and "weights_only" not in garbage
    with pytest.raises(UserError, match=r"w.pth: a bare state_dict; say which model it is \(model_name=NAME\)"):
        load_model(tmp_path / "w.pth")
    assert not any(p.suffix == ".onnx" for p in tmp_path.iterdir())


def test_export_cli_json(run, tmp_path, capsys):
    assert main(["export", str(run), "--format", "onnx", "--output", str(tmp_path / "x.onnx"), "--json"]) == 0
    assert _json_tail(capsys)["max_abs_diff"] < 1e-4


def test_export_refuses_a_folder_and_the_checkpoints_own_files(run, tmp_path, capsys):
    assert main(["export", str(run), "--format", "onnx", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"resnetlab export: error: --output {tmp_path}: is a folder; name the file to write "
        f"(e.g. {tmp_path / 'model.onnx'})"
    )
    ckpt = next((run / "checkpoints").glob("e*"))
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    for name in ("model.safetensors", "state.pt", "checksums.json"):
        assert main(["export", str(run), "--format", "torchscript", "--output", str(ckpt / name)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"--output {ckpt / name}: is " in err and "destroy" in err
    assert (
        main(
            ["export", str(ckpt / "model.safetensors"), "--format", "onnx", "--output", str(ckpt / "model.safetensors")]
        )
        == 2
    )
    assert "is the model file being exported" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "onnx", "--output", str(run / "checkpoints" / "latest")]) == 2
    capsys.readouterr()
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    load_model(run)  # the checkpoint still loads


def test_load_model_rejects_foreign_and_damaged_files(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_model(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint"):
        load_model(tmp_path / "empty")


def test_predict_gives_the_models_top_classes(run, tmp_path, capsys):
    source = load_digits().splits["train"]
    paths = []
    for i in (0, 1, 2):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(source.images[i, 0].numpy(), mode="L").save(path)
        paths.append(str(path))
    assert main(["predict", str(run), *paths, "--top-k", "3", "--json"]) == 0
    result = _json_tail(capsys)
    model, info = load_model(run)
    from resnetlab.training.setup import Preprocess

    with torch.no_grad():
        probs = model(Preprocess(info.mean, info.std)(source.images[:3])).softmax(1)
    for i, item in enumerate(result["predictions"]):
        assert item["image"] == paths[i] and len(item["top"]) == 3
        assert item["top"][0]["class"] == info.classes[int(probs[i].argmax())]
        assert item["top"][0]["probability"] == pytest.approx(float(probs[i].max()), abs=1e-5)


def test_predict_names_a_broken_image(run, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert main(["predict", str(run), str(bad)]) == 2
    assert "broken.png" in capsys.readouterr().err


def test_predict_refuses_a_model_of_channels_no_image_file_has(tmp_path, capsys):
    out = tmp_path / "syn4"
    train(TrainConfig(data="synthetic:4x8x8:2:64", epochs=1, batch_size=8, out=str(out)), progress=False)
    image = tmp_path / "rgb.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["predict", str(out), str(image)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"resnetlab predict: error: {out}: predict reads images as grayscale (1 channel) or RGB (3), "
        "and this model takes 4 channels"
    )


def test_predict_cli_as_a_process(run, tmp_path):
    path = tmp_path / "d.png"
    Image.fromarray(load_digits().splits["train"].images[5, 0].numpy(), mode="L").save(path)
    proc = subprocess.run(
        [sys.executable, "-m", "resnetlab", "predict", str(run), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "d.png" in proc.stdout and "%" in proc.stdout


@pytest.mark.slow
def test_compiled_inference_matches_eager_and_holds_the_weights_once():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    x = torch.randn(4, 3, 32, 32)
    compiled = prepare_inference(model, "compile")
    xc = x.contiguous(memory_format=torch.channels_last)
    torch._dynamo.utils.counters.clear()
    out = compiled(xc)  # called with gradients on, as a user would: still computed without them
    assert not out.requires_grad
    with torch.no_grad():
        diff = (compiled(xc) - model(x)).abs().max()
    assert float(diff) < 1e-4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one compilation for both calls
    assert len(compiled.state_dict()) == len(prepare_inference(model, "fold").state_dict())


class _Pixels(torch.nn.Module):
    """The input itself as the 'logits': makes each test-time view visible in the output."""

    def forward(self, x):
        return x.flatten(1)


def test_tta_views_are_flips_and_one_pixel_shifts_weighted_as_airbench():
    from resnetlab.training.evaluate import tta_logits

    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).view(2, 1, 4, 5)
    model = _Pixels()
    assert torch.equal(tta_logits(model, x), x.flatten(1))
    assert torch.equal(tta_logits(model, x, flip=True), ((x + x.flip(3)) / 2).flatten(1))
    # numpy's reflect padding, written out: the image shifted so that pixel (i, j) shows (i - 1, j - 1)
    padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect"))
    up_left, down_right = padded[..., :4, :5], padded[..., 2:, 2:]
    assert torch.equal(up_left[..., 1:, 1:], x[..., :-1, :-1])
    expected = x / 2 + (up_left + down_right) / 4
    assert torch.allclose(tta_logits(model, x, translate=1), expected.flatten(1))
    both = tta_logits(model, x, flip=True, translate=1)
    mirror = lambda t: (t + t.flip(3)) / 2  # noqa: E731
    assert torch.allclose(both, (mirror(x) / 2 + (mirror(up_left) + mirror(down_right)) / 4).flatten(1))
    with pytest.raises(ValueError, match="4x5"):
        tta_logits(model, x, translate=4)


def test_eval_reproduces_a_run_validated_with_flips_and_shifts_and_can_leave_them_out(tmp_path, capsys):
    out = tmp_path / "tta"
    config = TrainConfig(data="digits", epochs=1, batch_size=64, eval_flip=True, eval_translate=1, out=str(out))
    train(config, progress=False)
    final = json.loads((out / "result.json").read_text())["final"]
    assert main(["eval", str(out), "--json"]) == 0
    with_tta = _json_tail(capsys)
    assert with_tta["tta"] == {"flip": True, "translate": 1}
    assert with_tta["acc"] == pytest.approx(final["val_acc"], abs=1e-3)
    assert main(["eval", str(out), "--no-tta", "--json"]) == 0
    plain = _json_tail(capsys)
    assert plain["tta"] == {"flip": False, "translate": 0}
    assert plain["loss"] != pytest.approx(with_tta["loss"], rel=1e-6)


def _noise(path, size, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("image_size", [72, 32])
def test_predict_prepares_an_image_as_eval_and_the_runs_validation_on_streamed_runs(
    tmp_path, capsys, monkeypatch, image_size
):
    import resnetlab.data.folder as folder
    from resnetlab.data.folder import ImageFileDataset
    from resnetlab.data.types import FileList
    from resnetlab.predict import load_images

    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    for i in range(8):
        _noise(data / ("cat" if i % 2 else "dog") / f"{i}.png", (90, 76), i)
    image = _noise(tmp_path / "one" / "dog" / "x.png", (90, 76), 99)  # not square: the crop matters
    out = tmp_path / "run"
    config = TrainConfig(data=str(data), image_size=image_size, epochs=1, batch_size=4, workers=0, out=str(out))
    with monkeypatch.context() as m:
        # Above 64 px images always stream; at 32 px they stream only when the data set is large.
        m.setattr(folder, "IN_MEMORY_MAX_BYTES", 2**31 if image_size > 64 else 1)
        train(config, progress=False)
    _, info = load_model(out)
    assert info.crop_fraction == folder.EVAL_CROP_FRACTION

    # The pixels: predict's are those of the validation the run measured its accuracy with.
    one = FileList([str(image)], torch.tensor([0]))
    validation = ImageFileDataset(one, image_size=image_size, channels=3, train=False)
    assert torch.equal(load_images([image], info.input_shape, info.crop_fraction)[0], validation[0][0])
    # The probabilities: eval's loss on the one image is -log p(dog).
    assert main(["eval", str(out), "--data", str(tmp_path / "one"), "--no-tta", "--json"]) == 0
    p_eval = float(np.exp(-_json_tail(capsys)["loss"]))
    assert main(["predict", str(out), str(image), "--json"]) == 0
    top = _json_tail(capsys)["predictions"][0]["top"]
    p_predict = next(t["probability"] for t in top if t["class"] == "dog")
    assert p_predict == pytest.approx(p_eval, rel=1e-4, abs=2e-6)


def test_model_files_without_a_recorded_crop_take_the_streamed_one_above_64_px():
    from resnetlab.checkpoint import ModelInfo

    def info(side):
        meta = ModelInfo("resnet20", {}, ["a"], [0.5] * 3, [0.2] * 3, (3, side, side)).to_metadata()
        del meta["crop_fraction"]  # as written before it was recorded
        return ModelInfo.from_metadata(meta, "old.safetensors")

    assert info(72).crop_fraction == 0.875 and info(32).crop_fraction == 1.0


def test_a_shift_as_large_as_the_images_is_refused_before_training(tmp_path):
    config = TrainConfig(data="digits", epochs=1, eval_translate=8, out=str(tmp_path / "r"))
    with pytest.raises(UserError, match=r"--eval-translate 8: must be smaller than the images \(8x8\)"):
        train(config, progress=False)
    assert not (tmp_path / "r" / "result.json").exists()


def test_onednn_graph_inference_matches_eager_runs_fused_and_leaves_the_switch_as_it_was():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    fast = prepare_inference(model, "onednn")
    assert len(fast.state_dict()) == len(model.state_dict())  # the traced copy is not a second set of weights
    with torch.no_grad():
        for batch in (4, 4, 4, 3):  # the profiling executor fuses after the first calls of a shape
            x = torch.randn(batch, 3, 32, 32)
            assert float((fast(x) - model(x)).abs().max()) < 1e-4
            assert not torch.jit.onednn_fusion_enabled()
    top_level = {node.kind() for node in torch.jit.last_executed_optimized_graph().nodes()}
    assert "prim::oneDNNFusionGuard" in top_level and "aten::_convolution" not in top_level


@pytest.mark.parametrize("mode", ["fold", "onednn"])
def test_bfloat16_inference_computes_in_bfloat16_and_answers_in_the_input_dtype(mode):
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    fast = prepare_inference(model, mode, dtype=torch.bfloat16)
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left as it was
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for _ in range(3):  # oneDNN Graph fuses during the first calls
            out = fast(x)
            assert out.dtype == torch.float32
            # bfloat16 keeps 8 significant bits: the logits move by a small fraction of their size, not more
            diff = float((out - ref).abs().max())
            assert 0 < diff < 0.02 * float(ref.abs().max())
    if mode == "onednn" and fast_bfloat16(torch.device("cpu")):
        # oneDNN Graph fuses bfloat16 only where oneDNN has bfloat16 kernels (AVX-512, AMX); with AVX2
        # alone TorchScript runs the frozen graph's operators one by one.
        assert "prim::oneDNNFusionGuard" in {n.kind() for n in torch.jit.last_executed_optimized_graph().nodes()}


def test_inference_refuses_an_integer_dtype():
    with pytest.raises(ValueError, match="dtype must be a floating-point type, got torch.int8"):
        prepare_inference(create_model("resnet20"), "fold", dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype must be a floating-point type, got 'bfloat16'"):
        prepare_inference(create_model("resnet20"), "fold", dtype="bfloat16")


def test_bfloat16_inference_warns_where_the_cpu_has_no_bfloat16_kernels(monkeypatch):
    import warnings

    import resnetlab.capabilities
    from resnetlab.capabilities import SlowPathWarning

    model = create_model("resnet20")
    monkeypatch.setattr(resnetlab.capabilities, "fast_bfloat16", lambda device: False)
    with pytest.warns(SlowPathWarning, match=r"^dtype=torch.bfloat16: this CPU \(.*no bfloat16 kernels"):
        prepare_inference(model, "fold", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)
        prepare_inference(model, "fold")  # float32: nothing to warn about
        monkeypatch.setattr(resnetlab.capabilities, "fast_bfloat16", lambda device: True)
        prepare_inference(model, "fold", dtype=torch.bfloat16)
