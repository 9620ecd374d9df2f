"""Supervised stages on top of a pre-trained backbone, branch a1 (paper Sec. 3.2, 5; docs/design.md §4).

* Linear evaluation (``finetune=False``): backbone frozen in eval mode, gates frozen; a linear
  classifier trained with SGD (momentum 0.9, no weight decay), lr steps at the milestones.
* Fine-tuning (``finetune=True``): backbone and classifier trained on a seeded stratified label
  fraction (50%), gating active on branch a1, tau trainable toward the final target s (Eq. 11
  regulariser kept, Sec. 5.2), SGD with cosine decay. eta of the training batches is logged as
  ``finetune/eta`` (``finetune/logs/metrics.csv``, Fig. 8b).

Both augment with random resized crop (scale 0.08-1) and horizontal flip, batched per sample.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdg.builders import gating_target
from cdg.config import Config
from cdg.data import AugmentConfig, BatchAugment, dataset_info, normalize_batch
from cdg.nn import gate_statistics, pop_aux_losses, reset_gate_stats, sparsity_objective, threshold_layers
from cdg.optim import build_warmup_cosine_scheduler
from cdg.optim.schedule import total_steps


class SupervisedHead(L.LightningModule):
    def __init__(self, cfg: Config, backbone: nn.Module, num_classes: int, finetune: bool, steps_per_epoch: int) -> None:
        super().__init__()
        self.cfg, self.finetune, self.steps_per_epoch = cfg, finetune, max(1, steps_per_epoch)
        self.backbone = backbone
        self.classifier = nn.Linear(int(backbone.num_features), num_classes)
        info = dataset_info(cfg.data.dataset)
        self.mean, self.std = info.mean, info.std
        self.augment = BatchAugment(AugmentConfig(crop_size=info.image_size or 224, jitter_prob=0.0, gray_prob=0.0,
                                                  mean=info.mean, std=info.std))
        self.target = gating_target(cfg)
        if not finetune:
            self.backbone.requires_grad_(False)

    def on_train_epoch_start(self) -> None:
        if not self.finetune:
            self.backbone.eval()  # frozen backbone: BN statistics and gates stay as pre-trained

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        if x.dtype == torch.uint8:
            x = self.augment(x) if (self._trainer is not None and self._trainer.training) else normalize_batch(x, self.mean, self.std)
            if self.cfg.trainer.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def forward(self, x: Tensor) -> Tensor:
        if self.finetune:
            return self.classifier(self.backbone(x, 0))
        with torch.no_grad():
            f = self.backbone(x, 0)
        return self.classifier(f.float())

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/ce", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        if self.finetune:
            loss = loss + sparsity_objective(self.backbone, self.target, self.cfg.gating.lam).to(loss.device)
            loss = loss + pop_aux_losses(self.backbone).to(loss.device)  # FBS / DGC predictors (docs/design.md §5)
            self._log_eta()
        return loss

    def _log_eta(self) -> None:
        """eta during fine-tuning (Fig. 8b): the training batches' gates (branch a1) since the last
        log, on the steps Lightning writes to the log (every ``trainer.log_every_n_steps``)."""
        every = max(1, self.cfg.trainer.log_every_n_steps)
        if (self.global_step + 1) % every:
            return
        stats = gate_statistics(self.backbone, "train")
        if "eta_a1" in stats:
            self.log("finetune/eta", float(stats["eta_a1"]), on_step=True, on_epoch=False, batch_size=1)
        reset_gate_stats(self.backbone)

    def configure_optimizers(self):
        e = self.cfg.eval
        if self.finetune:
            taus = {f"backbone.{n}.tau": m.tau for n, m in threshold_layers(self.backbone)}
            rest = [p for n, p in self.named_parameters() if p.requires_grad and n not in taus]
            groups = [{"params": rest}, {"params": list(taus.values()), "weight_decay": 0.0}]
            opt = torch.optim.SGD([g for g in groups if g["params"]], lr=e.finetune_lr, momentum=0.9, weight_decay=e.finetune_weight_decay)
            sched = build_warmup_cosine_scheduler(opt, 0, total_steps(e.finetune_epochs, self.steps_per_epoch))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        opt = torch.optim.SGD(self.classifier.parameters(), lr=e.linear_lr, momentum=0.9, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, e.linear_milestones, 0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


@torch.no_grad()
def evaluate_classifier(model: SupervisedHead, ds: Any, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (eval mode, branch a1) on an in-memory dataset."""
    model.eval()
    dev = next(model.parameters()).device
    correct = 0
    for i in range(0, len(ds), batch_size):
        x = normalize_batch(ds.images[i:i + batch_size].to(dev), model.mean, model.std)
        if model.cfg.trainer.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=model.cfg.trainer.bf16):
            logits = model.classifier(model.backbone(x, 0).float())
        correct += int((logits.argmax(1).cpu() == ds.targets[i:i + batch_size]).sum())
    return correct / len(ds)
