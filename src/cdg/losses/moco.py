"""MoCo V2(+) building blocks: InfoNCE against a queue, the queue, and the momentum encoder.

docs/design.md §2: "MoCo V2(+): query encoder and momentum key encoder (EMA of parameters including tau;
momentum 0.99 -> 0.999 on a cosine schedule over steps), queue of 32768 negatives (CIFAR),
temperature 0.2, symmetric loss."

InfoNCE (He et al. 2020, Eq. 1) for a query q with positive key k+ and queue keys k_1..k_K,
all L2-normalised:

    L_q = -log( exp(q . k+ / T) / ( exp(q . k+ / T) + sum_{j=1}^{K} exp(q . k_j / T) ) )

The symmetric MoCo V2+ loss is formed by the caller, e.g. with one queue per view as solo-learn:
``0.5 * (loss(q1, k2, queue_2.tensor) + loss(q2, k1, queue_1.tensor))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MoCoLoss(nn.Module):
    """InfoNCE of queries ``q`` (N, D) against keys ``k`` (N, D) and queue negatives (K, D).

    logits = [q . k, q queue^T] / T  (shape N x (1 + K)), cross-entropy with label 0.
    ``q``, ``k`` and ``queue`` are L2-normalised inside; ``k`` and ``queue`` receive no gradient.
    Computed in float32 with autocast disabled (float64 inputs stay float64).
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if not temperature > 0.0:
            raise ValueError(f"MoCoLoss: temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def forward(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        """Return the mean InfoNCE loss over the N queries."""
        if q.ndim != 2 or q.shape != k.shape:
            raise ValueError(
                "MoCoLoss: expected q and k of the same shape (N, D), "
                f"got {tuple(q.shape)} and {tuple(k.shape)}"
            )
        if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
            raise ValueError(
                f"MoCoLoss: expected queue of shape (K, {q.shape[1]}), got {tuple(queue.shape)}"
            )
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=q.device.type, enabled=False):
            q = F.normalize(q.to(dtype), dim=1)
            k = F.normalize(k.detach().to(dtype), dim=1)
            neg_keys = F.normalize(queue.detach().to(dtype), dim=1)
            pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
            neg = q @ neg_keys.T  # (N, K)
            logits = torch.cat([pos, neg], dim=1) / self.temperature
            targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
            return F.cross_entropy(logits, targets)


class MemoryQueue(nn.Module):
    """FIFO ring buffer of K L2-normalised keys of dimension D (MoCo's dictionary).

    The keys and the write pointer are buffers, so they are saved in ``state_dict`` and move with
    ``.to(device)``. Initialised with L2-normalised Gaussian noise, as MoCo does.

    Args:
        size: K, the number of keys (docs/design.md: 32768 on CIFAR).
        dim: D, the key dimension.
    """

    queue: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"MemoryQueue: size and dim must be >= 1, got size={size}, dim={dim}")
        self.size = int(size)
        self.dim = int(dim)
        self.register_buffer("queue", F.normalize(torch.randn(self.size, self.dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def tensor(self) -> torch.Tensor:
        """The (K, D) key buffer (slot order, not age order)."""
        return self.queue

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (B, D) at the pointer, overwriting the oldest entries (FIFO).

        Wraps around the end of the buffer when B does not divide K. If B > K only the last K
        keys are kept. Keys are detached, L2-normalised and cast to the buffer's dtype. Under DDP
        the caller passes the globally gathered keys (``cdg.losses.gather_no_grad``).
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(
                f"MemoryQueue.enqueue: expected keys of shape (B, {self.dim}), "
                f"got {tuple(keys.shape)}"
            )
        keys = F.normalize(keys.detach().to(self.queue.dtype), dim=1)
        b = keys.shape[0]
        if b == 0:
            return
        if b > self.size:
            # Writing all B keys in order would leave exactly the last K; do that directly.
            start = (int(self.ptr) + b - self.size) % self.size
            keys = keys[-self.size :]
            b = self.size
        else:
            start = int(self.ptr)
        idx = (start + torch.arange(b, device=self.queue.device)) % self.size
        self.queue[idx] = keys.to(self.queue.device)
        self.ptr.fill_((start + b) % self.size)


@torch.no_grad()
def momentum_update(
    online: nn.Module, target: nn.Module, m: float, copy_buffers: bool = True
) -> None:
    """EMA update of the momentum (key) encoder: theta_k <- m * theta_k + (1 - m) * theta_q.

    Applied to every parameter (including the gating thresholds tau, docs/design.md §2). Parameters
    are matched by name; the two modules must have identical parameter names and shapes.
    With ``copy_buffers`` (default) buffers such as BN running statistics are copied from
    ``online`` to ``target`` (solo-learn leaves them to the key encoder's own forward passes;
    pass ``copy_buffers=False`` for that behaviour).
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum_update: m must be in [0, 1], got {m!r}")
    online_params = dict(online.named_parameters())
    target_params = dict(target.named_parameters())
    if online_params.keys() != target_params.keys():
        missing = sorted(set(online_params) ^ set(target_params))
        raise ValueError(f"momentum_update: parameter names differ between modules: {missing[:5]}")
    for name, p_t in target_params.items():
        p_o = online_params[name]
        if p_o.shape != p_t.shape:
            raise ValueError(
                f"momentum_update: parameter {name!r} has shape {tuple(p_o.shape)} online "
                f"and {tuple(p_t.shape)} in target"
            )
        p_t.mul_(m).add_(p_o.detach().to(p_t.dtype), alpha=1.0 - m)
    if copy_buffers:
        online_bufs = dict(online.named_buffers())
        for name, b_t in target.named_buffers():
            if name not in online_bufs:
                raise ValueError(f"momentum_update: buffer {name!r} missing from online module")
            b_t.copy_(online_bufs[name])


def cosine_momentum(step: int, max_steps: int, base: float = 0.99, final: float = 0.999) -> float:
    """BYOL / solo-learn momentum schedule, increasing from ``base`` to ``final``:

        m(step) = final - (final - base) * (cos(pi * step / max_steps) + 1) / 2

    ``step`` is clamped to [0, max_steps], so m(0) = base and m(step >= max_steps) = final.
    """
    if max_steps < 1:
        raise ValueError(f"cosine_momentum: max_steps must be >= 1, got {max_steps!r}")
    t = min(max(step, 0), max_steps)
    return final - (final - base) * (math.cos(math.pi * t / max_steps) + 1.0) / 2.0
