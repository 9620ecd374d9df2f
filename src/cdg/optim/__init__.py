"""Optimisers and learning-rate schedules (LARS, linear warm-up + cosine)."""

from __future__ import annotations

from cdg.optim.lars import LARS, split_params_for_lars
from cdg.optim.schedule import (
    ConstantFactor,
    WarmupCosineFactor,
    build_warmup_cosine_scheduler,
    warmup_cosine,
)

__all__ = [
    "LARS",
    "ConstantFactor",
    "WarmupCosineFactor",
    "build_warmup_cosine_scheduler",
    "split_params_for_lars",
    "warmup_cosine",
]
