"""SimCLR's normalised temperature-scaled cross-entropy (NT-Xent).

docs/design.md §2 ("SimCLR: NT-Xent (temperature 0.2)") and the paper's Eq. 11 term L_NT-Xent.
For 2N projections h (the two views z1, z2 stacked) and sim(u, v) = u^T v / (||u|| ||v||):

    l(i, j) = -log( exp(sim(h_i, h_j) / T) / sum_{k != i} exp(sim(h_i, h_k) / T) )

    L = 1 / (2N) * sum_{i=1}^{N} [ l(i, i + N) + l(i + N, i) ]

i.e. each of the 2N anchors has one positive (the other view of the same image) and 2N - 2
negatives; the self-similarity is excluded from the denominator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cdg.losses.gather import gather_with_grad


class NTXentLoss(nn.Module):
    """NT-Xent loss over two batches of projections ``z1``, ``z2`` of shape (N, D).

    Args:
        temperature: T in the equation above (docs/design.md: 0.2).
        gather_distributed: if True and a ``torch.distributed`` process group with more than one
            process is initialised, all ranks' projections are gathered (with gradient) and the
            loss is computed over the global batch of 2 * N * world_size anchors, as solo-learn
            does. Harmless (a no-op) when not distributed.

    The computation runs in float32 with autocast disabled, so bf16/fp16 inputs from a mixed
    precision forward give the float32 loss of the (rounded) inputs. Float64 inputs stay float64.
    """

    def __init__(self, temperature: float = 0.2, gather_distributed: bool = False) -> None:
        super().__init__()
        if not temperature > 0.0:
            raise ValueError(f"NTXentLoss: temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.gather_distributed = bool(gather_distributed)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Return the scalar NT-Xent loss of the positive pairs (z1[i], z2[i])."""
        if z1.ndim != 2 or z1.shape != z2.shape:
            raise ValueError(
                "NTXentLoss: expected z1 and z2 of the same shape (N, D), "
                f"got {tuple(z1.shape)} and {tuple(z2.shape)}"
            )
        if z1.shape[0] < 1:
            raise ValueError("NTXentLoss: empty batch (N = 0)")
        dtype = torch.float64 if z1.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1 = z1.to(dtype)
            z2 = z2.to(dtype)
            if self.gather_distributed:
                z1 = gather_with_grad(z1)
                z2 = gather_with_grad(z2)
            n = z1.shape[0]
            z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)  # (2N, D)
            logits = z @ z.T / self.temperature  # (2N, 2N)
            self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
            logits = logits.masked_fill(self_mask, float("-inf"))
            idx = torch.arange(n, device=z.device)
            targets = torch.cat([idx + n, idx])  # positive of i is i+N, of i+N is i
            return F.cross_entropy(logits, targets)
