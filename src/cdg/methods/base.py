"""What every SSL method shares: two views on two branches, the sparsity objective, optimisers.

Subclasses implement :meth:`SSLMethod.ssl_loss` (view 1 on branch a1, view 2 on branch a2, in
separate backbone calls: docs/design.md §2) and may add heads. Nothing here knows the CLI.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from cdg.builders import build_backbone, gating_target
from cdg.config import Config
from cdg.data import BatchAugment, augment_preset
from cdg.nn import get_gating_mode, pop_aux_losses, set_pruning_progress, sparsity_objective, threshold_layers
from cdg.optim import LARS, build_warmup_cosine_scheduler, split_params_for_lars
from cdg.optim.schedule import WarmupCosineFactor, total_steps

log = logging.getLogger("cdg")


class SSLMethod(L.LightningModule):
    """Base LightningModule: backbone + gating, augmentation of uint8 batches, Eq. 11, LARS/SGD."""

    def __init__(self, cfg: Config, steps_per_epoch: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.save_hyperparameters({"config": cfg.to_dict(), "steps_per_epoch": steps_per_epoch})
        self.backbone = build_backbone(cfg)
        self.augment = BatchAugment(augment_preset(cfg.method.name, cfg.data.dataset))
        self.target = gating_target(cfg)

    # --- data ------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Batched augmentation on the training device (docs/design.md §7): uint8 images -> two views."""
        images, labels = batch
        if self._trainer is None or not self._trainer.training:
            return batch
        if isinstance(images, (list, tuple)):  # per-image path: the workers already made (view 1, view 2)
            v1, v2 = images
        elif images.dtype == torch.uint8:
            v1, v2 = self.augment.two_views(images)
        else:
            return batch
        if self.cfg.trainer.channels_last:
            v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
        return (v1, v2), labels

    # --- forward and loss ------------------------------------------------------------------
    def forward(self, x: Tensor, branch: int = 0) -> Tensor:
        """Backbone features on ``branch`` (evaluation always uses branch a1 = 0)."""
        return self.backbone(x, branch)

    def ssl_loss(self, v1: Tensor, v2: Tensor) -> Tensor:
        raise NotImplementedError

    def current_target(self) -> float:
        """s of Eq. 11, ramped linearly from tau_init over ``gating.ramp_epochs`` if set."""
        ramp = self.cfg.gating.ramp_epochs
        if ramp <= 0:
            return self.target
        frac = min(1.0, self.global_step / (ramp * self.steps_per_epoch))
        return self.cfg.gating.tau_init + frac * (self.target - self.cfg.gating.tau_init)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: ``trainer.max_epochs`` x steps per epoch."""
        return total_steps(self.cfg.trainer.max_epochs, self.steps_per_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """DGC pruning-rate ramp (docs/design.md §5): fraction of training done, on every module (MoCo key encoder too)."""
        set_pruning_progress(self, min(1.0, self.global_step / self.total_steps))

    def on_train_start(self) -> None:
        """A run resumed with a different ``trainer.max_epochs``: the restored schedule still ends at
        the old length (a finished run would go on at lr = 0). Its horizon is set to the new length,
        so from the resume step on the lr is the warm-up-cosine of a run planned with the new length
        (for a longer run, the lr rises from the old schedule's value to the new one's at that step)."""
        for conf in self.trainer.lr_scheduler_configs:
            sched = conf.scheduler
            factors = getattr(sched, "lr_lambdas", [])
            changed = False
            for f in factors:
                if isinstance(f, WarmupCosineFactor) and f.total_steps != self.total_steps:
                    old, f.total_steps = f.total_steps, self.total_steps
                    f.warmup_steps = min(f.warmup_steps, self.total_steps - 1)
                    changed = True
            if changed:
                step = sched.last_epoch
                for group, base, f in zip(sched.optimizer.param_groups, sched.base_lrs, factors):
                    group["lr"] = base * f(step)
                sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
                log.warning("learning-rate schedule extended from %d to %d steps at step %d (trainer.max_epochs=%d)",
                            old, self.total_steps, step, self.cfg.trainer.max_epochs)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (v1, v2), _ = batch
        loss = self.ssl_loss(v1, v2)
        reg = sparsity_objective(self.backbone, self.current_target(), self.cfg.gating.lam).to(loss.device)
        aux = pop_aux_losses(self.backbone).to(loss.device)  # FBS / DGC predictor losses, both views
        total = loss + reg + aux
        mode = get_gating_mode(self.cfg.gating.mode)
        if mode.has_predictor_loss:
            self.log("train/predictor_loss", aux.detach(), on_step=True, on_epoch=True, batch_size=v1.shape[0])
        # under DDP each process holds its share of the global loss (local anchors): log their mean
        self.log("train/ssl_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=v1.shape[0],
                 sync_dist=True)
        if mode.gated:
            self.log("train/sparsity_reg", reg.detach(), on_step=True, on_epoch=True, batch_size=v1.shape[0])
        return total

    # --- optimisation ----------------------------------------------------------------------
    #: submodules (attribute names) trained at a fixed learning rate, each in a group of its own
    fixed_lr_modules: tuple[str, ...] = ()

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups, by name: LARS-scaled weights and the excluded 1-D parameters
        (:func:`cdg.optim.split_params_for_lars`), the gating thresholds tau alone (no weight decay,
        no LARS scaling; docs/design.md §3), and each of :attr:`fixed_lr_modules` alone."""
        taus = {f"backbone.{n}.tau": m.tau for n, m in threshold_layers(self.backbone)}
        fixed = tuple(f"{m}." for m in self.fixed_lr_modules)
        out = split_params_for_lars(self, skip=lambda n: n in taus or n.startswith(fixed))
        if taus:
            out.append({"params": list(taus.values()), "weight_decay": 0.0, "lars_exclude": True, "name": "tau"})
        for name in self.fixed_lr_modules:
            out.append({"params": list(getattr(self, name).parameters()), "fixed_lr": self.cfg.optim.predictor_fixed_lr,
                        "name": name})
        return out

    def configure_optimizers(self):
        o = self.cfg.optim
        world = self._trainer.world_size if self._trainer is not None else 1  # usable without a Trainer
        lr = o.lr * (self.cfg.data.batch_size * world / 256 if o.scale_lr else 1.0)
        groups = self.param_groups()
        if o.name == "lars":
            opt = LARS(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, eta=o.lars_eta)
        else:
            opt = torch.optim.SGD(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
        total = self.total_steps
        warm = min(total - 1, int(math.ceil(o.warmup_epochs * self.steps_per_epoch)))
        sched = build_warmup_cosine_scheduler(opt, warmup_steps=warm, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def projector_in_dim(backbone: nn.Module) -> int:
    return int(getattr(backbone, "num_features"))
