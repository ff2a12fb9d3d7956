"""How `log_pipeline_model` logs a network: torch.export's pt2 format where the network exports,
MLflow's pickle format with a warning where it does not, and weights.pt + pipeline_model.json in
both (what the pipeline itself loads, weights-only)."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.shards import read_manifest
from pipeline.model_package import log_pipeline_model, rebuild
from pipeline.models.zoo import build_model
from pipeline.registry.versions import logged_model_uri


class DataDependent(torch.nn.Module):
    """A branch on a tensor's value: torch.export cannot trace it with a dynamic batch."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        return out if out.sum() > 0 else -out


@pytest.fixture
def logged(tmp_path, digits_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_config(None, [f"data.uri={digits_uri}", "model.name=cifar_resnet20"])
    manifest = read_manifest(digits_uri)
    experiment = mlflow.create_experiment("package", artifact_location=str(tmp_path / "art"))

    def log(model: torch.nn.Module):
        with mlflow.start_run(experiment_id=experiment) as run:
            log_pipeline_model(model, cfg, manifest)
        # what registration resolves: the run's READY model of that name
        client = mlflow.MlflowClient()
        uri = logged_model_uri(client, client.get_run(run.info.run_id), "model")
        local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl"))
        return Path(local), {p.name for p in Path(local).rglob("*") if p.is_file()}

    def net():
        return build_model(cfg.model, in_channels=1, num_classes=10, image_size=8).eval()

    return log, net


def test_an_exportable_network_is_logged_in_pt2(logged, caplog):
    log, net = logged
    with caplog.at_level(logging.WARNING, logger="pipeline.model_package"):
        local, files = log(net())
    assert "model.pt2" in files and "model.pth" not in files  # torch.export's program
    assert "pickle format" not in caplog.text
    model, meta = rebuild(local)
    assert meta["num_classes"] == 10 and model.training is False


def test_a_network_torch_export_refuses_falls_back_to_pickle_with_a_warning(logged, caplog):
    log, net = logged
    model = DataDependent(net())
    with caplog.at_level(logging.WARNING, logger="pipeline.model_package"):
        local, files = log(model)
    assert "model.pth" in files and "model.pt2" not in files  # MLflow's pickle
    assert "torch.export could not export DataDependent" in caplog.text
    # The pipeline's own files are there either way: weights load weights-only.
    state = torch.load(next(local.rglob("weights.pt")), weights_only=True)
    assert state.keys() == model.state_dict().keys()
