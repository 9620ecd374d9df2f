"""SimCLR's normalised temperature-scaled cross-entropy (NT-Xent).

docs/design.md §2 ("SimCLR: NT-Xent (temperature 0.2)") and the paper's Eq. 11 term L_NT-Xent.
For 2N projections h (the two views z1, z2 stacked) and sim(u, v) = u^T v / (||u|| ||v||):

    l(i, j) = -log( exp(sim(h_i, h_j) / T) / sum_{k != i} exp(sim(h_i, h_k) / T) )

    L = 1 / (2N) * sum_{i=1}^{N} [ l(i, i + N) + l(i + N, i) ]

i.e. each of the 2N anchors has one positive (the other view of the same image) and 2N - 2
negatives; the self-similarity is excluded from the denominator.

Distributed form (``gather_distributed`` with W > 1 processes, each holding n = N / W images):
rank r computes only the rows of its own 2n anchors (its z1 and z2) against the 2N gathered keys
(all ranks' z1, then all ranks' z2), a (2n, 2N) logit matrix instead of the full (2N, 2N) one on
every rank (as lightly's ``NTXentLoss`` does). Its local anchor i (view 1) is global anchor
r * n + i, whose self-similarity is key column r * n + i (masked) and whose positive is column
N + r * n + i; its view-2 anchor n + i is global anchor N + r * n + i, with self column
N + r * n + i and positive r * n + i. Each denominator still runs over all 2N - 1 other keys, so
rank r returns

    L_r = 1 / (2n) * sum_{i in rank r's images} [ l(i, i + N) + l(i + N, i) ],

the global loss restricted to its anchors, and L = 1 / W * sum_r L_r (equal n on every rank: the
training loader drops the last partial batch).

Why the gradient is the global loss's: the keys are gathered with
:func:`cdg.losses.gather.gather_with_grad`, whose backward all-reduces (sums) over the ranks the
gradient each rank's L_r sends to every key slice. The gradient rank r gets for its own inputs
z_r is therefore d L_r / d z_r through its anchors plus sum_{r'} d L_r' / d z_r through the keys,
which is d (sum_{r'} L_r') / d z_r = W * dL / dz_r (L_r' for r' != r depends on z_r only through
the keys). DDP averages the parameter gradients over the W ranks, so the update is
1 / W * sum_r (dz_r / dtheta)^T W dL / dz_r = dL / dtheta: the gradient of the global-batch loss.
The value each rank returns (and logs) is its L_r, an unbiased sample of L, not L itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cdg.losses.gather import gather_with_grad, is_distributed


class NTXentLoss(nn.Module):
    """NT-Xent loss over two batches of projections ``z1``, ``z2`` of shape (N, D).

    Args:
        temperature: T in the equation above (docs/design.md: 0.2).
        gather_distributed: if True and a ``torch.distributed`` process group with more than one
            process is initialised, all ranks' projections are gathered (with gradient) as keys,
            so that every anchor is contrasted with the global batch of 2 * n * world_size
            projections; each rank computes the rows of its own 2n anchors only (see the module
            docstring for the form and why DDP's gradient is the global loss's). Harmless (a
            no-op) when not distributed.

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
        """Return the scalar NT-Xent loss of the positive pairs (z1[i], z2[i]) (under
        ``gather_distributed``, of this rank's anchors against all ranks' keys)."""
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
            if self.gather_distributed and is_distributed():
                return self._local_anchors_global_keys(z1, z2)
            n = z1.shape[0]
            z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)  # (2N, D)
            logits = z @ z.T / self.temperature  # (2N, 2N)
            self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
            logits = logits.masked_fill(self_mask, float("-inf"))
            idx = torch.arange(n, device=z.device)
            targets = torch.cat([idx + n, idx])  # positive of i is i+N, of i+N is i
            return F.cross_entropy(logits, targets)

    def _local_anchors_global_keys(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """L_r of the module docstring: this rank's 2n anchors against the 2N gathered keys."""
        n = z1.shape[0]
        rank = dist.get_rank()
        z1 = F.normalize(z1, dim=1)
        z2 = F.normalize(z2, dim=1)
        keys = torch.cat([gather_with_grad(z1), gather_with_grad(z2)], dim=0)  # (2N, D)
        big_n = keys.shape[0] // 2  # N = n * world_size (all_gather needs the same n on every rank)
        anchors = torch.cat([z1, z2], dim=0)  # (2n, D)
        logits = anchors @ keys.T / self.temperature  # (2n, 2N)
        own = rank * n + torch.arange(n, device=z1.device)  # this rank's images' global indices
        self_cols = torch.cat([own, own + big_n])
        self_mask = torch.zeros(2 * n, 2 * big_n, dtype=torch.bool, device=z1.device)
        self_mask[torch.arange(2 * n, device=z1.device), self_cols] = True
        logits = logits.masked_fill(self_mask, float("-inf"))
        targets = torch.cat([own + big_n, own])  # positive of view 1 is its view 2, and back
        return F.cross_entropy(logits, targets)
