"""Transfer learning: load weights, put on a new head, freeze the backbone, build optimiser groups.

`load_weights` reads a torchvision-format state dict (a file written by
`torch.save(model.state_dict(), path)`, or a checkpoint dict holding one under "model") or an MLflow
model URI (models:/..., runs:/...). Keys are matched by name; a classifier head whose shape differs
(another number of classes) is skipped and reported, any other shape mismatch is an error that
names the key, both shapes and the source.

`parameter_groups` splits parameters for the optimiser: norm and bias parameters (ndim <= 1, and
DynamicConv2d's (K, out) biases) get no weight decay, the usual practice since Goyal et al. 2017
(arXiv:1706.02677, section 5.1 applies decay to weights only); backbone groups carry
`lr_scale=backbone_lr_scale` for the trainer to multiply into the learning rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import ModelError
from pipeline.tags import WEIGHTS_FILE

__all__ = ["LoadReport", "freeze_backbone", "load_weights", "parameter_groups", "replace_head"]

MLFLOW_SCHEMES = ("models:/", "runs:/")


@dataclass
class LoadReport:
    """What `load_weights` did: keys loaded, keys the model has but the source lacks (missing),
    keys the source has but the model lacks (unexpected), and head keys skipped for their shape."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.source}: loaded {len(self.loaded)} tensors; missing {self.missing or 'none'}; "
            f"unexpected {self.unexpected or 'none'}; head skipped {self.skipped_head or 'none'}"
        )


def _is_head(key: str, head_prefix: str) -> bool:
    return key == head_prefix or key.startswith(head_prefix + ".")


def _read_state_dict(source: str, tracking_uri: str | None = None) -> dict[str, torch.Tensor]:
    if source.startswith(MLFLOW_SCHEMES):
        return _read_mlflow_weights(source, tracking_uri)
    path = Path(source)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    obj = _weights_only(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]  # a training checkpoint: {"model": state_dict, "optimizer": ...}
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(
            f"{path}: not a state dict (expected a mapping of tensor names to tensors, or a "
            'checkpoint with one under "model")'
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _weights_only(path: Path) -> Any:
    from pipeline.model_package import load_weights_only  # model_package builds from the zoo

    return load_weights_only(path)


def _read_mlflow_weights(source: str, tracking_uri: str | None) -> dict[str, torch.Tensor]:
    """The `weights.pt` of a model logged by `pipeline train`, loaded weights-only.

    Never `mlflow.pytorch.load_model`: that unpickles the logged model, and a pickle from an
    artifact store can run any code. A model without the pipeline's weights file is refused."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.storage import mask_credentials
    from pipeline.tracking import use_server

    if tracking_uri:  # workers do not inherit the driver's MLflow settings, and models:/ URIs
        use_server(tracking_uri)  # resolve against the global registry URI
    with tempfile.TemporaryDirectory(prefix="weights-") as tmp:
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri
                )
            )
        except MlflowException as exc:
            where = f" (tracking server {mask_credentials(tracking_uri)})" if tracking_uri else ""
            raise ModelError(
                f"{source}: cannot load the MLflow model{where}: {exc.message}"
            ) from None
        found = [
            p for p in (local / WEIGHTS_FILE, local / "extra_files" / WEIGHTS_FILE) if p.is_file()
        ]
        if not found:
            raise ModelError(
                f"{source}: no {WEIGHTS_FILE} in the logged model; only models logged by "
                "`pipeline train` can be fine-tuned from MLflow (the pipeline never unpickles a "
                "logged model). Pass a state dict file as model.weights instead"
            )
        obj = _weights_only(found[0])
    if not isinstance(obj, Mapping):
        raise ModelError(f"{source}: {WEIGHTS_FILE} is not a state dict")
    return dict(obj)


def load_weights(
    model: nn.Module, source: str, *, head_prefix: str = "fc", tracking_uri: str | None = None
) -> LoadReport:
    """Load matching tensors from a state dict file or an MLflow model URI into `model`.

    Raises ModelError for a missing file, a shape mismatch outside the
    head or when no key matches at all (probably another architecture).
    """
    state = _read_state_dict(source, tracking_uri)
    target = model.state_dict()
    report = LoadReport(source=source)
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key not in target:
            report.unexpected.append(key)
        elif tensor.shape != target[key].shape:
            if not _is_head(key, head_prefix):
                raise ModelError(
                    f"{source}: {key} has shape {tuple(tensor.shape)} in the weights but "
                    f"{tuple(target[key].shape)} in the model; only the '{head_prefix}' head may "
                    "differ (check the model name, small_input and in_channels)"
                )
            report.skipped_head.append(key)
        else:
            to_load[key] = tensor
    if not to_load:
        raise ModelError(
            f"{source}: no tensor name matches the model (e.g. the weights have "
            f"{next(iter(state), 'nothing')!r}); is it the same architecture?"
        )
    model.load_state_dict(to_load, strict=False)
    report.loaded = list(to_load)
    report.missing = [k for k in target if k not in state]
    return report


def replace_head(model: nn.Module, num_classes: int, *, head_prefix: str = "fc") -> nn.Linear:
    """Put a freshly initialised `nn.Linear(in_features, num_classes)` in place of the head."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    old = getattr(model, head_prefix, None)
    if not isinstance(old, nn.Linear):
        raise ValueError(f"model.{head_prefix} is {type(old).__name__}, expected nn.Linear")
    head = nn.Linear(old.in_features, num_classes, device=old.weight.device)
    setattr(model, head_prefix, head)
    return head


def freeze_backbone(model: nn.Module, *, head_prefix: str = "fc") -> int:
    """Set requires_grad=False on every parameter outside the head; returns how many were frozen.

    BatchNorm running statistics still update in train mode; call `.eval()` on the frozen modules
    for a fully fixed feature extractor.
    """
    frozen = 0
    for name, param in model.named_parameters():
        trainable = _is_head(name, head_prefix)
        param.requires_grad_(trainable)
        frozen += not trainable
    return frozen


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    backbone_lr_scale: float = 1.0,
    head_prefix: str = "fc",
) -> list[dict[str, Any]]:
    """Optimiser parameter groups: (backbone, head) x (decay, no_decay); frozen parameters and
    empty groups are left out. Each group has "name", "params", "weight_decay" and "lr_scale"."""
    groups: dict[tuple[str, str], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "head" if _is_head(name, head_prefix) else "backbone"
        # Norm weights/biases and biases (ndim <= 1; DynamicConv2d's bias is (K, out)) are not
        # decayed: shrinking them towards 0 only fights the normalisation.
        decay = "no_decay" if param.ndim <= 1 or name.endswith("bias") else "decay"
        groups.setdefault((part, decay), []).append(param)
    return [
        {
            "name": f"{part}_{decay}",
            "params": params,
            "weight_decay": weight_decay if decay == "decay" else 0.0,
            "lr_scale": backbone_lr_scale if part == "backbone" else 1.0,
        }
        for (part, decay), params in groups.items()
    ]
