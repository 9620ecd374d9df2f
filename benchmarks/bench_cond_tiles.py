"""The sparse conditional path alone (cdg.sparse.kernel.cond, block order) against oneDNN's dense
3x3 convolution of the same shape, for several tile sizes (kernel.BLOCK_TILE_BYTES): random input,
weights and Y_base, a threshold that opens ``--density`` of the gate entries, 1 thread, float32,
channels-last, medians of 5 after a warm-up. Prints dense time / cond time (the cond kernel
computes the (1 - 1/G) off-diagonal MACs of the open entries only: ideal 1 / (density (1 - 1/G))).

    OMP_NUM_THREADS=1 python benchmarks/bench_cond_tiles.py --density 0.42
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cdg.sparse import kernel as K


def median_s(fn, reps: int = 5) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--density", type=float, default=0.42)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--tiles-kib", type=int, nargs="+", default=[24, 128])
    a = p.parse_args()
    torch.set_num_threads(1)
    ext = K.extension(required=True)
    g = a.groups
    print(f"density {a.density}, G = {g}: dense conv time / cond time (ideal {1 / (a.density * (1 - 1 / g)):.2f}x)\n")
    print("| C | H x W | C_g | " + " | ".join(f"tile {t} KiB" for t in a.tiles_kib) + " |")
    print("|---|---|---|" + "---|" * len(a.tiles_kib))
    for n, c, h, cg in [(64, 64, 32, 16), (64, 128, 16, 16), (64, 256, 8, 16), (64, 512, 4, 16), (64, 64, 32, 8)]:
        torch.manual_seed(0)
        x = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, c, 3, 3)
        wz = K.pack_cond(w, g)
        wc, blocks = wz.view(c, 3, 3, c).permute(0, 3, 1, 2), K.pack_cond_blocks(wz)
        yb = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
        thr = torch.quantile(K.salience(yb, cg).flatten(), 1 - a.density).expand(n, c // cg).contiguous()
        sc, bi, wd = torch.ones(c), torch.zeros(c), w.contiguous(memory_format=torch.channels_last)
        td = median_s(lambda: F.conv2d(x, wd, None, 1, 1))
        cells = []
        saved = K.BLOCK_TILE_BYTES
        for kib in a.tiles_kib:
            K.BLOCK_TILE_BYTES = kib * 1024
            tc = median_s(lambda: K.cond(x, yb, thr, wz, wc, sc, bi, None, True, 1, cg, g, ext, blocks=blocks))
            cells.append(f"{td / tc:.2f}x")
        K.BLOCK_TILE_BYTES = saved
        print(f"| {c} | {h} x {h} | {cg} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
