"""Projection and prediction heads of the three SSL methods (docs/design.md §2).

All heads take ``in_dim`` explicitly so that width-multiplied backbones (ResNet-18 at 0.25x or 2x,
feature dimension 128 or 1024 instead of 512) plug in unchanged.

- SimCLR (docs/design.md §2): Linear(512, 2048) - ReLU - Linear(2048, 256).
- MoCo V2+ (solo-learn ``mocov2plus``): Linear - ReLU - Linear, 2048 hidden, 256 out.
- SimSiam (Chen & He 2021; solo-learn CIFAR: proj_hidden_dim 2048, proj_output_dim 2048):
  projector  Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN(affine=False);
  predictor  Linear(2048, 512)-BN-ReLU-Linear(512, 2048).
"""

from __future__ import annotations

import torch
from torch import nn


def _check_dims(name: str, **dims: int) -> None:
    for key, value in dims.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {key} must be a positive int, got {value!r}")


class SimCLRProjectionHead(nn.Module):
    """g(h) = W2 ReLU(W1 h + b1) + b2: Linear(in_dim, hidden_dim) - ReLU - Linear(hidden_dim, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256) -> None:
        super().__init__()
        _check_dims(type(self).__name__, in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim)
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map backbone features (N, in_dim) to projections (N, out_dim)."""
        return self.layers(x)


class MoCoProjectionHead(nn.Module):
    """MoCo V2+ projector: Linear(in_dim, hidden_dim) - ReLU - Linear(hidden_dim, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256) -> None:
        super().__init__()
        _check_dims(type(self).__name__, in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim)
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map backbone features (N, in_dim) to projections (N, out_dim)."""
        return self.layers(x)


class SimSiamProjectionHead(nn.Module):
    """SimSiam projector, 3 layers with BN:

        Linear(in, h) - BN - ReLU - Linear(h, h) - BN - ReLU - Linear(h, out) - BN(affine=False)

    Linear layers followed by BN have no bias (it would be cancelled by BN's mean subtraction;
    solo-learn keeps the last one but freezes it).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048) -> None:
        super().__init__()
        _check_dims(type(self).__name__, in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim)
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim, bias=False),
            nn.BatchNorm1d(out_dim, affine=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map backbone features (N, in_dim) to projections z (N, out_dim)."""
        return self.layers(x)


class SimSiamPredictionHead(nn.Module):
    """SimSiam predictor (bottleneck): Linear(in, h) - BN - ReLU - Linear(h, out).

    Trained with a fixed learning rate (docs/design.md §2): put its parameters in an optimizer group
    with ``fixed_lr=True`` (see ``cdg.optim.build_warmup_cosine_scheduler``).
    """

    def __init__(self, in_dim: int = 2048, hidden_dim: int = 512, out_dim: int = 2048) -> None:
        super().__init__()
        _check_dims(type(self).__name__, in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim)
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map projections z (N, in_dim) to predictions p (N, out_dim)."""
        return self.layers(x)
