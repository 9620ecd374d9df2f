"""FBS and DGC baselines (docs/design.md §5; paper Sec. 5.2, Tables 6-7) against hand-written references."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cdg.models import Conv3x3, create_model
from cdg.nn.dgc import DGCConv2d, dgc_hidden_channels, dgc_keep_ratio
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


def fbs_reference(m: FBSConv2d, x: torch.Tensor) -> torch.Tensor:
    """mask * g * BN_noaffine(conv(x)) + mask * beta, batch statistics, top-k by sorting."""
    g = torch.relu(x.mean((2, 3)) @ m.predictor.weight.T + m.predictor.bias)
    keep = g.argsort(dim=1, descending=True)[:, : m.k]
    mask = torch.zeros_like(g).scatter(1, keep, 1.0)
    y = F.conv2d(x, m.weight, None, m.stride, 1)
    mu = y.mean((0, 2, 3), keepdim=True)
    var = y.var((0, 2, 3), unbiased=False, keepdim=True)
    y = (y - mu) / torch.sqrt(var + m.norm.eps)
    return (mask * g)[:, :, None, None] * y + (mask * m.beta)[:, :, None, None]


def dgc_reference(m: DGCConv2d, x: torch.Tensor, k: int) -> torch.Tensor:
    """Head by head: FC-ReLU-FC-ReLU saliences, keep the top k inputs, scale, convolve, concat."""
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


def test_fbs_l1_loss_is_per_branch_and_cleared_when_popped():
    torch.manual_seed(1)
    m = FBSConv2d(4, 8, l1=1e-3).double()
    x1, x2 = torch.randn(3, 4, 5, 5, dtype=torch.double), torch.randn(3, 4, 5, 5, dtype=torch.double)
    m(x1, 0)
    m(x1, 0)  # the latest forward of a branch replaces the earlier one
    m(x2, 1)
    expected = 1e-3 * (m.saliency(x1).sum() + m.saliency(x2).sum())
    torch.testing.assert_close(m.pop_aux_loss().double(), expected)
    assert float(m.pop_aux_loss()) == 0.0
    with torch.no_grad():
        m(x1, 0)  # e.g. a MoCo key encoder: nothing stored
    m.eval()
    m(x1, 0)
    assert float(m.pop_aux_loss()) == 0.0


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
    m = DGCConv2d(64, 64, keep_ratio=0.45)
    assert m.kept_inputs() == kept_channels(0.45, 64) == 29  # a new layer: final rate (evaluation)
    set_pruning_progress(nn.Sequential(m), 0.0)
    assert m.kept_inputs() == 64
    m.set_progress(0.5)
    assert m.kept_inputs() == math.ceil(dgc_keep_ratio(0.5, 0.45) * 64)
    m.set_progress(1.0)
    assert m.kept_inputs() == 29


def test_dgc_saliency_loss_is_coef_times_mean_saliency():
    torch.manual_seed(4)
    m = DGCConv2d(16, 8, loss_coef=1e-2).double()
    x = torch.randn(2, 16, 4, 4, dtype=torch.double)
    m(x, 0)
    torch.testing.assert_close(m.pop_aux_loss().double(), 1e-2 * m.saliency(x).mean())


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


@pytest.mark.parametrize(
    "layer",
    [functools.partial(FBSConv2d, keep_ratio=0.5), functools.partial(DGCConv2d, heads=4, keep_ratio=0.45)],
    ids=["fbs", "dgc"],
)
def test_resnet18_with_baseline_layers_trains_on_both_branches(layer):
    torch.manual_seed(8)
    net = create_model("resnet18", width=0.125, conv_layer=layer)
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
    ratios = {}
    for scale_free in (False, True):
        torch.manual_seed(1)
        m = make(scale_free).eval()
        with torch.no_grad():
            assert torch.allclose(m.saliency(100 * x), m.saliency(x)) == scale_free
            ratios[scale_free] = float(m(100 * x).norm() / m(x).norm())
    assert ratios[True] == pytest.approx(100, rel=1e-3)  # BN in eval mode with fresh statistics is linear
    assert ratios[False] > 1000  # about 100^2 once the bias 1 of the predictor no longer matters
