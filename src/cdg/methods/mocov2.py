"""MoCo V2+ with CDG (docs/design.md §2).

Query encoder f_q and momentum key encoder f_k (EMA of every parameter, tau included; momentum
0.99 -> 0.999 on a cosine schedule over steps), one queue of negatives per view, symmetric loss.
Branch per view in both encoders: q1 = f_q(x1; a1), k2 = f_k(x2; a2), q2 = f_q(x2; a2),
k1 = f_k(x1; a1). As solo-learn's ``mocov2plus`` (the code the paper used)::

    L = ( InfoNCE(q1, k2, queue[1]) + InfoNCE(q2, k1, queue[0]) ) / 2
    queue[0] <- k1,  queue[1] <- k2

**Hard gates in the key encoder.** The key encoder is an EMA of the query encoder, a few percent
away in weights. With hard step gates that can flip many gates: the keys then come from a
different sparse network than the queries. ``method.key_gates`` chooses who gates the key
encoder: ``own`` (the paper's MoCo: f_k computes its own masks) or ``query`` (our deviation:
f_k reuses the masks f_q computed on the same view and branch, so that query and key differ only
in their weights, as in a dense MoCo). Every ``trainer.log_every_n_steps`` steps the method logs
the fraction of gates on which f_q and f_k disagree on identical input and branch (per layer and
on average) and the cosine similarity of their backbone features: the consistency of the teacher.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cdg.config import Config
from cdg.heads import MoCoProjectionHead
from cdg.losses import MemoryQueue, MoCoLoss, cosine_momentum, momentum_update
from cdg.losses.gather import gather_no_grad
from cdg.methods.base import SSLMethod, projector_in_dim
from cdg.nn import GatedConv2d, gated_layers


class MoCoV2Plus(SSLMethod):
    def __init__(self, cfg: Config, steps_per_epoch: int = 1) -> None:
        super().__init__(cfg, steps_per_epoch)
        m = cfg.method
        self.projector = MoCoProjectionHead(projector_in_dim(self.backbone), m.proj_hidden_dim, m.proj_output_dim)
        self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        # queues[v] holds the keys of view v + 1 (solo-learn's queue[v])
        self.queues = torch.nn.ModuleList(MemoryQueue(m.queue_size, m.proj_output_dim) for _ in range(2))
        self.criterion = MoCoLoss(m.temperature)
        self.momentum = m.base_momentum
        # (query layer, key layer) pairs of CDG's gated convolutions, for key_gates and the monitor
        q, k = gated_layers(self.backbone), gated_layers(self.momentum_backbone)
        self._gate_pairs = [(n, lq, lk) for (n, lq), (_, lk) in zip(q, k)]
        if m.key_gates == "query":
            for _, lq, lk in self._gate_pairs:
                if not isinstance(lq, GatedConv2d):
                    raise ValueError(f"method.key_gates=query needs CDG's gated layers, got {type(lq).__name__}")
                lq.keep_masks = True
                lk.mask_source = lq.last_masks  # the dict the query layer refreshes on every call

    @torch.no_grad()
    def _key_features(self, x: Tensor, branch: int) -> Tensor:
        return self.momentum_backbone(x, branch)

    def _measure_now(self) -> bool:
        every = self.cfg.trainer.log_every_n_steps
        return bool(self._gate_pairs) and self._trainer is not None and self.global_step % every == 0

    def ssl_loss(self, v1: Tensor, v2: Tensor) -> Tensor:
        measure = self._measure_now()
        if measure:
            for _, lq, lk in self._gate_pairs:
                lq.keep_masks = lk.keep_masks = True
        h1 = self.backbone(v1, 0)
        q1 = self.projector(h1)
        hk1 = self._key_features(v1, 0)  # before q2: the query layers still hold view 1's masks
        if measure:
            self._log_consistency(h1.detach(), hk1)
        q2 = self.projector(self.backbone(v2, 1))
        with torch.no_grad():
            k1 = self.momentum_projector(hk1)
            k2 = self.momentum_projector(self._key_features(v2, 1))
        if measure:
            query_masks = self.cfg.method.key_gates == "query"
            for _, lq, lk in self._gate_pairs:
                lq.keep_masks, lk.keep_masks = query_masks, False
                if not query_masks:
                    lq.last_masks.clear()
                lk.last_masks.clear()
        queue = [q.tensor.clone() for q in self.queues]
        loss = 0.5 * (self.criterion(q1, k2, queue[1]) + self.criterion(q2, k1, queue[0]))
        self.queues[0].enqueue(gather_no_grad(k1.float()))
        self.queues[1].enqueue(gather_no_grad(k2.float()))
        return loss

    @torch.no_grad()
    def _log_consistency(self, hq: Tensor, hk: Tensor) -> None:
        """Gate disagreement of f_q and f_k on view 1, branch a1, and their features' cosine."""
        dis = {}
        for name, lq, lk in self._gate_pairs:
            a, b = lq.last_masks.get(0), lk.last_masks.get(0)
            if a is not None and b is not None:
                dis[name] = float((a != b).float().mean())
        n = hq.shape[0]
        if dis:
            self.log("monitor/key_gate_disagreement", sum(dis.values()) / len(dis), on_step=True, on_epoch=False,
                     batch_size=n)
            for name, v in dis.items():
                self.log(f"monitor/key_gate_disagreement/{name}", v, on_step=True, on_epoch=False, batch_size=n)
        self.log("monitor/key_feature_cosine", F.cosine_similarity(hq.float(), hk.float(), dim=1).mean(),
                 on_step=True, on_epoch=False, batch_size=n)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """EMA update of the key encoder after each optimiser step, momentum on a cosine schedule."""
        self.momentum = cosine_momentum(self.global_step, self.total_steps, self.cfg.method.base_momentum, self.cfg.method.final_momentum)
        momentum_update(self.backbone, self.momentum_backbone, self.momentum, copy_buffers=False)
        momentum_update(self.projector, self.momentum_projector, self.momentum, copy_buffers=False)
        self.log("train/momentum", self.momentum, on_step=True, on_epoch=False)
