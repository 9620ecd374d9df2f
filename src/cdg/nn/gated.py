"""The interface every gated 3x3 convolution implements, and the dense convolution they replace.

A backbone builds its 3x3 block convolutions through a factory ``conv_layer(in, out, stride)``
(:mod:`cdg.models.resnet`). :class:`Conv3x3` is the dense default. Every gated alternative (CDG's
:class:`cdg.nn.GatedConv2d`, the FBS and DGC baselines) subclasses :class:`GatedLayer`, so that
statistics, losses, schedules and the cost model find them by type, not by attribute probing.

Cost model (docs/design.md §4-5): a gated layer computes ``base_fraction`` of its dense MACs
always (CDG: the base path, 1/G, Eq. 1), the rest only where or when its gate is open, plus
``gate_macs(out_elements)`` for the gate itself. For a layer with dense MACs F and
conditional-path sparsity eta::

    F_gated = F * (base_fraction + (1 - base_fraction) * (1 - eta)) + gate_macs      (Eq. 13 per layer)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Conv3x3(nn.Conv2d):
    """Dense 3x3 convolution (padding 1, no bias) that accepts and ignores ``branch``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, 3, stride, 1, bias=False)

    def forward(self, x: Tensor, branch: int = 0) -> Tensor:  # type: ignore[override]
        return super().forward(x)


class GatedLayer(nn.Module):
    """Base class of the gated 3x3 convolutions: ``forward(x, branch)`` plus what callers read.

    Attributes:
        in_channels, out_channels, stride: the convolution's shape.
        gate_groups: G (CDG/CGNet groups, DGC heads; 1 for FBS).
        group_size: C_g, the output channels that share one gate entry (Eq. 12).
        gate_counts: non-persistent float64 buffer [phase (0 train, 1 eval), branch, (closed,
            total)], accumulated on the device while ``track_stats`` is set (no host sync).
        keep_masks / last_masks: with ``keep_masks``, the latest 0/1 mask of each branch.
        has_threshold: whether the layer has a learned threshold ``tau`` that Eq. 11 regularises.

    Subclasses override :attr:`is_gated`, :attr:`base_fraction`, :meth:`gate_macs`,
    :meth:`predictor_macs`, :meth:`pop_aux_loss` and :meth:`set_progress` where they differ from
    the defaults below.
    """

    has_threshold: bool = False
    gate_counts: Tensor

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.gate_groups, self.group_size = 1, 1
        self.register_buffer("gate_counts", torch.zeros(2, 2, 2, dtype=torch.float64), persistent=False)
        self.track_stats = True
        self.keep_masks = False
        self.last_masks: dict[int, Tensor] = {}

    # --- what the layer is -----------------------------------------------------------------
    @property
    def is_gated(self) -> bool:
        """Whether the layer skips any computation (a GatedConv2d with G = 1 is a dense conv)."""
        return True

    @property
    def base_fraction(self) -> float:
        """Fraction of the dense MACs computed whatever the gate decides (CDG: 1/G; FBS/DGC: 0)."""
        return 0.0

    def predictor_macs(self) -> int:
        """MACs of a learned salience predictor for one image (FBS, DGC); 0 for CDG."""
        return 0

    def gate_macs(self, out_elements: int) -> float:
        """MACs (or MAC-equivalents) of the gate for one image with ``out_elements`` outputs."""
        return float(self.predictor_macs())

    # --- training hooks --------------------------------------------------------------------
    def pop_aux_loss(self) -> Tensor:
        """The layer's own training loss since the last call (FBS/DGC predictors); clears it."""
        return torch.zeros((), device=self.gate_counts.device)

    def set_progress(self, progress: float) -> None:
        """Fraction of training done (0..1), for layers with a schedule (DGC's pruning ramp)."""

    # --- statistics ------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.gate_counts.zero_()

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # keep the counts in float64 when the module is cast (.half(), .to(bfloat16)): a cast
        # buffer would round them (bf16 holds integers exactly only up to 256); moves apply
        counts = self.gate_counts
        super()._apply(fn, recurse)
        self.gate_counts = counts.to(self.gate_counts.device)
        return self
