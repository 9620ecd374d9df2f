"""Multiply-accumulates (MACs) and the FLOPs reduction of gated networks (Eq. 13; docs/design.md §4).

Dense MACs come from PyTorch's own counter (``torch.utils.flop_counter.FlopCounterMode``) run on
the *dense twin* of the network (same shapes, dense 3x3 convolutions); FLOPs = 2 x MACs. A gated
layer with G groups and conditional-path sparsity eta_l costs F_l (1/G + (1 - 1/G)(1 - eta_l))
plus its gate: per salience element a few operations (instance norm, compare, select; counted as
``GATE_OPS_PER_ELEMENT`` MAC-equivalents) and the C_g-group average of the structured variant.
Each layer states its own cost (:class:`cdg.nn.GatedLayer`'s ``base_fraction`` and ``gate_macs``);
FBS / DGC have no base path and pay for their salience predictors instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cdg.nn.gated import GatedLayer
from cdg.nn.gated_conv import GATE_OPS_PER_ELEMENT
from cdg.nn.modes import flops_reduction_eq13
from cdg.nn.sparsity import gated_layers

__all__ = ["GATE_OPS_PER_ELEMENT", "LayerMACs", "MACReport", "count_macs", "flops_reduction_eq13", "mac_report"]


@dataclass
class LayerMACs:
    name: str
    macs: int  # dense MACs of the layer for one image
    gated: bool = False
    gate_groups: int = 1
    group_size: int = 1
    out_elements: int = 0  # C_out x H x W for one image
    base_fraction: float = 1.0  # share of `macs` computed whatever the gate says (CDG 1/G, FBS/DGC 0)
    gate_macs: float = 0.0  # the gate's own cost for one image (CDG's gate ops, FBS/DGC predictors)


@dataclass
class MACReport:
    layers: list[LayerMACs] = field(default_factory=list)
    total_dense: int = 0  # whole network, dense, one image (conv + linear, as the counter counts)

    def gated_macs(self, eta_per_layer: dict[str, float] | float | None) -> float:
        """Whole-network MACs with each gated layer at its own eta (or one eta for all)."""
        total = float(self.total_dense)
        for l in self.layers:
            if not l.gated:
                continue
            eta = eta_per_layer if isinstance(eta_per_layer, (int, float)) else (eta_per_layer or {}).get(l.name)
            if eta is None:
                raise ValueError(f"no eta given for gated layer {l.name}")
            b = l.base_fraction
            total += l.macs * (b + (1.0 - b) * (1.0 - eta)) + l.gate_macs - l.macs
        return total

    def reduction_exact(self, eta_per_layer: dict[str, float] | float) -> float:
        """Dense MACs of the whole network / MACs with gating (dense layers included)."""
        return self.total_dense / self.gated_macs(eta_per_layer)

    def to_dict(self) -> dict:
        return {"total_dense_macs": self.total_dense,
                "layers": [l.__dict__ for l in self.layers]}


def _leaf_convs(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@torch.no_grad()
def count_macs(dense_model: nn.Module, input_size: tuple[int, ...],
               gated: Mapping[str, GatedLayer] | None = None) -> MACReport:
    """Per-layer dense MACs of ``dense_model`` for one image of ``input_size`` (C, H, W).

    ``gated`` maps a layer name to the gated layer that a gated twin of the network has there
    (e.g. ``dict(cdg.nn.gated_layers(gated_twin))``); each such layer's cost follows its own
    ``base_fraction`` and ``gate_macs``.
    """
    was = dense_model.training
    dense_model.eval()
    out_shapes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: out_shapes.__setitem__(n, tuple(o.shape)))
             for n, m in _leaf_convs(dense_model).items()]
    counter = FlopCounterMode(display=False)
    x = torch.zeros(1, *input_size)
    try:
        with counter:
            dense_model(x)
    finally:
        for h in hooks:
            h.remove()
        dense_model.train(was)
    counts = counter.get_flop_counts()
    root = type(dense_model).__name__
    report = MACReport(total_dense=int(sum(counts.get("Global", {}).values()) // 2))
    gated = gated or {}
    for name in _leaf_convs(dense_model):
        flops = sum(counts.get(f"{root}.{name}", {}).values())
        shape = out_shapes.get(name, ())
        elems = int(torch.tensor(shape[1:]).prod()) if shape else 0
        layer = gated.get(name)
        if layer is None:
            report.layers.append(LayerMACs(name, int(flops // 2), out_elements=elems))
        else:
            report.layers.append(LayerMACs(name, int(flops // 2), True, layer.gate_groups, layer.group_size, elems,
                                           layer.base_fraction, layer.gate_macs(elems)))
    return report


def mac_report(cfg: Any) -> MACReport:
    """The MAC report of a run's config (``cdg.config.Config``): the dense twin counted by
    PyTorch's FLOP counter on one image of the dataset's size, with the config's gated layers."""
    from cdg.builders import build_backbone
    from cdg.data import dataset_info

    gated = dict(gated_layers(build_backbone(cfg)))
    dense_cfg = copy.deepcopy(cfg)
    dense_cfg.gating.mode = "dense"
    size = dataset_info(cfg.data.dataset).image_size or 224
    return count_macs(build_backbone(dense_cfg), (3, size, size), gated)
