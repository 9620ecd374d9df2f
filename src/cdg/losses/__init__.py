"""Self-supervised losses and their helpers (SimCLR NT-Xent, MoCo InfoNCE + queue, SimSiam)."""

from __future__ import annotations

from cdg.losses.gather import gather_no_grad, gather_with_grad, is_distributed
from cdg.losses.moco import MemoryQueue, MoCoLoss, cosine_momentum, momentum_update
from cdg.losses.negative_cosine import NegativeCosineSimilarity
from cdg.losses.nt_xent import NTXentLoss

__all__ = [
    "MemoryQueue",
    "MoCoLoss",
    "NTXentLoss",
    "NegativeCosineSimilarity",
    "cosine_momentum",
    "gather_no_grad",
    "gather_with_grad",
    "is_distributed",
    "momentum_update",
]
