import copy
import pickle

import pytest
import torch
from torch import nn

from resnetlab.blocks import (
    BasicBlock,
    Bottleneck,
    FCResidualBlock,
    PadShortcut,
    PreActBasicBlock,
    PreActBottleneck,
    Residual,
    make_shortcut,
)

CONV_BLOCKS = [BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck]


def _out_channels(block_cls, planes):
    return planes * block_cls.expansion


# --- the fully connected block -------------------------------------------------------------------


def test_fc_block_computes_the_tutorial_formula():
    torch.manual_seed(0)
    block = FCResidualBlock(5)
    a = torch.randn(4, 5)
    z1 = a @ block.fc1.weight.T + block.fc1.bias
    a1 = torch.relu(z1)
    z2 = a1 @ block.fc2.weight.T + block.fc2.bias
    torch.testing.assert_close(block(a), torch.relu(z2 + a))
    block.plain = True
    torch.testing.assert_close(block(a), torch.relu(z2))


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_fc_block_with_zero_second_layer_returns_nonnegative_input_exactly(norm):
    torch.manual_seed(0)
    block = FCResidualBlock(16, norm=norm)
    if norm is None:
        with torch.no_grad():
            block.fc2.weight.zero_()
            block.fc2.bias.zero_()
    else:
        block.zero_init_last()
    a = torch.relu(torch.randn(8, 16))  # a >= 0, as after any ReLU
    assert torch.equal(block(a), a)


def test_fc_block_zero_init_last_without_norm_zeroes_w2_and_b2():
    block = FCResidualBlock(8)
    block.zero_init_last()
    assert torch.count_nonzero(block.fc2.weight) == 0 and torch.count_nonzero(block.fc2.bias) == 0
    assert torch.count_nonzero(block.fc1.weight) > 0


def test_fc_block_rejects_unknown_norm():
    with pytest.raises(ValueError, match="norm must be"):
        FCResidualBlock(4, norm="group")


# --- convolutional blocks ------------------------------------------------------------------------


@pytest.mark.parametrize("block_cls", CONV_BLOCKS)
@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_block_shapes_and_backward(block_cls, shortcut, stride):
    planes = 8
    in_channels = 8 if stride == 1 else 4
    block = block_cls(in_channels, planes, stride, shortcut=shortcut)
    x = torch.randn(2, in_channels, 9, 9, requires_grad=True)
    y = block(x)
    assert y.shape == (2, _out_channels(block_cls, planes), 5 if stride == 2 else 9, 5 if stride == 2 else 9)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("block_cls", CONV_BLOCKS)
@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
@pytest.mark.parametrize("stride", [1, 2])
def test_zero_init_last_makes_the_block_its_shortcut(block_cls, shortcut, stride):
    torch.manual_seed(0)
    in_channels = 8 if stride == 1 else 4
    block = block_cls(in_channels, 8, stride, shortcut=shortcut)
    block.zero_init_last()
    for mode in (block.train, block.eval):
        mode()
        x = torch.randn(2, in_channels, 8, 8)
        if block.preact:
            # Nothing follows the addition: the output is the shortcut itself.
            preact = torch.relu(block.bn1(x))
            expected = block._shortcut_from(x, preact)
        else:
            expected = torch.relu(block.shortcut(x))
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("block_cls", CONV_BLOCKS)
def test_identity_shortcut_block_at_zero_residual_is_exactly_the_identity(block_cls):
    torch.manual_seed(0)
    channels = _out_channels(block_cls, 4)
    block = block_cls(channels, 4, 1, shortcut="B").eval()
    assert block.downsample is None
    block.zero_init_last()
    x = torch.relu(torch.randn(3, channels, 6, 6))  # the output of a previous block is >= 0
    assert torch.equal(block(x), x)


@pytest.mark.parametrize("block_cls", CONV_BLOCKS)
def test_plain_block_has_the_same_branch_and_no_shortcut(block_cls):
    torch.manual_seed(0)
    residual = block_cls(4, 8, 2, shortcut="B")
    torch.manual_seed(0)
    plain = block_cls(4, 8, 2, shortcut="B", plain=True)
    assert plain.downsample is None and residual.downsample is not None
    r_sd, p_sd = residual.state_dict(), plain.state_dict()
    assert set(r_sd) - set(p_sd) == {k for k in r_sd if k.startswith("downsample.")}
    for key in p_sd:
        assert torch.equal(p_sd[key], r_sd[key]), key
    x = torch.randn(2, 4, 8, 8)
    residual.eval(), plain.eval()
    with torch.no_grad():
        if block_cls.preact:
            preact = torch.relu(residual.bn1(x))
            expected = residual(x) - residual._shortcut_from(x, preact)
            torch.testing.assert_close(plain(x), expected)
        else:
            assert not torch.equal(plain(x), residual(x))


@pytest.mark.parametrize("block_cls", CONV_BLOCKS)
def test_zero_init_last_on_a_plain_block_is_refused(block_cls):
    block = block_cls(8, 8 // block_cls.expansion or 1, plain=True)
    with pytest.raises(ValueError, match="without a shortcut"):
        block.zero_init_last()


def test_bottleneck_stride_sits_on_the_3x3_by_default_and_on_the_1x1_on_request():
    v15 = Bottleneck(64, 16, 2)
    v1 = Bottleneck(64, 16, 2, stride_in_1x1=True)
    assert (v15.conv1.stride, v15.conv2.stride) == ((1, 1), (2, 2))
    assert (v1.conv1.stride, v1.conv2.stride) == ((2, 2), (1, 1))
    x = torch.randn(1, 64, 8, 8)
    assert v15(x).shape == v1(x).shape == (1, 64, 4, 4)


def test_basic_block_rejects_bottleneck_options():
    with pytest.raises(ValueError, match="groups=1"):
        BasicBlock(8, 8, groups=2)
    with pytest.raises(ValueError, match="1x1"):
        BasicBlock(8, 8, stride_in_1x1=True)


# --- shortcuts -----------------------------------------------------------------------------------


def test_option_a_subsamples_and_zero_pads_channels_without_parameters():
    sc = PadShortcut(4, 8, stride=2)
    assert list(sc.parameters()) == [] and list(sc.buffers()) == []
    x = torch.randn(2, 4, 6, 6)
    y = sc(x)
    assert y.shape == (2, 8, 3, 3)
    torch.testing.assert_close(y[:, 2:6], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert torch.count_nonzero(y[:, :2]) == 0 and torch.count_nonzero(y[:, 6:]) == 0


def test_option_a_is_a_named_picklable_module():
    sc = PadShortcut(16, 32, stride=2)
    assert repr(sc) == "PadShortcut(16, 32, stride=2)"
    clone = pickle.loads(pickle.dumps(sc))
    x = torch.randn(1, 16, 4, 4)
    assert torch.equal(clone(x), sc(x))


def test_option_a_cannot_shrink_channels():
    with pytest.raises(ValueError, match="cannot shrink"):
        PadShortcut(8, 4)


@pytest.mark.parametrize(
    "option, same_shape, kind",
    [
        ("A", True, None),
        ("A", False, PadShortcut),
        ("B", True, None),
        ("B", False, nn.Sequential),
        ("C", True, nn.Sequential),
        ("C", False, nn.Sequential),
    ],
)
def test_shortcut_options(option, same_shape, kind):
    sc = make_shortcut(option, 8, 8 if same_shape else 16, 1 if same_shape else 2, nn.BatchNorm2d)
    if kind is None:
        assert sc is None
    else:
        assert isinstance(sc, kind)
    if kind is nn.Sequential:
        assert isinstance(sc[0], nn.Conv2d) and sc[0].kernel_size == (1, 1) and isinstance(sc[1], nn.BatchNorm2d)


def test_unknown_shortcut_option_is_an_error():
    with pytest.raises(ValueError, match="shortcut must be one of"):
        make_shortcut("D", 8, 8, 1, nn.BatchNorm2d)


def test_option_a_blocks_have_no_shortcut_parameters():
    block = BasicBlock(16, 32, 2, shortcut="A")
    assert isinstance(block.downsample, PadShortcut)
    assert not any(k.startswith("downsample") for k in block.state_dict())


# --- the general wrapper -------------------------------------------------------------------------


def test_residual_wrapper_adds_the_branch_to_the_shortcut():
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    block = Residual(branch, post_act=nn.ReLU())
    x = torch.randn(3, 6)
    torch.testing.assert_close(block(x), torch.relu(branch(x) + x))
    projected = Residual(nn.Linear(6, 4), skip=nn.Linear(6, 4, bias=False))
    torch.testing.assert_close(projected(x), projected.branch(x) + projected.skip(x))


def test_residual_wrapper_plain_twin_drops_the_skip_module():
    block = Residual(nn.Linear(6, 4), skip=nn.Linear(6, 4, bias=False), plain=True)
    assert block.skip is None and set(block.state_dict()) == {"branch.weight", "branch.bias"}
    x = torch.randn(2, 6)
    torch.testing.assert_close(block(x), block.branch(x))


def test_residual_wrapper_zero_init_last_gives_the_identity():
    block = Residual(nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 5), nn.BatchNorm1d(5)))
    block.zero_init_last()
    x = torch.randn(4, 5)
    assert torch.equal(block(x), x)
    no_norm = Residual(nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5)))
    no_norm.zero_init_last()
    assert torch.equal(no_norm(x), x)


@pytest.mark.parametrize("block_cls", CONV_BLOCKS)
def test_blocks_pickle_and_deepcopy(block_cls):
    block = block_cls(8, 16, 2, shortcut="A").eval()
    x = torch.randn(1, 8, 8, 8)
    for clone in (pickle.loads(pickle.dumps(block)), copy.deepcopy(block)):
        assert torch.equal(clone(x), block(x))
