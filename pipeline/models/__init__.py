"""ResNet model zoo: torchvision-compatible ImageNet ResNets, CIFAR ResNets, dynamic-conv variants,
and transfer-learning helpers. See `zoo.build_model` for the entry point used by the trainer."""

from pipeline.errors import UnknownModelError
from pipeline.models.dynamic_conv import DynamicConv2d, DynamicSpec, set_temperature, temperature_at
from pipeline.models.resnet import ResNet, cifar_resnet
from pipeline.models.transfer import (
    LoadReport,
    freeze_backbone,
    load_weights,
    parameter_groups,
    replace_head,
)
from pipeline.models.zoo import (
    MODEL_NAMES,
    build_model,
    count_macs,
    describe_models,
)

__all__ = [
    "MODEL_NAMES",
    "DynamicConv2d",
    "DynamicSpec",
    "LoadReport",
    "ResNet",
    "UnknownModelError",
    "build_model",
    "cifar_resnet",
    "count_macs",
    "describe_models",
    "freeze_backbone",
    "load_weights",
    "parameter_groups",
    "replace_head",
    "set_temperature",
    "temperature_at",
]
