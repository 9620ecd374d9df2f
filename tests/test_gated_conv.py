"""GatedConv2d against hand-written references (docs/design.md §1, issue: gating core)."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch
import torch.nn.functional as F

from cdg.nn import GatedConv2d, base_path_blocks, gate_surrogate_derivative, sparsity_objective, threshold_from_sparsity
from cdg.nn.sparsity import gate_statistics, mask_similarity


def reference_forward(m: GatedConv2d, x: torch.Tensor, branch: int, mask_from: torch.Tensor | None = None):
    """Y = Y_full * M + Y_base * (1 - M), the base path built block by block from W (Eq. 1-3)."""
    g, co, ci = m.gate_groups, m.out_channels // m.gate_groups, m.in_channels // m.gate_groups
    w_b = torch.zeros_like(m.weight)
    for o, p in enumerate(base_path_blocks(g, branch, m.mode, m.overlap)):
        w_b[o * co:(o + 1) * co, p * ci:(p + 1) * ci] = m.weight[o * co:(o + 1) * co, p * ci:(p + 1) * ci]
    y_base = F.conv2d(x, w_b, None, m.stride, 1)  # masked dense conv: the naive CGNet form
    y_full = F.conv2d(x, m.weight, None, m.stride, 1)
    if mask_from is None:
        s = y_base
        if m.group_size > 1:
            n_, c, h, w = s.shape
            s = s.reshape(n_, c // m.group_size, m.group_size, h, w).mean(2)
        mu = s.mean((2, 3), keepdim=True)
        var = s.var((2, 3), unbiased=False, keepdim=True)
        nrm = (s - mu) / torch.sqrt(var + 1e-5)
        tau = m.tau.view(1, -1, 1, 1)
        hard = (nrm > tau).to(s.dtype)
        soft = torch.sigmoid(m.alpha * (nrm - tau))
        mask = hard + soft - soft.detach()  # straight-through with the sigmoid surrogate
    else:
        mask = mask_from
    full = mask.repeat_interleave(m.group_size, 1) if m.group_size > 1 else mask
    return y_full * full + y_base * (1 - full), mask


# (base_conv, channels_last, gate_kernel): both base-path convolutions, the block selection in both
# layouts, and the fused gate in C++ (auto: channels-last, C_g = 1) and in PyTorch
LAYOUTS = (("grouped", False, "auto"), ("grouped", True, "auto"), ("grouped", True, "torch"), ("masked", False, "auto"))
CASES = list(itertools.product((2, 4, 8), (0, 1), ("dual", "shared_base"), (1, 2), (True, False), LAYOUTS))


@pytest.mark.parametrize("g,branch,mode,cg,fused,layout", CASES)
def test_fast_form_equals_reference_values_and_gradients(g, branch, mode, cg, fused, layout):
    torch.manual_seed(g * 10 + branch)
    base_conv, channels_last, kernel = layout
    m = GatedConv2d(16, 32, 1, g, mode=mode, group_size=cg, base_conv=base_conv, gate_kernel=kernel).double()
    m.fused = fused
    with torch.no_grad():
        m.tau.uniform_(-0.7, 0.7)
    x = torch.randn(3, 16, 7, 7, dtype=torch.double)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    gy = torch.randn(3, 32, 7, 7, dtype=torch.double)
    y = m(x, branch)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    gx, gw, gt = torch.autograd.grad(y, (x, m.weight, m.tau), gy)
    yr, _ = reference_forward(m, x, branch)
    rx, rw, rt = torch.autograd.grad(yr, (x, m.weight, m.tau), gy)
    for a, b in ((y, yr), (gx, rx), (gw, rw), (gt, rt)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("overlap", (0, 50, 75, 100))
@pytest.mark.parametrize("base_conv,channels_last,kernel", LAYOUTS)
def test_overlap_layouts_match_reference(overlap, base_conv, channels_last, kernel):
    torch.manual_seed(overlap)
    m = GatedConv2d(8, 8, 2, 4, overlap=overlap, base_conv=base_conv, gate_kernel=kernel).double()
    x = torch.randn(2, 8, 9, 9, dtype=torch.double)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(m(x, 1), reference_forward(m, x, 1)[0])


def test_tau_limits_give_dense_and_base_path():
    m = GatedConv2d(8, 8, 1, 4).double()
    x = torch.randn(2, 8, 6, 6, dtype=torch.double)
    for fused in (True, False):
        m.fused = fused
        with torch.no_grad():
            m.tau.fill_(-1e9)
        torch.testing.assert_close(m(x, 0), F.conv2d(x, m.weight, None, 1, 1))
        with torch.no_grad():
            m.tau.fill_(1e9)
        for b in (0, 1):
            torch.testing.assert_close(m(x, b), m.base_path(x, b))


@pytest.mark.parametrize("g", (2, 3, 4, 8))
def test_a1_a2_base_blocks_disjoint_and_cover_one_gth(g):
    a1 = set(enumerate(base_path_blocks(g, 0)))
    a2 = set(enumerate(base_path_blocks(g, 1)))
    assert not a1 & a2
    assert len(a1) == len(a2) == g  # g blocks of (C_out/G x C_in/G): C_out*C_in/G weights each
    m = GatedConv2d(8 * g, 8 * g, 1, g)
    for b in (0, 1):
        assert m.base_weight(b).numel() == m.weight.numel() // g


def test_overlap_layouts_share_what_spec_says():
    a1 = set(enumerate(base_path_blocks(4, 0)))
    for overlap, shared in ((100, 4), (75, 3), (50, 2), (0, 0)):
        a2 = set(enumerate(base_path_blocks(4, 1, "dual", overlap)))
        assert len(a1 & a2) == shared
    assert base_path_blocks(4, 1, "dual", 50) == (0, 1, 0, 1)  # input groups 2, 3 never in a2
    assert base_path_blocks(4, 1, "shared_base") == (0, 1, 2, 3)
    assert base_path_blocks(3, 1) == (1, 2, 0)  # odd G: cyclic shift


def test_structured_mask_constant_within_groups():
    m = GatedConv2d(16, 32, 1, 4, group_size=4)
    m.keep_masks = True
    m(torch.randn(2, 16, 8, 8), 0)
    mask = m.last_masks[0]
    assert mask.shape == (2, 8, 8, 8) and m.tau.shape == (8,)
    full = mask.repeat_interleave(4, 1)
    assert torch.equal(full.view(2, 8, 4, 8, 8).amin(2), full.view(2, 8, 4, 8, 8).amax(2))


def test_unified_applies_view1_mask_to_view2():
    torch.manual_seed(0)
    m = GatedConv2d(8, 8, 1, 4, mode="unified").double()
    m.keep_masks = True
    x1, x2 = torch.randn(2, 8, 6, 6, dtype=torch.double), torch.randn(2, 8, 6, 6, dtype=torch.double)
    m(x1, 0)
    mask1 = m.last_masks[0]
    y2 = m(x2, 1)
    expected, _ = reference_forward(m, x2, 1, mask_from=mask1)
    torch.testing.assert_close(y2, expected)
    assert torch.equal(m.last_masks[1], mask1)
    m.keep_masks = False
    own = GatedConv2d(8, 8, 1, 4, mode="dual").double()
    own.load_state_dict(m.state_dict())
    assert not torch.equal(own(x2, 0), y2)  # its own mask would differ
    with pytest.raises(RuntimeError, match="branch a1"):
        m(x2, 1)  # no fresh a1 mask


def test_surrogate_derivatives_match_formulas():
    u = torch.linspace(-3, 3, 61, dtype=torch.double)
    s = torch.sigmoid(2.0 * u)
    torch.testing.assert_close(gate_surrogate_derivative(u, 2.0, "sigmoid"), 2.0 * s * (1 - s))
    torch.testing.assert_close(gate_surrogate_derivative(u, 2.0, "one_sided"), 2.0 * s * (1 - s) * (u > 0))
    torch.testing.assert_close(gate_surrogate_derivative(u, 2.0, "hard_sigmoid"), 0.5 * (u.abs() < 1.0).double())


def test_regulariser_moves_tau_toward_target():
    m = GatedConv2d(8, 8, 1, 4)
    with torch.no_grad():
        m.tau.copy_(torch.linspace(-2, 3, 8))
    target = 1.0
    loss = sparsity_objective(m, target, lam=1e-4)
    torch.testing.assert_close(loss, 1e-4 * ((m.tau - target) ** 2).sum())
    loss.backward()
    step = -m.tau.grad
    assert torch.all(torch.sign(step) == torch.sign(target - m.tau.detach()))
    assert abs(threshold_from_sparsity(0.8413447) - 1.0) < 1e-4


def test_gate_statistics_and_mask_similarity():
    torch.manual_seed(0)
    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.g = GatedConv2d(8, 8, 1, 4)

        def forward(self, x, branch=0):
            return self.g(x, branch)

    net = Wrap().eval()
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        net(x, 0)
    st = gate_statistics(net, "eval")
    net.g.keep_masks = True
    with torch.no_grad():
        net(x, 0)
    closed = 1 - net.g.last_masks[0].double().mean().item()
    assert abs(st["eta"] - closed) < 1e-9 and set(st["eta_per_layer"]) == {"g"}
    net.g.keep_masks = False
    assert mask_similarity(net, x, x) < 1.0  # different base paths give different masks
    shared = Wrap().eval()
    shared.g = GatedConv2d(8, 8, 1, 4, mode="shared_base")
    assert mask_similarity(shared, x, x) == pytest.approx(1.0)


def test_clear_errors():
    with pytest.raises(ValueError, match="in_channels=10 is not divisible by gate_groups G=4"):
        GatedConv2d(10, 8, 1, 4)
    with pytest.raises(ValueError, match="group_size C_g=3"):
        GatedConv2d(8, 16, 1, 4, group_size=3)
    with pytest.raises(ValueError, match="unknown gating mode 'triple'"):
        GatedConv2d(8, 8, 1, 4, mode="triple")
    with pytest.raises(ValueError, match="base_conv"):
        GatedConv2d(8, 8, 1, 4, base_conv="sparse")
    with pytest.raises(ValueError, match="unknown base-path overlap"):
        base_path_blocks(4, 1, "dual", 30)
    with pytest.raises(ValueError, match="gate_groups=4 only"):
        base_path_blocks(8, 1, "dual", 50)


@pytest.mark.parametrize("cg,channels_last", [(1, False), (1, True), (2, True)])
def test_inference_gate_equals_training_gate(cg, channels_last):
    torch.manual_seed(cg)
    m = GatedConv2d(16, 16, 1, 4, group_size=cg).double().eval()
    with torch.no_grad():
        m.tau.uniform_(-0.5, 0.5)
    x = torch.randn(3, 16, 8, 8, dtype=torch.double)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fast = m.gate(m.base_path(x, 0))
    with torch.enable_grad():
        ref = m.gate(m.base_path(x, 0)).detach()
    assert torch.equal(fast, ref)


@pytest.mark.parametrize("channels_last", (False, True))
def test_compiled_gate_equals_eager_gate(channels_last):
    """``compile_gate`` runs the same fused math through torch.compile: same values and gradients."""
    torch.manual_seed(3)
    eager = GatedConv2d(16, 32, 1, 4).double()
    with torch.no_grad():
        eager.tau.uniform_(-0.7, 0.7)
    compiled = GatedConv2d(16, 32, 1, 4, compile_gate=True).double()
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(3, 16, 7, 7, dtype=torch.double)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gy = torch.randn(3, 32, 7, 7, dtype=torch.double)
    results = []
    for m in (eager, compiled):
        xi = x.clone().requires_grad_()
        y = m(xi, 1)
        results.append((y, *torch.autograd.grad(y, (xi, m.weight, m.tau), gy)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


needs_compiler = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler")


@needs_compiler
@pytest.mark.parametrize("dtype,tol", ((torch.float64, 1e-9), (torch.float32, 1e-4)))
def test_cpp_gate_kernel_equals_pytorch_gate(dtype, tol, monkeypatch):
    """The C++ kernel (``gate_kernel="cpp"``) gives the PyTorch gate's output, mask and gradients, and
    really runs: a build failure is an error in ``cpp`` mode, and the kernel's calls are counted."""
    from cdg.nn import gate_kernel, gated_conv

    calls = []
    module = gate_kernel.instance_gate(required=True)

    def counted(required=False):
        calls.append(required)
        return module

    monkeypatch.setattr(gated_conv, "instance_gate", counted)
    torch.manual_seed(5)
    torch_gate = GatedConv2d(32, 64, 1, 4, gate_kernel="torch").to(dtype)
    with torch.no_grad():
        torch_gate.tau.uniform_(-0.7, 0.7)
    cpp_gate = GatedConv2d(32, 64, 1, 4, gate_kernel="cpp").to(dtype)
    cpp_gate.load_state_dict(torch_gate.state_dict())
    x = torch.randn(4, 32, 12, 12, dtype=dtype).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(4, 64, 12, 12, dtype=dtype)
    results = []
    for m in (torch_gate, cpp_gate):
        m.keep_masks = True
        xi = x.clone().requires_grad_()
        y = m(xi, 1)
        results.append((y, m.last_masks[1], *torch.autograd.grad(y, (xi, m.weight, m.tau), gy)))
    assert calls == [True], "the C++ kernel was not used"
    (y0, m0, *g0), (y1, m1, *g1) = results
    assert torch.equal(m0, m1) and torch.equal(y0, y1)
    assert y1.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_gate_kernel_falls_back_where_it_does_not_apply(monkeypatch):
    """NCHW input, C_g > 1 and other surrogates run the PyTorch gate even with gate_kernel="cpp"."""
    from cdg.nn import gated_conv

    monkeypatch.setattr(gated_conv, "instance_gate", lambda required=False: pytest.fail("kernel called"))
    for kwargs, channels_last in (({}, False), ({"group_size": 2}, True), ({"surrogate": "hard_sigmoid"}, True)):
        m = GatedConv2d(8, 16, 1, 4, gate_kernel="cpp", **kwargs)
        x = torch.randn(2, 8, 6, 6)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        m(x.requires_grad_(), 0).sum().backward()
    with pytest.raises(ValueError, match="gate_kernel"):
        GatedConv2d(8, 8, 1, 4, gate_kernel="cuda")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_gate_counts_are_exact(dtype):
    """Closed-gate counts equal the mask's zeros exactly, also for a bf16 mask under autocast (as in
    bf16-mixed training), whose own bf16 sum would round."""
    torch.manual_seed(0)
    m = GatedConv2d(16, 16, 1, 4)
    m.keep_masks = True
    x = torch.randn(8, 16, 16, 16).contiguous(memory_format=torch.channels_last)
    for branch in (0, 1):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = m(x, branch)
        y.float().sum().backward()
        mask = m.last_masks[branch]
        assert mask.dtype == dtype and mask.numel() > 256  # bf16 integers are exact only up to 256
        assert m.gate_counts[0, branch, 0].item() == (mask == 0).sum().item()
        assert m.gate_counts[0, branch, 1].item() == mask.numel()


def test_gate_counts_stay_float64_when_the_module_is_cast():
    from cdg.nn import FBSConv2d

    torch.manual_seed(0)
    for m in (GatedConv2d(16, 16, 1, 4), FBSConv2d(16, 16, 1)):
        m = m.to(torch.bfloat16)
        assert m.weight.dtype == torch.bfloat16 and m.gate_counts.dtype == torch.float64
        m.eval()
        with torch.no_grad():
            m(torch.randn(8, 16, 17, 17, dtype=torch.bfloat16), 0)
        assert m.gate_counts[1, 0, 1].item() == 8 * 16 * 17 * 17  # 289 * 128: not a bf16 number


def test_eval_gate_compares_in_fp32_under_bf16():
    """Issue 13 item 6: in bf16 the eval gate computes moments, threshold and comparison in fp32,
    so its mask equals the fp32 gate's on the same (bf16-rounded) base-path values."""
    torch.manual_seed(0)
    conv = GatedConv2d(16, 32, gate_groups=4, gate_kernel="torch").eval()
    with torch.no_grad():
        conv.tau.copy_(torch.randn_like(conv.tau))
        y = (torch.randn(4, 32, 8, 8) * 3 + 1).to(torch.bfloat16)
        got = conv.gate(y)
        ref = conv.gate(y.float())
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.float(), ref)
    # the old form (threshold rounded to bf16, compared in bf16) flips gates on the same input
    s = y
    mu = s.float().mean((2, 3), keepdim=True)
    std = (s.float().var((2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    old = (s > (mu + conv.tau.view(1, -1, 1, 1) * std).to(torch.bfloat16)).float()
    assert not torch.equal(old, ref)
