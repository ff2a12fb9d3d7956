"""ResNets: torchvision compatibility, the paper's CIFAR sizes, stems, shortcuts, init, dy_ nets."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from pipeline.models import resnet
from pipeline.models.dynamic_conv import DynamicConv2d, DynamicSpec
from pipeline.models.resnet import CIFAR_PAPER_PARAMS, IMAGENET_REFERENCE, PadShortcut


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


SLOW_IMAGENET = {"resnet101", "resnet152"}
IMAGENET_NAMES = [
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW_IMAGENET else name
    for name in IMAGENET_REFERENCE
]


@pytest.mark.parametrize("name", IMAGENET_NAMES)
def test_imagenet_resnet_matches_torchvision_both_ways(name):
    ours = getattr(resnet, name)()
    theirs = getattr(torchvision.models, name)()  # architecture only: no weights are downloaded
    assert n_params(ours) == IMAGENET_REFERENCE[name].params == n_params(theirs)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval()
    theirs.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("name", list(CIFAR_PAPER_PARAMS))
def test_cifar_resnet_sizes_match_the_paper(name):
    model = getattr(resnet, name)()  # option A, 10 classes: He et al. 2015, Table 6
    assert n_params(model) == pytest.approx(CIFAR_PAPER_PARAMS[name], rel=0.02)
    depth = int(name.removeprefix("cifar_resnet"))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth  # stem + 2 convs per block, plus the classifier


def test_cifar_shortcut_options():
    a = resnet.cifar_resnet20(shortcut="A")
    b = resnet.cifar_resnet20(shortcut="B")
    shortcuts_a = [m.downsample for m in a.modules() if isinstance(m, BasicBlock) and m.downsample]
    assert len(shortcuts_a) == 2 and all(isinstance(s, PadShortcut) for s in shortcuts_a)
    # Option B adds a 1x1 conv + BN projection at the two stage transitions (16->32, 32->64).
    assert n_params(b) - n_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    x = torch.randn(2, 3, 32, 32)
    assert a(x).shape == b(x).shape == (2, 10)


def test_pad_shortcut_subsamples_and_zero_pads():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    y = PadShortcut(out_channels=4, stride=2)(x)
    assert y.shape == (1, 4, 2, 2)
    torch.testing.assert_close(y[:, :2], x[:, :, ::2, ::2])
    assert (y[:, 2:] == 0).all()


def test_small_input_stem_keeps_torchvision_keys():
    small = resnet.resnet18(small_input=True, in_channels=1, num_classes=10)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert small.conv1.in_channels == 1
    assert isinstance(small.maxpool, nn.Identity)
    assert small.state_dict().keys() == torchvision.models.resnet18().state_dict().keys()
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_default_initialisation():
    torch.manual_seed(0)
    model = resnet.resnet18()
    conv = model.layer3[0].conv2  # 256 -> 256, 3x3: Kaiming normal, fan_out = 256 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()


@pytest.mark.parametrize(("builder", "last_bn"), [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_zeroes_the_last_bn_of_each_branch(builder, last_bn):
    model = getattr(resnet, builder)(zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock | Bottleneck)]
    assert blocks and all((getattr(b, last_bn).weight == 0).all() for b in blocks)
    assert (model.bn1.weight == 1).all()
    # Every block starts as the identity (plus ReLU), so a block maps relu(x) to itself.
    block = model.layer1[1].eval()
    x = torch.rand(1, block.conv1.in_channels, 4, 4)
    torch.testing.assert_close(block(x), x)


def test_dropout_before_classifier():
    model = resnet.cifar_resnet20(dropout=0.5)
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.5
    assert isinstance(resnet.cifar_resnet20().dropout, nn.Identity)
    model.train()
    features = torch.ones(64, 64)
    assert (model.dropout(features) == 0).any()


def dynamic_convs(model: nn.Module) -> list[DynamicConv2d]:
    return [m for m in model.modules() if isinstance(m, DynamicConv2d)]


def test_dy_variants_replace_3x3_convs_but_not_the_stem():
    static = resnet.resnet50()
    dy = resnet.dy_resnet50()
    n3x3 = sum(
        isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in static.modules()
    )  # stem is 7x7
    assert isinstance(dy.conv1, nn.Conv2d) and not isinstance(dy.conv1, DynamicConv2d)
    assert len(dynamic_convs(dy)) == n3x3 == 16
    assert all(d.kernel_size == (3, 3) and d.num_kernels == 4 for d in dynamic_convs(dy))
    full = resnet.dy_resnet50(DynamicSpec(num_kernels=2, replace_1x1=True))
    n_convs = sum(isinstance(m, nn.Conv2d) for m in static.modules())
    assert len(dynamic_convs(full)) == n_convs - 1  # all but the stem, projections included


def test_dy_cifar_keeps_a_static_stem_and_learns():
    model = resnet.dy_cifar_resnet20(in_channels=1)
    assert type(model.conv1) is nn.Conv2d
    assert len(dynamic_convs(model)) == 18
    # Each DynamicConv2d's K kernels get the same Kaiming fan_out init as a static conv.
    kernels = model.layer3[1].conv1.kernels
    assert kernels.shape == (4, 64, 64, 3, 3)
    assert kernels.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)


def test_generic_cifar_builder_checks_depth():
    assert n_params(resnet.cifar_resnet(14)) < n_params(resnet.cifar_resnet20())
    with pytest.raises(ValueError, match=r"depth must be 6n\+2 .* got 21"):
        resnet.cifar_resnet(21)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_channels": 0}, "in_channels must be >= 1"),
        ({"num_classes": 0}, "num_classes must be >= 1"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"shortcut": "C"}, "shortcut must be 'A'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resnet.cifar_resnet20(**kwargs)


def test_export_paths_work_for_any_batch():
    x2, x3 = torch.randn(2, 1, 8, 8), torch.randn(3, 1, 8, 8)
    static = resnet.cifar_resnet20(in_channels=1).eval()
    with pytest.warns(FutureWarning):  # torch.jit.script is deprecated but still used for serving
        scripted = torch.jit.script(static)
    torch.testing.assert_close(scripted(x3), static(x3))
    # A trace of a dy_ net records the batch-agnostic "mix" computation, so other batches work.
    dy = resnet.dy_cifar_resnet20(in_channels=1).eval()
    with torch.no_grad(), pytest.warns(FutureWarning):
        traced = torch.jit.trace(dy, x2)
    torch.testing.assert_close(traced(x3), dy(x3), atol=1e-5, rtol=1e-5)
    # torch.export (MLflow's pt2 format) with a dynamic batch dimension.
    batch = torch.export.Dim("batch", min=2, max=1024)
    exported = torch.export.export(dy, (x2,), dynamic_shapes=({0: batch},)).module()
    torch.testing.assert_close(exported(x3), dy(x3), atol=1e-5, rtol=1e-5)
