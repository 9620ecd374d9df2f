"""SimSiam's negative cosine similarity with stop-gradient (Chen & He 2021, Eq. 1 and 3).

    D(p, z) = - p / ||p||_2 . stopgrad(z) / ||z||_2       (averaged over the batch)

The symmetric SimSiam loss is formed by the caller (docs/design.md §2, "symmetric negative cosine with
stop-gradient"):

    L = 0.5 * D(p1, z2) + 0.5 * D(p2, z1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NegativeCosineSimilarity(nn.Module):
    """D(p, z) = -mean_i cos(p_i, stopgrad(z_i)) for p, z of shape (N, D).

    ``z`` is detached inside, so no gradient flows into it. Computed in float32 with autocast
    disabled (float64 inputs stay float64). The result lies in [-1, 1].
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Return D(p, z), a scalar."""
        if p.ndim != 2 or p.shape != z.shape:
            raise ValueError(
                "NegativeCosineSimilarity: expected p and z of the same shape (N, D), "
                f"got {tuple(p.shape)} and {tuple(z.shape)}"
            )
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=p.device.type, enabled=False):
            p = F.normalize(p.to(dtype), dim=1, eps=self.eps)
            z = F.normalize(z.detach().to(dtype), dim=1, eps=self.eps)
            return -(p * z).sum(dim=1).mean()
