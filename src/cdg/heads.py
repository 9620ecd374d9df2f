"""Projection and prediction heads of the three SSL methods (docs/design.md §2).

Every head is a :class:`ProjectionHead` built from a list of blocks (lightly's form). All heads
take ``in_dim`` explicitly so that width-multiplied backbones (ResNet-18 at 0.25x or 2x,
feature dimension 128 or 1024 instead of 512) plug in unchanged.

- SimCLR (docs/design.md §2): Linear(512, 2048) - ReLU - Linear(2048, 256).
- MoCo V2+ (solo-learn ``mocov2plus``): Linear - ReLU - Linear, 2048 hidden, 256 out.
- SimSiam (Chen & He 2021; solo-learn CIFAR: proj_hidden_dim 2048, proj_output_dim 2048):
  projector  Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN(affine=False);
  predictor  Linear(2048, 512)-BN-ReLU-Linear(512, 2048).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


def _check_dims(name: str, **dims: int) -> None:
    for key, value in dims.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {key} must be a positive int, got {value!r}")


#: one block of a head: (in_dim, out_dim, batch norm after the linear layer or None, activation or None)
Block = tuple[int, int, Optional[nn.Module], Optional[nn.Module]]


class ProjectionHead(nn.Module):
    """A head built from blocks ``(in_dim, out_dim, norm, activation)``, each giving
    ``Linear(in_dim, out_dim)`` (without bias when a norm follows it, which would cancel it),
    then the norm and the activation where given, in one ``nn.Sequential`` called ``layers``."""

    def __init__(self, blocks: Sequence[Block]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for in_dim, out_dim, norm, act in blocks:
            _check_dims(type(self).__name__, in_dim=in_dim, out_dim=out_dim)
            layers.append(nn.Linear(in_dim, out_dim, bias=norm is None))
            layers += [m for m in (norm, act) if m is not None]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map inputs (N, in_dim of the first block) to outputs (N, out_dim of the last block)."""
        return self.layers(x)


class SimCLRProjectionHead(ProjectionHead):
    """g(h) = W2 ReLU(W1 h + b1) + b2: Linear(in_dim, hidden_dim) - ReLU - Linear(hidden_dim, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256) -> None:
        super().__init__([(in_dim, hidden_dim, None, nn.ReLU()), (hidden_dim, out_dim, None, None)])


class MoCoProjectionHead(ProjectionHead):
    """MoCo V2+ projector (solo-learn ``mocov2plus``): the same two blocks as SimCLR's,
    Linear(in_dim, hidden_dim) - ReLU - Linear(hidden_dim, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256) -> None:
        super().__init__([(in_dim, hidden_dim, None, nn.ReLU()), (hidden_dim, out_dim, None, None)])


class SimSiamProjectionHead(ProjectionHead):
    """SimSiam projector, 3 blocks with BN:

        Linear(in, h) - BN - ReLU - Linear(h, h) - BN - ReLU - Linear(h, out) - BN(affine=False)

    Linear layers followed by BN have no bias (it would be cancelled by BN's mean subtraction;
    solo-learn keeps the last one but freezes it).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048) -> None:
        super().__init__([
            (in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU()),
            (hidden_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU()),
            (hidden_dim, out_dim, nn.BatchNorm1d(out_dim, affine=False), None),
        ])


class SimSiamPredictionHead(ProjectionHead):
    """SimSiam predictor (bottleneck): Linear(in, h) - BN - ReLU - Linear(h, out).

    Trained with a fixed learning rate (docs/design.md §2): see ``SimSiam.fixed_lr_modules``.
    """

    def __init__(self, in_dim: int = 2048, hidden_dim: int = 512, out_dim: int = 2048) -> None:
        super().__init__([(in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU()), (hidden_dim, out_dim, None, None)])
