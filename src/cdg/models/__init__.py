"""Backbones: ResNet-18/50 with CIFAR or ImageNet stem and a pluggable 3x3 conv factory."""

from cdg.models.registry import create_model, list_models, register_model
from cdg.models.resnet import BasicBlock, Bottleneck, Conv3x3, ResNet, resnet18, resnet50, stage_widths

__all__ = [
    "BasicBlock", "Bottleneck", "Conv3x3", "ResNet", "create_model", "list_models", "register_model",
    "resnet18", "resnet50", "stage_widths",
]
