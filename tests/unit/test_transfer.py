"""Transfer learning: load a state dict or MLflow model, new head, frozen backbone, param groups."""

from __future__ import annotations

import pathlib

import pytest
import torch
import torchvision
from torch import nn

from pipeline.errors import ModelError
from pipeline.models import resnet
from pipeline.models.transfer import freeze_backbone, load_weights, parameter_groups, replace_head


@pytest.fixture
def pretrained(tmp_path):
    """A small-input resnet18 with 1000 classes, saved as a torchvision-format state dict."""
    torch.manual_seed(0)
    model = resnet.resnet18(small_input=True)
    path = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_load_into_new_head_then_freeze(pretrained):
    source, path = pretrained
    model = resnet.resnet18(small_input=True)
    replace_head(model, 10)
    assert model.fc.out_features == 10 and model.fc.in_features == 512

    report = load_weights(model, str(path))
    assert report.skipped_head == ["fc.weight", "fc.bias"]
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(source.state_dict()) - 2
    torch.testing.assert_close(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    torch.testing.assert_close(model.bn1.running_var, source.bn1.running_var)

    assert freeze_backbone(model) == len(list(model.parameters())) - 2
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    groups = parameter_groups(model, weight_decay=5e-4, backbone_lr_scale=0.1)
    assert [(g["name"], len(g["params"]), g["weight_decay"], g["lr_scale"]) for g in groups] == [
        ("head_decay", 1, 5e-4, 1.0),
        ("head_no_decay", 1, 0.0, 1.0),
    ]
    loss = model(torch.randn(2, 3, 16, 16)).sum()
    loss.backward()
    assert model.conv1.weight.grad is None and model.fc.weight.grad is not None


def test_other_shape_mismatch_is_refused_with_key_shapes_and_path(tmp_path):
    path = tmp_path / "imagenet_stem.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)  # 7x7 stem
    model = resnet.resnet18(small_input=True, num_classes=10)
    before = model.conv1.weight.clone()
    with pytest.raises(ValueError) as err:
        load_weights(model, str(path))
    message = str(err.value)
    assert "conv1.weight" in message and str(path) in message
    assert "(64, 3, 7, 7)" in message and "(64, 3, 3, 3)" in message
    assert torch.equal(model.conv1.weight, before)  # nothing half-loaded


def test_checkpoint_dict_and_reported_keys(tmp_path, pretrained):
    source, _ = pretrained
    state = source.state_dict()
    state.pop("layer1.0.bn1.running_mean")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "epoch": 3}, path)
    model = resnet.resnet18(small_input=True)
    report = load_weights(model, str(path))
    assert report.missing == ["layer1.0.bn1.running_mean"]
    assert report.unexpected == ["extra.weight"]
    assert report.skipped_head == []
    torch.testing.assert_close(model.fc.weight, source.fc.weight)
    assert "layer1.0.bn1.running_mean" in report.summary()


def test_torchvision_resnet_round_trip(tmp_path):
    path = tmp_path / "tv.pt"
    tv = torchvision.models.resnet50()
    torch.save(tv.state_dict(), path)
    model = resnet.resnet50(num_classes=5)
    report = load_weights(model, str(path))
    assert report.skipped_head == ["fc.weight", "fc.bias"] and not report.missing
    torch.testing.assert_close(model.layer3[2].conv2.weight, tv.layer3[2].conv2.weight)


def test_missing_file_and_wrong_architecture(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelError, match=str(missing)):
        load_weights(resnet.resnet18(), str(missing))
    path = tmp_path / "cifar.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="no tensor name matches"):
        load_weights(resnet.cifar_resnet20(), str(path))
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="not a state dict"):
        load_weights(resnet.cifar_resnet20(), str(path))


class _Payload:
    """Unpickling this writes a marker file: proof that something ran pickled code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "unpickled"))


@pytest.mark.slow
def test_mlflow_uri_loads_weights_only_never_the_pickle(tmp_path, monkeypatch):
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # A throwaway sqlite store, via the standard variable; the process-wide URI is restored after.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)  # another store's
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    marker = tmp_path / "marker"
    source = resnet.cifar_resnet20(in_channels=1)
    source.payload = _Payload(str(marker))  # rides along in the pickled model
    weights = tmp_path / "weights.pt"
    torch.save(resnet.cifar_resnet20(in_channels=1).state_dict(), weights)
    with mlflow.start_run() as run:
        mlflow.pytorch.log_model(
            source, name="model", serialization_format="pickle", extra_files=[str(weights)]
        )
    assert not marker.exists()
    model = resnet.cifar_resnet20(in_channels=1)
    report = load_weights(model, f"runs:/{run.info.run_id}/model")
    assert not marker.exists(), "load_weights unpickled the logged model"
    assert not report.missing and not report.skipped_head
    expected = torch.load(weights, weights_only=True)
    torch.testing.assert_close(model.layer3[2].conv2.weight, expected["layer3.2.conv2.weight"])
    with pytest.raises(ModelError, match="runs:/0123456789abcdef/model"):
        load_weights(model, "runs:/0123456789abcdef/model")
    with mlflow.start_run() as bare:  # an MLflow model the pipeline did not log: refused
        mlflow.pytorch.log_model(source, name="model", serialization_format="pickle")
    with pytest.raises(ModelError, match=r"no weights\.pt .* never unpickles"):
        load_weights(model, f"runs:/{bare.info.run_id}/model")
    assert not marker.exists()


def test_parameter_groups_exempt_norms_and_biases():
    model = resnet.dy_cifar_resnet20(dropout=0.1)
    groups = {g["name"]: g for g in parameter_groups(model, 1e-4, backbone_lr_scale=0.5)}
    assert set(groups) == {"backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["backbone_no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["backbone_decay"]["params"]}
    assert "bn1.weight" in no_decay and "layer1.0.conv1.bias" not in decay
    assert "layer1.0.conv1.bias" not in names.values()  # ResNet convs have no bias...
    assert "layer1.0.conv1.attention.fc1.bias" in no_decay  # ...but attention FCs do
    assert "layer1.0.conv1.weight" in decay and "conv1.weight" in decay
    assert groups["backbone_decay"]["lr_scale"] == 0.5 and groups["head_decay"]["lr_scale"] == 1.0
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))
    torch.optim.SGD(list(groups.values()), lr=0.1)  # a valid optimiser spec


def test_parameter_groups_treat_dynamic_biases_as_biases():
    from pipeline.models.dynamic_conv import DynamicConv2d

    model = nn.Sequential()
    model.add_module("conv", DynamicConv2d(4, 4, 3, bias=True))
    model.add_module("fc", nn.Linear(4, 2))
    groups = {g["name"]: g["params"] for g in parameter_groups(model, 0.1)}
    assert any(p is model.conv.bias for p in groups["backbone_no_decay"])  # (K, out) bias
    assert any(p is model.conv.weight for p in groups["backbone_decay"])


def test_replace_head_checks_arguments():
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        replace_head(resnet.resnet18(), 0)
    with pytest.raises(ValueError, match=r"model\.classifier is NoneType"):
        replace_head(resnet.resnet18(), 3, head_prefix="classifier")
