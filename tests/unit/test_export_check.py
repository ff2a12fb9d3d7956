"""`pull`'s check of an export against the original network: the allowed logit difference
scales with the logits' size (float32 reordering errors do), and never drops below the
per-format tolerance."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ServingError
from pipeline.serving import export

pytestmark = pytest.mark.quick


def check_with(monkeypatch, logit: float, error: float) -> dict:
    """`export._check` of an ONNX export whose logits are `logit` and off by `error`."""
    monkeypatch.setattr(export, "example_input", lambda meta, batch: np.zeros((batch, 3)))
    monkeypatch.setattr(
        export, "torch_forward", lambda model: lambda x: np.full((len(x), 4), logit)
    )
    monkeypatch.setattr(
        export, "_forward_of", lambda fmt, out: lambda x: np.full((len(x), 4), logit + error)
    )
    return export._check("onnx", None, {}, None)


def test_large_logits_allow_a_proportionally_larger_difference(monkeypatch):
    record = check_with(monkeypatch, 40.0, 1.8e-3)  # 4.5e-5 of the largest |logit|
    assert record["logit_scale"] == 40.0
    assert record["tolerance"] == pytest.approx(40 * export.TOLERANCE["onnx"])
    assert record["max_abs_diff"] <= record["tolerance"]
    with pytest.raises(ServingError, match=r"onnx export differs .* largest \|logit\|"):
        check_with(monkeypatch, 40.0, 8e-3)  # 2e-4 of it


def test_small_logits_keep_the_absolute_tolerance(monkeypatch):
    assert check_with(monkeypatch, 0.01, 5e-5)["tolerance"] == export.TOLERANCE["onnx"]
    with pytest.raises(ServingError):
        check_with(monkeypatch, 0.01, 2e-4)


def test_a_nan_export_fails(monkeypatch):
    with pytest.raises(ServingError):
        check_with(monkeypatch, 1.0, float("nan"))
