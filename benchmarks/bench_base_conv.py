"""Per-layer cost of CDG's base path (Eq. 1) against the dense 3x3 convolution, on this machine.

For each 3x3 layer shape of a CIFAR ResNet-18 at the given widths (batch 128, channels_last,
fp32), prints the forward + backward time of the dense convolution and of the base path computed
two ways, with their ratios to dense:

* grouped: a grouped convolution over the G blocks (1/G of the dense FLOPs);
* masked:  the dense convolution with the weights outside the base blocks zeroed (1x the FLOPs).

``GatedConv2d(base_conv="auto")`` picks masked on a CPU when in_channels / G < 8; this script
shows whether that rule suits a given CPU. Branch a2 (inverse diagonal) is timed, which also
includes regrouping the input's channel blocks.

Usage: python benchmarks/bench_base_conv.py [--widths 0.25 1.0] [--groups 4] [--reps 7]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from cdg.nn import GatedConv2d

from _common import cifar_stage_shapes, interleaved_medians  # benchmarks/_common.py


def fwd_bwd_s(m: GatedConv2d, x: torch.Tensor, base: bool) -> float:
    t = time.perf_counter()
    y = m.base_path(x, 1) if base else torch.nn.functional.conv2d(x, m.weight, None, 1, 1)
    y.backward(torch.ones_like(y))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=float, nargs="+", default=[0.25, 1.0])
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"fwd+bwd per layer, batch {a.batch}, fp32, channels_last, {a.threads} threads, G={a.groups}, branch a2")
    print("width  C_in  HxW    in/G  dense ms  grouped ms (x dense)  masked ms (x dense)  auto picks")
    for w in a.widths:
        for c, hw in cifar_stage_shapes(w):
            x = torch.randn(a.batch, c, hw, hw).contiguous(memory_format=torch.channels_last).requires_grad_()
            forms = {"dense": (GatedConv2d(c, c, 1, a.groups), False)}
            forms.update({k: (GatedConv2d(c, c, 1, a.groups, base_conv=k), True) for k in ("grouped", "masked")})
            med = interleaved_medians({k: partial(fwd_bwd_s, m, x, base) for k, (m, base) in forms.items()}, a.reps)
            ms = {k: v * 1e3 for k, v in med.items()}
            pick = "masked" if forms["dense"][0]._masked_base(x) else "grouped"  # base_conv="auto"
            print(f"{w:<5}  {c:<4}  {hw:>2}x{hw:<2}  {c // a.groups:<4}  {ms['dense']:8.1f}  "
                  f"{ms['grouped']:8.1f} ({ms['grouped'] / ms['dense']:.2f}x)     "
                  f"{ms['masked']:8.1f} ({ms['masked'] / ms['dense']:.2f}x)      {pick}", flush=True)


if __name__ == "__main__":
    main()
