"""The fused training gate alone, forward + backward, per ResNet-18 stage: PyTorch form vs C++ kernel.

One GatedConv2d gate call on channels-last fp32 tensors of each stage's shape (batch 128, CIFAR
input), medians of interleaved rounds. The convolutions are not timed: this is the cost that
``gating.gate_kernel`` changes. The step-level effect is in ``bench_gated_conv.py``.

Usage: python benchmarks/bench_gate_kernel.py [--widths 0.25 1.0] [--batch 128] [--rounds 15]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from cdg.nn.gate_kernel import instance_gate
from cdg.nn.gated_conv import _FusedInstanceGate

from _common import cifar_stage_shapes, interleaved_medians  # benchmarks/_common.py


def gate_step(y_full: torch.Tensor, y_base: torch.Tensor, tau: torch.Tensor, grad: torch.Tensor, kernel: str) -> float:
    t = time.perf_counter()
    out, _ = _FusedInstanceGate.apply(y_full, y_base, tau, 2.0, "sigmoid", 1, False, kernel)
    out.backward(grad)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=float, nargs="+", default=[0.25, 1.0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    instance_gate(required=True)  # build (or load) before timing
    print(f"gate fwd+bwd per layer call, batch {a.batch}, fp32, channels_last, {a.threads} threads")
    print("width  C     HxW    PyTorch ms  C++ kernel ms  (PyTorch / kernel)")
    for w in a.widths:
        for c, hw in cifar_stage_shapes(w):
            shape = (a.batch, c, hw, hw)

            def cl() -> torch.Tensor:
                return torch.randn(shape).contiguous(memory_format=torch.channels_last)

            y_full, y_base, grad = cl().requires_grad_(), cl().requires_grad_(), cl()
            tau = torch.zeros(c, requires_grad=True)

            def timer(kernel: str) -> float:
                y_full.grad = y_base.grad = tau.grad = None
                return gate_step(y_full, y_base, tau, grad, kernel)

            med = {k: v * 1e3 for k, v in interleaved_medians({k: partial(timer, k) for k in ("torch", "cpp")},
                                                               a.rounds).items()}
            print(f"{w:<6} {c:<5} {hw:>2}x{hw:<3} {med['torch']:>10.1f} {med['cpp']:>14.1f}  "
                  f"({med['torch'] / med['cpp']:.1f}x)", flush=True)


if __name__ == "__main__":
    main()
