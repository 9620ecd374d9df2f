"""Self-supervised methods (LightningModules), one small module each."""

from __future__ import annotations

from cdg.config import Config
from cdg.methods.base import SSLMethod
from cdg.methods.mocov2 import MoCoV2Plus
from cdg.methods.simclr import SimCLR
from cdg.methods.simsiam import SimSiam

METHODS: dict[str, type[SSLMethod]] = {"simclr": SimCLR, "mocov2": MoCoV2Plus, "simsiam": SimSiam}


def build_method(cfg: Config, steps_per_epoch: int = 1) -> SSLMethod:
    if cfg.method.name not in METHODS:
        raise ValueError(f"unknown method {cfg.method.name!r}; valid: {', '.join(METHODS)}")
    return METHODS[cfg.method.name](cfg, steps_per_epoch)


__all__ = ["METHODS", "MoCoV2Plus", "SSLMethod", "SimCLR", "SimSiam", "build_method"]
