"""A small model registry: ``create_model(name, **kwargs)`` (timm-style)."""

from __future__ import annotations

from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model constructor to the registry under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``create_model("resnet18", width=0.25, conv_layer=...)``."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
