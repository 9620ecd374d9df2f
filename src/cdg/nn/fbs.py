"""Feature Boosting and Suppression (FBS, Gao et al. 2019): a baseline of Tables 6-7 (docs/design.md §5).

Per gated 3x3 convolution, a salience predictor reads the globally average-pooled input and scores
every *output* channel of every sample; the layer takes over the normalisation of its output::

    g = ReLU(FC(GAP(x)))                      FC: C_in -> C_out, bias 1, weights trunc. normal (std 0.01)
    M = top_k(g), k = ceil(d * C_out)         winner-take-all per sample (d = keep ratio, 0.5 = "2.00x")
    Y = M * g * BN_noaffine(conv(x)) + M * beta                       beta: per channel, initialised to 0.1
    L1 = l1 * sum_{n, c} |M * g|              summed over the batch and the channels (l1 = 1e-8)

``g`` replaces the scale (gamma) of the convolution's BatchNorm and ``beta`` its shift, so a
suppressed channel is exactly 0 after the layer and the activation (ReLU in the first convolution of
a block; none before the residual sum in the second) follows directly: one normalisation per
convolution. In self-supervised training the predictor (and the normalisation) is shared by both
contrastive views; the masks are per view, because they depend on the input (docs/design.md §5).

The official code (``deep-fry/mayo``, the FBS authors' TensorFlow framework):

* ``mayo/net/tf/gate/parametric.py`` (``ParametricGatedConvolution``, commit 7d2dd3e):
  ``normalize`` is the layer's ``slim.batch_norm`` with ``scale=False, center=False``;
  ``activate`` computes ``tensor *= actives * gamma`` then ``tensor += actives * beta`` (beta a
  per-channel variable ``gate/shift`` initialised to 0.1), then the layer's activation function.
  ``gamma`` is the predictor output (``gate()``), registered as ``gate.gamma``.
* ``mayo/net/tf/gate/base.py`` (``GatedConvolutionBase``): ``_predictor`` is GAP + a 1x1 conv
  (= FC) with ``biases_initializer=1.0``, ``weights_initializer=truncated_normal(stddev=0.01)``
  and the layer's activation function (ReLU; mayo's ResNet-18, ``models/resnet18.yaml``, sets
  none on a block's second conv, whose ReLU follows the residual sum, so there its predictor is
  linear; ours applies ReLU everywhere, as v1 and docs/design.md §5 do); ``actives`` keeps the
  ``ceil(density * C)`` largest gate values per sample (threshold = the (k+1)-th largest, ``>``),
  with ``stop_gradient``. ``models/gate/resnet18.yaml`` also gates the stem and the downsampling
  shortcuts, which stay dense here as for every method.
* ``SparseRegularizedGatedConvolutionBase.regularize`` (base.py at 7d2dd3e, later
  ``gate/sparse.py``): ``sparse = gate() * actives()``, loss ``tf.reduce_sum(tf.abs(sparse))``
  times the weight, added to ``REGULARIZATION_LOSSES``; ``mayo/session/train.py`` adds those to
  each tower's mean task loss unchanged, so the L1 is a sum over the (per-GPU) batch, not a mean.

Known variants inside mayo's history (we follow 7d2dd3e, which also matches the comment that every
version of ``parametric.py`` carries): a later ``parametric.py`` (0ee22a5) adds the shift before
the gate (``Y = M g (BN + beta)``), a later ``base.py`` (cf1d776) initialises the predictor with
std 0.05, and the older single-file ``mayo/net/tf/gate.py`` regularised the unmasked ``g``.

With ``form="official"`` (default) the layer has :attr:`FBSConv2d.owns_norm` set: the backbone must
not apply its own BatchNorm to this layer's output (in :mod:`cdg.models.resnet` that BN becomes an
``nn.Identity``; see docs/design.md §5). ``form="v1"`` is the form of the earlier results in
docs/results.md: same formula, but ``beta`` initialised to 0, the default ``nn.Linear`` init of the
predictor, the L1 on the unmasked ``g`` (``l1 * sum |g|``) and the block's affine BN kept after the
layer (``owns_norm`` False).

Training computes ``conv(x)`` densely and multiplies by the mask; at inference the suppressed output
channels of a sample are simply not computed, so they cost nothing: the layer costs
``9 C_in C_out H W (1 - eta) + C_in C_out`` MACs per image (:meth:`FBSConv2d.macs_per_image`).

This module also holds :class:`DynamicPruningConv`, the part FBS and DGC (:mod:`cdg.nn.dgc`)
share: a :class:`cdg.nn.gated.GatedLayer` with a salience predictor, its auxiliary loss and no
base path, so that :func:`cdg.nn.gate_statistics` and :func:`cdg.nn.mask_similarity` work on
them as on CDG's layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdg.nn.gated import GatedLayer


#: the forms of the FBS and DGC layers: the official code's (default) and the earlier one (v1)
FORMS = ("official", "v1")


def check_form(form: str) -> str:
    """``form`` if it is one of :data:`FORMS`; ValueError otherwise."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}, got {form!r}")
    return form


def kept_channels(keep_ratio: float, channels: int) -> int:
    """k = ceil(keep_ratio * channels), at least 1 and at most ``channels``.

    A tiny tolerance keeps ratios such as 0.5 * 64 from rounding up on floating-point noise.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {keep_ratio!r}")
    return max(1, min(channels, math.ceil(keep_ratio * channels - 1e-9)))


def top_k_mask(scores: Tensor, k: int, dim: int = -1) -> Tensor:
    """0/1 mask (dtype of ``scores``) of the ``k`` largest entries along ``dim``, exactly k per row.

    Ties are broken by :func:`torch.topk`; the mask carries no gradient.
    """
    if k >= scores.shape[dim]:
        return torch.ones_like(scores)
    idx = scores.detach().topk(k, dim=dim, sorted=False).indices
    return torch.zeros_like(scores).scatter_(dim, idx, 1.0)


class DynamicPruningConv(GatedLayer):
    """Statistics and auxiliary-loss plumbing shared by :class:`FBSConv2d` and ``DGCConv2d``.

    * ``gate_counts`` (non-persistent float64 buffer, on the device): [phase (0 train, 1 eval),
      branch, (closed, total)], as in :class:`cdg.nn.GatedConv2d`. Counts are in *output-element
      equivalents*: a call adds ``total = N * C_out * H_out * W_out`` and ``closed = eta_call *
      total``, where ``eta_call`` is the fraction of channel computations skipped (docs/design.md §5).
      Per layer, eta is that fraction; across layers the element-weighted eta weighs each layer by
      its output elements as for CDG, and ``gate_statistics``' FLOP weighting (9 * C_in per
      element) is then exact.
    * ``last_masks[branch]`` (with ``keep_masks``): the 0/1 channel selection as
      (N, predictors, channels, 1), so that :func:`cdg.nn.mask_similarity` gives the cosine
      similarity of the two views' channel selections.
    * Auxiliary (predictor) losses of training forwards with gradients enabled are kept per branch,
      the latest forward of each branch only, and handed out, summed, by :meth:`pop_aux_loss`,
      which clears them. Forwards in eval mode or under ``torch.no_grad`` (e.g. a MoCo key encoder)
      store nothing.
    * ``scale_free`` (off by default, docs/design.md §5's form): the predictors read the pooled input
      divided by its RMS over channels, so that the saliences do not grow with the input's scale.
      In the §5 form the saliences are linear in that scale and so the layer's output is
      quadratic in it. In eval mode, where BN no longer re-normalises each batch, an atypical image
      then squares its scale at every gated layer until it overflows. At 4 epochs on CIFAR-10 this
      happened to 0.03% (DGC) and 1.4% (FBS) of the images (docs/results.md).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, scale_free: bool = False) -> None:
        for name, c in (("in_channels", in_channels), ("out_channels", out_channels)):
            if c < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be >= 1, got {c}")
        super().__init__(in_channels, out_channels, stride)
        self.scale_free = bool(scale_free)
        self._aux: dict[int, Tensor] = {}

    def pooled(self, x: Tensor) -> Tensor:
        """GAP(x), N x C_in, the predictors' input; with ``scale_free``, divided by its RMS over channels."""
        p = x.mean((2, 3))
        if self.scale_free:
            p = p / p.float().pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-6).to(p.dtype)
        return p

    @staticmethod
    def _check_branch(branch: int) -> None:
        if branch not in (0, 1):
            raise ValueError(f"branch must be 0 (a1) or 1 (a2), got {branch!r}")

    def _record(self, mask: Tensor, branch: int, eta_call: float, out_elements: int, aux: Tensor) -> None:
        """Store mask, statistics and auxiliary loss of one forward (see the class docstring)."""
        if self.keep_masks:
            self.last_masks[branch] = mask.detach().unsqueeze(-1)
        if self.track_stats:
            with torch.no_grad():
                counts = self.gate_counts[0 if self.training else 1, branch]
                counts[0] += eta_call * out_elements  # scalar adds: no host synchronisation
                counts[1] += out_elements
        if self.training and torch.is_grad_enabled():
            self._aux[branch] = aux

    def pop_aux_loss(self) -> Tensor:
        """Sum of the stored auxiliary losses (one per branch called since the last pop); clears them."""
        if not self._aux:
            return torch.zeros((), device=self.gate_counts.device)
        losses, self._aux = list(self._aux.values()), {}
        return torch.stack([l.float() for l in losses]).sum()

    def dense_macs(self, h_out: int, w_out: int) -> int:
        """MACs of the dense 3x3 convolution for one image: 9 * C_in * C_out * H_out * W_out."""
        return 9 * self.in_channels * self.out_channels * h_out * w_out

    def predictor_macs(self) -> int:
        """MACs of the salience predictor's FC layers for one image (pooling and top-k not counted)."""
        raise NotImplementedError

    def final_eta(self) -> float:
        """Fraction of channel computations skipped at inference (the trained pruning rate)."""
        raise NotImplementedError

    def macs_per_image(self, h_out: int, w_out: int, eta: float | None = None) -> float:
        """Inference MACs for one image: ``dense_macs * (1 - eta) + predictor_macs``.

        ``eta`` defaults to :meth:`final_eta`. Pooling (C_in * H_in * W_in adds), top-k and the
        per-channel scaling (O(C * H * W)) are not counted; they are below 1% of the convolution.
        """
        eta = self.final_eta() if eta is None else eta
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta!r}")
        return self.dense_macs(h_out, w_out) * (1.0 - eta) + self.predictor_macs()


class FBSConv2d(DynamicPruningConv):
    """3x3 convolution with FBS output-channel pruning (Gao et al. 2019; docs/design.md §5).

    Args:
        in_channels, out_channels: channel counts.
        stride: convolution stride (kernel 3, padding 1, no bias).
        keep_ratio: d, the fraction of output channels computed per sample (k = ceil(d * C_out)).
        l1: coefficient of the L1 penalty on the saliences (1e-8).
        scale_free: predictor on the RMS-normalised pooled input (see :class:`DynamicPruningConv`).
        form: ``"official"`` (default; mayo's ``ParametricGatedConvolution``, see the module
            docstring) or ``"v1"`` (the form of the earlier results).

    ``gate_groups`` is 1 (FBS has no base path; Table 6 lists no groups), ``group_size`` 1.
    eta of a call is ``(C_out - k) / C_out``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, keep_ratio: float = 0.5, l1: float = 1e-8,
        scale_free: bool = False, form: str = "official",
    ) -> None:
        super().__init__(in_channels, out_channels, stride, scale_free)
        self.form = check_form(form)
        self.keep_ratio, self.l1 = float(keep_ratio), float(l1)
        self.k = kept_channels(keep_ratio, out_channels)
        self.gate_groups, self.group_size = 1, 1
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.predictor = nn.Linear(in_channels, out_channels)
        if form == "official":  # mayo: truncated_normal_initializer(stddev=0.01), i.e. cut at 2 std
            nn.init.trunc_normal_(self.predictor.weight, std=0.01, a=-0.02, b=0.02)
        nn.init.ones_(self.predictor.bias)
        self.norm = nn.BatchNorm2d(out_channels, affine=False)
        self.beta = nn.Parameter(torch.full((out_channels,), 0.1 if form == "official" else 0.0))

    @property
    def owns_norm(self) -> bool:
        """Whether the output is already normalised (scale g, shift beta): the backbone must not add a BN."""
        return self.form == "official"

    def saliency(self, x: Tensor) -> Tensor:
        """g = ReLU(FC(GAP(x))): per-sample output-channel saliences, N x C_out, >= 0."""
        return torch.relu(self.predictor(self.pooled(x)))

    def forward(self, x: Tensor, branch: int = 0) -> Tensor:
        self._check_branch(branch)
        g = self.saliency(x)
        mask = top_k_mask(g, self.k, dim=1)
        y = self.norm(F.conv2d(x, self.weight, None, self.stride, 1))
        gate = (mask * g).to(y.dtype)[:, :, None, None]
        shift = (mask * self.beta).to(y.dtype)[:, :, None, None]
        out = torch.addcmul(shift, y, gate)
        n, c, h, w = out.shape
        # official: |M g| (mayo regularises gate() * actives()); v1: |g|. Both summed over the batch.
        penalised = mask * g if self.form == "official" else g
        self._record(mask.unsqueeze(1), branch, self.final_eta(), n * c * h * w,
                     self.l1 * penalised.float().abs().sum())
        return out

    def predictor_macs(self) -> int:
        """The FC layer: C_in * C_out MACs per image."""
        return self.in_channels * self.out_channels

    def final_eta(self) -> float:
        """(C_out - k) / C_out."""
        return (self.out_channels - self.k) / self.out_channels

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, keep={self.k}/{self.out_channels}, "
                f"l1={self.l1}, form={self.form}")
