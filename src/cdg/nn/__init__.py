"""Layers of CDG: the gated convolution, its factory, the sparsity objective and statistics."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from torch import nn

from cdg.nn.dgc import DGCConv2d, dgc_keep_ratio
from cdg.nn.fbs import FBSConv2d
from cdg.nn.gated_conv import (
    GATING_MODES,
    GatedConv2d,
    base_path_blocks,
    gate_surrogate_derivative,
    smoothed_step,
)
from cdg.nn.sparsity import (
    gate_statistics,
    gated_layers,
    mask_similarity,
    pop_aux_losses,
    reset_gate_stats,
    set_pruning_progress,
    sparsity_objective,
    threshold_from_sparsity,
    threshold_layers,
)

BASELINE_MODES: tuple[str, ...] = ("fbs", "dgc")
MODES: tuple[str, ...] = ("dense",) + GATING_MODES + BASELINE_MODES


def make_conv_layer(mode: str = "dense", **options: Any) -> Callable[..., nn.Module]:
    """The 3x3 conv factory for a gating mode, to pass as ``conv_layer`` to a backbone.

    ``dense`` gives :class:`cdg.models.Conv3x3`; ``dual`` (CDG), ``shared_base`` (CGNet_SimCLR)
    and ``unified`` give :class:`GatedConv2d` with ``options`` (gate_groups, overlap, group_size,
    norm, surrogate, alpha, tau_init).
    """
    if mode == "dense":
        from cdg.models.resnet import Conv3x3

        return Conv3x3
    if mode == "fbs":  # options: keep_ratio, l1, scale_free
        return partial(FBSConv2d, **options)
    if mode == "dgc":  # options: heads, keep_ratio, squeeze, loss_coef, scale_free
        return partial(DGCConv2d, **options)
    if mode not in GATING_MODES:
        raise ValueError(f"unknown gating mode {mode!r}; valid: {', '.join(MODES)}")
    return partial(GatedConv2d, mode=mode, **options)


__all__ = [
    "BASELINE_MODES", "DGCConv2d", "FBSConv2d", "GatedConv2d", "MODES", "dgc_keep_ratio", "pop_aux_losses",
    "set_pruning_progress", "threshold_layers", "base_path_blocks", "gate_statistics", "gate_surrogate_derivative",
    "gated_layers", "make_conv_layer", "mask_similarity", "reset_gate_stats", "smoothed_step",
    "sparsity_objective", "threshold_from_sparsity",
]
