"""Check an inference form against the eval-mode gated backbone it came from (tests, ``cdg speed``).

The mask M = [normal(S) > tau] is a step function of float32 values, so two computations of the
same layer that round differently (our kernel vs oneDNN; or even the backbone itself on NCHW vs
channels-last input) can disagree on an entry whose salience lies within rounding of its threshold,
and such a flip then changes that sample's later layers. :func:`compare` therefore checks, per
sample:

* a sample whose masks are identical to the reference's in every gated layer must have features
  within ``rtol`` (relative L2 error) of the reference's;
* a sample whose masks differ must have its first differences only at borderline entries: where the
  reference's normalised margin ``|normal(S) - tau|`` (recomputed in float64 from the reference's
  own layer input) is below ``margin``.

It returns the counts (samples with a flip, flipped entries, worst error of the other samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Comparison:
    samples: int
    samples_with_flips: int
    flipped_entries: int
    max_rel_err: float  # over the samples without flips
    max_borderline_margin: float  # the largest |normal(S) - tau| of a first flip (0 if none)
    entries: int  # mask entries compared

    def summary(self) -> str:
        return (f"max rel. error {self.max_rel_err:.2e} over {self.samples - self.samples_with_flips}/{self.samples} "
                f"samples with identical masks; {self.flipped_entries} of {self.entries} mask entries differ "
                f"(in {self.samples_with_flips} samples; first flips at |normal(S) - tau| <= "
                f"{self.max_borderline_margin:.1e})")


def reference_margin(conv: nn.Module, x: Tensor) -> Tensor:
    """|normal(S) - tau| of a GatedConv2d on branch a1 for input ``x``, in float64 (N x E x H x W)."""
    g = conv.gate_groups
    xb = x.double()
    y = F.conv2d(xb, conv.base_weight(0).detach().double(), None, conv.stride, 1, 1, g)
    if conv.group_size > 1:
        n, c, h, w = y.shape
        y = y.reshape(n, c // conv.group_size, conv.group_size, h, w).mean(2)
    tau = conv.tau.detach().double().view(1, -1, 1, 1)
    if conv.norm == "batch":
        bn = conv.branch_norms[0]
        z = (y - bn.running_mean.double().view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.double().view(1, -1, 1, 1) + bn.eps)
    else:
        mu = y.mean((2, 3), keepdim=True)
        var = y.var((2, 3), unbiased=False, keepdim=True)
        z = (y - mu) / torch.sqrt(var + 1e-5)
    return (z - tau).abs()


@torch.no_grad()
def compare(backbone: nn.Module, sparse: nn.Module, x: Tensor, margin: float = 1e-4) -> Comparison:
    """Features and masks of ``sparse`` (a :class:`cdg.sparse.SparseResNet`) against
    ``backbone.eval()`` on branch a1 for the batch ``x`` (module docstring). Raises AssertionError
    where a mask differs away from its threshold."""
    from cdg.nn import GatedConv2d

    backbone.eval()
    layers = [(n, m) for n, m in backbone.named_modules() if isinstance(m, GatedConv2d) and m.is_gated]
    inputs: dict[str, Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0].detach()))
             for n, m in layers]
    keep = {n: m.keep_masks for n, m in layers}
    try:
        for _, m in layers:
            m.keep_masks = True
        ref = backbone(x)
        ref_masks = {n: m.last_masks[0].to(torch.uint8) for n, m in layers}
    finally:
        for h in hooks:
            h.remove()
        for n, m in layers:
            m.keep_masks = keep[n]
    sparse.set_flags(keep_mask=True)
    try:
        out = sparse(x)
        ours = {n: m.last_mask for n, m in sparse.gated()}
    finally:
        sparse.set_flags(keep_mask=False)
    if set(ours) != set(ref_masks):
        raise AssertionError(f"gated layers differ: {sorted(set(ours) ^ set(ref_masks))}")
    n = x.shape[0]
    flipped = torch.zeros(n, dtype=torch.bool)
    entries = flips = 0
    worst_margin = 0.0
    for name, conv in layers:
        diff = ours[name] != ref_masks[name]
        entries += diff.numel()
        per_sample = diff.flatten(1).any(1)
        new = per_sample & ~flipped  # samples whose first difference is in this layer
        if new.any():
            m = reference_margin(conv, inputs[name][new])[diff[new]]
            worst = float(m.max())
            if worst >= margin:
                raise AssertionError(f"{name}: a mask entry differs from the reference's at |normal(S) - tau| = "
                                     f"{worst:.3g} (not a rounding tie: margin {margin:g})")
            worst_margin = max(worst_margin, worst)
        flips += int(diff.sum())
        flipped |= per_sample
    good = ~flipped
    err = 0.0
    if good.any():
        num = (out[good] - ref[good]).norm(dim=1)
        den = ref[good].norm(dim=1).clamp_min(1e-12)
        err = float((num / den).max())
    return Comparison(n, int(flipped.sum()), flips, err, worst_margin, entries)
