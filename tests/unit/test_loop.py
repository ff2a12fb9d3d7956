"""Worker-side pieces of the training loop that need no Ray cluster: device set-up, the model a
worker trains, the process group's settings, the workers' placement, and what travels to the
workers."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.data.shards import Manifest
from pipeline.errors import ConfigError
from pipeline.train.callbacks import KillWorkerOnce, StepInfo
from pipeline.train.entry import DatasetHandle, LoopConfig
from pipeline.train.loop import configure_device, worker_model
from pipeline.train.trainer import data_config, scaling_config, torch_config


@pytest.fixture
def manifest(digits_uri) -> Manifest:
    from pipeline.data.shards import read_manifest

    return read_manifest(digits_uri)


def test_cudnn_benchmark_is_set_for_cuda_workers_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_device(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    configure_device(torch.device("cuda", 0))  # a flag: setting it needs no GPU
    assert torch.backends.cudnn.benchmark is True


def test_sync_bn_converts_batchnorm_when_there_are_several_workers(manifest):
    cfg = load_config(None, ["scaling.use_gpu=true", "train.sync_bn=true"])
    kinds = {type(m) for m in worker_model(cfg, manifest, world=2).modules()}
    assert nn.SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds
    alone = {type(m) for m in worker_model(cfg, manifest, world=1).modules()}
    assert nn.BatchNorm2d in alone and nn.SyncBatchNorm not in alone
    plain = load_config(None, ["scaling.use_gpu=true"])
    assert nn.SyncBatchNorm not in {type(m) for m in worker_model(plain, manifest, 2).modules()}


def test_process_group_backend_and_timeout_reach_ray():
    gpu = torch_config(load_config(None, ["scaling.use_gpu=true", "scaling.timeout_s=120"]))
    assert (gpu.backend, gpu.timeout_s) == ("nccl", 120)
    cpu = torch_config(load_config())
    assert (cpu.backend, cpu.timeout_s) == ("gloo", 1800)


def test_workers_and_their_placement_reach_ray():
    default = scaling_config(load_config())
    assert (default.num_workers, default.placement_strategy) == (2, "PACK")
    assert default.resources_per_worker == {"CPU": 1.0}
    spread = scaling_config(
        load_config(None, ["scaling.placement_strategy=SPREAD", "scaling.cpus_per_worker=2"])
    )
    assert spread.placement_strategy == "SPREAD" and spread.resources_per_worker == {"CPU": 2.0}
    assert spread.as_placement_group_factory().strategy == "SPREAD"  # what Ray reserves
    with pytest.raises(ConfigError, match=r"scaling\.placement_strategy: Input should be 'PACK'"):
        load_config(None, ["scaling.placement_strategy=spread"])


def test_only_several_workers_split_the_datasets():
    """One worker reads each dataset whole: splitting would start a SplitCoordinator actor per
    dataset for nothing (a process of ~3 CPU-s each)."""
    one = data_config(load_config(None, ["scaling.num_workers=1"]))
    assert one._datasets_to_split == []
    two = data_config(load_config(None, ["scaling.num_workers=2"]))
    assert two._datasets_to_split == "all"


def test_loop_config_pickles_with_its_dataset_handle_and_callbacks(manifest, digits_uri, tmp_path):
    handle = DatasetHandle.resolve(digits_uri, manifest)
    loop = LoopConfig(
        config=load_config(),
        dataset=handle,
        callbacks=[KillWorkerOnce(epoch=1, marker=str(tmp_path / "m"))],
    )
    again = pickle.loads(pickle.dumps(loop))
    assert again.config == loop.config and again.manifest == manifest
    assert again.dataset.split_paths("train") == handle.split_paths("train")
    assert all(p.startswith(handle.root.path) for p in handle.split_paths("train"))
    assert again.callbacks == loop.callbacks


def test_kill_worker_once_targets_the_last_rank_halfway_through_its_epoch(tmp_path, monkeypatch):
    exits = []
    monkeypatch.setattr("os._exit", exits.append)
    kill = KillWorkerOnce(epoch=1, marker=str(tmp_path / "killed"))
    for info in (StepInfo(0, 5, 10, 1, 2), StepInfo(1, 4, 10, 1, 2), StepInfo(1, 5, 10, 0, 2)):
        kill.on_step(info)
    assert exits == []
    kill.on_step(StepInfo(1, 5, 10, 1, 2))
    assert exits == [137] and (tmp_path / "killed").exists()
    kill.on_step(StepInfo(1, 5, 10, 1, 2))  # once per run: the marker remembers
    assert exits == [137]


def test_loop_config_unpickles_without_torch_or_mlflow(manifest, digits_uri, tmp_path):
    """Train V2's controller unpickles the LoopConfig with the trainer and never runs the loop:
    torch and MLflow there would cost seconds on the way to the first step."""
    import subprocess
    import sys

    import ray.cloudpickle as cloudpickle

    loop = LoopConfig(
        config=load_config(),
        dataset=DatasetHandle.resolve(digits_uri, manifest),
        callbacks=[KillWorkerOnce(epoch=0, marker=str(tmp_path / "m"))],
    )
    blob = tmp_path / "loop.pkl"
    blob.write_bytes(cloudpickle.dumps(loop))
    probe = (
        f"import ray.cloudpickle as c, sys; c.loads(open({str(blob)!r}, 'rb').read()); "
        "print(' '.join(m for m in ('torch', 'torchvision', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


@pytest.mark.parametrize("upload", ["sync", "async"])
def test_checkpoint_directory_outlives_report_only_for_async_upload(upload, monkeypatch):
    """Ray uploads an async checkpoint after `report` returns, then deletes it: the directory
    must still be there when report returns; a sync one is uploaded inside report and removed."""
    import ray.train

    from pipeline.train.loop import _report
    from pipeline.train.optim import BatchMixer, build_optimizer, build_scheduler
    from pipeline.train.state import CHECKPOINT_FILE, TrainState

    cfg = load_config(None, ["train.epochs=1", "train.schedule=constant"]).train
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(cfg, [{"params": list(model.parameters()), "weight_decay": 0}])
    state = TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg, optimizer, 1),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        mixer=BatchMixer(0.0, 0.0, 2),
        epoch=3,
    )
    calls = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: calls.append(kw))
    _report({"epoch": 2, "val_acc": 0.5}, state, is_rank0=False, upload=upload)
    _report({"epoch": 2, "val_acc": 0.5}, state, is_rank0=True, upload=upload)
    other, rank0 = calls
    assert other["checkpoint"] is None and rank0["checkpoint_dir_name"] == "epoch-0003"
    written = Path(rank0["checkpoint"].path)
    if upload == "async":
        mode = ray.train.CheckpointUploadMode.ASYNC
        assert other["checkpoint_upload_mode"] == rank0["checkpoint_upload_mode"] == mode
        assert rank0["delete_local_checkpoint_after_upload"] is True
        assert (written / CHECKPOINT_FILE).is_file()  # Ray deletes it after the upload
        shutil.rmtree(written)
    else:
        assert "checkpoint_upload_mode" not in rank0  # Ray's default: SYNC
        assert not written.exists()
