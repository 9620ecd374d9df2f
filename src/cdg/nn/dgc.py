"""Dynamic Group Convolution (DGC, Su et al. 2020): a baseline of Tables 6-7 (docs/design.md §5).

A 3x3 convolution C_in -> C_out is split into ``heads`` (4) heads along its output channels. The
layer first normalises and rectifies its input (its own BatchNorm over C_in), then head ``h`` has
its own salience generator, which scores the *input* channels of every sample::

    x'  = ReLU(BN(x))                           the layer's own BN (affine), before pooling and conv
    s_h = ReLU(FC2_h(ReLU(FC1_h(GAP(x')))))     FC1: C_in -> C_in / r (no bias), FC2: -> C_in (bias 1)
    M_h = 0 on the n_off smallest s_h, n_off = round((1 - g_keep) * C_in)   per sample
    Y_h = conv(x' * (M_h * s_h), W_h)           W_h: C_out/heads x C_in x 3 x 3
    Y   = concat_h Y_h
    loss = loss_coef * sum_h mean_{n, c}(s_h)   (1e-5; the per-head means are summed, not averaged)

with r = ``squeeze`` (16), halved (8) when C_in < 80. The kept channels are scaled by their
saliency, which is how the generators receive gradients.

The official code is github.com/zhuogege1943/dgc. Read here through copies in a public code index
(the repository itself is not indexed): ``layers.py`` with the header "source:
https://github.com/zhuogege1943/dgc/blob/439fde259c/layers.py"; the ``main.py`` whose docstring
reads "Dynamic Group Convolution ... authors: Zhuo Su, Linpu Fang ... Code forked from
CondenseNet"; and a ResNet-18 file (``dyresnet18(args)``, ``from layers import
DynamicMultiHeadConv``, ``args.heads/squeeze_rate/gate_factor``) without a source header:

* ``layers.py``, ``DynamicMultiHeadConv.forward``: ``x = self.norm(x); x = self.relu(x)``
  (``nn.BatchNorm2d(in_channels)``, ``nn.ReLU``), then ``x_averaged = self.avg_pool(x)``; each
  ``HeadConv`` computes ``mask = relu_fc2(fc2(relu_fc1(fc1(x_averaged))))`` and
  ``_lasso_loss = mask.mean()``, zeroes the entries ``<=`` the largest of the ``inactive_channels``
  smallest (``topk(..., largest=False)``), and returns ``x * mask_c``; the layer returns the sum of
  the heads' ``_lasso_loss``. fc1/fc2 are ``kaiming_normal_``, fc2's bias 1.0, r halved below 80.
* ``inactive_channels = round(C_in * (1 - gate_factor) * 3/2 * (progress - 1/12))`` for
  1/12 < progress < 3/4, ``round(C_in * (1 - gate_factor))`` from 3/4 on (Python's round).
* ``main.py``: ``lasso_loss = sum over layers of lasso_m.mean()``,
  ``loss = CE + group_lasso_lambda * lasso_loss`` with ``group_lasso_lambda = 1e-5``.
* ``dyresnet18``: the torchvision post-activation BasicBlock with the two 3x3 convs
  replaced by ``DynamicMultiHeadConv``, the block's ``bn1``/``bn2`` kept after them. So every DGC
  conv sees ``ReLU(BN(input))`` of its own *and* is followed by the block's BN, exactly what
  :mod:`cdg.models.resnet`'s (unchanged) post-activation blocks give with this layer. Differences
  left: the official ResNet also gates the 1x1 downsampling shortcut (ours stays dense, as for every
  method here) and interleaves the heads' output channels (``view(b, heads, c/heads).transpose``),
  a fixed relabelling of output channels that changes nothing.

``form="v1"`` is the form of the earlier results in docs/results.md: no BN/ReLU inside the layer
(the generators and the convolution read ``x``), the loss ``loss_coef * mean(s)`` over samples,
heads and channels (1/heads of the official one), and ``k = ceil(keep * C_in)`` kept channels.

The pruning rate is ramped (:func:`dgc_keep_ratio`): nothing is pruned during the first 1/12 of
training, then the rate grows linearly to its target ``1 - keep_ratio`` at 3/4 of training and stays
there. :meth:`DGCConv2d.set_progress` sets the fraction of training done; a new layer starts at
progress 1.0 (the final rate), which evaluation and fine-tuning keep.

Training computes every head densely on its scaled input (one grouped convolution over ``heads``
scaled copies of x', the cost of one dense convolution); at inference a head reads only its k kept
input channels, so the layer costs ``9 C_in C_out H W (1 - eta) + heads * 2 * C_in * C_in/r`` MACs
per image (:meth:`DGCConv2d.macs_per_image`), with eta = (C_in - k) / C_in the fraction of
(head, input channel) pairs pruned (the input BN/ReLU and the pooling are not counted). In
self-supervised training the generators and the BN are shared by both views; the masks are per view
(docs/design.md §5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdg.nn.fbs import DynamicPruningConv, check_form, kept_channels, top_k_mask

RAMP_START = 1.0 / 12.0
RAMP_END = 3.0 / 4.0


def dgc_keep_ratio(progress: float, final_keep: float, start: float = RAMP_START, end: float = RAMP_END) -> float:
    """Fraction of input channels a DGC head keeps after ``progress`` (0..1) of training.

    Pruning rate 0 (keep 1.0) up to ``start`` (1/12), then linear to ``1 - final_keep`` at ``end``
    (3/4), constant afterwards (Su et al. 2020; docs/design.md §5)::

        keep(p) = 1 - (1 - final_keep) * clamp((p - start) / (end - start), 0, 1)
    """
    if not 0.0 < final_keep <= 1.0:
        raise ValueError(f"DGC final keep ratio must be in (0, 1], got {final_keep!r}")
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"DGC ramp needs 0 <= start < end <= 1, got start={start!r}, end={end!r}")
    frac = min(1.0, max(0.0, (progress - start) / (end - start)))
    return 1.0 - (1.0 - final_keep) * frac


def dgc_pruned_channels(
    progress: float, final_keep: float, channels: int, start: float = RAMP_START, end: float = RAMP_END
) -> int:
    """Input channels a DGC head zeroes after ``progress`` of training: the official rule.

    ``round(C * (1 - final_keep) * clamp((p - start) / (end - start), 0, 1))`` with Python's round
    (the official ``inactive_channels``; for the default ramp ``(p - 1/12) / (2/3) = 3/2 (p - 1/12)``),
    at most ``C - 1`` so that a head keeps a channel.
    """
    dgc_keep_ratio(progress, final_keep, start, end)  # validates the arguments
    frac = min(1.0, max(0.0, (progress - start) / (end - start)))
    return min(channels - 1, round(channels * (1.0 - final_keep) * frac))


def dgc_hidden_channels(in_channels: int, squeeze: int = 16) -> int:
    """C_in / r of the salience generators: r = ``squeeze``, halved when C_in < 80; at least 1."""
    r = squeeze if in_channels >= 80 else max(1, squeeze // 2)
    return max(1, in_channels // r)


class DGCConv2d(DynamicPruningConv):
    """3x3 dynamic group convolution (Su et al. 2020; docs/design.md §5).

    Args:
        in_channels, out_channels: channel counts; ``out_channels`` must be divisible by ``heads``.
        stride: convolution stride (kernel 3, padding 1, no bias).
        heads: number of heads (4); ``gate_groups`` equals it (Table 6's "# of groups").
        keep_ratio: g, the final fraction of input channels a head keeps (0.45; 0.47 matches the
            paper's 2.11x).
        squeeze: r of the salience generators (16, halved when C_in < 80).
        loss_coef: coefficient of the saliency loss (1e-5).
        ramp_start, ramp_end: fractions of training where the pruning ramp starts and ends.
        scale_free: generators on the RMS-normalised pooled input (see :class:`DynamicPruningConv`).
        form: ``"official"`` (default: the layer's own BN + ReLU on its input, the loss summed over
            heads, ``round`` pruning count; see the module docstring) or ``"v1"`` (earlier results).

    The weight is one C_out x C_in x 3 x 3 tensor; head h owns output rows
    [h * C_out/heads, (h+1) * C_out/heads). ``owns_norm`` is False: the block's BN after the
    layer is part of the official ResNet too.
    """

    owns_norm = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        heads: int = 4,
        keep_ratio: float = 0.45,
        squeeze: int = 16,
        loss_coef: float = 1e-5,
        *,
        ramp_start: float = RAMP_START,
        ramp_end: float = RAMP_END,
        scale_free: bool = False,
        form: str = "official",
    ) -> None:
        super().__init__(in_channels, out_channels, stride, scale_free)
        self.form = check_form(form)
        if heads < 1 or out_channels % heads:
            raise ValueError(f"DGCConv2d: out_channels={out_channels} is not divisible by heads={heads}")
        if squeeze < 1:
            raise ValueError(f"DGCConv2d: squeeze must be >= 1, got {squeeze}")
        dgc_keep_ratio(1.0, keep_ratio, ramp_start, ramp_end)  # validates the schedule
        self.heads, self.keep_ratio, self.squeeze, self.loss_coef = heads, float(keep_ratio), squeeze, float(loss_coef)
        self.ramp_start, self.ramp_end = ramp_start, ramp_end
        self.gate_groups, self.group_size = heads, 1
        self.hidden = dgc_hidden_channels(in_channels, squeeze)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        # salience generators of all heads, batched: FC1 (no bias) and FC2 (bias 1), He-normal
        self.fc1_weight = nn.Parameter(torch.randn(heads, self.hidden, in_channels) * math.sqrt(2.0 / in_channels))
        self.fc2_weight = nn.Parameter(torch.randn(heads, in_channels, self.hidden) * math.sqrt(2.0 / self.hidden))
        self.fc2_bias = nn.Parameter(torch.ones(heads * in_channels))  # 1-D: treated as a bias by LARS
        # official: DynamicMultiHeadConv's self.norm / self.relu on the input (v1 has no such module,
        # so that its checkpoints still load)
        self.norm = nn.BatchNorm2d(in_channels) if form == "official" else None
        self.progress = 1.0

    # --- pruning schedule ------------------------------------------------------------------
    def set_progress(self, progress: float) -> None:
        """Fraction of training done (0..1); sets the current pruning rate (:func:`dgc_keep_ratio`)."""
        self.progress = float(progress)

    def current_keep_ratio(self) -> float:
        return dgc_keep_ratio(self.progress, self.keep_ratio, self.ramp_start, self.ramp_end)

    def kept_inputs(self) -> int:
        """k, the input channels each head keeps now.

        official: ``C_in - round((1 - keep) * C_in * ramp)`` (:func:`dgc_pruned_channels`);
        v1: ``ceil(keep(progress) * C_in)``. They differ when ``keep * C_in`` has a fractional part
        below 0.5, e.g. C_in = 32, keep 0.45: 14 (official) against 15 (v1).
        """
        if self.form == "v1":
            return kept_channels(self.current_keep_ratio(), self.in_channels)
        return self.in_channels - dgc_pruned_channels(
            self.progress, self.keep_ratio, self.in_channels, self.ramp_start, self.ramp_end)

    # --- forward ---------------------------------------------------------------------------
    def preprocess(self, x: Tensor) -> Tensor:
        """x' = ReLU(BN(x)), what the generators and the convolution read (official); x itself (v1)."""
        return x if self.norm is None else torch.relu(self.norm(x))

    def saliency(self, x: Tensor) -> Tensor:
        """s = ReLU(FC2(ReLU(FC1(GAP(x'))))) for every head: N x heads x C_in, >= 0.

        ``x`` is the layer's input; in the official form the call updates the BN's running statistics
        in training mode, as a forward does.
        """
        return self._generators(self.preprocess(x))

    def _generators(self, xp: Tensor) -> Tensor:
        pooled = self.pooled(xp)
        hid = torch.relu(torch.einsum("nc,hdc->nhd", pooled, self.fc1_weight.to(pooled.dtype)))
        s = torch.einsum("nhd,hcd->nhc", hid, self.fc2_weight.to(hid.dtype))
        return torch.relu(s + self.fc2_bias.view(self.heads, self.in_channels).to(s.dtype))

    def forward(self, x: Tensor, branch: int = 0) -> Tensor:
        self._check_branch(branch)
        n, c = x.shape[:2]
        xp = self.preprocess(x)
        s = self._generators(xp)
        k = self.kept_inputs()
        # the k largest per head: the official "zero everything <= the (C - k)-th smallest" up to ties
        # (tied zeros change nothing, as x' * 0 = 0 either way)
        mask = top_k_mask(s, k, dim=2)
        scale = (mask * s).to(xp.dtype)  # N x heads x C_in
        xs = (xp.unsqueeze(1) * scale[..., None, None]).flatten(1, 2)  # N x heads*C_in x H x W
        y = F.conv2d(xs, self.weight, None, self.stride, 1, 1, self.heads)
        _, co, h, w = y.shape
        sf = s.float()
        # official: the heads' mean saliencies summed (layers.py); v1: the mean over heads as well
        loss = sf.mean((0, 2)).sum() if self.form == "official" else sf.mean()
        self._record(mask, branch, (c - k) / c, n * co * h * w, self.loss_coef * loss)
        return y

    # --- cost ------------------------------------------------------------------------------
    def predictor_macs(self) -> int:
        """The generators' FC layers: heads * 2 * C_in * (C_in / r) MACs per image."""
        return self.heads * 2 * self.in_channels * self.hidden

    def final_eta(self) -> float:
        """(C_in - k_final) / C_in, k_final the kept count at the final rate (see :meth:`kept_inputs`)."""
        if self.form == "v1":
            return (self.in_channels - kept_channels(self.keep_ratio, self.in_channels)) / self.in_channels
        pruned = dgc_pruned_channels(1.0, self.keep_ratio, self.in_channels, self.ramp_start, self.ramp_end)
        return pruned / self.in_channels

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, heads={self.heads}, "
            f"keep_ratio={self.keep_ratio}, hidden={self.hidden}, loss_coef={self.loss_coef}, "
            f"progress={self.progress:.3f}, form={self.form}"
        )
