"""DynamicConv2d: equals a static conv at K=1 and a per-sample reference; trains every kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.dynamic_conv import DynamicConv2d, set_temperature, temperature_at
from pipeline.models.zoo import count_macs

ALGORITHMS = ["aggregate", "mix", "auto"]
# (in, out, kernel, stride, padding, dilation, groups, bias)
GEOMETRIES = [
    pytest.param((6, 8, 3, 1, 1, 1, 1, True), id="3x3"),
    pytest.param((6, 8, 3, 2, 1, 1, 1, False), id="3x3-stride2-nobias"),
    pytest.param((6, 9, 3, 1, 2, 2, 3, True), id="groups3-dilation2"),
    pytest.param((4, 4, 1, 1, 0, 1, 1, False), id="1x1"),
    pytest.param((4, 6, (3, 1), (2, 1), (1, 0), 1, 2, True), id="3x1-groups2"),
]


def make_layer(geometry, algorithm: str, num_kernels: int = 3) -> DynamicConv2d:
    cin, cout, k, s, p, d, g, bias = geometry
    layer = DynamicConv2d(
        cin, cout, k, s, p, d, g, bias, num_kernels=num_kernels, algorithm=algorithm
    )
    layer.temperature = 1.0
    nn.init.normal_(layer.attention.fc2.weight, std=1.0)  # clearly non-uniform attention
    if layer.bias is not None:
        nn.init.normal_(layer.bias)
    return layer


def per_sample_reference(layer: DynamicConv2d, x: torch.Tensor) -> torch.Tensor:
    """The definition: for each sample, mix the kernels with its attention and convolve."""
    attn = layer.kernel_attention(x)
    outs = []
    for i in range(x.shape[0]):
        weight = torch.einsum("k,koihw->oihw", attn[i], layer.kernels)
        bias = attn[i] @ layer.bias if layer.bias is not None else None
        outs.append(
            F.conv2d(
                x[i : i + 1],
                weight,
                bias,
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups,
            )
        )
    return torch.cat(outs)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_one_kernel_equals_static_conv(geometry, algorithm):
    cin, cout, k, s, p, d, g, bias = geometry
    torch.manual_seed(0)
    static = nn.Conv2d(cin, cout, k, s, p, d, g, bias)
    dynamic = DynamicConv2d(cin, cout, k, s, p, d, g, bias, num_kernels=1, algorithm=algorithm)
    with torch.no_grad():
        dynamic.weight.copy_(static.weight)
        if bias:
            dynamic.bias.copy_(static.bias[None])
    x = torch.randn(3, cin, 7, 8)
    torch.testing.assert_close(dynamic(x), static(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_batched_equals_per_sample_reference(geometry, algorithm, channels_last):
    torch.manual_seed(1)
    layer = make_layer(geometry, algorithm)
    x = torch.randn(4, geometry[0], 9, 7)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = layer(x)
    torch.testing.assert_close(y, per_sample_reference(layer, x), atol=1e-5, rtol=0)
    if channels_last:  # the output stays in the input's memory format
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("algorithm", ["aggregate", "mix"])
def test_algorithms_agree_in_gradients(algorithm):
    torch.manual_seed(2)
    geometry = (6, 8, 3, 1, 1, 1, 2, True)
    layer = make_layer(geometry, algorithm)
    x = torch.randn(3, 6, 6, 6, requires_grad=True)
    layer(x).square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    ref = per_sample_reference(layer, x)
    ref.square().sum().backward()
    for got, want in zip(grads, [x.grad] + [p.grad for p in layer.parameters()], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("algorithm", ["aggregate", "mix"])
def test_every_kernel_receives_gradient(algorithm):
    torch.manual_seed(3)
    layer = make_layer((4, 6, 3, 1, 1, 1, 1, True), algorithm, num_kernels=4)
    layer.temperature = 30.0  # the paper's starting temperature: near-uniform attention
    layer(torch.randn(2, 4, 5, 5)).sum().backward()
    per_kernel = layer.weight.grad.unflatten(0, (4, 6)).flatten(1).abs().sum(dim=1)
    assert (per_kernel > 0).all(), per_kernel
    assert (layer.bias.grad.abs().sum(dim=1) > 0).all()
    assert layer.attention.fc1.weight.grad.abs().sum() > 0


def test_auto_mixes_outputs_on_small_maps_with_big_kernels():
    big = DynamicConv2d(256, 256, 3, padding=1, bias=False, num_kernels=4)
    small = DynamicConv2d(16, 16, 3, padding=1, bias=False, num_kernels=4)
    assert big._mix_is_cheaper(torch.empty(1, 256, 7, 7))
    assert not big._mix_is_cheaper(torch.empty(1, 256, 14, 14))
    assert not small._mix_is_cheaper(torch.empty(1, 16, 8, 8))
    assert small._mix_is_cheaper(torch.empty(1, 16, 4, 4))


def test_flop_counter_sees_aggregation_and_grouped_conv():
    layer = DynamicConv2d(8, 16, 3, padding=1, bias=False, num_kernels=4, algorithm="aggregate")
    hidden = layer.attention.fc1.out_features
    conv = 16 * 8 * 9 * 10 * 10  # per-sample conv at 10x10
    aggregation = 4 * 16 * 8 * 9  # (1, K) @ (K, out*in*kh*kw)
    attention = 8 * hidden + hidden * 4
    assert count_macs(layer, (8, 10, 10)) == conv + aggregation + attention
    layer.algorithm = "mix"
    assert count_macs(layer, (8, 10, 10)) == 4 * conv + 4 * 16 * 10 * 10 + attention


def test_channels_last_model_conversion_keeps_values():
    torch.manual_seed(4)
    layer = make_layer((4, 8, 3, 1, 1, 1, 1, True), "auto")
    x = torch.randn(2, 4, 6, 6)
    before = layer(x)
    layer = layer.to(memory_format=torch.channels_last)
    after = layer(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="groups=4 must divide in_channels=6"):
        DynamicConv2d(6, 8, 3, groups=4)
    with pytest.raises(ValueError, match="num_kernels"):
        DynamicConv2d(4, 4, 3, num_kernels=0)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        DynamicConv2d(4, 4, 3, algorithm="fast")  # type: ignore[arg-type]


def test_temperature_schedule_is_linear_then_flat():
    assert temperature_at(0) == 30.0
    assert temperature_at(5) == pytest.approx(15.5)
    assert temperature_at(2.5, start=10.0, end=2.0, epochs=5) == pytest.approx(6.0)
    assert temperature_at(10) == 1.0
    assert temperature_at(25) == 1.0
    assert temperature_at(-1) == 30.0
    assert temperature_at(3, epochs=0) == 1.0


def test_set_temperature_reaches_every_layer_and_sharpens_attention():
    torch.manual_seed(5)
    model = nn.Sequential(
        make_layer((3, 4, 3, 1, 1, 1, 1, True), "auto"),
        nn.ReLU(),
        make_layer((4, 4, 3, 1, 1, 1, 1, True), "auto"),
    )
    x = torch.randn(2, 3, 5, 5)
    assert set_temperature(model, 30.0) == 2
    flat = model[0].kernel_attention(x)
    assert set_temperature(model, 1.0) == 2
    sharp = model[0].kernel_attention(x)
    assert model[2].temperature == 1.0
    assert (sharp.max(dim=1).values > flat.max(dim=1).values).all()
    assert (flat - 1 / 3).abs().max() < 0.1  # high temperature: near uniform
    with pytest.raises(ValueError, match="temperature must be > 0"):
        set_temperature(model, 0.0)


def test_annealing_the_temperature_does_not_recompile_a_compiled_model():
    """A Python float temperature is a constant to torch.compile: each new value recompiled
    (and after 8, torch gave up and ran eagerly). As a buffer it is an input."""
    import torch._dynamo

    torch.manual_seed(0)
    model = nn.Sequential(DynamicConv2d(3, 4, 3, padding=1, num_kernels=2), nn.ReLU())
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 3, 8, 8)
    outputs = []
    for epoch in range(5):
        set_temperature(model, temperature_at(epoch, 30.0, 1.0, 4))
        outputs.append(compiled(x))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["recompiles"])
    assert not torch.allclose(outputs[0], outputs[-1])  # the temperature still takes effect
    assert model[0].temperature == 1.0
    assert "_temperature" not in model.state_dict()  # weights files are unchanged
