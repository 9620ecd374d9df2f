"""The ResNet shortcut's 1x1 stride-2 convolution on the CPU, channels-last fp32 (README "Failure behaviour").

* default: time of forward + backward of the plain strided convolution against the subsampled
  stride-1 form that :class:`cdg.models.resnet.StridedConv1x1` uses below 16 input channels, at the
  CIFAR recipe's shortcut shapes (batch 256, 1 thread, interleaved rounds).
* ``--probe``: does the plain strided convolution's backward survive (each case in its own process,
  since the oneDNN fault is a segfault or a hang)? Prints ok / the exit status / hung per (channels, size).

    python benchmarks/bench_shortcut.py [--probe]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from _common import interleaved_medians

CASE = """
import torch, torch.nn.functional as F
c, h = {c}, {h}
x = torch.randn(16, c, h, h).contiguous(memory_format=torch.channels_last).requires_grad_()
w = torch.randn(2 * c, c, 1, 1).contiguous(memory_format=torch.channels_last).requires_grad_()
F.conv2d(x, w, stride=2).sum().backward()
"""


def probe() -> None:
    for c in (4, 8, 12, 16, 24, 40):
        for h in (32, 56, 112):
            try:
                r = subprocess.run([sys.executable, "-c", CASE.format(c=c, h=h)], capture_output=True, timeout=60)
                outcome = "ok" if r.returncode == 0 else f"exit {r.returncode}"
            except subprocess.TimeoutExpired:
                outcome = "hung (killed after 60 s)"
            print(f"plain 1x1 stride-2 conv, backward, {c} channels, {h}x{h}, batch 16: {outcome}", flush=True)


def timing() -> None:
    torch.set_num_threads(1)
    for n, c, h in [(256, 12, 32), (256, 16, 32), (256, 32, 16), (256, 64, 8)]:
        w = torch.randn(2 * c, c, 1, 1).contiguous(memory_format=torch.channels_last).requires_grad_()
        x = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last).requires_grad_()
        g = torch.randn(n, 2 * c, h // 2, h // 2).contiguous(memory_format=torch.channels_last)

        def timer(subsample: bool) -> float:
            t = time.perf_counter()
            for _ in range(10):
                w.grad = x.grad = None
                y = F.conv2d(x[:, :, ::2, ::2], w) if subsample else F.conv2d(x, w, stride=2)
                y.backward(g)
            return (time.perf_counter() - t) / 10

        m = interleaved_medians({"plain": lambda: timer(False), "subsampled": lambda: timer(True)}, rounds=11)
        print(f"({n},{c},{h},{h}) -> {2 * c}: plain strided {1e3 * m['plain']:.2f} ms, subsampled + stride 1 "
              f"{1e3 * m['subsampled']:.2f} ms, ratio {m['subsampled'] / m['plain']:.2f}  "
              f"[fwd+bwd, fp32 channels-last, 1 thread, medians of 11 interleaved rounds; {torch.backends.cpu.get_cpu_capability()}]")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", action="store_true")
    probe() if ap.parse_args().probe else timing()
