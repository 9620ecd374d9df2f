"""SimSiam with CDG: L = D(p1, sg(z2))/2 + D(p2, sg(z1))/2, view 1 on a1, view 2 on a2 (docs/design.md §2)."""

from __future__ import annotations

from torch import Tensor

from cdg.config import Config
from cdg.heads import SimSiamPredictionHead, SimSiamProjectionHead
from cdg.losses import NegativeCosineSimilarity
from cdg.methods.base import SSLMethod, projector_in_dim


class SimSiam(SSLMethod):
    #: the predictor keeps a fixed learning rate (SimSiam; solo-learn's static_lr)
    fixed_lr_modules = ("predictor",)

    def __init__(self, cfg: Config, steps_per_epoch: int = 1) -> None:
        super().__init__(cfg, steps_per_epoch)
        m = cfg.method
        self.projector = SimSiamProjectionHead(projector_in_dim(self.backbone), m.proj_hidden_dim, m.proj_output_dim)
        self.predictor = SimSiamPredictionHead(m.proj_output_dim, m.pred_hidden_dim, m.proj_output_dim)
        self.criterion = NegativeCosineSimilarity()

    def ssl_loss(self, v1: Tensor, v2: Tensor) -> Tensor:
        z1 = self.projector(self.backbone(v1, 0))
        z2 = self.projector(self.backbone(v2, 1))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return 0.5 * (self.criterion(p1, z2) + self.criterion(p2, z1))
