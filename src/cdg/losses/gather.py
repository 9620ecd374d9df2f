"""Gathering tensors across DDP processes, with or without gradient.

SimCLR's large-batch NT-Xent and MoCo's queue both want the *global* batch of embeddings. These
helpers wrap ``torch.distributed.all_gather`` and are no-ops (returning the input unchanged) when
``torch.distributed`` is unavailable, not initialised, or the world has a single process, so the
same code path runs on a laptop CPU and on a multi-GPU job.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GatherLayer(torch.autograd.Function):
    """``all_gather`` with gradient (as in solo-learn / lightly).

    Forward: ``out[r] = x_r`` for every rank r. Backward: each rank receives the gradient of its
    own slice summed over all ranks (``all_reduce`` of the stacked gradients). When rank r's loss
    is L_r and the global loss is L = 1/W * sum_r L_r (e.g. :class:`cdg.losses.NTXentLoss`'s local
    anchors against gathered keys), rank r's input x_r thus gets d(sum_r' L_r')/dx_r = W * dL/dx_r,
    and DDP's averaging of parameter gradients over the W ranks makes the update dL/dtheta. (The
    same holds when every rank computes the whole global loss: then each gets W * dL/dx_r too.)
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        output = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(output, x.contiguous())
        return tuple(output)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        all_gradients = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(all_gradients)
        return all_gradients[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, differentiably; identity when not distributed."""
    if not is_distributed():
        return x
    return torch.cat(GatherLayer.apply(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 without gradient (e.g. MoCo keys for the queue)."""
    if not is_distributed():
        return x.detach()
    output = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(output, x.detach().contiguous())
    return torch.cat(output, dim=0)
