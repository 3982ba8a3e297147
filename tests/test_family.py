"""The residual family: MobileNetV2, EfficientNet-B0, DenseNet, their blocks, plain twins and study."""

import csv
import hashlib
import json

import pytest
import torch

from resnetlab import create_model
from resnetlab.blocks.inverted import DropPath, InvertedResidual, MBConv, make_divisible
from resnetlab.cli import main
from resnetlab.summary import summarize

PARAMS = {
    "mobilenet_v2": 3_504_872,  # torchvision
    "efficientnet_b0": 5_288_548,  # torchvision
    "densenet121": 7_978_856,  # torchvision
    "densenet_bc_100": 769_162,  # Huang et al. 2017, table 2: 0.8M
    "mobilenet_v2_cifar": 2_236_682,
    "efficientnet_b0_cifar": 4_020_358,
}

# SHA-256 of torchvision 0.28's state_dict table, one "key shape" line per entry in order (as in
# test_torchvision_layout.py, where the ResNet tables are written out), and the number of entries.
TORCHVISION_LAYOUT = {
    "mobilenet_v2": (314, "02a13742f977603fad66d395c03616bac72f4c5f6ff1aff838b0e68ac8c104a6"),
    "efficientnet_b0": (360, "cc0b29fd8954d58bf7009dacaeecd1be176a267ad17a44abcdadd3e93e05a2b3"),
    "densenet121": (727, "075101c7403c26e186db2c915fa5f8c1f171d130f302877d75f33ba7183b9175"),
}


@pytest.mark.parametrize("name, count", sorted(PARAMS.items()))
def test_parameter_counts(name, count):
    assert sum(p.numel() for p in create_model(name).parameters()) == count


@pytest.mark.parametrize("name", sorted(TORCHVISION_LAYOUT))
def test_state_dict_layout_is_torchvisions(name):
    sd = create_model(name).state_dict()
    text = "\n".join(f"{k} {'x'.join(map(str, v.shape)) or '-'}" for k, v in sd.items())
    assert (len(sd), hashlib.sha256(text.encode()).hexdigest()) == TORCHVISION_LAYOUT[name]


def test_summary_figures():
    assert summarize(create_model("mobilenet_v2")).macs == pytest.approx(300.8e6, rel=0.01)  # torchvision: 0.30 G
    assert summarize(create_model("efficientnet_b0")).macs == pytest.approx(386e6, rel=0.02)  # torchvision: 0.39 G
    assert summarize(create_model("densenet121")).macs == pytest.approx(2.83e9, rel=0.01)  # torchvision: 2.83 G


def test_make_divisible():
    assert make_divisible(32 * 0.75) == 24 and make_divisible(16 * 0.35) == 8 and make_divisible(1280 * 1.4) == 1792


# --- blocks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [InvertedResidual, MBConv])
def test_inverted_residual_shortcut_only_where_shapes_agree(cls):
    kwargs = {"kernel_size": 3, "expand_ratio": 6} if cls is MBConv else {"expand_ratio": 6}
    same = cls(16, 16, stride=1, **kwargs).eval()
    down = cls(16, 24, stride=2, **kwargs).eval()
    assert same.use_res_connect and not down.use_res_connect
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(same(x), same.residual(x) + x)
    torch.testing.assert_close(down(x), down.residual(x))
    same.zero_init_last()
    assert torch.equal(same(x), x)  # nothing follows the addition: the identity exactly
    assert same.has_shortcut and not down.has_shortcut
    with pytest.raises(ValueError, match="without a shortcut"):
        down.zero_init_last()  # it would output zero whatever its input


@pytest.mark.parametrize("name", ["mobilenet_v2_cifar", "efficientnet_b0_cifar"])
def test_zero_init_residual_zeroes_only_the_blocks_with_a_shortcut(name):
    torch.manual_seed(0)
    model = create_model(name, zero_init_residual=True).eval()
    blocks = model.residual_blocks()
    with_shortcut = [b for b in blocks if b.has_shortcut]
    assert 0 < len(with_shortcut) < len(blocks)
    for block in blocks:
        channels = next(m for m in block.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
        x = torch.randn(2, channels, 8, 8)
        with torch.no_grad():
            out = block(x)
        if block.has_shortcut:
            assert torch.equal(out, x)  # the identity at initialisation
        else:
            assert out.abs().amax() > 0  # not silenced
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)
    assert logits.std(0).mean() > 0  # the network still sees its input


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    drop = DropPath(0.5)
    x = torch.ones(2000, 3, 2, 2)
    y = drop(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert (per_sample == 0).all(1).float().mean() == pytest.approx(0.5, abs=0.05)
    assert torch.equal(drop.eval()(x), x)


def test_efficientnet_stochastic_depth_rises_linearly():
    model = create_model("efficientnet_b0")
    probs = [m.stochastic_depth.p for m in model.modules() if isinstance(m, MBConv)]
    assert len(probs) == 16 and probs[0] == 0
    assert probs == pytest.approx([0.2 * i / 16 for i in range(16)])


# --- plain twins ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mobilenet_v2_cifar", "efficientnet_b0_cifar"])
def test_plain_twins_share_everything_but_the_additions(name):
    torch.manual_seed(0)
    residual = create_model(name).eval()
    torch.manual_seed(0)
    plain = create_model(name, plain=True).eval()
    r_sd, p_sd = residual.state_dict(), plain.state_dict()
    assert r_sd.keys() == p_sd.keys() and all(torch.equal(r_sd[k], p_sd[k]) for k in r_sd)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(residual(x), plain(x))
    for block in residual.residual_blocks():
        block.plain = True
    assert torch.equal(residual(x), plain(x))
    assert create_model("plain_" + name).plain


def test_densenet_has_no_plain_twin():
    with pytest.raises(ValueError, match="no plain twin"):
        create_model("densenet_bc_100", plain=True)


@pytest.mark.parametrize("name", ["mobilenet_v2_cifar", "efficientnet_b0_cifar", "densenet_bc_100", "mobilenet_v2"])
def test_feature_info_matches_forward_intermediates(name):
    model = create_model(name).eval()
    c, h, w = model.default_input_size
    x = torch.randn(1, c, h, w)
    feats = model.forward_intermediates(x)
    assert len(feats) == len(model.feature_info)
    for f, info in zip(feats, model.feature_info, strict=True):
        assert f.shape == (1, info.channels, h // info.stride, w // info.stride), info
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))


@pytest.mark.parametrize("name", ["mobilenet_v2_cifar", "efficientnet_b0_cifar", "densenet_bc_100"])
def test_reset_classifier_and_checkpointing(name):
    torch.manual_seed(0)
    model = create_model(name)
    model.reset_classifier(4)
    x = torch.randn(3, 3, 32, 32)
    assert model(x).shape == (3, 4)
    model.eval()
    ref = model(x)
    model.train().set_grad_checkpointing()
    model.eval()
    torch.testing.assert_close(model(x), ref)


# --- the study ------------------------------------------------------------------------------------


def test_families_study(tmp_path, capsys):
    out = tmp_path / "fam"
    code = main(
        [
            "study",
            "families",
            "--data",
            "synthetic:3x16x16:4:400",
            "--models",
            "resnet_cifar",
            "mobilenet_v2_cifar",
            "plain_mobilenet_v2_cifar",
            "--budget",
            "0.5",
            "--epochs",
            "1",
            "--seeds",
            "2",
            "--batch-size",
            "32",
            "--out",
            str(out),
            "--json",
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    for name in ("report.md", "families.png", "families.svg", "families.csv", "results.json"):
        assert (out / name).is_file()
    with open(out / "families.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["resnet_cifar", "mobilenet_v2_cifar", "plain_mobilenet_v2_cifar"]
    for r in rows:
        assert result[f"{r['model']}_val_acc"] == pytest.approx(round(float(r["val_acc_mean"]), 2))
        assert float(r["train_img_per_s"]) > 0 and float(r["infer_img_per_s"]) > 0
    assert rows[1]["params"] == rows[2]["params"]  # the plain twin has exactly the same parameters


def test_families_rejects_unknown_models(capsys):
    assert main(["study", "families", "--models", "resnet20", "mobilenetv3"]) == 2
    assert "mobilenetv3" in capsys.readouterr().err
