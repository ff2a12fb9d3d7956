"""TrainState: one state_dict for everything a checkpoint holds, restored on any device."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.train.optim import BatchMixer, ModelEma, build_optimizer, build_scheduler
from pipeline.train.state import TrainState, read_checkpoint


def _state(device: str = "cpu", precision_fp16: bool = False, seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    with torch.device(device):
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    cfg = TrainConfig(epochs=2, lr=0.1, schedule="cosine")
    optimizer = build_optimizer(cfg, [{"params": list(model.parameters()), "weight_decay": 0.0}])
    return TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg, optimizer, steps_per_epoch=5),
        # An enabled scaler on the CPU stands in for fp16 on a GPU (torch supports both).
        scaler=torch.amp.GradScaler("cpu", enabled=precision_fp16),
        mixer=BatchMixer(0.2, 0.0, 3, seed=seed),
        ema=ModelEma(model, 0.9),
    )


def _train_a_step(state: TrainState) -> None:
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    x, target = state.mixer(x, y)
    loss = nn.functional.cross_entropy(state.model(x), target)
    state.optimizer.zero_grad()
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.ema.update(state.model)


def test_round_trip_restores_modules_progress_and_every_rng(tmp_path):
    saved = _state()
    _train_a_step(saved)
    saved.epoch, saved.history, saved.mlflow_run_id = 1, [{"epoch": 0, "val_acc": 0.5}], "abc"
    saved.save(tmp_path)
    draws = (torch.rand(3), np.random.rand(3), random.random(), saved.mixer.generator.random())

    restored = _state(seed=1)
    restored.load_state_dict(read_checkpoint(tmp_path))
    assert (restored.epoch, restored.history, restored.mlflow_run_id) == (1, saved.history, "abc")
    expected, got = saved.model.state_dict(), restored.model.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    momentum = saved.optimizer.state_dict()["state"]
    assert restored.optimizer.state_dict()["state"].keys() == momentum.keys()
    assert restored.scheduler.last_epoch == saved.scheduler.last_epoch == 1
    assert restored.ema.num_updates == 1
    again = (torch.rand(3), np.random.rand(3), random.random(), restored.mixer.generator.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1])
    assert draws[2:] == again[2:]


def test_a_worker_on_another_device_resumes_a_cpu_checkpoint(tmp_path):
    """On a GPU worker the checkpoint used to be read with map_location=<the worker's device>:
    the CPU RNG state landed on the GPU and torch.set_rng_state raised. "meta" stands in for
    the GPU here: the modules live there, and the RNG states must still come back on the CPU."""
    _state().save(tmp_path)
    on_meta = _state(device="meta")
    on_meta.load_state_dict(read_checkpoint(tmp_path))
    assert next(on_meta.model.parameters()).device.type == "meta"
    torch.rand(1)  # the CPU generator is intact


def test_fp16_resumes_from_a_checkpoint_written_without_it(tmp_path):
    """A disabled scaler saves an empty state, which an enabled one refused to load."""
    _state(precision_fp16=False).save(tmp_path)
    fp16 = _state(precision_fp16=True)
    fp16.load_state_dict(read_checkpoint(tmp_path))
    assert fp16.scaler.is_enabled() and fp16.scaler.get_scale() == 2.0**16


def test_checkpoint_holds_only_weights_only_types(tmp_path):
    state = _state()
    _train_a_step(state)
    path = state.save(tmp_path)
    torch.load(path, weights_only=True)  # raises on anything that would need unpickling code
    assert set(read_checkpoint(tmp_path)["rng"]) >= {"torch", "cuda", "numpy", "python", "mixer"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_state_is_saved_and_restored(tmp_path):
    torch.cuda.manual_seed_all(3)
    torch.zeros(1, device="cuda")
    state = _state()
    state.save(tmp_path)
    expected = torch.rand(4, device="cuda")
    state.load_state_dict(read_checkpoint(tmp_path))
    assert torch.equal(torch.rand(4, device="cuda"), expected)
