"""SimCLR training-step time with gated convolutions divided by the same with dense convolutions.

Two views (view 1 on a1, view 2 on a2), forward + backward + SGD step, ResNet-18, CIFAR input,
channels_last, bf16 autocast where the CPU has native bf16 (else fp32), interleaved in one process (the host is shared and noisy: only
ratios measured side by side mean anything). The forms:

* dense:  plain 3x3 convolutions;
* cdg:    our GatedConv2d at G = 4 (dense conv + base conv, grouped or masked by `base_conv="auto"`,
          + fused gate in the C++ kernel, `gate_kernel="auto"`);
* cdg_torch_gate: the same with the fused gate in PyTorch operations (`gate_kernel="torch"`);
* cdg_compiled: the same with the PyTorch gate through torch.compile (`compile_gate=True`);
* naive:  the original channel-gating formulation: a full conv plus a *masked* full-size base conv
          (Y = Y_full * M + Y_base * (1 - M)), about 2x the dense convolution cost;
* convs_only: CDG's dense and base-path convolutions with no gate (Y_full + Y_base), the floor
          that a faster gate could reach with these convolution kernels.

Usage: python benchmarks/bench_gated_conv.py [--widths 0.25 1.0] [--batch 128] [--rounds 3] [--profile]

``--profile`` also prints the top operators (self CPU time) of one dense and one CDG step per width.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from cdg.config import native_bf16
from cdg.models import create_model
from cdg.nn import GatedConv2d, make_conv_layer

from _common import interleaved_medians  # benchmarks/_common.py


class NaiveGatedConv2d(GatedConv2d):
    """Reference formulation of the original CGNet code: masked weights, two full convolutions."""

    def forward(self, x, branch=0):
        g, co, ci = self.gate_groups, self.out_channels // self.gate_groups, self.in_channels // self.gate_groups
        mask_w = torch.zeros_like(self.weight)
        for o, p in enumerate(self.blocks[branch]):
            mask_w[o * co:(o + 1) * co, p * ci:(p + 1) * ci] = 1
        y_base = F.conv2d(x, self.weight * mask_w, None, self.stride, 1)
        y_full = F.conv2d(x, self.weight, None, self.stride, 1)
        m = self.gate(y_base, branch).to(y_full.dtype)
        return y_full * m + y_base * (1 - m)


class ConvsOnlyGatedConv2d(GatedConv2d):
    """CDG's two convolutions (dense + base path) with no gate: Y = Y_full + Y_base. The floor any
    gate implementation can reach with these convolution kernels (not a model to train)."""

    def forward(self, x, branch=0):
        return F.conv2d(x, self.weight, None, self.stride, 1) + self.base_path(x, branch)


def step_time(net: nn.Module, x1: torch.Tensor, x2: torch.Tensor, opt: torch.optim.Optimizer, bf16: bool) -> float:
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        z1, z2 = net(x1, branch=0).float(), net(x2, branch=1).float()
        loss = -(F.normalize(z1) * F.normalize(z2)).sum(1).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=float, nargs="+", default=[0.25, 1.0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile each whole network (gate in its composable form, fused=False)")
    ap.add_argument("--profile", action="store_true", help="top operators of one dense and one CDG step")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 autocast only where the CPU has native bf16 (AVX512-BF16/AMX)")
    a = ap.parse_args()
    bf16 = a.precision == "bf16" or (a.precision == "auto" and native_bf16())
    torch.set_num_threads(a.threads)
    for w in a.widths:
        def compiled(i, o, s=1):
            m = GatedConv2d(i, o, s, 4)
            if a.compile:
                m.fused = False  # let Inductor fuse and differentiate the plain composition
            else:
                m.compile_gate = True
            return m

        factories = {"dense": make_conv_layer("dense"), "cdg": make_conv_layer("dual", gate_groups=4),
                     "cdg_torch_gate": make_conv_layer("dual", gate_groups=4, gate_kernel="torch"),
                     "cdg_compiled": compiled, "naive": lambda i, o, s=1: NaiveGatedConv2d(i, o, s, 4),
                     "convs_only": lambda i, o, s=1: ConvsOnlyGatedConv2d(i, o, s, 4)}
        nets, opts = {}, {}
        for k, f in factories.items():
            torch.manual_seed(0)
            nets[k] = create_model("resnet18", width=w, conv_layer=f).to(memory_format=torch.channels_last)
            if a.compile and k in ("dense", "cdg_compiled"):
                nets[k] = torch.compile(nets[k])
            opts[k] = torch.optim.SGD(nets[k].parameters(), lr=0.01, momentum=0.9)
        x1 = torch.randn(a.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        x2 = torch.randn(a.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        # warm-up (and compilation), then interleaved rounds
        med = interleaved_medians({k: partial(step_time, nets[k], x1, x2, opts[k], bf16) for k in nets}, a.rounds,
                                  warmup=2)
        if a.profile:
            from torch.profiler import ProfilerActivity, profile

            for k in ("dense", "cdg"):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    step_time(nets[k], x1, x2, opts[k], bf16)
                print(f"== ResNet-18 x{w}, one {k} step, top operators by self CPU time")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=36))
        if a.compile:
            print(f"  whole-model compile: cdg compiled / dense compiled = {med['cdg_compiled'] / med['dense']:.2f}x "
                  f"(dense column is compiled too)")
        print(f"ResNet-18 x{w}, batch {a.batch}, two views, fwd+bwd+step, {'bf16' if bf16 else 'fp32'}+channels_last, {a.threads} threads: "
              f"dense {med['dense']:.3f}s  cdg {med['cdg']:.3f}s ({med['cdg'] / med['dense']:.2f}x dense)  "
              f"cdg PyTorch gate {med['cdg_torch_gate']:.3f}s ({med['cdg_torch_gate'] / med['dense']:.2f}x dense)  "
              f"cdg {'whole-model compiled' if a.compile else 'compiled gate'} {med['cdg_compiled']:.3f}s ({med['cdg_compiled'] / med['dense']:.2f}x dense)  "
              f"naive CGNet form {med['naive']:.3f}s ({med['naive'] / med['dense']:.2f}x dense)  "
              f"CDG's convolutions alone, no gate {med['convs_only']:.3f}s ({med['convs_only'] / med['dense']:.2f}x dense)",
              flush=True)


if __name__ == "__main__":
    main()
