"""MoCo V2+ with CDG (docs/design.md §2).

Query encoder f_q and momentum key encoder f_k (EMA of every parameter, tau included; momentum
0.99 -> 0.999 on a cosine schedule over steps), a queue of negatives, symmetric loss. Branch per
view in both encoders: q1 = f_q(x1; a1), k2 = f_k(x2; a2), q2 = f_q(x2; a2), k1 = f_k(x1; a1).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from cdg.config import Config
from cdg.heads import MoCoProjectionHead
from cdg.losses import MemoryQueue, MoCoLoss, cosine_momentum, momentum_update
from cdg.losses.gather import gather_no_grad
from cdg.methods.base import SSLMethod, projector_in_dim


class MoCoV2Plus(SSLMethod):
    def __init__(self, cfg: Config, steps_per_epoch: int = 1) -> None:
        super().__init__(cfg, steps_per_epoch)
        m = cfg.method
        self.projector = MoCoProjectionHead(projector_in_dim(self.backbone), m.proj_hidden_dim, m.proj_output_dim)
        self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.queue = MemoryQueue(m.queue_size, m.proj_output_dim)
        self.criterion = MoCoLoss(m.temperature)
        self.momentum = m.base_momentum

    @torch.no_grad()
    def _keys(self, x: Tensor, branch: int) -> Tensor:
        return self.momentum_projector(self.momentum_backbone(x, branch))

    def ssl_loss(self, v1: Tensor, v2: Tensor) -> Tensor:
        q1 = self.projector(self.backbone(v1, 0))
        q2 = self.projector(self.backbone(v2, 1))
        k1, k2 = self._keys(v1, 0), self._keys(v2, 1)
        queue = self.queue.tensor.clone()
        loss = 0.5 * (self.criterion(q1, k2, queue) + self.criterion(q2, k1, queue))
        self.queue.enqueue(gather_no_grad(torch.cat([k1, k2]).float()))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """EMA update of the key encoder after each optimiser step, momentum on a cosine schedule."""
        self.momentum = cosine_momentum(self.global_step, self.total_steps, self.cfg.method.base_momentum, self.cfg.method.final_momentum)
        momentum_update(self.backbone, self.momentum_backbone, self.momentum, copy_buffers=False)
        momentum_update(self.projector, self.momentum_projector, self.momentum, copy_buffers=False)
        self.log("train/momentum", self.momentum, on_step=True, on_epoch=False)
