"""SimCLR with CDG (paper Sec. 3-4, Fig. 2): NT-Xent between z1 = g(f(x1; a1)), z2 = g(f(x2; a2))."""

from __future__ import annotations

from torch import Tensor

from cdg.config import Config
from cdg.heads import SimCLRProjectionHead
from cdg.losses import NTXentLoss
from cdg.methods.base import SSLMethod, projector_in_dim


class SimCLR(SSLMethod):
    def __init__(self, cfg: Config, steps_per_epoch: int = 1) -> None:
        super().__init__(cfg, steps_per_epoch)
        m = cfg.method
        self.projector = SimCLRProjectionHead(projector_in_dim(self.backbone), m.proj_hidden_dim, m.proj_output_dim)
        self.criterion = NTXentLoss(m.temperature, gather_distributed=True)

    def ssl_loss(self, v1: Tensor, v2: Tensor) -> Tensor:
        z1 = self.projector(self.backbone(v1, 0))
        z2 = self.projector(self.backbone(v2, 1))
        return self.criterion(z1, z2)
