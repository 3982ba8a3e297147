"""torchvision's state_dict layout for resnet18 and resnet50, written out, and an independent check
that a torchvision-format state_dict gives torchvision's outputs.

The tables were printed from torchvision 0.28 (``{key} {shape}`` for every state_dict entry, in order;
``-`` is a scalar). The functional reference below recomputes torchvision's forward pass with
``torch.nn.functional`` from a state_dict alone, so the comparison does not trust our module code.
"""

import pytest
import torch
import torch.nn.functional as F

from resnetlab import create_model

TORCHVISION_RESNET18 = """
conv1.weight 64x3x7x7
bn1.weight 64
bn1.bias 64
bn1.running_mean 64
bn1.running_var 64
bn1.num_batches_tracked -
layer1.0.conv1.weight 64x64x3x3
layer1.0.bn1.weight 64
layer1.0.bn1.bias 64
layer1.0.bn1.running_mean 64
layer1.0.bn1.running_var 64
layer1.0.bn1.num_batches_tracked -
layer1.0.conv2.weight 64x64x3x3
layer1.0.bn2.weight 64
layer1.0.bn2.bias 64
layer1.0.bn2.running_mean 64
layer1.0.bn2.running_var 64
layer1.0.bn2.num_batches_tracked -
layer1.1.conv1.weight 64x64x3x3
layer1.1.bn1.weight 64
layer1.1.bn1.bias 64
layer1.1.bn1.running_mean 64
layer1.1.bn1.running_var 64
layer1.1.bn1.num_batches_tracked -
layer1.1.conv2.weight 64x64x3x3
layer1.1.bn2.weight 64
layer1.1.bn2.bias 64
layer1.1.bn2.running_mean 64
layer1.1.bn2.running_var 64
layer1.1.bn2.num_batches_tracked -
layer2.0.conv1.weight 128x64x3x3
layer2.0.bn1.weight 128
layer2.0.bn1.bias 128
layer2.0.bn1.running_mean 128
layer2.0.bn1.running_var 128
layer2.0.bn1.num_batches_tracked -
layer2.0.conv2.weight 128x128x3x3
layer2.0.bn2.weight 128
layer2.0.bn2.bias 128
layer2.0.bn2.running_mean 128
layer2.0.bn2.running_var 128
layer2.0.bn2.num_batches_tracked -
layer2.0.downsample.0.weight 128x64x1x1
layer2.0.downsample.1.weight 128
layer2.0.downsample.1.bias 128
layer2.0.downsample.1.running_mean 128
layer2.0.downsample.1.running_var 128
layer2.0.downsample.1.num_batches_tracked -
layer2.1.conv1.weight 128x128x3x3
layer2.1.bn1.weight 128
layer2.1.bn1.bias 128
layer2.1.bn1.running_mean 128
layer2.1.bn1.running_var 128
layer2.1.bn1.num_batches_tracked -
layer2.1.conv2.weight 128x128x3x3
layer2.1.bn2.weight 128
layer2.1.bn2.bias 128
layer2.1.bn2.running_mean 128
layer2.1.bn2.running_var 128
layer2.1.bn2.num_batches_tracked -
layer3.0.conv1.weight 256x128x3x3
layer3.0.bn1.weight 256
layer3.0.bn1.bias 256
layer3.0.bn1.running_mean 256
layer3.0.bn1.running_var 256
layer3.0.bn1.num_batches_tracked -
layer3.0.conv2.weight 256x256x3x3
layer3.0.bn2.weight 256
layer3.0.bn2.bias 256
layer3.0.bn2.running_mean 256
layer3.0.bn2.running_var 256
layer3.0.bn2.num_batches_tracked -
layer3.0.downsample.0.weight 256x128x1x1
layer3.0.downsample.1.weight 256
layer3.0.downsample.1.bias 256
layer3.0.downsample.1.running_mean 256
layer3.0.downsample.1.running_var 256
layer3.0.downsample.1.num_batches_tracked -
layer3.1.conv1.weight 256x256x3x3
layer3.1.bn1.weight 256
layer3.1.bn1.bias 256
layer3.1.bn1.running_mean 256
layer3.1.bn1.running_var 256
layer3.1.bn1.num_batches_tracked -
layer3.1.conv2.weight 256x256x3x3
layer3.1.bn2.weight 256
layer3.1.bn2.bias 256
layer3.1.bn2.running_mean 256
layer3.1.bn2.running_var 256
layer3.1.bn2.num_batches_tracked -
layer4.0.conv1.weight 512x256x3x3
layer4.0.bn1.weight 512
layer4.0.bn1.bias 512
layer4.0.bn1.running_mean 512
layer4.0.bn1.running_var 512
layer4.0.bn1.num_batches_tracked -
layer4.0.conv2.weight 512x512x3x3
layer4.0.bn2.weight 512
layer4.0.bn2.bias 512
layer4.0.bn2.running_mean 512
layer4.0.bn2.running_var 512
layer4.0.bn2.num_batches_tracked -
layer4.0.downsample.0.weight 512x256x1x1
layer4.0.downsample.1.weight 512
layer4.0.downsample.1.bias 512
layer4.0.downsample.1.running_mean 512
layer4.0.downsample.1.running_var 512
layer4.0.downsample.1.num_batches_tracked -
layer4.1.conv1.weight 512x512x3x3
layer4.1.bn1.weight 512
layer4.1.bn1.bias 512
layer4.1.bn1.running_mean 512
layer4.1.bn1.running_var 512
layer4.1.bn1.num_batches_tracked -
layer4.1.conv2.weight 512x512x3x3
layer4.1.bn2.weight 512
layer4.1.bn2.bias 512
layer4.1.bn2.running_mean 512
layer4.1.bn2.running_var 512
layer4.1.bn2.num_batches_tracked -
fc.weight 1000x512
fc.bias 1000
"""

TORCHVISION_RESNET50 = """
conv1.weight 64x3x7x7
bn1.weight 64
bn1.bias 64
bn1.running_mean 64
bn1.running_var 64
bn1.num_batches_tracked -
layer1.0.conv1.weight 64x64x1x1
layer1.0.bn1.weight 64
layer1.0.bn1.bias 64
layer1.0.bn1.running_mean 64
layer1.0.bn1.running_var 64
layer1.0.bn1.num_batches_tracked -
layer1.0.conv2.weight 64x64x3x3
layer1.0.bn2.weight 64
layer1.0.bn2.bias 64
layer1.0.bn2.running_mean 64
layer1.0.bn2.running_var 64
layer1.0.bn2.num_batches_tracked -
layer1.0.conv3.weight 256x64x1x1
layer1.0.bn3.weight 256
layer1.0.bn3.bias 256
layer1.0.bn3.running_mean 256
layer1.0.bn3.running_var 256
layer1.0.bn3.num_batches_tracked -
layer1.0.downsample.0.weight 256x64x1x1
layer1.0.downsample.1.weight 256
layer1.0.downsample.1.bias 256
layer1.0.downsample.1.running_mean 256
layer1.0.downsample.1.running_var 256
layer1.0.downsample.1.num_batches_tracked -
layer1.1.conv1.weight 64x256x1x1
layer1.1.bn1.weight 64
layer1.1.bn1.bias 64
layer1.1.bn1.running_mean 64
layer1.1.bn1.running_var 64
layer1.1.bn1.num_batches_tracked -
layer1.1.conv2.weight 64x64x3x3
layer1.1.bn2.weight 64
layer1.1.bn2.bias 64
layer1.1.bn2.running_mean 64
layer1.1.bn2.running_var 64
layer1.1.bn2.num_batches_tracked -
layer1.1.conv3.weight 256x64x1x1
layer1.1.bn3.weight 256
layer1.1.bn3.bias 256
layer1.1.bn3.running_mean 256
layer1.1.bn3.running_var 256
layer1.1.bn3.num_batches_tracked -
layer1.2.conv1.weight 64x256x1x1
layer1.2.bn1.weight 64
layer1.2.bn1.bias 64
layer1.2.bn1.running_mean 64
layer1.2.bn1.running_var 64
layer1.2.bn1.num_batches_tracked -
layer1.2.conv2.weight 64x64x3x3
layer1.2.bn2.weight 64
layer1.2.bn2.bias 64
layer1.2.bn2.running_mean 64
layer1.2.bn2.running_var 64
layer1.2.bn2.num_batches_tracked -
layer1.2.conv3.weight 256x64x1x1
layer1.2.bn3.weight 256
layer1.2.bn3.bias 256
layer1.2.bn3.running_mean 256
layer1.2.bn3.running_var 256
layer1.2.bn3.num_batches_tracked -
layer2.0.conv1.weight 128x256x1x1
layer2.0.bn1.weight 128
layer2.0.bn1.bias 128
layer2.0.bn1.running_mean 128
layer2.0.bn1.running_var 128
layer2.0.bn1.num_batches_tracked -
layer2.0.conv2.weight 128x128x3x3
layer2.0.bn2.weight 128
layer2.0.bn2.bias 128
layer2.0.bn2.running_mean 128
layer2.0.bn2.running_var 128
layer2.0.bn2.num_batches_tracked -
layer2.0.conv3.weight 512x128x1x1
layer2.0.bn3.weight 512
layer2.0.bn3.bias 512
layer2.0.bn3.running_mean 512
layer2.0.bn3.running_var 512
layer2.0.bn3.num_batches_tracked -
layer2.0.downsample.0.weight 512x256x1x1
layer2.0.downsample.1.weight 512
layer2.0.downsample.1.bias 512
layer2.0.downsample.1.running_mean 512
layer2.0.downsample.1.running_var 512
layer2.0.downsample.1.num_batches_tracked -
layer2.1.conv1.weight 128x512x1x1
layer2.1.bn1.weight 128
layer2.1.bn1.bias 128
layer2.1.bn1.running_mean 128
layer2.1.bn1.running_var 128
layer2.1.bn1.num_batches_tracked -
layer2.1.conv2.weight 128x128x3x3
layer2.1.bn2.weight 128
layer2.1.bn2.bias 128
layer2.1.bn2.running_mean 128
layer2.1.bn2.running_var 128
layer2.1.bn2.num_batches_tracked -
layer2.1.conv3.weight 512x128x1x1
layer2.1.bn3.weight 512
layer2.1.bn3.bias 512
layer2.1.bn3.running_mean 512
layer2.1.bn3.running_var 512
layer2.1.bn3.num_batches_tracked -
layer2.2.conv1.weight 128x512x1x1
layer2.2.bn1.weight 128
layer2.2.bn1.bias 128
layer2.2.bn1.running_mean 128
layer2.2.bn1.running_var 128
layer2.2.bn1.num_batches_tracked -
layer2.2.conv2.weight 128x128x3x3
layer2.2.bn2.weight 128
layer2.2.bn2.bias 128
layer2.2.bn2.running_mean 128
layer2.2.bn2.running_var 128
layer2.2.bn2.num_batches_tracked -
layer2.2.conv3.weight 512x128x1x1
layer2.2.bn3.weight 512
layer2.2.bn3.bias 512
layer2.2.bn3.running_mean 512
layer2.2.bn3.running_var 512
layer2.2.bn3.num_batches_tracked -
layer2.3.conv1.weight 128x512x1x1
layer2.3.bn1.weight 128
layer2.3.bn1.bias 128
layer2.3.bn1.running_mean 128
layer2.3.bn1.running_var 128
layer2.3.bn1.num_batches_tracked -
layer2.3.conv2.weight 128x128x3x3
layer2.3.bn2.weight 128
layer2.3.bn2.bias 128
layer2.3.bn2.running_mean 128
layer2.3.bn2.running_var 128
layer2.3.bn2.num_batches_tracked -
layer2.3.conv3.weight 512x128x1x1
layer2.3.bn3.weight 512
layer2.3.bn3.bias 512
layer2.3.bn3.running_mean 512
layer2.3.bn3.running_var 512
layer2.3.bn3.num_batches_tracked -
layer3.0.conv1.weight 256x512x1x1
layer3.0.bn1.weight 256
layer3.0.bn1.bias 256
layer3.0.bn1.running_mean 256
layer3.0.bn1.running_var 256
layer3.0.bn1.num_batches_tracked -
layer3.0.conv2.weight 256x256x3x3
layer3.0.bn2.weight 256
layer3.0.bn2.bias 256
layer3.0.bn2.running_mean 256
layer3.0.bn2.running_var 256
layer3.0.bn2.num_batches_tracked -
layer3.0.conv3.weight 1024x256x1x1
layer3.0.bn3.weight 1024
layer3.0.bn3.bias 1024
layer3.0.bn3.running_mean 1024
layer3.0.bn3.running_var 1024
layer3.0.bn3.num_batches_tracked -
layer3.0.downsample.0.weight 1024x512x1x1
layer3.0.downsample.1.weight 1024
layer3.0.downsample.1.bias 1024
layer3.0.downsample.1.running_mean 1024
layer3.0.downsample.1.running_var 1024
layer3.0.downsample.1.num_batches_tracked -
layer3.1.conv1.weight 256x1024x1x1
layer3.1.bn1.weight 256
layer3.1.bn1.bias 256
layer3.1.bn1.running_mean 256
layer3.1.bn1.running_var 256
layer3.1.bn1.num_batches_tracked -
layer3.1.conv2.weight 256x256x3x3
layer3.1.bn2.weight 256
layer3.1.bn2.bias 256
layer3.1.bn2.running_mean 256
layer3.1.bn2.running_var 256
layer3.1.bn2.num_batches_tracked -
layer3.1.conv3.weight 1024x256x1x1
layer3.1.bn3.weight 1024
layer3.1.bn3.bias 1024
layer3.1.bn3.running_mean 1024
layer3.1.bn3.running_var 1024
layer3.1.bn3.num_batches_tracked -
layer3.2.conv1.weight 256x1024x1x1
layer3.2.bn1.weight 256
layer3.2.bn1.bias 256
layer3.2.bn1.running_mean 256
layer3.2.bn1.running_var 256
layer3.2.bn1.num_batches_tracked -
layer3.2.conv2.weight 256x256x3x3
layer3.2.bn2.weight 256
layer3.2.bn2.bias 256
layer3.2.bn2.running_mean 256
layer3.2.bn2.running_var 256
layer3.2.bn2.num_batches_tracked -
layer3.2.conv3.weight 1024x256x1x1
layer3.2.bn3.weight 1024
layer3.2.bn3.bias 1024
layer3.2.bn3.running_mean 1024
layer3.2.bn3.running_var 1024
layer3.2.bn3.num_batches_tracked -
layer3.3.conv1.weight 256x1024x1x1
layer3.3.bn1.weight 256
layer3.3.bn1.bias 256
layer3.3.bn1.running_mean 256
layer3.3.bn1.running_var 256
layer3.3.bn1.num_batches_tracked -
layer3.3.conv2.weight 256x256x3x3
layer3.3.bn2.weight 256
layer3.3.bn2.bias 256
layer3.3.bn2.running_mean 256
layer3.3.bn2.running_var 256
layer3.3.bn2.num_batches_tracked -
layer3.3.conv3.weight 1024x256x1x1
layer3.3.bn3.weight 1024
layer3.3.bn3.bias 1024
layer3.3.bn3.running_mean 1024
layer3.3.bn3.running_var 1024
layer3.3.bn3.num_batches_tracked -
layer3.4.conv1.weight 256x1024x1x1
layer3.4.bn1.weight 256
layer3.4.bn1.bias 256
layer3.4.bn1.running_mean 256
layer3.4.bn1.running_var 256
layer3.4.bn1.num_batches_tracked -
layer3.4.conv2.weight 256x256x3x3
layer3.4.bn2.weight 256
layer3.4.bn2.bias 256
layer3.4.bn2.running_mean 256
layer3.4.bn2.running_var 256
layer3.4.bn2.num_batches_tracked -
layer3.4.conv3.weight 1024x256x1x1
layer3.4.bn3.weight 1024
layer3.4.bn3.bias 1024
layer3.4.bn3.running_mean 1024
layer3.4.bn3.running_var 1024
layer3.4.bn3.num_batches_tracked -
layer3.5.conv1.weight 256x1024x1x1
layer3.5.bn1.weight 256
layer3.5.bn1.bias 256
layer3.5.bn1.running_mean 256
layer3.5.bn1.running_var 256
layer3.5.bn1.num_batches_tracked -
layer3.5.conv2.weight 256x256x3x3
layer3.5.bn2.weight 256
layer3.5.bn2.bias 256
layer3.5.bn2.running_mean 256
layer3.5.bn2.running_var 256
layer3.5.bn2.num_batches_tracked -
layer3.5.conv3.weight 1024x256x1x1
layer3.5.bn3.weight 1024
layer3.5.bn3.bias 1024
layer3.5.bn3.running_mean 1024
layer3.5.bn3.running_var 1024
layer3.5.bn3.num_batches_tracked -
layer4.0.conv1.weight 512x1024x1x1
layer4.0.bn1.weight 512
layer4.0.bn1.bias 512
layer4.0.bn1.running_mean 512
layer4.0.bn1.running_var 512
layer4.0.bn1.num_batches_tracked -
layer4.0.conv2.weight 512x512x3x3
layer4.0.bn2.weight 512
layer4.0.bn2.bias 512
layer4.0.bn2.running_mean 512
layer4.0.bn2.running_var 512
layer4.0.bn2.num_batches_tracked -
layer4.0.conv3.weight 2048x512x1x1
layer4.0.bn3.weight 2048
layer4.0.bn3.bias 2048
layer4.0.bn3.running_mean 2048
layer4.0.bn3.running_var 2048
layer4.0.bn3.num_batches_tracked -
layer4.0.downsample.0.weight 2048x1024x1x1
layer4.0.downsample.1.weight 2048
layer4.0.downsample.1.bias 2048
layer4.0.downsample.1.running_mean 2048
layer4.0.downsample.1.running_var 2048
layer4.0.downsample.1.num_batches_tracked -
layer4.1.conv1.weight 512x2048x1x1
layer4.1.bn1.weight 512
layer4.1.bn1.bias 512
layer4.1.bn1.running_mean 512
layer4.1.bn1.running_var 512
layer4.1.bn1.num_batches_tracked -
layer4.1.conv2.weight 512x512x3x3
layer4.1.bn2.weight 512
layer4.1.bn2.bias 512
layer4.1.bn2.running_mean 512
layer4.1.bn2.running_var 512
layer4.1.bn2.num_batches_tracked -
layer4.1.conv3.weight 2048x512x1x1
layer4.1.bn3.weight 2048
layer4.1.bn3.bias 2048
layer4.1.bn3.running_mean 2048
layer4.1.bn3.running_var 2048
layer4.1.bn3.num_batches_tracked -
layer4.2.conv1.weight 512x2048x1x1
layer4.2.bn1.weight 512
layer4.2.bn1.bias 512
layer4.2.bn1.running_mean 512
layer4.2.bn1.running_var 512
layer4.2.bn1.num_batches_tracked -
layer4.2.conv2.weight 512x512x3x3
layer4.2.bn2.weight 512
layer4.2.bn2.bias 512
layer4.2.bn2.running_mean 512
layer4.2.bn2.running_var 512
layer4.2.bn2.num_batches_tracked -
layer4.2.conv3.weight 2048x512x1x1
layer4.2.bn3.weight 2048
layer4.2.bn3.bias 2048
layer4.2.bn3.running_mean 2048
layer4.2.bn3.running_var 2048
layer4.2.bn3.num_batches_tracked -
fc.weight 1000x2048
fc.bias 1000
"""


def _table(text: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in text.strip().splitlines():
        key, shape = line.split()
        rows.append((key, () if shape == "-" else tuple(int(s) for s in shape.split("x"))))
    return rows


@pytest.mark.parametrize("name, table", [("resnet18", TORCHVISION_RESNET18), ("resnet50", TORCHVISION_RESNET50)])
def test_state_dict_keys_and_shapes_match_torchvision(name, table):
    ours = [(k, tuple(v.shape)) for k, v in create_model(name).state_dict().items()]
    assert ours == _table(table)


def _bn(x, sd, prefix):
    return F.batch_norm(
        x,
        sd[prefix + ".running_mean"],
        sd[prefix + ".running_var"],
        sd[prefix + ".weight"],
        sd[prefix + ".bias"],
        training=False,
        eps=1e-5,
    )


def _reference_forward(sd: dict, layers: list[int], bottleneck: bool, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ResNet forward in eval mode (stride on the 3x3 conv, "v1.5"), from a state_dict."""
    x = F.relu(_bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for stage, depth in enumerate(layers, start=1):
        for i in range(depth):
            p = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            if bottleneck:
                out = F.relu(_bn(F.conv2d(x, sd[p + ".conv1.weight"]), sd, p + ".bn1"))
                out = F.relu(_bn(F.conv2d(out, sd[p + ".conv2.weight"], stride=stride, padding=1), sd, p + ".bn2"))
                out = _bn(F.conv2d(out, sd[p + ".conv3.weight"]), sd, p + ".bn3")
            else:
                out = F.relu(_bn(F.conv2d(x, sd[p + ".conv1.weight"], stride=stride, padding=1), sd, p + ".bn1"))
                out = _bn(F.conv2d(out, sd[p + ".conv2.weight"], padding=1), sd, p + ".bn2")
            if p + ".downsample.0.weight" in sd:
                x = _bn(F.conv2d(x, sd[p + ".downsample.0.weight"], stride=stride), sd, p + ".downsample.1")
            x = F.relu(out + x)
    x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return F.linear(x, sd["fc.weight"], sd["fc.bias"])


@pytest.mark.parametrize(
    "name, layers, bottleneck", [("resnet18", [2, 2, 2, 2], False), ("resnet50", [3, 4, 6, 3], True)]
)
def test_torchvision_format_state_dict_gives_torchvision_outputs(name, layers, bottleneck):
    torch.manual_seed(0)
    # A "foreign" checkpoint: random weights and non-trivial batch-norm statistics, keyed as torchvision.
    sd = {}
    for key, shape in _table(TORCHVISION_RESNET50 if bottleneck else TORCHVISION_RESNET18):
        if len(shape) >= 2:  # conv and linear weights, scaled by fan-in to keep activations moderate
            sd[key] = torch.randn(shape) / torch.tensor(shape[1:]).prod().sqrt()
        elif key.endswith(("running_var", ".weight")):
            sd[key] = torch.rand(shape) + 0.5
        elif shape:
            sd[key] = torch.randn(shape) * 0.1
        else:
            sd[key] = torch.tensor(0)
    model = create_model(name).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_forward(sd, layers, bottleneck, x), rtol=1e-4, atol=1e-4)
