"""Layers of CDG: the gated convolution, the gating-mode registry, the sparsity objective and statistics."""

from __future__ import annotations

from cdg.nn.dgc import DGCConv2d, dgc_keep_ratio
from cdg.nn.fbs import FBSConv2d
from cdg.nn.gated import Conv3x3, GatedLayer
from cdg.nn.gated_conv import (
    GatedConv2d,
    base_path_blocks,
    gate_surrogate_derivative,
    smoothed_step,
)
from cdg.nn.modes import GATING_MODES, GatingMode, get_gating_mode, make_conv_layer, register_gating_mode
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

__all__ = [
    "Conv3x3", "DGCConv2d", "FBSConv2d", "GATING_MODES", "GatedConv2d", "GatedLayer", "GatingMode",
    "base_path_blocks", "dgc_keep_ratio", "gate_statistics", "gate_surrogate_derivative", "gated_layers",
    "get_gating_mode", "make_conv_layer", "mask_similarity", "pop_aux_losses", "register_gating_mode",
    "reset_gate_stats", "set_pruning_progress", "smoothed_step", "sparsity_objective", "threshold_from_sparsity",
    "threshold_layers",
]
