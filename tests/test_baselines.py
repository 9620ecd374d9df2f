"""FBS and DGC baselines (docs/design.md §5; paper Sec. 5.2, Tables 6-7) against hand-written references.

The references follow the official code: FBS = deep-fry/mayo ``mayo/net/tf/gate/{base,parametric}.py``
(commit 7d2dd3e), DGC = zhuogege1943/dgc ``layers.py`` / ``main.py`` (commit 439fde259c); see the
module docstrings of :mod:`cdg.nn.fbs` and :mod:`cdg.nn.dgc`.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cdg.models import Conv3x3, create_model
from cdg.nn import get_gating_mode
from cdg.nn.dgc import DGCConv2d, dgc_hidden_channels, dgc_keep_ratio, dgc_pruned_channels
from cdg.nn.fbs import FBSConv2d, kept_channels
from cdg.nn.sparsity import (
    gate_statistics,
    gated_layers,
    mask_similarity,
    pop_aux_losses,
    reset_gate_stats,
    set_pruning_progress,
    threshold_layers,
)


def _batch_norm(y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Training-mode BN without affine part: batch statistics over (N, H, W), biased variance."""
    mu = y.mean((0, 2, 3), keepdim=True)
    var = y.var((0, 2, 3), unbiased=False, keepdim=True)
    return (y - mu) / torch.sqrt(var + eps)


def fbs_reference(m: FBSConv2d, x: torch.Tensor) -> torch.Tensor:
    """mask * g * BN_noaffine(conv(x)) + mask * beta, batch statistics, top-k by sorting."""
    g = torch.relu(x.mean((2, 3)) @ m.predictor.weight.T + m.predictor.bias)
    keep = g.argsort(dim=1, descending=True)[:, : m.k]
    mask = torch.zeros_like(g).scatter(1, keep, 1.0)
    y = _batch_norm(F.conv2d(x, m.weight, None, m.stride, 1), m.norm.eps)
    return (mask * g)[:, :, None, None] * y + (mask * m.beta)[:, :, None, None]


def dgc_reference(m: DGCConv2d, x: torch.Tensor, k: int) -> torch.Tensor:
    """Head by head (official layers.py): x' = ReLU(BN(x)) (v1: x' = x), FC-ReLU-FC-ReLU saliences of
    GAP(x'), zero all but the k largest, scale x', convolve, concatenate."""
    if m.form == "official":
        x = torch.relu(_batch_norm(x, m.norm.eps) * m.norm.weight[:, None, None] + m.norm.bias[:, None, None])
    co = m.out_channels // m.heads
    pooled = x.mean((2, 3))
    outs = []
    for h in range(m.heads):
        hid = torch.relu(pooled @ m.fc1_weight[h].T)
        s = torch.relu(hid @ m.fc2_weight[h].T + m.fc2_bias[h * m.in_channels:(h + 1) * m.in_channels])
        keep = s.argsort(dim=1, descending=True)[:, :k]
        scale = torch.zeros_like(s).scatter(1, keep, 1.0) * s
        outs.append(F.conv2d(x * scale[:, :, None, None], m.weight[h * co:(h + 1) * co], None, m.stride, 1))
    return torch.cat(outs, 1)


def _center_tap(a: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel that is the 1x1 map ``a`` (C_out x C_in): conv(x) = einsum(a, x), by hand."""
    w = torch.zeros(*a.shape, 3, 3, dtype=a.dtype)
    w[:, :, 1, 1] = a
    return w


def _tiny_input() -> torch.Tensor:
    """N=2, C=2, 2x2 maps with known per-sample channel means (1, 3) and (2, 0.5)."""
    pattern = torch.tensor([[0.5, -0.5], [-0.25, 0.25]], dtype=torch.double)
    means = torch.tensor([[1.0, 3.0], [2.0, 0.5]], dtype=torch.double)
    return means[:, :, None, None] + pattern * torch.tensor([1.0, -2.0], dtype=torch.double)[None, :, None, None]


# --- FBS -------------------------------------------------------------------------------------

def test_fbs_keeps_exactly_ceil_d_cout_channels_per_sample_and_matches_reference():
    torch.manual_seed(0)
    m = FBSConv2d(8, 20, stride=2, keep_ratio=0.3).double()  # k = ceil(6) = 6
    with torch.no_grad():
        m.beta.normal_()
    m.keep_masks = True
    x = torch.randn(5, 8, 9, 9, dtype=torch.double)
    y = m(x, 0)
    mask = m.last_masks[0]
    assert m.k == 6 and mask.shape == (5, 1, 20, 1)
    assert mask.sum(dim=(1, 2, 3)).tolist() == [6.0] * 5
    assert torch.all(y[mask[:, 0, :, 0] == 0] == 0)  # suppressed channels output exactly zero
    torch.testing.assert_close(y, fbs_reference(m, x), rtol=1e-10, atol=1e-10)
    assert m.final_eta() == pytest.approx(14 / 20)


def test_fbs_official_layer_on_a_hand_computed_example():
    """mayo parametric.py: Y = M * gamma * BN_noaffine(conv) + M * beta, gamma = ReLU(FC(GAP(x))),
    M = the ceil(d C) largest gamma per sample; L1 = l1 * sum over batch and channels of |M gamma|."""
    m = FBSConv2d(2, 4, keep_ratio=0.5, l1=1e-3).double()  # k = 2 of 4
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.double)
    with torch.no_grad():
        m.weight.copy_(_center_tap(a))
        m.predictor.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0], [0.0, 0.0]], dtype=torch.double))
        m.predictor.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.5], dtype=torch.double))
        m.beta.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.double))
    m.keep_masks = True
    x = _tiny_input()
    y = m(x, 0)
    # by hand: GAP(x) = (1, 3) and (2, 0.5); gamma = (1, 3, 2, 1.5) and (2, 0.5, 0, 1.5)
    gamma = torch.tensor([[1.0, 3.0, 2.0, 1.5], [2.0, 0.5, 0.0, 1.5]], dtype=torch.double)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]], dtype=torch.double)
    assert torch.equal(m.saliency(x), gamma) and torch.equal(m.last_masks[0][:, 0, :, 0], mask)
    conv = torch.einsum("oi,nihw->nohw", a, x)
    expected = mask[:, :, None, None] * (gamma[:, :, None, None] * _batch_norm(conv) + m.beta[None, :, None, None])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert torch.all(y[mask == 0] == 0)  # a suppressed channel is exactly 0: no BN follows this layer
    torch.testing.assert_close(m.pop_aux_loss().double(), torch.tensor(1e-3 * (3 + 2 + 2 + 1.5), dtype=torch.double))


def test_fbs_v1_form_penalises_the_unmasked_saliences():
    m = FBSConv2d(2, 4, keep_ratio=0.5, l1=1e-3, form="v1").double()
    with torch.no_grad():
        m.predictor.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0], [0.0, 0.0]], dtype=torch.double))
        m.predictor.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.5], dtype=torch.double))
    m(_tiny_input(), 0)
    torch.testing.assert_close(m.pop_aux_loss().double(), torch.tensor(1e-3 * 11.5, dtype=torch.double))


def test_fbs_l1_loss_is_per_branch_summed_over_the_batch_and_cleared_when_popped():
    """Updated for the official form: the L1 is on M * g (mayo: gate() * actives()), was on g (v1)."""
    torch.manual_seed(1)
    m = FBSConv2d(4, 8, l1=1e-3).double()
    x1, x2 = torch.randn(3, 4, 5, 5, dtype=torch.double), torch.randn(3, 4, 5, 5, dtype=torch.double)

    def masked_l1(x):
        g = m.saliency(x)
        keep = g.argsort(dim=1, descending=True)[:, : m.k]
        return torch.zeros_like(g).scatter(1, keep, 1.0).mul(g).abs().sum()

    m(x1, 0)
    m(x1, 0)  # the latest forward of a branch replaces the earlier one
    m(x2, 1)
    expected = 1e-3 * (masked_l1(x1) + masked_l1(x2))
    torch.testing.assert_close(m.pop_aux_loss().double(), expected)
    assert float(m.pop_aux_loss()) == 0.0
    # a sum over the batch (mayo: tf.reduce_sum), not a mean: the same images twice give twice the loss
    m(torch.cat([x1, x1]), 0)
    torch.testing.assert_close(m.pop_aux_loss().double(), 2e-3 * masked_l1(x1))
    with torch.no_grad():
        m(x1, 0)  # e.g. a MoCo key encoder: nothing stored
    m.eval()
    m(x1, 0)
    assert float(m.pop_aux_loss()) == 0.0


def test_fbs_init_values():
    torch.manual_seed(0)
    m = FBSConv2d(256, 256)
    assert m.form == "official" and m.owns_norm
    assert torch.all(m.beta == 0.1) and torch.all(m.predictor.bias == 1.0)
    w = m.predictor.weight.detach()
    # truncated normal, std 0.01, cut at 2 std (tf.truncated_normal_initializer): std 0.01 * 0.8796
    assert w.abs().max() <= 0.02 and float(w.std()) == pytest.approx(0.01 * 0.8796, rel=0.03)
    assert not m.norm.affine
    v1 = FBSConv2d(256, 256, form="v1")
    assert not v1.owns_norm and torch.all(v1.beta == 0.0) and torch.all(v1.predictor.bias == 1.0)
    assert float(v1.predictor.weight.detach().abs().max()) > 0.02  # nn.Linear's default uniform(+-1/sqrt(256))
    with pytest.raises(ValueError, match="form"):
        FBSConv2d(4, 4, form="paper")


@pytest.mark.parametrize("ratio,channels,k", [(0.5, 64, 32), (0.3, 20, 6), (0.45, 10, 5), (0.34, 3, 2), (1.0, 7, 7),
                                              (0.01, 8, 1)])
def test_fbs_keeps_ceil_d_c_channels(ratio, channels, k):
    """mayo base.py: num_active = math.ceil(num_elements * density)."""
    assert kept_channels(ratio, channels) == k == FBSConv2d(4, channels, keep_ratio=ratio).k


def _take_over_block_norms(net: nn.Module) -> None:
    """What cdg.models.resnet should do for a conv with ``owns_norm``: no block BN after it."""
    for blk in [b for stage in (net.layer1, net.layer2, net.layer3, net.layer4) for b in stage]:
        for i in (1, 2, 3):
            conv = getattr(blk, f"conv{i}", None)
            if getattr(conv, "owns_norm", False):
                setattr(blk, f"bn{i}", nn.Identity())


def test_fbs_in_a_block_that_drops_its_bn_gives_exact_zeros_for_suppressed_channels():
    """The official structure: conv -> (BN_noaffine, * M g, + M beta) -> ReLU, one BN per conv."""
    torch.manual_seed(9)
    net = create_model("resnet18", width=0.125, conv_layer=functools.partial(FBSConv2d, keep_ratio=0.5))
    _take_over_block_norms(net)
    blk = net.layer2[0]
    blk.conv1.keep_masks = True
    seen = {}
    blk.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0]))
    net(torch.rand(3, 3, 16, 16), 0)
    h = torch.relu(blk.bn1(blk.conv1(seen["x"], 0)))  # what the block feeds conv2
    mask = blk.conv1.last_masks[0][:, 0, :, 0]
    assert torch.all(h[mask == 0] == 0) and (h[mask == 1] > 0).any()


def test_resnet_drops_the_block_bn_after_an_fbs_layer_that_owns_it():
    """Official FBS normalises its own output (one BN per conv): the block adds none after it,
    so a suppressed channel is exactly 0 before the activation; v1 keeps the block's BN."""
    net = create_model("resnet18", width=0.125, conv_layer=FBSConv2d, zero_init_residual=True)
    assert isinstance(net.layer1[0].bn1, nn.Identity) and isinstance(net.layer1[0].bn2, nn.Identity)
    v1 = create_model("resnet18", width=0.125, conv_layer=functools.partial(FBSConv2d, form="v1"))
    assert isinstance(v1.layer1[0].bn1, nn.BatchNorm2d)
    assert isinstance(create_model("resnet18", width=0.125).layer1[0].bn2, nn.BatchNorm2d)


def test_the_registry_passes_the_form_and_labels_it():
    base = dict(keep_ratio=None, predictor_loss=None, scale_free_saliency=False, groups=4, squeeze=16)
    for mode, layer in (("fbs", FBSConv2d), ("dgc", DGCConv2d)):
        spec = get_gating_mode(mode)
        default = spec.conv_layer(SimpleNamespace(**base))(16, 16, 1)
        assert type(default) is layer and default.form == "official"
        assert "form=official" in spec.label(SimpleNamespace(**base))
        g = SimpleNamespace(**base, baseline_form="v1")  # a config that selects the earlier form
        assert spec.conv_layer(g)(16, 16, 1).form == "v1" and "form=v1" in spec.label(g)


# --- DGC -------------------------------------------------------------------------------------

def test_dgc_keeps_configured_fraction_per_head_and_matches_reference():
    torch.manual_seed(2)
    m = DGCConv2d(20, 8, stride=1, heads=4, keep_ratio=0.45).double()  # 0.45 * 20 = 9 (not 10)
    with torch.no_grad():
        m.fc1_weight.abs_()  # live hidden units: no tied saliences, so top-k is unique
    m.keep_masks = True
    x = torch.rand(3, 20, 6, 6, dtype=torch.double)
    y = m(x, 1)
    mask = m.last_masks[1]
    assert m.kept_inputs() == 9 and mask.shape == (3, 4, 20, 1)
    assert torch.all(mask.sum(dim=(2, 3)) == 9)
    torch.testing.assert_close(y, dgc_reference(m, x, 9), rtol=1e-10, atol=1e-10)
    assert m.final_eta() == pytest.approx(11 / 20)


def test_dgc_channels_last_input_gives_the_same_output():
    torch.manual_seed(3)
    m = DGCConv2d(8, 8, stride=2, heads=4, keep_ratio=0.5).double()
    x = torch.randn(2, 8, 7, 7, dtype=torch.double)
    y = m(x)
    y_cl = m(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, y_cl)


@pytest.mark.parametrize(
    "progress,keep", [(0.0, 1.0), (1 / 12, 1.0), ((1 / 12 + 3 / 4) / 2, 1 - 0.55 / 2), (3 / 4, 0.45), (1.0, 0.45)]
)
def test_dgc_ramp(progress, keep):
    assert dgc_keep_ratio(progress, 0.45) == pytest.approx(keep)


def test_dgc_layer_follows_progress_and_starts_at_the_final_rate():
    """Updated for the official count: C - round(C (1 - g) 3/2 (p - 1/12)) (was ceil(keep(p) C), the same here)."""
    m = DGCConv2d(64, 64, keep_ratio=0.45)
    assert m.kept_inputs() == 64 - round(64 * 0.55) == 29  # a new layer: final rate (evaluation)
    set_pruning_progress(nn.Sequential(m), 0.0)
    assert m.kept_inputs() == 64
    m.set_progress(0.5)
    assert m.kept_inputs() == 64 - round(64 * (1 - 0.45) * 3.0 / 2 * (0.5 - 1.0 / 12)) == 42
    m.set_progress(1.0)
    assert m.kept_inputs() == 29


@pytest.mark.parametrize("channels,keep,official,v1", [(64, 0.45, 29, 29), (32, 0.45, 14, 15), (20, 0.45, 9, 9),
                                                       (128, 0.45, 58, 58), (16, 0.5, 8, 8), (40, 0.47, 19, 19),
                                                       (30, 0.25, 8, 8), (10, 0.25, 2, 3)])
def test_dgc_kept_channel_count_rule(channels, keep, official, v1):
    """layers.py: inactive_channels = round(C_in * (1 - gate_factor)), Python's round (half to even:
    round(22.5) = 22, round(7.5) = 8); v1 kept ceil(keep * C_in)."""
    assert official == channels - round(channels * (1 - keep))
    assert DGCConv2d(channels, 8, keep_ratio=keep).kept_inputs() == official
    assert DGCConv2d(channels, 8, keep_ratio=keep).final_eta() == pytest.approx((channels - official) / channels)
    assert DGCConv2d(channels, 8, keep_ratio=keep, form="v1").kept_inputs() == v1 == kept_channels(keep, channels)


def test_dgc_pruned_count_follows_the_official_ramp_formula():
    for channels in (16, 29, 64, 128, 256):
        for keep in (0.25, 0.45, 0.47):
            for p in [i / 200 for i in range(201)]:
                if 1 / 12 < p < 3 / 4:
                    official = round(channels * (1 - keep) * 3.0 / 2 * (p - 1.0 / 12))
                else:
                    official = 0 if p <= 1 / 12 else round(channels * (1 - keep))
                assert dgc_pruned_channels(p, keep, channels) == official, (channels, keep, p)


def test_dgc_official_layer_on_a_hand_computed_example():
    """layers.py: x' = ReLU(BN(x)); per head s = ReLU(FC2(ReLU(FC1(GAP(x'))))); the C_in - k smallest s
    zeroed; Y_h = conv(x' * s_masked, W_h); loss = coef * sum_h mean(s_h) (main.py sums the layers')."""
    m = DGCConv2d(2, 2, heads=2, keep_ratio=0.5, loss_coef=1e-2).double()  # 1 of 2 inputs per head
    assert m.hidden == 1 and m.kept_inputs() == 1
    with torch.no_grad():
        m.norm.weight.copy_(torch.tensor([2.0, 1.0], dtype=torch.double))
        m.norm.bias.copy_(torch.tensor([0.5, -0.2], dtype=torch.double))
        m.fc1_weight.copy_(torch.tensor([[[1.0, 1.0]], [[1.0, -1.0]]], dtype=torch.double))  # heads x hidden x C_in
        m.fc2_weight.copy_(torch.tensor([[[1.0], [2.0]], [[-1.0], [1.0]]], dtype=torch.double))  # heads x C_in x hidden
        m.fc2_bias.copy_(torch.tensor([0.1, 0.0, 1.0, 0.5], dtype=torch.double))
        m.weight.copy_(_center_tap(torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.double)))
    m.keep_masks = True
    x = _tiny_input()
    y = m(x, 0)
    # by hand
    xp = torch.relu(_batch_norm(x) * torch.tensor([2.0, 1.0], dtype=torch.double)[None, :, None, None]
                    + torch.tensor([0.5, -0.2], dtype=torch.double)[None, :, None, None])
    p = xp.mean((2, 3))  # N x 2
    s0 = torch.relu(torch.relu(p[:, :1] + p[:, 1:]) * torch.tensor([1.0, 2.0], dtype=torch.double)
                    + torch.tensor([0.1, 0.0], dtype=torch.double))
    s1 = torch.relu(torch.relu(p[:, :1] - p[:, 1:]) * torch.tensor([-1.0, 1.0], dtype=torch.double)
                    + torch.tensor([1.0, 0.5], dtype=torch.double))
    outs = []
    rows = (torch.tensor([1.0, 2.0], dtype=torch.double), torch.tensor([3.0, -1.0], dtype=torch.double))
    for s, row in zip((s0, s1), rows):
        thr = s.sort(dim=1).values[:, :1]  # the official rule: zero every s <= the largest of the 1 smallest
        sm = torch.where(s <= thr, torch.zeros_like(s), s)
        outs.append(torch.einsum("i,nihw->nhw", row, xp * sm[:, :, None, None])[:, None])
    torch.testing.assert_close(y, torch.cat(outs, 1), rtol=1e-12, atol=1e-12)
    assert torch.equal(m.last_masks[0][:, :, :, 0], torch.stack([(s0 > s0.min(1, keepdim=True).values),
                                                                 (s1 > s1.min(1, keepdim=True).values)], 1).double())
    torch.testing.assert_close(m.pop_aux_loss().double(), 1e-2 * (s0.mean() + s1.mean()))


def test_dgc_saliency_loss_sums_the_heads_mean_saliencies():
    """Updated for the official form (layers.py sums the heads' mask.mean()): heads x the v1 loss."""
    torch.manual_seed(4)
    x = torch.randn(2, 16, 4, 4, dtype=torch.double)
    for form, factor in (("official", 4), ("v1", 1)):
        m = DGCConv2d(16, 8, heads=4, loss_coef=1e-2, form=form).double()
        m(x, 0)
        loss = m.pop_aux_loss().double()
        s = m.saliency(x)
        torch.testing.assert_close(loss, 1e-2 * factor * s.mean())
        if form == "official":
            torch.testing.assert_close(loss, 1e-2 * sum(s[:, h].mean() for h in range(4)))


def test_dgc_structure_and_init():
    torch.manual_seed(0)
    m = DGCConv2d(256, 64, heads=4)
    assert not m.owns_norm  # official dyresnet18 keeps the block's bn1/bn2 after the DGC convs
    assert isinstance(m.norm, nn.BatchNorm2d) and m.norm.affine and m.norm.num_features == 256
    assert torch.all(m.norm.weight == 1) and torch.all(m.norm.bias == 0) and torch.all(m.fc2_bias == 1.0)
    assert m.hidden == 16  # C_in >= 80: r = 16
    # kaiming_normal_ (fan_in, gain sqrt 2) of nn.Linear weights (out, in): fc1 fan_in C_in, fc2 fan_in C_in / r
    assert float(m.fc1_weight.detach().std()) == pytest.approx(math.sqrt(2 / 256), rel=0.05)
    assert float(m.fc2_weight.detach().std()) == pytest.approx(math.sqrt(2 / 16), rel=0.05)
    v1 = DGCConv2d(256, 64, heads=4, form="v1")
    assert v1.norm is None and set(v1.state_dict()) == {"weight", "fc1_weight", "fc2_weight", "fc2_bias"}
    # official: the generators and the conv read ReLU(BN(x)), so an input that BN maps below 0 is cut
    m2 = DGCConv2d(4, 4, heads=4, keep_ratio=1.0).double()
    with torch.no_grad():
        m2.norm.bias.fill_(-100.0)
    assert torch.all(m2(torch.randn(2, 4, 3, 3, dtype=torch.double)) == 0)


@pytest.mark.parametrize("make", [lambda: FBSConv2d(32, 16, keep_ratio=0.5), lambda: DGCConv2d(32, 16, keep_ratio=0.5)])
def test_masks_depend_on_the_input(make):
    torch.manual_seed(5)
    m = make()
    m.keep_masks = True
    m(torch.randn(4, 32, 6, 6), 0)
    m(torch.randn(4, 32, 6, 6) * torch.rand(1, 32, 1, 1) * 3, 1)
    a, b = m.last_masks[0], m.last_masks[1]
    assert not torch.equal(a, b)
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 4))  # per sample, too


# --- cost ------------------------------------------------------------------------------------

def _conv_macs(c_in: int, c_out: int, stride: int, size: int) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        Conv3x3(c_in, c_out, stride)(torch.zeros(1, c_in, size, size))
    return counter.get_total_flops() // 2


def test_fbs_macs_by_hand():
    m = FBSConv2d(16, 32, stride=2, keep_ratio=0.5)
    dense = 9 * 16 * 32 * 8 * 8
    assert m.dense_macs(8, 8) == dense == _conv_macs(16, 32, 2, 16)
    assert m.predictor_macs() == 16 * 32
    assert m.macs_per_image(8, 8) == pytest.approx(dense * 0.5 + 512)
    assert m.macs_per_image(8, 8, eta=0.25) == pytest.approx(dense * 0.75 + 512)


def test_dgc_macs_by_hand():
    m = DGCConv2d(16, 32, heads=4, keep_ratio=0.5, squeeze=16)  # C_in < 80: r = 8, hidden 2
    assert m.hidden == 2 and dgc_hidden_channels(128, 16) == 8 and dgc_hidden_channels(4, 16) == 1
    dense = 9 * 16 * 32 * 8 * 8
    assert m.dense_macs(8, 8) == dense == _conv_macs(16, 32, 1, 8)
    assert m.predictor_macs() == 4 * 2 * 16 * 2
    assert m.macs_per_image(8, 8) == pytest.approx(dense * 0.5 + 256)
    # the same MACs as the heads' convolutions over their kept inputs
    assert m.macs_per_image(8, 8) == pytest.approx(4 * 9 * 8 * 8 * 8 * 8 + 256)


# --- statistics, gradients, backbone ----------------------------------------------------------

class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = FBSConv2d(8, 16, stride=1, keep_ratio=0.25)
        self.b = DGCConv2d(16, 16, stride=2, heads=4, keep_ratio=0.5)

    def forward(self, x: torch.Tensor, branch: int = 0) -> torch.Tensor:
        return self.b(self.a(x, branch), branch)


def test_gate_statistics_of_fbs_and_dgc_layers():
    torch.manual_seed(6)
    net = _Pair()
    assert [n for n, _ in gated_layers(net)] == ["a", "b"] and threshold_layers(net) == []
    net(torch.randn(2, 8, 8, 8), 0)  # a: 8x8 output, eta 0.75; b: 4x4 output, eta 0.5
    st = gate_statistics(net, "train")
    assert st["eta_per_layer"] == {"a": pytest.approx(0.75), "b": pytest.approx(0.5)}
    assert st["eta"] == pytest.approx((0.75 * 64 + 0.5 * 16) / 80)
    flop_weighted = 1 - (net.a.macs_per_image(8, 8) - net.a.predictor_macs() + net.b.macs_per_image(4, 4)
                         - net.b.predictor_macs()) / (net.a.dense_macs(8, 8) + net.b.dense_macs(4, 4))
    assert st["eta_flop_weighted"] == pytest.approx(flop_weighted) == pytest.approx(2 / 3)
    assert "eta_a2" not in st and gate_statistics(net, "eval") == {}
    net.eval()
    net.b.set_progress(0.0)
    with torch.no_grad():
        net(torch.randn(2, 8, 8, 8), 1)
    ev = gate_statistics(net, "eval")
    assert ev["eta_a2"] == pytest.approx(0.75 * 64 / 80)
    reset_gate_stats(net)
    assert gate_statistics(net, "train") == {}


@pytest.mark.parametrize("kind", ["fbs", "dgc"])
def test_gradients_reach_the_predictors(kind):
    torch.manual_seed(7)
    m = FBSConv2d(8, 16) if kind == "fbs" else DGCConv2d(8, 16)
    x = torch.rand(4, 8, 6, 6)
    loss = (m(x, 0) * torch.randn(4, 16, 6, 6)).sum() + m.pop_aux_loss()
    loss.backward()
    params = [m.predictor.weight, m.predictor.bias] if kind == "fbs" else [m.fc1_weight, m.fc2_weight, m.fc2_bias]
    for p in params + [m.weight]:
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("form", ["official", "v1"])
@pytest.mark.parametrize(
    "layer",
    [functools.partial(FBSConv2d, keep_ratio=0.5), functools.partial(DGCConv2d, heads=4, keep_ratio=0.45)],
    ids=["fbs", "dgc"],
)
def test_resnet18_with_baseline_layers_trains_on_both_branches(layer, form):
    torch.manual_seed(8)
    net = create_model("resnet18", width=0.125, conv_layer=functools.partial(layer, form=form))
    if form == "official":
        _take_over_block_norms(net)  # the official structure (a no-op for DGC)
    layers = gated_layers(net)
    assert len(layers) == 16
    set_pruning_progress(net, 0.5)
    v1, v2 = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    f1, f2 = net(v1, 0), net(v2, 1)
    aux = pop_aux_losses(net)
    assert aux.item() > 0
    (-F.cosine_similarity(f1, f2).mean() + aux).backward()
    for _, m in layers:
        pred = m.predictor.weight if isinstance(m, FBSConv2d) else m.fc2_bias
        assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert pop_aux_losses(net).item() == 0.0
    st = gate_statistics(net, "train")
    assert 0 < st["eta_a1"] < 1 and st["eta_a1"] == pytest.approx(st["eta_a2"])
    net.eval()
    set_pruning_progress(net, 1.0)
    with torch.no_grad():
        assert torch.isfinite(net(v1, 0)).all()
    assert mask_similarity(net, v1, v1) == pytest.approx(1.0)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="heads=4"):
        DGCConv2d(8, 10, heads=4)
    with pytest.raises(ValueError, match="keep ratio"):
        FBSConv2d(8, 8, keep_ratio=0.0)
    with pytest.raises(ValueError, match="branch"):
        FBSConv2d(4, 4)(torch.zeros(1, 4, 3, 3), 2)


@pytest.mark.parametrize("make", [lambda sf: FBSConv2d(16, 16, scale_free=sf),
                                  lambda sf: DGCConv2d(16, 16, heads=4, squeeze=4, scale_free=sf)])
def test_scale_free_saliency_keeps_the_eval_output_linear_in_the_input_scale(make):
    """The design §5 predictors grow with the input's scale, so the layer is quadratic in it (the eval-mode
    blow-up of docs/results.md); on the RMS-normalised pooled input the saliences ignore the scale."""
    torch.manual_seed(0)
    x = torch.rand(4, 16, 6, 6)
    # 1e4, not 100: the official FBS predictor starts small (std 0.01), so its bias 1 dominates g up to
    # larger input scales than with the v1 init (scale 100 gave a ratio of 256, not > 1000)
    scale = 1e4
    ratios = {}
    for scale_free in (False, True):
        torch.manual_seed(1)
        m = make(scale_free).eval()
        with torch.no_grad():
            if isinstance(m, FBSConv2d):
                m.beta.zero_()  # the official shift beta (0.1) is an additive constant, not scaled with x
            assert torch.allclose(m.saliency(scale * x), m.saliency(x)) == scale_free
            ratios[scale_free] = float(m(scale * x).norm() / m(x).norm())
    assert ratios[True] == pytest.approx(scale, rel=1e-3)  # BN in eval mode with fresh statistics is linear
    assert ratios[False] > 10 * scale  # towards scale^2 once the bias 1 of the predictor no longer matters
