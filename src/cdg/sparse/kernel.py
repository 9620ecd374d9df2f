"""The C++ CPU kernels of sparse inference (``csrc/sparse_conv.cpp``), built on first use, and their
PyTorch fallback (same values up to float rounding).

Three steps per gated 3x3 convolution on branch a1 (docs/design.md §1), on channels-last float32
tensors passed as contiguous N x H x W x C views:

* :func:`base_conv`: Y_base = X * W_b (Eq. 1), the grouped convolution of the diagonal blocks;
* :func:`thresholds`: thr = mu + tau * std of S = Y_base (or its C_g-channel mean, Eq. 12) per sample
  and gate entry over H x W, so that M = [S > thr] (Eq. 2; the test of
  ``GatedConv2d._gate_inference``);
* :func:`cond`: Y = Y_base + M * conv(X, W - W_b) (Eq. 3) computed ONLY at the open entries, then the
  per-channel epilogue ``relu(scale * Y + bias + residual)`` (the following BatchNorm, the block's
  shortcut and ReLU). With ``dense=True`` (layers with many input channels, where the sparse loops
  lose to oneDNN) conv(X, W - W_b) is computed densely and only Eq. 3 + the epilogue run in C++.

The loop structure of each kernel is described at the top of ``csrc/sparse_conv.cpp``.

The kernel is compiled like :mod:`cdg.nn.gate_kernel` (``torch.utils.cpp_extension.load``, OpenMP,
``-march``-level flags per CPU capability, cached in ``$TORCH_EXTENSIONS_DIR``). If it cannot be
built, :func:`extension` warns once (or raises, with ``required``) and the PyTorch forms run.
:data:`CALLS` counts the calls of each form in this process (``cpp_*`` are also counted by the
kernel itself: :func:`kernel_calls`), so a test can tell which one ran.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from cdg.nn.gate_kernel import build_extension, load_once

SOURCE = Path(__file__).with_name("csrc") / "sparse_conv.cpp"
#: how many times each form ran in this process: cpp_base, cpp_thresholds, cpp_cond, cpp_combine, torch_base, ...
CALLS: Counter = Counter()
#: bytes of padded input rows per tile of output rows (kept within L1 while every output channel's
#: weights pass over the tile)
TILE_BYTES = 24 * 1024
#: the same for the cond kernel's block order (C_g a multiple of 8): longer lists of open positions
#: per gate entry, so fewer partial register blocks (benchmarks/bench_cond_tiles.py, 42% open, G = 4,
#: AMD EPYC AVX2: 1.16-1.98x faster than 24 KiB over width-1 ResNet-18 layer shapes, C_g = 8 and 16)
BLOCK_TILE_BYTES = 128 * 1024
#: loop order of the cond kernel: 0 automatic, 1 channel-major, 2 position-major, 3 blocks (C_g a
#: multiple of 8, with ``blocks`` given) (tests, tuning)
ORDER = 0
EPS = 1e-5
_state: dict[str, object] = {}


def extension(required: bool = False) -> ModuleType | None:
    """The compiled kernel module, or None where it cannot be built (a warning says why, once).

    With ``required`` a failed build raises a RuntimeError that says why."""
    # -ffp-contract=fast: a * b + c on vectors becomes one FMA (ISO C++ mode turns contraction off)
    return load_once(_state, lambda: build_extension("cdg_sparse_conv", SOURCE, ["-ffp-contract=fast"]), required,
                     "cdg.sparse: the C++ sparse-conv kernel could not be built ({error}); sparse inference runs in "
                     "PyTorch (same values, no speed-up)",
                     "kernel='cpp': the C++ sparse-conv kernel could not be built: {error}")


def kernel_calls() -> dict[str, int]:
    """Calls the compiled kernel itself counted (0s when it is not built)."""
    ext = _state.get("module")
    if ext is None:
        return {"base_conv": 0, "thresholds": 0, "cond": 0, "combine": 0, "cond_blocks": 0}
    b, t, c, m, k = ext.calls()  # type: ignore[attr-defined]
    return {"base_conv": b, "thresholds": t, "cond": c, "combine": m, "cond_blocks": k}


# ----------------------------------------------------------------------------- weight packing


def block_diagonal_mask(out_channels: int, in_channels: int, groups: int) -> Tensor:
    """(C_out, C_in) 0/1: 1 on the diagonal blocks (branch a1's base path, Eq. 1)."""
    co, ci = out_channels // groups, in_channels // groups
    g_out = torch.arange(out_channels) // co
    g_in = torch.arange(in_channels) // ci
    return (g_out[:, None] == g_in[None, :]).float()


def pack_base(weight: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """W_b for :func:`base_conv`: per chunk of 8 output channels, the input channels of the
    chunk's group(s), as ``[9][nci][8]`` (zeros off the diagonal and beyond C_out); and the
    ``(chunks, 3)`` int64 table (first input channel, input channels, offset)."""
    co, ci = weight.shape[:2]
    cog, cig = co // groups, ci // groups
    w = weight.detach().float().permute(0, 2, 3, 1).reshape(co, 9, ci)  # (co, tap, ci)
    parts, meta, off = [], [], 0
    for k in range((co + 7) // 8):
        c0, c1 = 8 * k, min(8 * k + 8, co)
        g_lo, g_hi = c0 // cog, (c1 - 1) // cog
        i0, i1 = g_lo * cig, (g_hi + 1) * cig
        blk = torch.zeros(9, i1 - i0, 8)
        for lane, c in enumerate(range(c0, c1)):
            g = c // cog
            blk[:, g * cig - i0:(g + 1) * cig - i0, lane] = w[c, :, g * cig:(g + 1) * cig]
        parts.append(blk.reshape(-1))
        meta.append((i0, i1 - i0, off))
        off += blk.numel()
    return torch.cat(parts).contiguous(), torch.tensor(meta, dtype=torch.int64)


def pack_cond(weight: Tensor, groups: int) -> Tensor:
    """W_c = W - W_b for :func:`cond`: (C_out, 9, C_in), taps in (kh, kw) order, diagonal blocks zero."""
    co, ci = weight.shape[:2]
    wc = weight.detach().float() * (1.0 - block_diagonal_mask(co, ci, groups))[:, :, None, None]
    return wc.permute(0, 2, 3, 1).reshape(co, 9, ci).contiguous()


def pack_cond_blocks(wz: Tensor) -> Tensor:
    """W_c (C_out, 9, C_in) as ``[C_out / 8][9][C_in][8]``: per chunk of 8 output channels, one weight
    vector per (tap, input channel), for the kernel's block order (C_g a multiple of 8)."""
    co, _, ci = wz.shape
    return wz.reshape(co // 8, 8, 9, ci).permute(0, 2, 3, 1).contiguous()


# ----------------------------------------------------------------------------- the three steps


def _nhwc(t: Tensor) -> Tensor:
    """A channels-last N x C x H x W tensor as its contiguous N x H x W x C view (no copy)."""
    return t.permute(0, 2, 3, 1).contiguous()


def base_conv(x: Tensor, packed: tuple[Tensor, Tensor], weight_b: Tensor, groups: int, stride: int,
              ext: ModuleType | None) -> Tensor:
    """Y_base (N, C, Ho, Wo, channels-last) of ``x`` (channels-last). ``weight_b`` is the grouped
    conv weight (C_out, C_in / G, 3, 3) of the PyTorch (oneDNN) form."""
    if ext is not None:
        CALLS["cpp_base"] += 1
        y = ext.base_conv(_nhwc(x), packed[0], packed[1], weight_b.shape[0], stride, TILE_BYTES)
        return y.permute(0, 3, 1, 2)
    CALLS["torch_base"] += 1
    return F.conv2d(x, weight_b, None, stride, 1, 1, groups)


def thresholds(y_base: Tensor, tau: Tensor, group_size: int, ext: ModuleType | None) -> Tensor:
    """thr (N, C / C_g): M = [S > thr] with S = Y_base or its C_g-channel mean (Eq. 2, 12)."""
    if ext is not None:
        CALLS["cpp_thresholds"] += 1
        return ext.thresholds(_nhwc(y_base), tau, group_size, EPS)
    CALLS["torch_thresholds"] += 1
    s = salience(y_base, group_size).double()
    mu = s.mean((2, 3))
    var = ((s * s).mean((2, 3)) - mu * mu).clamp_min(0.0)
    return (mu + tau.double()[None] * torch.sqrt(var + EPS)).float()


def salience(y_base: Tensor, group_size: int) -> Tensor:
    """S (N, C / C_g, H, W): Y_base, or its mean over each run of C_g channels (Eq. 12)."""
    if group_size == 1:
        return y_base
    n, c, h, w = y_base.shape
    return y_base.reshape(n, c // group_size, group_size, h, w).mean(2)


def cond(x: Tensor, y_base: Tensor, thr: Tensor, wz: Tensor, weight_c: Tensor, scale: Tensor, bias: Tensor,
         residual: Tensor | None, relu: bool, stride: int, group_size: int, groups: int,
         ext: ModuleType | None, want_mask: bool = False, dense: bool = False,
         blocks: Tensor | None = None) -> tuple[Tensor, Tensor | None, int]:
    """``relu(scale * (Y_base + M * conv(X, W_c)) + bias + residual)`` (channels-last), the mask
    (N, C / C_g, Ho, Wo) uint8 if ``want_mask``, and the number of open channels. ``wz`` is W_c
    packed for the kernel, ``weight_c`` the same as a conv weight for the PyTorch form (which
    computes conv(X, W_c) densely). ``dense``: the kernel's form computes conv(X, W_c) densely too
    (oneDNN) and only Eq. 3 and the epilogue in C++ (``combine``), for layers where that is faster.
    ``blocks``: W_c from :func:`pack_cond_blocks` (C_g a multiple of 8): the kernel computes each open
    entry's C_g channels as whole vectors, several open positions at a time (block order)."""
    if ext is not None and dense:
        CALLS["cpp_combine"] += 1
        res = _nhwc(residual) if residual is not None else torch.empty(0)
        y_cond = F.conv2d(x, weight_c, None, stride, 1)
        out, mask, n_open = ext.combine(_nhwc(y_base), _nhwc(y_cond), thr, scale, bias, res, relu, group_size,
                                        want_mask)
        return out.permute(0, 3, 1, 2), (mask.permute(0, 3, 1, 2) if want_mask else None), int(n_open)
    if ext is not None:
        CALLS["cpp_cond"] += 1
        res = _nhwc(residual) if residual is not None else torch.empty(0)
        out, mask, n_open = ext.cond(_nhwc(x), _nhwc(y_base), thr, wz, scale, bias, res, relu, stride, group_size,
                                     groups, want_mask, TILE_BYTES if blocks is None else BLOCK_TILE_BYTES, ORDER,
                                     blocks if blocks is not None else torch.empty(0))
        return out.permute(0, 3, 1, 2), (mask.permute(0, 3, 1, 2) if want_mask else None), int(n_open)
    CALLS["torch_cond"] += 1
    m = salience(y_base, group_size) > thr[:, :, None, None]
    n_open = int(m.sum()) * group_size
    mf = m.to(y_base.dtype)
    if group_size > 1:
        mf = mf.repeat_interleave(group_size, dim=1)
    y = torch.addcmul(y_base, mf, F.conv2d(x, weight_c, None, stride, 1))
    out = torch.addcmul(bias.view(1, -1, 1, 1), y, scale.view(1, -1, 1, 1))
    if residual is not None:
        out = out + residual
    if relu:
        out = torch.relu(out)
    out = out.contiguous(memory_format=torch.channels_last)
    return out, (m.to(torch.uint8) if want_mask else None), n_open
