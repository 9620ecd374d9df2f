"""Would whole-vector blocks help a run's masks? Per gated layer of a trained run: the fraction of
open (position, channel) entries and of (position, 8-channel chunk) entries with at least one open
channel, on the first 64 test images (branch a1, eval). Where the second is close to 1 while the
first is not (C_g = 1), computing whole 8-channel vectors (the sparse kernel's block order) would do
(any-of-8) / (open) times the needed conditional-path work.

    python benchmarks/bench_mask_structure.py results/cpu/simclr_cdg_g4
"""

from __future__ import annotations

import sys

import torch

from cdg.runs import load_run
from cdg.sparse import export_inference
from cdg.sparse.speed import load_images


def main() -> None:
    run = sys.argv[1]
    cfg, backbone = load_run(run)
    sparse = export_inference(backbone.eval()).set_flags(keep_mask=True)
    x, what = load_images(cfg, 64)
    with torch.no_grad():
        sparse(x)
    print(f"{run}: {what}, branch a1, eval\n")
    print("| layer | C | open | any of 8 open | block work / open work |\n|---|---|---|---|---|")
    for name, m in sparse.gated():
        mk = m.last_mask  # N x C/C_g x H x W
        n, c, h, w = mk.shape
        if c % 8:
            continue
        open_ = mk.float().mean().item()
        any8 = mk.view(n, c // 8, 8, h, w).amax(2).float().mean().item()
        print(f"| {name} | {c} | {open_:.2f} | {any8:.2f} | {any8 / open_:.2f}x |")


if __name__ == "__main__":
    main()
