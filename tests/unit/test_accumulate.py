"""Gradient accumulation (`train.accumulate_steps`): k micro-batches then one optimizer step make
the same update as one step on their union, in one process and under DDP, where every
micro-batch but a group's last skips the gradient all-reduce (`no_sync`)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pipeline.config import TrainConfig, load_config
from pipeline.errors import ConfigError
from pipeline.models.transfer import parameter_groups
from pipeline.train.callbacks import LoopHooks
from pipeline.train.loop import StepOptions, _Hooks, steps_per_epoch, train_one_epoch
from pipeline.train.optim import BatchMixer, ModelEma, build_optimizer, build_scheduler
from pipeline.train.state import TrainState

CLASSES = 3
ATOL = 1e-6


def tiny_net() -> nn.Module:
    """A conv net without BatchNorm: its update depends on the batch only through the loss."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, CLASSES))


def samples(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def batches_of(x: torch.Tensor, y: torch.Tensor, size: int) -> list[dict[str, torch.Tensor]]:
    return [{"image": x[i : i + size], "label": y[i : i + size]} for i in range(0, len(x), size)]


def train_cfg(optimizer: str) -> TrainConfig:
    lr = 0.1 if optimizer == "sgd" else 0.01
    return TrainConfig(
        epochs=1,
        optimizer=optimizer,
        lr=lr,
        momentum=0.9,
        weight_decay=0.05,
        schedule="onecycle",  # the LR changes every step: the schedule must count steps
        label_smoothing=0.1,
        ema_decay=0.5,
        grad_clip=None,
        channels_last=False,
    )


def make_state(model: nn.Module, cfg: TrainConfig, steps: int, scaler=None) -> TrainState:
    optimizer = build_optimizer(cfg, parameter_groups(model, cfg.weight_decay, 1.0))
    return TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg, optimizer, steps),
        scaler=scaler or torch.amp.GradScaler("cpu", enabled=False),
        mixer=BatchMixer(0.0, 0.0, CLASSES),
        ema=ModelEma(model, cfg.ema_decay),
    )


def run_epoch(batches, steps: int, accumulate: int, cfg: TrainConfig, model=None, **state_kw):
    model = model if model is not None else tiny_net()
    state = make_state(model, cfg, steps, **state_kw)
    opts = StepOptions(
        device=torch.device("cpu"),
        num_classes=CLASSES,
        steps=steps,
        label_smoothing=cfg.label_smoothing,
        accumulate_steps=accumulate,
        batches=len(batches),
    )
    seen = _StepLog()
    train_one_epoch(state, state.model, batches, opts, epoch=0, hooks=_Hooks([seen], 0, 1))
    return state, seen


class _StepLog(LoopHooks):
    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []

    def on_step(self, info) -> None:
        self.steps.append((info.step, info.steps))


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_two_micro_batches_of_4_make_the_update_of_one_batch_of_8(optimizer):
    cfg = train_cfg(optimizer)
    x, y = samples(16)
    large, large_log = run_epoch(batches_of(x, y, 8), steps=2, accumulate=1, cfg=cfg)
    accum, accum_log = run_epoch(batches_of(x, y, 4), steps=2, accumulate=2, cfg=cfg)
    assert_same_params(accum.model, large.model)
    assert_same_params(accum.ema.module, large.ema.module)
    # Schedule, EMA and the hooks follow optimizer steps, not micro-batches.
    assert accum.scheduler.last_epoch == large.scheduler.last_epoch == 2
    assert accum.ema.num_updates == 2
    assert accum_log.steps == large_log.steps == [(0, 2), (1, 2)]
    assert accum.optimizer.param_groups[0]["lr"] == large.optimizer.param_groups[0]["lr"]


def test_a_remainder_group_steps_at_the_epoch_end_with_its_own_mean():
    """5 micro-batches of 4, accumulate 2: steps over 8, 8 and then 4 samples."""
    cfg = train_cfg("sgd")
    x, y = samples(20)
    reference = [*batches_of(x[:16], y[:16], 8), *batches_of(x[16:], y[16:], 4)]
    large, _ = run_epoch(reference, steps=3, accumulate=1, cfg=cfg)
    accum, log = run_epoch(batches_of(x, y, 4), steps=3, accumulate=2, cfg=cfg)
    assert_same_params(accum.model, large.model)
    assert accum.scheduler.last_epoch == 3 and accum.ema.num_updates == 3
    assert [s for s, _ in log.steps] == [0, 1, 2]


def test_grad_scaler_scales_every_micro_loss_and_updates_once_per_step():
    """An enabled scaler (CPU, powers of two: exact) gives the unscaled update, and its scale
    grows once per optimizer step (growth_interval=1), not once per micro-batch."""
    cfg = train_cfg("sgd")
    x, y = samples(16)
    plain, _ = run_epoch(batches_of(x, y, 4), steps=2, accumulate=2, cfg=cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    scaled, _ = run_epoch(batches_of(x, y, 4), steps=2, accumulate=2, cfg=cfg, scaler=scaler)
    assert_same_params(scaled.model, plain.model)
    assert scaler.get_scale() == 2.0**12


def test_steps_per_epoch_counts_optimizer_steps_with_a_remainder():
    manifest = SimpleNamespace(split=lambda name: SimpleNamespace(rows=200))
    cfg = load_config(None, ["train.batch_size=20", "scaling.num_workers=2"])
    assert steps_per_epoch(cfg, manifest) == 10  # 100 rows per worker, batches of 10
    cfg = load_config(None, ["train.batch_size=20", "train.accumulate_steps=3"])
    assert steps_per_epoch(cfg, manifest) == 4  # 10 micro-batches: 3 + 3 + 3 + 1


def test_accumulate_steps_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train\.accumulate_steps"):
        load_config(None, ["train.accumulate_steps=0"])


# ----------------------------------------------------------------------------------------------
# DDP: two gloo processes on this machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = samples(16)
        # Rank r's micro-batches of 2: group g holds samples 8g..8g+7, rank r their 4r..4r+3.
        mine = [
            {"image": x[s : s + 2], "label": y[s : s + 2]}
            for g in range(2)
            for s in (8 * g + 4 * rank, 8 * g + 4 * rank + 2)
        ]
        model = nn.parallel.DistributedDataParallel(tiny_net())
        allreduces: list[int] = []

        def counting_hook(_, bucket):
            allreduces.append(bucket.index())
            fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0] / world)

        model.register_comm_hook(None, counting_hook)
        run_epoch(mine, steps=2, accumulate=2, cfg=train_cfg("sgd"), model=model)
        params = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        torch.save({"params": params, "allreduces": len(allreduces)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduces_once_per_step_and_matches_the_large_batch(tmp_path):
    """2 ranks x micro-batches of 2 x accumulate 2 = one step per 8 samples: the gradient is
    all-reduced only on each group's last micro-batch (2 all-reduces for 4 micro-batches; the
    tiny net fits one bucket), and both ranks end with the single-process batch-8 weights."""
    mp.start_processes(
        _ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    x, y = samples(16)
    large, _ = run_epoch(batches_of(x, y, 8), steps=2, accumulate=1, cfg=train_cfg("sgd"))
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert saved["allreduces"] == 2
        for name, p in large.model.state_dict().items():
            torch.testing.assert_close(saved["params"][name], p, atol=ATOL, rtol=0, msg=name)
