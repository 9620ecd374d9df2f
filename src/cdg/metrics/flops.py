"""Multiply-accumulates (MACs) and the FLOPs reduction of gated networks (Eq. 13; docs/design.md §4).

Dense MACs come from PyTorch's own counter (``torch.utils.flop_counter.FlopCounterMode``) run on
the *dense twin* of the network (same shapes, dense 3x3 convolutions); FLOPs = 2 x MACs. A gated
layer with G groups and conditional-path sparsity eta_l costs F_l (1/G + (1 - 1/G)(1 - eta_l))
plus its gate: per salience element a few operations (instance norm, compare, select; counted as
``GATE_OPS_PER_ELEMENT`` MAC-equivalents) and the C_g-group average of the structured variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

GATE_OPS_PER_ELEMENT = 4


def flops_reduction_eq13(eta: float, gate_groups: int) -> float:
    """Eq. 13: D = 1 / (1/G + (1 - eta)(1 - 1/G))."""
    g = gate_groups
    return 1.0 / (1.0 / g + (1.0 - eta) * (1.0 - 1.0 / g))


@dataclass
class LayerMACs:
    name: str
    macs: int  # dense MACs of the layer for one image
    gated: bool = False
    gate_groups: int = 1
    group_size: int = 1
    out_elements: int = 0  # C_out x H x W for one image
    kind: str = "cdg"  # "cdg" (GatedConv2d), "fbs" or "dgc" (docs/design.md §5 baselines)
    predictor_macs: int = 0  # FBS: C_in*C_out; DGC: heads*2*C_in*(C_in/r) (the layer's predictor_macs())


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
            if l.kind in ("fbs", "dgc"):  # skipped channel computations + salience predictor (docs/design.md §5)
                kept, overhead = l.macs * (1.0 - eta), l.predictor_macs
            else:
                g = l.gate_groups
                kept = l.macs * (1.0 / g + (1.0 - 1.0 / g) * (1.0 - eta))
                overhead = GATE_OPS_PER_ELEMENT * l.out_elements / l.group_size + (l.out_elements if l.group_size > 1 else 0)
            total += kept + overhead - l.macs
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
def count_macs(dense_model: nn.Module, input_size: tuple[int, ...], gated: dict[str, tuple] | None = None) -> MACReport:
    """Per-layer dense MACs of ``dense_model`` for one image of ``input_size`` (C, H, W).

    ``gated`` maps a layer name to (G, C_g) for the layers a gated twin gates, or to
    (G, C_g, kind, predictor_macs) for the FBS / DGC baselines.
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
        g, cg, kind, pred = (tuple(gated.get(name, (1, 1))) + ("cdg", 0))[:4]
        elems = int(torch.tensor(shape[1:]).prod()) if shape else 0
        report.layers.append(LayerMACs(name, int(flops // 2), name in gated, g, cg, elems, kind, int(pred)))
    return report
