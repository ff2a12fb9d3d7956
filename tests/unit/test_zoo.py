"""The zoo: names, config -> model, MACs against torchvision's numbers, one training step each."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from pipeline.cli.display import model_table
from pipeline.config import DynamicConvConfig, ModelConfig
from pipeline.errors import UnknownModelError
from pipeline.models.dynamic_conv import DynamicConv2d
from pipeline.models.resnet import IMAGENET_REFERENCE
from pipeline.models.zoo import MODEL_NAMES, build_model, describe_models


def test_model_names():
    static = [
        *(f"resnet{d}" for d in (18, 34, 50, 101, 152)),
        *(f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110)),
    ]
    assert set(MODEL_NAMES) == {*static, *(f"dy_{n}" for n in static)}


def test_unknown_name_lists_the_choices():
    with pytest.raises(UnknownModelError, match="unknown model 'resnet19'") as err:
        build_model(ModelConfig(name="resnet19"), in_channels=3, num_classes=10)
    assert isinstance(err.value, ValueError)
    assert all(name in str(err.value) for name in MODEL_NAMES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_channels": 0, "num_classes": 10}, "in_channels must be >= 1"),
        ({"in_channels": 3, "num_classes": 0}, "num_classes must be >= 1"),
        ({"in_channels": 3, "num_classes": 10, "image_size": 0}, "image_size must be >= 1"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(ModelConfig(name="cifar_resnet20"), **kwargs)


@pytest.mark.parametrize(
    ("small_input", "image_size", "stem_kernel"),
    [(None, 32, 3), (None, 64, 3), (None, 65, 7), (None, None, 7), (True, 224, 3), (False, 8, 7)],
)
def test_small_input_stem_is_automatic_for_small_images(small_input, image_size, stem_kernel):
    cfg = ModelConfig(name="resnet18", small_input=small_input)
    model = build_model(cfg, in_channels=1, num_classes=10, image_size=image_size)
    assert model.conv1.kernel_size == (stem_kernel, stem_kernel)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10


def test_config_fields_reach_the_model():
    cfg = ModelConfig(
        name="dy_cifar_resnet20",
        shortcut="B",
        zero_init_residual=True,
        dropout=0.2,
        dynamic=DynamicConvConfig(num_kernels=2, reduction=8, temperature_start=10.0),
    )
    model = build_model(cfg, in_channels=3, num_classes=7)
    assert isinstance(model.layer2[0].downsample, nn.Sequential)  # option B projection
    assert (model.layer1[0].bn2.weight == 0).all()
    assert model.dropout.p == 0.2
    dy = [m for m in model.modules() if isinstance(m, DynamicConv2d)]
    assert dy and all(m.num_kernels == 2 and m.temperature == 10.0 for m in dy)
    assert model.layer3[0].conv2.attention.fc1.out_features == 64 // 8
    # The CIFAR-only shortcut option does not disturb ImageNet nets.
    assert build_model(ModelConfig(name="resnet18", shortcut="B"), in_channels=3, num_classes=5)


def test_describe_models_macs_match_torchvision_at_224():
    rows = {r["name"]: r for r in describe_models(names=list(IMAGENET_REFERENCE))}
    for name, ref in IMAGENET_REFERENCE.items():
        assert rows[name]["params"] == ref.params
        assert rows[name]["macs"] / 1e9 == pytest.approx(ref.gmacs, rel=0.02)
        assert rows[name]["family"] == "resnet"


def test_describe_models_counts_dynamic_conv_work():
    rows = {
        r["name"]: r for r in describe_models((1, 32, 32), 10, ["cifar_resnet20", "dy_resnet18"])
    }
    cifar = rows["cifar_resnet20"]
    assert cifar["params"] == pytest.approx(0.27e6, rel=0.02)
    assert cifar["macs"] == pytest.approx(40.8e6, rel=0.02)  # the commonly quoted 41M multiply-adds
    static = describe_models((1, 32, 32), 10, ["resnet18"])[0]
    assert rows["dy_resnet18"]["family"] == "dy_resnet"
    assert rows["dy_resnet18"]["macs"] > static["macs"]  # aggregation + attention are counted
    with pytest.raises(UnknownModelError):
        describe_models(names=["vgg16"])


def test_model_table():
    rows = describe_models((3, 32, 32), 10, ["cifar_resnet20", "cifar_resnet56"])
    table = model_table(rows)
    assert isinstance(table, Table) and table.row_count == 2
    console = Console(width=120, record=True)
    console.print(table)
    text = console.export_text()
    assert "cifar_resnet56" in text and "0.85" in text and "3x32x32" in text


TRAIN_INPUTS = [pytest.param((1, 8, 8), id="grey8"), pytest.param((3, 32, 32), id="rgb32")]


@pytest.mark.parametrize("input_size", TRAIN_INPUTS)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_trains_one_step(name, input_size):
    torch.manual_seed(0)
    c, h, w = input_size
    model = build_model(ModelConfig(name=name), in_channels=c, num_classes=10, image_size=h)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(2, c, h, w), torch.tensor([3, 7])
    before = model.fc.weight.detach().clone()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.fc.weight, before)
