"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import statistics
from typing import Callable

from cdg.models import stage_widths


def cifar_stage_shapes(width: float) -> list[tuple[int, int]]:
    """(channels, H = W) of the 3x3 convolutions of each CIFAR ResNet stage (32x32 input)."""
    return [(c, 32 >> i) for i, c in enumerate(stage_widths(width))]


def interleaved_medians(timers: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each timer over ``rounds`` interleaved rounds, after ``warmup`` untimed calls
    of each (the host is shared: only forms timed side by side compare)."""
    for timer in timers.values():
        for _ in range(warmup):
            timer()
    times: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(rounds):
        for k, timer in timers.items():
            times[k].append(timer())
    return {k: statistics.median(v) for k, v in times.items()}
