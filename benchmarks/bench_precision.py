"""fp32 against bf16 autocast, contiguous against channels_last, on this CPU.

ResNet-18 (CIFAR stem), one view, forward + backward, repeated. Decides whether ``precision: auto``
is right here: bf16 pays only where the CPU computes it natively (AVX512-BF16 / AMX).

Usage: python benchmarks/bench_precision.py [--width 0.25] [--batch 128] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from cdg.config import native_bf16
from cdg.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16()}")
    for channels_last in (False, True):
        for bf16 in (False, True):
            net = create_model("resnet18", width=a.width, stem="cifar")
            x = torch.randn(a.batch, 3, 32, 32)
            if channels_last:
                net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = net(x).float().sum()
                loss.backward()
                times.append(time.perf_counter() - t)
            print(f"ResNet-18 x{a.width}, batch {a.batch}, fwd+bwd, {'channels_last' if channels_last else 'contiguous'}, "
                  f"{'bf16 autocast' if bf16 else 'fp32'}: " + ", ".join(f"{t:.3f}s" for t in times), flush=True)


if __name__ == "__main__":
    main()
