import copy
import pickle
import re

import pytest
import torch
from torch import nn

from resnetlab import ResidualMLP, UnknownModelError, create_model, list_models
from resnetlab.blocks import PadShortcut
from resnetlab.models import cifar_resnet, model_entry, preact_cifar_resnet
from resnetlab.summary import saved_activation_bytes

# torchvision's counts for the ImageNet models; the ResNet paper's 0.27M ... 19.4M for CIFAR.
PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet1202": 19_421_274,
    # He et al. 2016 give 1.7M, 1.7M and 10.2M (the last without batch-norm parameters).
    "preact_resnet110": 1_730_522,
    "preact_resnet164": 1_703_258,
    "preact_resnet1001": 10_327_706,
}

# Plain twins of option-A CIFAR nets have exactly their residual nets' parameters; ImageNet plain
# twins lack the option-B projections.
PLAIN_PARAMS = {"plain20": 269_722, "plain1202": 19_421_274, "plain18": 11_515_688, "plain50": 22_780_456}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small_input(model, batch=2):
    c, h, w = model.default_input_size
    side = 64 if h == 224 else h  # ImageNet nets run on 64x64 to keep the sweep fast
    return torch.randn(batch, c, side, side if h == w else w)


@pytest.mark.parametrize("name, count", sorted(PARAMS.items()))
def test_parameter_counts(name, count):
    assert n_params(create_model(name)) == count


@pytest.mark.parametrize("name, count", sorted(PLAIN_PARAMS.items()))
def test_plain_parameter_counts(name, count):
    assert n_params(create_model(name)) == count


@pytest.mark.parametrize("name", list_models())
def test_forward_and_backward_for_every_registered_model(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    x = small_input(model)
    out = model(x)
    assert out.shape == (2, 7)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    if not model.plain:
        # Plain BN nets are not held to this: their gradients grow exponentially towards the input
        # (Yang et al. 2019), beyond float32 in plain1202 (the gradients study shows it).
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "preact_resnet164", "residual_mlp"])
def test_forward_features_head_and_reset_classifier(name):
    model = create_model(name).eval()
    x = small_input(model)
    feats = model.forward_features(x)
    assert feats.shape[:2] == (2, model.num_features)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("resnet_cifar", {"depth": "abc"}, "depth='abc': resnet_cifar takes an integer"),
        ("residual_mlp", {"width": 1000.0}, "width=1000.0: residual_mlp takes an integer"),
        ("resnet20", {"shortcut": "D"}, "shortcut='D': resnet20 takes one of 'A', 'B', 'C'"),
        ("resnet18", {"widths": [64, "x", 256, 512]}, "widths=[64, 'x', 256, 512]: resnet18 takes Sequence[int]"),
        ("mobilenet_v2", {"width_mult": True}, "width_mult=True: mobilenet_v2 takes a number"),
        ("densenet121", {"input_size": [32]}, "input_size=[32]: densenet121 takes tuple[int, int] | None"),
    ],
)
def test_model_arguments_of_the_wrong_type_are_named(name, kwargs, message):
    from resnetlab.models.registry import check_arguments

    with pytest.raises(ValueError, match=re.escape(message)):
        check_arguments(name, kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet_cifar", {"depth": 14, "shortcut": "B", "widths": (8, 16, 32)}),
        ("residual_mlp", {"width": 32, "norm": None, "input_size": [8, 8]}),
        ("mobilenet_v2", {"width_mult": 1}),  # an int where a float is annotated
        ("efficientnet_b0", {"stochastic_depth_prob": 0.1, "unknown": 1}),  # unknown: the builder's call
    ],
)
def test_model_arguments_of_the_right_type_pass_the_check(name, kwargs):
    from resnetlab.models.registry import check_arguments

    check_arguments(name, kwargs)


def test_the_mlp_names_the_input_shape_it_expects():
    model = create_model("residual_mlp")
    with pytest.raises(ValueError, match=r"expected inputs of shape \(N, 1, 8, 8\), got \(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize(
    "name", ["resnet20", "residual_mlp", "mobilenet_v2_cifar", "efficientnet_b0_cifar", "densenet_bc_100"]
)
def test_every_family_built_without_a_classifier_returns_the_pooled_features(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=0).eval()
    x = small_input(model)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, model.num_features)
        torch.testing.assert_close(out, model.forward_head(model.forward_features(x), pre_logits=True))
    for bad in ({"num_classes": -1}, {"in_chans": 0}):
        with pytest.raises(ValueError, match="need num_classes >= 0 and in_chans >= 1"):
            create_model(name, **bad)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet50", [("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16), ("layer4", 2048, 32)]),
        ("resnet20", [("layer1", 16, 1), ("layer2", 32, 2), ("layer3", 64, 4)]),
        ("preact_resnet164", [("layer1", 64, 1), ("layer2", 128, 2), ("layer3", 256, 4)]),
    ],
)
def test_feature_info_matches_forward_intermediates(name, expected):
    model = create_model(name).eval()
    assert [(f.module, f.channels, f.stride) for f in model.feature_info] == expected
    x = small_input(model, batch=1)
    feats = model.forward_intermediates(x)
    assert len(feats) == len(expected)
    for f, (_, channels, stride) in zip(feats, expected, strict=True):
        assert f.shape == (1, channels, x.shape[2] // stride, x.shape[3] // stride)
    (last,) = model.forward_intermediates(x, indices=[len(expected) - 1])
    torch.testing.assert_close(last, feats[-1])
    first, last = model.forward_intermediates(x, indices=[-1, 0])  # negative from the end; forward order
    torch.testing.assert_close(first, feats[0])
    torch.testing.assert_close(last, feats[-1])
    last_two = model.forward_intermediates(x, indices=2)  # an int: the last n stages (as timm)
    assert [f.shape for f in last_two] == [f.shape for f in feats[-2:]]
    assert model.forward_intermediates(x, indices=[]) == []
    for bad in ([len(expected)], [-len(expected) - 1], len(expected) + 1):
        with pytest.raises(IndexError):
            model.forward_intermediates(x, indices=bad)


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "preact_resnet110"])
def test_in_chans_and_num_classes(name):
    model = create_model(name, in_chans=1, num_classes=5)
    c, h, w = model.default_input_size
    assert c == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


# --- plain twins ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shortcut",
    [
        ("resnet20", None),
        ("resnet18", None),
        ("resnet50", None),
        ("preact_resnet164", None),
        ("resnet20", "C"),
        ("residual_mlp", None),
    ],
)
def test_plain_twin_shares_every_branch_parameter_and_its_initialisation(name, shortcut):
    kwargs = {} if shortcut is None else {"shortcut": shortcut}
    torch.manual_seed(0)
    residual = create_model(name, **kwargs)
    torch.manual_seed(0)
    plain = create_model(name, plain=True, **kwargs)
    r_sd, p_sd = residual.state_dict(), plain.state_dict()
    assert set(p_sd) <= set(r_sd)
    leftover = set(r_sd) - set(p_sd)
    assert all(".downsample." in k for k in leftover)
    for key, value in p_sd.items():
        assert value.shape == r_sd[key].shape
        assert torch.equal(value, r_sd[key]), f"{key} differs between the twins"
    result = plain.load_state_dict(r_sd, strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == sorted(leftover)


def test_option_a_plain_twin_loads_the_residual_state_dict_strictly():
    residual = create_model("resnet56")
    plain = create_model("plain56")
    plain.load_state_dict(residual.state_dict(), strict=True)
    assert not any(isinstance(m, PadShortcut) for m in plain.modules())
    assert any(isinstance(m, PadShortcut) for m in residual.modules())


def test_plain_twin_differs_only_by_the_additions():
    torch.manual_seed(0)
    residual = create_model("resnet20").eval()
    plain = create_model("plain20").eval()
    plain.load_state_dict(residual.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for block in residual.residual_blocks():
        block.plain = True  # switching the flag off the shortcut must reproduce the twin exactly
    torch.testing.assert_close(residual(x), plain(x), rtol=0, atol=0)


def test_plain_alias_cannot_be_asked_to_be_residual():
    with pytest.raises(ValueError, match="plain twin"):
        create_model("plain20", plain=False)


def test_zero_init_residual_is_refused_for_plain_networks():
    with pytest.raises(ValueError, match="zero_init_residual"):
        create_model("plain20", zero_init_residual=True)


# --- identity at zero residual -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["resnet20", "resnet18", "resnet50", "preact_resnet110", "preact_resnet164", "residual_mlp"]
)
def test_zero_init_residual_makes_every_block_its_shortcut(name):
    torch.manual_seed(0)
    model = create_model(name, zero_init_residual=True).eval()
    x = small_input(model)
    with torch.no_grad():
        h = model.forward_stem(x)
        for block in model.residual_blocks():
            if getattr(block, "preact", False):
                expected = block._shortcut_from(h, torch.relu(block.bn1(h)))
            else:
                expected = torch.relu(block.shortcut(h))
            out = block(h)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            h = out


def test_zero_initialised_cifar_resnet_features_are_the_padded_stem_output():
    # With option A and every branch at zero, ResNet-20's features are its stem output, subsampled
    # and zero-padded by the two PadShortcuts: the network is a chain of identities.
    model = create_model("resnet20", zero_init_residual=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem = model.forward_stem(x)
        feats = model.forward_features(x)
    expected = nn.Sequential(PadShortcut(16, 32, 2), PadShortcut(32, 64, 2))(stem)
    assert torch.equal(feats, expected)


# --- gradient checkpointing ----------------------------------------------------------------------


@pytest.mark.parametrize("segment", [None, 1, 2])
@pytest.mark.parametrize("name", ["resnet20", "preact_resnet164", "residual_mlp"])
def test_grad_checkpointing_gives_the_same_outputs_gradients_and_bn_statistics(name, segment):
    torch.manual_seed(0)
    a = create_model(name)
    b = copy.deepcopy(a)
    b.set_grad_checkpointing(blocks_per_segment=segment)
    x = small_input(a, batch=4)
    out_a, out_b = a(x), b(x)
    torch.testing.assert_close(out_a, out_b)
    out_a.square().mean().backward()
    out_b.square().mean().backward()
    for (name_a, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name_a)
    # The recomputation in backward must not update the running statistics a second time.
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, msg=key)


def test_grad_checkpointing_stores_a_fraction_of_the_activations():
    torch.manual_seed(0)
    model = create_model("resnet110")  # 18 blocks per stage: segments of 4 (round(sqrt(18)))
    x = torch.randn(4, 3, 32, 32)
    full = saved_activation_bytes(model, x)
    model.set_grad_checkpointing()
    sqrt_segments = saved_activation_bytes(model, x)
    model.set_grad_checkpointing(blocks_per_segment=1)
    per_block = saved_activation_bytes(model, x)
    assert sqrt_segments < per_block < full / 4


@pytest.mark.slow
def test_resnet1202_trains_with_grad_checkpointing():
    torch.manual_seed(0)
    model = create_model("resnet1202")
    model.set_grad_checkpointing()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)


# --- registry ------------------------------------------------------------------------------------


def test_unknown_model_names_the_closest_ones():
    with pytest.raises(UnknownModelError, match=r"unknown model 'resnet5'; closest: .*resnet50"):
        create_model("resnet5")


def test_list_models_pattern_and_natural_order():
    assert list_models("resnet[0-9]*")[:4] == ["resnet18", "resnet20", "resnet32", "resnet34"]
    assert "plain_mlp" in list_models("plain*") and "densenet121" not in list_models("plain*")
    assert "resnet1202" in list_models() and list_models("nothing*") == []


def test_user_keyword_arguments_win_over_builder_defaults():
    model = create_model("resnet20", shortcut="B", num_classes=100)
    assert model.num_classes == 100
    assert isinstance(model.layer2[0].downsample, nn.Sequential)
    assert model_entry("plain20").plain_of == "resnet20"


def test_bad_depths_are_errors():
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(21)
    with pytest.raises(ValueError, match="9n\\+2"):
        preact_cifar_resnet(100, bottleneck=True)
    with pytest.raises(ValueError, match="even number"):
        ResidualMLP(depth=3)


def test_cifar_resnet_of_any_depth():
    model = cifar_resnet(14)
    assert [len(getattr(model, n)) for n in model.stage_names] == [2, 2, 2]


def test_residual_mlp_depth_counts_hidden_layers():
    model = ResidualMLP(depth=64, width=32)
    assert len(model.blocks) == 32
    linear = [m for m in model.blocks.modules() if isinstance(m, nn.Linear)]
    assert len(linear) == 64


# --- serialisation and export --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet20", "plain20", "resnet18", "preact_resnet110", "residual_mlp"])
def test_models_pickle_and_deepcopy(name):
    model = create_model(name).eval()
    x = small_input(model, batch=1)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert torch.equal(clone(x), model(x))


def test_torch_export_of_resnet20():
    model = create_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
