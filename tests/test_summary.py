import pytest
import torch
from torch import nn

from resnetlab import create_model
from resnetlab.summary import format_count, saved_activation_bytes, summarize


def test_resnet50_summary_matches_torchvisions_figures():
    s = summarize(create_model("resnet50"))
    assert s.input_size == (3, 224, 224)
    assert s.params == 25_557_032 and s.trainable_params == s.params
    assert s.macs == 4_089_184_256  # torchvision's "4.09 GFLOPS" (multiply-accumulates)
    assert [r.name for r in s.rows] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert [r.output_shape for r in s.rows] == [
        (64, 56, 56),
        (256, 56, 56),
        (512, 28, 28),
        (1024, 14, 14),
        (2048, 7, 7),
        (1000,),
    ]
    assert sum(r.params for r in s.rows) == s.params
    assert sum(r.macs for r in s.rows) == s.macs
    # stem: 7x7 conv, 3 -> 64 channels, on a 112x112 output map
    assert s.rows[0].macs == 64 * 3 * 7 * 7 * 112 * 112
    assert s.rows[-1].macs == 2048 * 1000


def test_cifar_resnet_summaries():
    s = summarize(create_model("resnet20"))
    assert s.macs == 40_551_040 and format_count(s.macs) == "40.6 M"
    # layer1: six 3x3 convs of 16 -> 16 channels on 32x32 maps
    assert s.rows[1].macs == 6 * 16 * 16 * 9 * 32 * 32
    big = summarize(create_model("resnet1202"))
    assert big.params == 19_421_274 and format_count(big.macs) == "2.83 G"


def test_summary_of_a_plain_twin_and_a_custom_input():
    s = summarize(create_model("plain20"), (3, 64, 64))
    assert s.rows[-2].output_shape == (64, 16, 16)
    assert s.macs == 4 * 40_551_040 - 3 * 640  # convs scale with the map area, the classifier does not


def test_summary_rejects_wrong_channels():
    with pytest.raises(ValueError, match="3 input channels"):
        summarize(create_model("resnet20"), (1, 32, 32))


@pytest.mark.parametrize(
    "n, text", [(4_089_184_256, "4.09 G"), (40_551_040, "40.6 M"), (640, "640"), (2_048, "2.05 K")]
)
def test_format_count(n, text):
    assert format_count(n) == text


def test_saved_activation_bytes_counts_each_saved_storage_once():
    # conv saves its input (2*3*8*8 floats) and weight (8*3*3*3); ReLU saves its output (2*8*8*8)
    tiny = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU())
    assert saved_activation_bytes(tiny, torch.randn(2, 3, 8, 8)) == 4 * (2 * 3 * 8 * 8 + 8 * 3 * 3 * 3 + 2 * 8 * 8 * 8)

    # a tensor saved twice (x * x saves both factors) is one allocation
    class Square(nn.Module):
        def forward(self, x):
            return x * x

    assert saved_activation_bytes(Square(), torch.randn(2, 3, 8, 8, requires_grad=True)) == 4 * 2 * 3 * 8 * 8
