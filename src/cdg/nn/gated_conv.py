"""The gated 3x3 convolution of Contrastive Dual Gating (paper Sec. 2.1, 3, 4; docs/design.md §1).

A convolution with weight ``W`` (C_out x C_in x 3 x 3) is split into G groups along both channel
axes. For contrastive branch ``a_i`` the *base path* reads, for each output group ``o``, only the
input group ``pi_i(o)`` (Eq. 1)::

    Y_base = X_base * W_b                                                        (Eq. 1)

and a learned threshold ``tau`` gates the remaining *conditional path* per output element::

    M = step(normal(S) - tau)         S = Y_base, or its C_g-group average       (Eq. 2, 12)
    Y = Y_base + M * Y_cond           Y_cond = X_cond * W_c = conv(X, W) - Y_base (Eq. 3)

Backward uses the CGNet "gradient smoothing": dM/dn = alpha * s * (1 - s), s = sigmoid(alpha(n - tau)).

Training computes the dense convolution once plus the base path once as a grouped convolution
(1 + 1/G dense-conv costs; with fewer than 8 input channels per group a CPU runs the base path as
the dense convolution with zeroed weights, which oneDNN does faster), which equals the reference
form ``Y_full * M + Y_base * (1 - M)`` in values and gradients. The three steps
(:meth:`GatedConv2d.base_path`, :meth:`GatedConv2d.gate`,
:meth:`GatedConv2d.combine`) are separate so that a sparse kernel can replace ``combine``.
In training they run fused (:class:`_FusedInstanceGate`, whose PyTorch form below is the readable
one); on a CPU the same math runs by default in the C++ kernel of :mod:`cdg.nn.gate_kernel`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdg.nn.gate_kernel import instance_gate, supports as kernel_supports
from cdg.nn.gated import GatedLayer

GatingMode = Literal["dual", "shared_base", "unified"]
Norm = Literal["instance", "batch"]
Surrogate = Literal["sigmoid", "one_sided", "hard_sigmoid"]

#: the ``mode`` values GatedConv2d takes (the gating modes of cdg.nn.modes that build it)
GATED_CONV_MODES: tuple[str, ...] = ("dual", "shared_base", "unified")
#: MAC-equivalents per salience element of the gate: instance-norm moments, compare, select
GATE_OPS_PER_ELEMENT = 4
NORMS: tuple[str, ...] = ("instance", "batch")
SURROGATES: tuple[str, ...] = ("sigmoid", "one_sided", "hard_sigmoid")
BASE_CONVS: tuple[str, ...] = ("auto", "grouped", "masked")
GATE_KERNELS: tuple[str, ...] = ("auto", "cpp", "torch")
OVERLAPS: tuple[int, ...] = (0, 50, 75, 100)


def base_path_blocks(gate_groups: int, branch: int, mode: str = "dual", overlap: int = 0) -> tuple[int, ...]:
    """Input group read by each output group in the base path of ``branch`` (docs/design.md §1).

    Returns ``pi`` with ``pi[o]`` the input group of output group ``o``.

    * branch a1 (0): the diagonal, ``pi(o) = o``.
    * branch a2 (1), ``dual`` mode: the inverse diagonal ``pi(o) = G-1-o`` for even G, the cyclic
      shift ``pi(o) = (o+1) mod G`` for odd G (both disjoint from a1 for G > 1).
    * ``shared_base`` and ``unified`` modes: a2 uses the diagonal too (CGNet_SimCLR, Table 1/6).
    * ``overlap`` (Table 2, G = 4, dual mode): percentage of a2's base blocks shared with a1.
      100 -> diagonal; 75 -> {(0,0),(1,1),(2,2),(3,0)}; 50 -> {(0,0),(1,1),(2,0),(3,1)} (input
      groups 2 and 3 never enter a2, the paper's reading of Fig. 5c); 0 -> inverse diagonal.
    """
    g = gate_groups
    if branch not in (0, 1):
        raise ValueError(f"branch must be 0 (a1) or 1 (a2), got {branch!r}")
    if mode not in GATED_CONV_MODES:
        raise ValueError(f"unknown gating mode {mode!r}; valid: {', '.join(GATED_CONV_MODES)}")
    if overlap not in OVERLAPS:
        raise ValueError(f"unknown base-path overlap {overlap!r}; valid: {OVERLAPS}")
    diagonal = tuple(range(g))
    if branch == 0 or mode != "dual" or overlap == 100 or g == 1:
        return diagonal
    if overlap == 0:
        return tuple(g - 1 - o for o in range(g)) if g % 2 == 0 else tuple((o + 1) % g for o in range(g))
    if g != 4:
        raise ValueError(f"base-path overlap {overlap}% is defined for gate_groups=4 only (Table 2), got G={g}")
    return (0, 1, 2, 0) if overlap == 75 else (0, 1, 0, 1)


class _SmoothedStep(torch.autograd.Function):
    """M = step(n - tau) forward; surrogate derivative backward (CGNet gradient smoothing)."""

    @staticmethod
    def forward(ctx, n: Tensor, tau: Tensor, alpha: float, surrogate: str) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(n, tau)
        ctx.alpha, ctx.surrogate = alpha, surrogate
        return _step(n, tau, n.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        n, tau = ctx.saved_tensors
        d = gate_surrogate_derivative(n - tau, ctx.alpha, ctx.surrogate)
        grad_n = grad * d
        grad_tau = -grad_n.sum(dim=(0, 2, 3), keepdim=True).reshape(tau.shape)
        return grad_n, grad_tau, None, None


def gate_surrogate_derivative(u: Tensor, alpha: float = 2.0, surrogate: str = "sigmoid") -> Tensor:
    """dM/du of the gate at ``u = n - tau`` (docs/design.md §1, "Gate").

    * ``sigmoid``: alpha * s * (1 - s), s = sigmoid(alpha * u).
    * ``one_sided``: the same where the gate is open (u > 0), zero where it is closed.
    * ``hard_sigmoid``: alpha / 4 inside |u| < 2 / alpha, zero outside.
    """
    if surrogate == "hard_sigmoid":
        return (u.abs() < 2.0 / alpha).to(u.dtype) * (alpha / 4.0)
    s = torch.sigmoid(alpha * u)
    d = alpha * s * (1.0 - s)
    if surrogate == "one_sided":
        d = d * (u > 0).to(u.dtype)
    return d


def smoothed_step(n: Tensor, tau: Tensor, alpha: float = 2.0, surrogate: str = "sigmoid") -> Tensor:
    """The gate sigma_s of Eq. 2: a hard 0/1 step forward, a smooth surrogate backward."""
    return _SmoothedStep.apply(n, tau, alpha, surrogate)


def _step(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``(a > b).to(dtype)`` in one pass: writing the comparison straight into a float tensor is
    several times faster on a CPU than a bool tensor and a conversion."""
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=dtype, device=a.device)
    return torch.gt(a, b, out=out)


def _channels_last_view(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _gate_forward(y_full: Tensor, y_base: Tensor, tau: Tensor, group_size: int, nhwc: bool):
    """Forward math of the fused gate on (N, C, H, W) or, with ``nhwc``, (N, H, W, C) tensors."""
    cdim, sdims = (3, (1, 2)) if nhwc else (1, (2, 3))
    cdt = torch.promote_types(y_base.dtype, torch.float32)  # gate math in fp32 (fp64 in tests)
    s = _group_mean(y_base.to(cdt), group_size, cdim)
    mu, rstd = _spatial_moments(s, sdims)
    t = tau.to(cdt).view((1, 1, 1, -1) if nhwc else (1, -1, 1, 1))
    # n > tau  <=>  s > mu + tau / rstd: no normalised tensor is needed in the forward pass
    mask = _step(s, mu + t / rstd, y_base.dtype)
    # Eq. 3, Y_base + M * (Y_full - Y_base), as one lerp: exactly Y_full where M = 1
    out = torch.lerp(y_base, y_full, _group_repeat(mask, group_size, cdim))
    return out, mask, y_full, y_base, s, mu, rstd, t


def _gate_backward(grad: Tensor, y_full: Tensor, y_base: Tensor, s: Tensor, mu: Tensor, rstd: Tensor, t: Tensor,
                   mask: Tensor, alpha: float, surrogate: str, group_size: int, nhwc: bool):
    """Backward math of the fused gate: gradients for Y_full, Y_base and tau."""
    g = group_size
    cdim, sdims = (3, (1, 2)) if nhwc else (1, (2, 3))
    grad_full = grad * _group_repeat(mask, g, cdim)
    grad_m = _group_sum((y_full - y_base).mul_(grad).to(s.dtype), g, cdim)  # dL/dM = dL/dY * Y_cond
    if surrogate == "sigmoid":
        # alpha * (n - tau) = s * (alpha rstd) - alpha (mu rstd + tau): one pass, then
        # grad_n = alpha * sig * (1 - sig) * grad_m through sigmoid's own backward kernel.
        k = alpha * rstd
        sig = torch.addcmul(-k * mu - alpha * t, s, k).sigmoid_()
        gb = torch.ops.aten.sigmoid_backward(grad_m, sig)
        scale = alpha
    else:
        gb = grad_m * gate_surrogate_derivative((s - mu) * rstd - t, alpha, surrogate)
        scale = 1.0
    # grad_n = scale * gb.  Instance-norm backward dS = rstd (dN - mean(dN) - N mean(dN N)),
    # written with per-(sample, channel) coefficients: dS = c1 * gb + c2 * s + c3.
    sum_gb = gb.sum(sdims, keepdim=True)
    mean_gb = sum_gb / (s.shape[sdims[0]] * s.shape[sdims[1]])
    mean_gbs = (gb * s).mean(sdims, keepdim=True)
    b = rstd * (mean_gbs - mu * mean_gb)  # mean(gb * n)
    c1 = scale * rstd
    c2 = -scale * rstd * rstd * b
    c3 = scale * rstd * (rstd * b * mu - mean_gb)
    grad_s = torch.addcmul(c3, c2, s).addcmul_(c1, gb)
    grad_tau = -scale * sum_gb.sum(dim=tuple(d for d in range(4) if d != cdim))
    if g > 1:
        grad_s = _group_repeat(grad_s, g, cdim) / g
    grad_base = grad_s.to(grad.dtype).add_(grad).sub_(grad_full)  # dL/dY (1 - M) + dL/dS
    return grad_full, grad_base, grad_tau


_COMPILED: dict[str, object] = {}


def _math(name: str, compiled: bool):
    """The eager function, or its ``torch.compile`` (Inductor) version, built once on first use."""
    fn = _gate_forward if name == "forward" else _gate_backward
    if not compiled:
        return fn
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[name]


class _FusedInstanceGate(torch.autograd.Function):
    """Training fast path: salience -> instance norm -> step -> Eq. 3 combine, in one function.

    Exactly the composition ``combine(gate(salience(y_base)))`` with ``norm="instance"``, with the
    backward written out so that autograd stores and runs far fewer elementwise passes (the
    composable form costs more than the convolutions on a CPU). Tested against that composition.
    Channels-last inputs are processed as contiguous N x H x W x C views (mixed layouts are slow).
    With ``compiled`` the math runs through ``torch.compile``, which fuses it into a few kernels;
    with ``kernel`` ``auto`` or ``cpp`` it runs in the C++ kernel of :mod:`cdg.nn.gate_kernel` where
    that covers the call (channels-last float CPU tensors, C_g = 1, sigmoid surrogate).
    Returns the layer output and the 0/1 mask (one entry per C_g group, N x C/C_g x H x W).
    """

    @staticmethod
    def forward(ctx, y_full: Tensor, y_base: Tensor, tau: Tensor, alpha: float, surrogate: str, group_size: int,  # type: ignore[override]
                compiled: bool = False, kernel: str = "torch"):
        ctx.set_materialize_grads(False)  # no zero tensor for the mask's (absent) gradient
        nhwc = _channels_last_view(y_base) and _channels_last_view(y_full)
        if nhwc:  # channel axis last: reduce over (1, 2)
            y_full, y_base = y_full.permute(0, 2, 3, 1), y_base.permute(0, 2, 3, 1)
        ext = None
        if kernel != "torch" and not compiled and nhwc and kernel_supports(y_full, y_base, group_size, surrogate):
            ext = instance_gate(required=kernel == "cpp")
        if ext is not None:  # the fused C++ kernel: same math, one pass over memory each way
            tau_c = tau.detach().to(y_base.dtype).contiguous()
            out, mask, mu, rstd = ext.forward(y_full, y_base, tau_c)
            ctx.save_for_backward(y_full, y_base, mask, mu, rstd, tau_c)
        else:
            out, mask, *saved = _math("forward", compiled)(y_full, y_base, tau, group_size, nhwc)
            ctx.save_for_backward(*saved, mask)
        ctx.ext, ctx.alpha, ctx.surrogate, ctx.group_size, ctx.nhwc, ctx.compiled = (
            ext, alpha, surrogate, group_size, nhwc, compiled)
        ctx.tau_shape, ctx.tau_dtype = tau.shape, tau.dtype
        ctx.mark_non_differentiable(mask)
        if nhwc:
            out, mask = out.permute(0, 3, 1, 2), mask.permute(0, 3, 1, 2)
        return out, mask

    @staticmethod
    def backward(ctx, grad: Tensor | None, _grad_mask: Tensor | None):  # type: ignore[override]
        if grad is None:  # the output took no part in the loss
            return None, None, None, None, None, None, None, None
        if ctx.nhwc:
            grad = grad.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        else:
            grad = grad.contiguous()
        saved = ctx.saved_tensors
        if ctx.ext is not None:  # saved: y_full, y_base, mask, mu, rstd, tau
            grad_full, grad_base, grad_tau = ctx.ext.backward(grad.to(saved[0].dtype), *saved, ctx.alpha)
        else:
            grad_full, grad_base, grad_tau = _math("backward", ctx.compiled)(
                grad, *saved, ctx.alpha, ctx.surrogate, ctx.group_size, ctx.nhwc)
        if ctx.nhwc:
            grad_full, grad_base = grad_full.permute(0, 3, 1, 2), grad_base.permute(0, 3, 1, 2)
        return grad_full, grad_base, grad_tau.reshape(ctx.tau_shape).to(ctx.tau_dtype), None, None, None, None, None


def _select_blocks(x: Tensor, pi: tuple[int, ...]) -> Tensor:
    """``x`` with its channels regrouped as the G blocks ``pi``, in x's own memory format.

    (``index_select`` over channels returns a contiguous tensor for channels-last input, and a
    mixed layout makes every later layer of that view slow. The inverse diagonal is a flip, whose
    backward is a flip too rather than an ``index_add_`` into zeros.)"""
    nhwc = _channels_last_view(x)
    dim = 3 if nhwc else 1
    t = (x.permute(0, 2, 3, 1) if nhwc else x).unflatten(dim, (len(pi), -1))
    if pi == tuple(reversed(range(len(pi)))):
        t = t.flip(dim)
    else:  # the cyclic shift of odd G and the Table 2 overlap layouts
        t = t.index_select(dim, torch.tensor(pi, device=x.device))
    t = t.flatten(dim, dim + 1)
    return t.permute(0, 3, 1, 2) if nhwc else t


def _spatial_moments(s: Tensor, dims: tuple[int, int], eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Mean and 1/std over H x W (biased variance, as instance norm), from sums.

    ``torch.var_mean`` over inner dimensions is 50-100x slower than ``sum`` on the CPUs we measured.
    """
    mu = s.mean(dims, keepdim=True)
    var = ((s * s).mean(dims, keepdim=True) - mu * mu).clamp_min(0.0)
    return mu, torch.rsqrt(var + eps)


def _group_mean(t: Tensor, g: int, cdim: int) -> Tensor:
    if g == 1:
        return t
    shape = list(t.shape)
    shape[cdim : cdim + 1] = [shape[cdim] // g, g]
    return t.reshape(shape).mean(cdim + 1)


def _group_sum(t: Tensor, g: int, cdim: int) -> Tensor:
    if g == 1:
        return t
    shape = list(t.shape)
    shape[cdim : cdim + 1] = [shape[cdim] // g, g]
    return t.reshape(shape).sum(cdim + 1)


def _group_repeat(t: Tensor, g: int, cdim: int) -> Tensor:
    return t if g == 1 else t.repeat_interleave(g, dim=cdim)


class GatedConv2d(GatedLayer):
    """3x3 channel-gated convolution with per-branch base paths (CDG, Eq. 1-3, 7-10, 12).

    Args:
        in_channels, out_channels: channel counts; both must be divisible by ``gate_groups``.
        stride: convolution stride (kernel 3, padding 1, no bias).
        gate_groups: G, the number of gating groups; 1 is a plain dense convolution.
        mode: ``dual`` (CDG: own mask and disjoint base path per branch), ``shared_base``
            (CGNet_SimCLR: masks per branch, both on the diagonal base path) or ``unified``
            (Table 1 control: branch a2 reuses the mask branch a1 computed in its latest call).
        overlap: Table 2 ablation, percent of a2's base blocks shared with a1 (dual mode only).
        group_size: C_g of the structured variant (Eq. 12); masks and tau are shared by each run of
            C_g consecutive output channels. 1 is the unstructured gate.
        norm: ``instance`` (per sample and channel over H x W, no affine) or ``batch``
            (BatchNorm without affine, one per branch).
        surrogate: backward of the step: ``sigmoid``, ``one_sided`` or ``hard_sigmoid``.
        alpha: surrogate slope (2.0).
        tau_init: initial threshold.
        compile_gate: run the fused training gate through ``torch.compile`` (same values).
        base_conv: how Eq. 1 is computed: ``grouped`` (a grouped convolution), ``masked`` (the dense
            convolution with the non-base weights zeroed) or ``auto`` (masked on a CPU when
            in_channels / G < 8, grouped otherwise). All give the same values.
        gate_kernel: who runs the fused training gate on a CPU: ``cpp`` (the C++ kernel of
            :mod:`cdg.nn.gate_kernel`, built on first use; an error if it cannot be built),
            ``torch`` (PyTorch operations) or ``auto`` (the kernel, falling back to PyTorch with a
            warning if it cannot be built). The kernel covers channels-last float32/float64 input
            with C_g = 1 and the sigmoid surrogate; other calls run in PyTorch. Same values.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        gate_groups: int = 4,
        *,
        mode: GatingMode = "dual",
        overlap: int = 0,
        group_size: int = 1,
        norm: Norm = "instance",
        surrogate: Surrogate = "sigmoid",
        alpha: float = 2.0,
        tau_init: float = 0.0,
        compile_gate: bool = False,
        base_conv: str = "auto",
        gate_kernel: str = "auto",
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        g = gate_groups
        if g < 1:
            raise ValueError(f"gate_groups must be >= 1, got {g}")
        for name, c in (("in_channels", in_channels), ("out_channels", out_channels)):
            if c % g:
                raise ValueError(f"GatedConv2d: {name}={c} is not divisible by gate_groups G={g}")
        if group_size < 1 or (out_channels // g) % group_size:
            raise ValueError(
                f"GatedConv2d: group_size C_g={group_size} must divide out_channels/G = {out_channels}/{g} "
                f"= {out_channels // g} (Eq. 12 groups stay inside one gating group)"
            )
        if norm not in NORMS:
            raise ValueError(f"unknown gate norm {norm!r}; valid: {', '.join(NORMS)}")
        if surrogate not in SURROGATES:
            raise ValueError(f"unknown surrogate {surrogate!r}; valid: {', '.join(SURROGATES)}")
        if overlap and mode != "dual":
            raise ValueError(f"overlap={overlap} applies to mode 'dual' only (got mode {mode!r})")
        self.gate_groups, self.mode, self.overlap = g, mode, overlap
        self.group_size, self.norm, self.surrogate, self.alpha = group_size, norm, surrogate, alpha
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.tau = nn.Parameter(torch.full((out_channels // group_size,), float(tau_init)))
        if norm == "batch":
            self.branch_norms = nn.ModuleList(
                nn.BatchNorm2d(out_channels // group_size, affine=False) for _ in range(2)
            )
        if base_conv not in BASE_CONVS:
            raise ValueError(f"unknown base_conv {base_conv!r}; valid: {', '.join(BASE_CONVS)}")
        self.base_conv = base_conv
        if gate_kernel not in GATE_KERNELS:
            raise ValueError(f"unknown gate_kernel {gate_kernel!r}; valid: {', '.join(GATE_KERNELS)}")
        self.gate_kernel = gate_kernel
        self.blocks = tuple(base_path_blocks(g, b, mode, overlap) for b in (0, 1))
        co, ci = out_channels // g, in_channels // g
        for b, pi in enumerate(self.blocks):
            block_mask = torch.zeros(out_channels, in_channels, 1, 1)
            for o, p in enumerate(pi):
                block_mask[o * co:(o + 1) * co, p * ci:(p + 1) * ci] = 1
            self.register_buffer(f"_block_mask{b}", block_mask, persistent=False)
        self.fused = True  # training fast path (instance norm); False runs the three steps
        self.compile_gate = compile_gate  # run the fused gate math through torch.compile
        # masks by branch that this layer uses instead of computing its own, e.g. another layer's
        # ``last_masks`` (a MoCo key encoder reusing its query encoder's gates); None: its own
        self.mask_source: dict[int, Tensor] | None = None
        self._a1_mask: Tensor | None = None

    # --- the three steps -------------------------------------------------------------------
    def base_weight(self, branch: int) -> Tensor:
        """W_b for ``branch``: the G blocks (o, pi(o)) stacked for a grouped convolution."""
        co, ci = self.out_channels // self.gate_groups, self.in_channels // self.gate_groups
        w = self.weight
        return torch.cat([w[o * co:(o + 1) * co, p * ci:(p + 1) * ci] for o, p in enumerate(self.blocks[branch])])

    def base_path(self, x: Tensor, branch: int = 0) -> Tensor:
        """Eq. 1: Y_base = X_base * W_b, a grouped convolution (1/G of the dense cost).

        With ``base_conv="masked"`` (or ``"auto"`` on a CPU with fewer than 8 input channels per
        group, where oneDNN's grouped convolution is slower than the dense one) it is the dense
        convolution with the weights outside the base blocks zeroed: the same values.
        """
        if self._masked_base(x):
            return F.conv2d(x, self.weight * getattr(self, f"_block_mask{branch}"), None, self.stride, 1)
        if self.blocks[branch] != tuple(range(self.gate_groups)):
            x = _select_blocks(x, self.blocks[branch])
        return F.conv2d(x, self.base_weight(branch), None, self.stride, 1, 1, self.gate_groups)

    def _masked_base(self, x: Tensor) -> bool:
        if self.base_conv == "auto":
            return x.device.type == "cpu" and self.in_channels // self.gate_groups < 8
        return self.base_conv == "masked"

    def salience(self, y_base: Tensor) -> Tensor:
        """Alg. 1 lines 8-12 / Eq. 12: S = Y_base, or its average over each run of C_g channels."""
        if self.group_size == 1:
            return y_base
        n, c, h, w = y_base.shape
        return y_base.reshape(n, c // self.group_size, self.group_size, h, w).mean(2)

    def gate(self, y_base: Tensor, branch: int = 0) -> Tensor:
        """Eq. 2 / 9-10: M = sigma_s(normal(S) - tau), one entry per (sample, C_g group, h, w)."""
        if self.norm == "instance" and not torch.is_grad_enabled():
            return self._gate_inference(y_base)
        s = self.salience(y_base)
        s = s.to(torch.promote_types(s.dtype, torch.float32))
        if self.norm == "instance":
            n = F.instance_norm(s, eps=1e-5)
        else:
            n = self.branch_norms[branch](s)
        return smoothed_step(n, self.tau.to(n.dtype).view(1, -1, 1, 1), self.alpha, self.surrogate)

    def _gate_inference(self, y_base: Tensor) -> Tensor:
        """The same mask without autograd: normal(S) > tau  <=>  S > mu + tau * std (per sample and
        channel), computed in fp32 (fp64 for fp64 input) whatever the activations' dtype, on a
        contiguous N x H x W x C view for channels-last input (much faster on CPUs)."""
        nhwc = _channels_last_view(y_base)
        s = y_base.permute(0, 2, 3, 1) if nhwc else y_base
        cdim, sdims = (3, (1, 2)) if nhwc else (1, (2, 3))
        acc = torch.promote_types(y_base.dtype, torch.float32)
        # bf16 / fp16 activations: moments, threshold and comparison in fp32, as in training (a
        # bf16 threshold mu + tau * std would round by up to 2**-8 of its size and flip gates)
        s = _group_mean(s if s.dtype == acc else s.to(acc), self.group_size, cdim)
        count = s.shape[sdims[0]] * s.shape[sdims[1]]
        mu = s.sum(sdims, keepdim=True) / count
        var = ((s * s).sum(sdims, keepdim=True) / count - mu * mu).clamp_min(0.0)
        t = self.tau.to(acc).view((1, 1, 1, -1) if nhwc else (1, -1, 1, 1))
        mask = _step(s, mu + t * torch.sqrt(var + 1e-5), y_base.dtype)
        return mask.permute(0, 3, 1, 2) if nhwc else mask

    def combine(self, x: Tensor, y_base: Tensor, mask: Tensor) -> Tensor:
        """Eq. 3: Y = Y_base + M * (conv(X, W) - Y_base), M repeated over each C_g group.

        Dense form used for training and as the reference for a sparse inference kernel.
        """
        y_full = F.conv2d(x, self.weight, None, self.stride, 1)
        if self.group_size > 1:
            mask = mask.repeat_interleave(self.group_size, dim=1)
        return torch.addcmul(y_base, mask.to(y_full.dtype), y_full - y_base)

    # --- forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor, branch: int = 0) -> Tensor:
        if branch not in (0, 1):
            raise ValueError(f"branch must be 0 (a1) or 1 (a2), got {branch!r}")
        if self.gate_groups == 1:
            return F.conv2d(x, self.weight, None, self.stride, 1)
        y_base = self.base_path(x, branch)
        if (self.fused and self.norm == "instance" and torch.is_grad_enabled() and self.mode != "unified"
                and self.mask_source is None):
            y_full = F.conv2d(x, self.weight, None, self.stride, 1)
            out, mask = _FusedInstanceGate.apply(y_full, y_base, self.tau, self.alpha, self.surrogate, self.group_size,
                                                 self.compile_gate, self.gate_kernel)
            self._record(mask, branch)
            return out
        forced = self.mask_source.get(branch) if self.mask_source is not None else None
        if forced is not None:
            if forced.shape[0] != x.shape[0]:
                raise RuntimeError(f"mask_source holds a mask for {forced.shape[0]} samples, the input has {x.shape[0]}")
            mask = forced.to(y_base.dtype)
        elif self.mode == "unified" and branch == 1:
            mask, self._a1_mask = self._a1_mask, None
            if mask is None or mask.shape[0] != x.shape[0]:
                raise RuntimeError(
                    "unified gating: branch a2 needs the mask of branch a1 from the same step; call the "
                    "model on view 1 (branch 0) before view 2 (branch 1), with the same batch size"
                )
        else:
            mask = self.gate(y_base, branch)
            if self.mode == "unified" and branch == 0:
                self._a1_mask = mask
        self._record(mask, branch)
        return self.combine(x, y_base, mask)

    # --- statistics ------------------------------------------------------------------------
    def _record(self, mask: Tensor, branch: int) -> None:
        if self.keep_masks:
            self.last_masks[branch] = mask.detach()
        if self.track_stats:
            with torch.no_grad():
                counts = self.gate_counts[0 if self.training else 1, branch]
                # a float32 sum of 0/1 values is exact below 2**24 elements (and much faster on a
                # CPU than converting a float32 mask to float64 first); a bf16 sum would round
                big = mask.numel() >= 2**24
                opened = mask.sum(dtype=torch.float64 if big else torch.float32)
                counts[0] += mask.numel() - opened
                counts[1] += mask.numel()

    # --- the GatedLayer interface ------------------------------------------------------------
    has_threshold = True

    @property
    def is_gated(self) -> bool:
        """G = 1 is a plain dense convolution."""
        return self.gate_groups > 1

    @property
    def base_fraction(self) -> float:
        """The base path (Eq. 1): 1/G of the dense MACs."""
        return 1.0 / self.gate_groups

    def gate_macs(self, out_elements: int) -> float:
        """``GATE_OPS_PER_ELEMENT`` per salience element, plus the C_g-group average (Eq. 12)."""
        return GATE_OPS_PER_ELEMENT * out_elements / self.group_size + (out_elements if self.group_size > 1 else 0)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, G={self.gate_groups}, "
            f"mode={self.mode}, overlap={self.overlap}, C_g={self.group_size}, norm={self.norm}, "
            f"surrogate={self.surrogate}, alpha={self.alpha}"
        )
