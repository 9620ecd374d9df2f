"""Re-estimate a backbone's BatchNorm running statistics on one branch.

During pre-training every step runs view 1 through base path a1 and view 2 through a2, and each
BatchNorm's running mean and variance (one set, shared by both branches) settles near an average of
the two branches' statistics. Evaluation runs branch a1 only, in eval mode. This module measures
what that costs: it replaces every BatchNorm's running statistics by those of branch a1's own
activations on a set of images (a cumulative average over all of them, not an EMA), leaving
every weight and gate threshold as trained.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cdg.data import normalize_batch


@torch.no_grad()
def recalibrate_bn(backbone: nn.Module, images: Tensor, mean: tuple[float, float, float],
                   std: tuple[float, float, float], branch: int = 0, batch_size: int = 512,
                   channels_last: bool = True) -> int:
    """Set every BatchNorm's running mean/var to those of ``branch`` on ``images`` (uint8 N x 3 x H x W).

    The gates stay in eval mode (hard masks with the trained thresholds), as at evaluation; only
    the BatchNorm layers run in training mode, with ``momentum=None`` (an exact average over the
    batches). Returns the number of BatchNorm layers re-estimated. The backbone is left in eval mode.
    """
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    backbone.eval()
    dev = next(backbone.parameters()).device
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for i in range(0, len(images), batch_size):
            x = normalize_batch(images[i:i + batch_size].to(dev), mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            backbone(x, branch)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        backbone.eval()
    return len(bns)
