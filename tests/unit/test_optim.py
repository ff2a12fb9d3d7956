"""Optimizer, LR schedules, batch mixing, EMA, precision and clipping from pipeline.train.optim."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainConfig
from pipeline.train.optim import (
    BatchMixer,
    ModelEma,
    autocast_context,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    cutmix,
    cutmix_box,
    make_grad_scaler,
    mixed_loss,
    mixup,
    soft_target_loss,
)


def _default_groups(
    model: nn.Module, weight_decay: float, backbone_lr_scale: float = 1.0, head_prefix: str = "fc"
) -> list[dict]:
    """Stand-in for pipeline.models.transfer.parameter_groups: decay/no-decay x backbone/head."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        key = (name.startswith(head_prefix), p.ndim > 1)
        groups.setdefault(key, []).append(p)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": 1.0 if head else backbone_lr_scale,
        }
        for (head, decay), params in groups.items()
    ]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.body(x)))


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**kw)


def _lr_trace(optimizer, scheduler, steps: int) -> list[list[float]]:
    """The LR of every group used at each optimizer step, as the loop would see it."""
    trace = []
    for _ in range(steps):
        trace.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return trace


def _two_group_optimizer(cfg: TrainConfig) -> torch.optim.Optimizer:
    model = _Net()
    return build_optimizer(cfg, _default_groups(model, cfg.weight_decay, backbone_lr_scale=0.1))


# --- optimizer ---------------------------------------------------------------------------------


def test_sgd_groups_get_scaled_lr_and_their_own_weight_decay():
    cfg = _cfg(optimizer="sgd", lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt = build_optimizer(cfg, _default_groups(_Net(), cfg.weight_decay, backbone_lr_scale=0.1))
    assert isinstance(opt, torch.optim.SGD)
    by_role = {(g["lr_scale"], g["weight_decay"]): g for g in opt.param_groups}
    assert set(by_role) == {(1.0, 5e-4), (1.0, 0.0), (0.1, 5e-4), (0.1, 0.0)}
    for (scale, _), group in by_role.items():
        assert group["lr"] == pytest.approx(0.2 * scale)
        assert group["momentum"] == 0.9 and group["nesterov"] is True


def test_adamw_uses_configured_weight_decay_not_torch_default():
    cfg = _cfg(optimizer="adamw", lr=1e-3, weight_decay=0.05)
    params = list(_Net().parameters())
    opt = build_optimizer(cfg, [{"params": params}])  # no weight_decay key in the group
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.05
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_nesterov_is_dropped_without_momentum():
    cfg = _cfg(optimizer="sgd", momentum=0.0, nesterov=True)
    opt = build_optimizer(cfg, [{"params": list(_Net().parameters()), "weight_decay": 0.0}])
    assert opt.param_groups[0]["nesterov"] is False


def test_no_parameter_groups_is_a_clear_error():
    with pytest.raises(ValueError, match="no parameter groups"):
        build_optimizer(_cfg(), [])


# --- schedules ---------------------------------------------------------------------------------


def test_onecycle_peaks_per_group_after_a_quarter_by_default():
    cfg = _cfg(lr=0.2, schedule="onecycle", epochs=4, warmup_epochs=0)
    opt = _two_group_optimizer(cfg)
    trace = _lr_trace(opt, build_scheduler(cfg, opt, steps_per_epoch=10), 40)
    peaks = [max(step[i] for step in trace) for i in range(len(opt.param_groups))]
    assert sorted(set(round(p, 9) for p in peaks)) == [0.02, 0.2]  # lr * lr_scale per group
    head = [g["lr_scale"] for g in opt.param_groups].index(1.0)
    lrs = [step[head] for step in trace]
    assert lrs[0] == pytest.approx(0.2 / 25)  # torch's div_factor
    assert lrs.index(max(lrs)) == 9  # 0.25 * 40 steps - 1
    assert lrs[-1] < 0.2 / 25 / 1000  # anneals to ~max_lr / 25 / 1e4
    assert opt.param_groups[head]["momentum"] == 0.9  # momentum is not cycled


def test_onecycle_rise_follows_warmup_epochs():
    cfg = _cfg(lr=0.1, schedule="onecycle", epochs=4, warmup_epochs=2)
    opt = build_optimizer(cfg, [{"params": list(_Net().parameters()), "weight_decay": 0.0}])
    lrs = [s[0] for s in _lr_trace(opt, build_scheduler(cfg, opt, steps_per_epoch=10), 40)]
    assert lrs.index(max(lrs)) == 19
    assert max(lrs) == pytest.approx(0.1)


def test_cosine_warms_up_linearly_then_decays_to_zero_keeping_group_scale():
    cfg = _cfg(lr=0.2, schedule="cosine", epochs=4, warmup_epochs=1)
    opt = _two_group_optimizer(cfg)
    trace = _lr_trace(opt, build_scheduler(cfg, opt, steps_per_epoch=10), 40)
    head = [g["lr_scale"] for g in opt.param_groups].index(1.0)
    backbone = [g["lr_scale"] for g in opt.param_groups].index(0.1)
    lrs = [step[head] for step in trace]
    assert lrs[0] == pytest.approx(0.02)  # (0 + 1) / 10 of the peak
    assert lrs[4] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(0.2) and lrs[10] == pytest.approx(0.2)
    assert lrs[25] == pytest.approx(0.1)  # halfway through the 30 decay steps
    assert lrs[39] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 29 / 30)))
    for step in trace:
        assert step[backbone] == pytest.approx(0.1 * step[head])


def test_step_schedule_multiplies_by_gamma_every_step_size_epochs():
    cfg = _cfg(lr=0.1, schedule="step", epochs=6, step_size=2, gamma=0.1)
    opt = build_optimizer(cfg, [{"params": list(_Net().parameters()), "weight_decay": 0.0}])
    lrs = [s[0] for s in _lr_trace(opt, build_scheduler(cfg, opt, steps_per_epoch=5), 30)]
    assert lrs[0] == lrs[9] == pytest.approx(0.1)
    assert lrs[10] == lrs[19] == pytest.approx(0.01)
    assert lrs[20] == lrs[29] == pytest.approx(0.001)


def test_constant_schedule_with_and_without_warmup():
    cfg = _cfg(lr=0.05, schedule="constant", epochs=3, warmup_epochs=0.5)
    opt = build_optimizer(cfg, [{"params": list(_Net().parameters()), "weight_decay": 0.0}])
    lrs = [s[0] for s in _lr_trace(opt, build_scheduler(cfg, opt, steps_per_epoch=10), 30)]
    assert lrs[:6] == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05, 0.05])
    assert lrs[-1] == pytest.approx(0.05)
    cfg = _cfg(lr=0.05, schedule="constant", epochs=3)
    opt = build_optimizer(cfg, [{"params": list(_Net().parameters()), "weight_decay": 0.0}])
    lrs = [s[0] for s in _lr_trace(opt, build_scheduler(cfg, opt, steps_per_epoch=10), 30)]
    assert lrs == pytest.approx([0.05] * 30)


def test_warmup_longer_than_training_names_the_fields():
    cfg = _cfg(schedule="cosine", epochs=2, warmup_epochs=2)
    opt = build_optimizer(cfg, [{"params": list(_Net().parameters()), "weight_decay": 0.0}])
    with pytest.raises(ValueError, match=r"train\.warmup_epochs .* train\.epochs"):
        build_scheduler(cfg, opt, steps_per_epoch=10)


# --- batch mixing ------------------------------------------------------------------------------


class _RecordingRng:
    """A numpy Generator that remembers every Beta draw and its parameters."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.betas: list[tuple[float, float, float]] = []

    def beta(self, a: float, b: float) -> float:
        value = self.rng.beta(a, b)
        self.betas.append((a, b, value))
        return value

    def __getattr__(self, name: str):
        return getattr(self.rng, name)


def _labelled_batch(n: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i is an image filled with the value i and has label i."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).clone()
    return x, torch.eye(n)


def test_mixup_blends_pixels_and_targets_with_the_same_lambda():
    x, y = _labelled_batch()
    rng = _RecordingRng(0)
    for _ in range(20):
        mixed, soft = mixup(x, y, alpha=0.4, generator=rng)
        expected = soft @ torch.arange(4, dtype=torch.float32)  # sum_c weight_c * c
        assert torch.allclose(mixed[:, 0, 0, 0], expected, atol=1e-6)
        assert torch.allclose(soft.sum(dim=1), torch.ones(4))
    assert all(a == b == 0.4 for a, b, _ in rng.betas)


def test_cutmix_targets_match_the_pasted_area_exactly():
    x, y = _labelled_batch(size=16)
    rng = _RecordingRng(1)
    for _ in range(200):
        mixed, soft = cutmix(x, y, alpha=1.0, generator=rng)
        lam_raw = rng.betas[-1][2]
        for c in range(4):  # the share of pixels showing sample c == the target weight of c
            share = (mixed[:, 0] == c).float().mean(dim=(1, 2))
            assert torch.allclose(soft[:, c], share, atol=1e-6)
        own = soft.diagonal()
        # Clipping and integer box sizes only ever shrink the box: corrected lambda >= drawn.
        assert bool((own >= lam_raw - 1e-6).all())


def test_cutmix_alpha_reaches_the_beta_distribution():
    x, y = _labelled_batch(n=2, size=8)
    for alpha, variance in ((1.0, 1 / 12), (0.2, 1 / (4 * 1.4))):  # Var Beta(a,a) = 1/(4(2a+1))
        rng = _RecordingRng(2)
        for _ in range(4000):
            cutmix(x, y, alpha=alpha, generator=rng)
        assert all(a == b == alpha for a, b, _ in rng.betas)
        lams = np.array([v for _, _, v in rng.betas])
        assert lams.mean() == pytest.approx(0.5, abs=0.02)
        assert lams.var() == pytest.approx(variance, abs=0.01)


def test_cutmix_box_is_inside_the_image_and_sized_by_lambda():
    rng = np.random.default_rng(3)
    for lam in (0.0, 0.3, 0.75, 1.0):
        for _ in range(50):
            top, bottom, left, right = cutmix_box(32, 24, lam, rng)
            assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 24
            assert (bottom - top) * (right - left) <= (1 - lam) * 32 * 24 + 1e-9


def test_batch_mixer_is_identity_with_hard_labels_when_off():
    mixer = BatchMixer(0.0, 0.0, num_classes=10, seed=0)
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 10, (8,))
    out_x, out_y = mixer(x, y)
    assert out_x is x and out_y is y and out_y.dtype == torch.int64


def test_batch_mixer_picks_each_method_half_the_time_with_its_own_alpha():
    mixer = BatchMixer(mixup_alpha=0.2, cutmix_alpha=1.0, num_classes=5, seed=0)
    mixer.generator = rng = _RecordingRng(4)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    for _ in range(400):
        _, soft = mixer(x, y)
        assert soft.shape == (6, 5) and torch.allclose(soft.sum(dim=1), torch.ones(6))
    alphas = [a for a, _, _ in rng.betas]
    assert set(alphas) == {0.2, 1.0}
    assert alphas.count(1.0) / len(alphas) == pytest.approx(0.5, abs=0.08)


def test_batch_mixer_with_one_alpha_always_uses_that_method():
    mixer = BatchMixer(mixup_alpha=0.0, cutmix_alpha=0.5, num_classes=3, seed=0)
    mixer.generator = rng = _RecordingRng(5)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    for _ in range(30):
        mixer(x, y)
    assert {a for a, _, _ in rng.betas} == {0.5}


def test_same_seed_mixes_the_same_way():
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    a = BatchMixer(0.4, 1.0, num_classes=4, seed=7)
    b = BatchMixer(0.4, 1.0, num_classes=4, seed=7)
    for _ in range(5):
        (xa, ya), (xb, yb) = a(x, y), b(x, y)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_is_the_same_for_hard_and_soft_targets(smoothing):
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 7), torch.randint(0, 7, (16,))
    hard = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    soft = soft_target_loss(logits, F.one_hot(labels, 7).float(), smoothing)
    assert soft.item() == pytest.approx(hard.item(), rel=1e-5)
    assert mixed_loss(logits, labels, smoothing).item() == pytest.approx(hard.item(), rel=1e-6)
    probs = torch.softmax(torch.randn(16, 7), dim=1)
    torch_soft = F.cross_entropy(logits, probs, label_smoothing=smoothing)
    assert mixed_loss(logits, probs, smoothing).item() == pytest.approx(torch_soft.item(), rel=1e-5)


# --- EMA ---------------------------------------------------------------------------------------


def test_ema_averages_weights_and_copies_buffers():
    model = _Net()
    ema = ModelEma(model, decay=0.9)
    before = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(8, 4))  # moves the BatchNorm running statistics
    ema.update(model)
    for old, new in zip(before, ema.module.parameters(), strict=True):
        assert torch.allclose(new, old + 0.1, atol=1e-6)  # 0.9 * old + 0.1 * (old + 1)
    assert torch.equal(ema.module.norm.running_mean, model.norm.running_mean)
    assert int(ema.module.norm.num_batches_tracked) == 1
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert ema.num_updates == 1


def test_ema_state_dict_round_trip():
    model = _Net()
    ema = ModelEma(model, decay=0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    ema.update(model)
    restored = ModelEma(_Net(), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.99 and restored.num_updates == 1
    expected, got = ema.module.state_dict(), restored.module.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_ema_unwraps_ddp(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(_Net())
        ema = ModelEma(ddp, decay=0.5)
        assert isinstance(ema.module, _Net)
        with torch.no_grad():
            ddp.module.fc.bias.fill_(4.0)
        start = ema.module.fc.bias.clone()
        ema.update(ddp)
        assert torch.allclose(ema.module.fc.bias, 0.5 * start + 2.0)
        assert set(ema.state_dict()["module"]) == set(_Net().state_dict())  # no "module." prefix
    finally:
        dist.destroy_process_group()


def test_ema_rejects_a_decay_outside_zero_one():
    with pytest.raises(ValueError, match="ema_decay"):
        ModelEma(_Net(), decay=1.0)


# --- precision and clipping --------------------------------------------------------------------


def test_autocast_contexts():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32
    with autocast_context("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast_context("fp16", "cpu")


def test_grad_scaler_only_for_fp16_on_cuda():
    assert not make_grad_scaler("fp16", "cpu").is_enabled()
    assert not make_grad_scaler("bf16", "cpu").is_enabled()
    assert not make_grad_scaler("fp32", "cuda").is_enabled()


def test_clip_gradients_returns_the_norm_and_clips():
    model = nn.Linear(3, 1, bias=False)
    model.weight.grad = torch.tensor([[3.0, 4.0, 0.0]])
    assert clip_gradients(model, None) is None
    assert torch.allclose(model.weight.grad, torch.tensor([[3.0, 4.0, 0.0]]))
    norm = clip_gradients(model, 1.0)
    assert float(norm) == pytest.approx(5.0)
    assert float(model.weight.grad.norm()) == pytest.approx(1.0, rel=1e-4)


# --- GPU-facing details --------------------------------------------------------------------------


def test_soft_target_loss_is_float32_under_bf16_autocast():
    """MixUp targets such as 1/3 and the log-probabilities must not be rounded to bf16."""
    torch.manual_seed(0)
    logits = torch.randn(64, 10) * 3
    targets = torch.full((64, 10), 0.0)
    targets[:, 0], targets[:, 1] = 1 / 3, 2 / 3
    exact = soft_target_loss(logits, targets, label_smoothing=0.1)
    got = soft_target_loss(logits.to(torch.bfloat16), targets, label_smoothing=0.1)
    assert got.dtype == torch.float32
    # bf16 logits themselves carry ~3 digits; everything after them must be float32.
    ref = soft_target_loss(logits.to(torch.bfloat16).float(), targets, label_smoothing=0.1)
    assert float(got) == pytest.approx(float(ref), rel=1e-6)
    assert float(got) == pytest.approx(float(exact), rel=1e-2)


class _CountTorchCalls(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _ema_calls(depth: int) -> list[str]:
    model = nn.Sequential(
        *[nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)) for _ in range(depth)]
    )
    ema = ModelEma(model, 0.9)
    ema.update(model)
    with _CountTorchCalls() as counter:
        ema.update(model)
    return counter.calls


def test_ema_update_is_a_few_fused_calls_whatever_the_depth():
    """Per-tensor Python loops launch two kernels per parameter each step on a GPU."""
    shallow, deep = _ema_calls(2), _ema_calls(20)
    assert len(shallow) == len(deep) <= 4, deep[:10]
