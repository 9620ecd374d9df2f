"""Augmentation throughput: ``python -m cdg.data.bench [--threads 1] [--rounds 5]``.

Views per second of :class:`~cdg.data.BatchAugment` (batch 256) against the per-image
:class:`~cdg.data.TwoViewTransform` (and kornia.augmentation's equivalent pipeline, if installed),
interleaved round by round in one process, as docs/design.md §7 asks (this host's speed drifts, so only
the ratios within one call compare). Inputs are random uint8 32x32 images (content does not change
the cost of these ops).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from cdg.data.transforms import BatchAugment, TwoViewTransform, augment_preset


def _rate(fn: Callable[[], int], min_s: float) -> float:
    n, t0 = 0, time.perf_counter()
    while True:
        n += fn()
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return n / dt


def measure(
    recipe: str = "simclr",
    batch: int = 256,
    threads: int = 1,
    rounds: int = 5,
    min_s: float = 0.5,
    kornia: bool = True,
) -> dict[str, list[float]]:
    """Views/s per round for each implementation (medians are what to report)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure(recipe, batch, rounds, min_s, kornia)
    finally:
        torch.set_num_threads(before)


def _measure(recipe: str, batch: int, rounds: int, min_s: float, kornia: bool) -> dict[str, list[float]]:
    cfg = augment_preset(recipe, "cifar10")
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ba = BatchAugment(cfg)
    tv = TwoViewTransform(cfg)
    runs: dict[str, Callable[[], int]] = {}

    def run_batch() -> int:
        ba(x)
        return batch

    def run_tv() -> int:
        for i in range(16):
            tv(x[i])
        return 32

    runs["BatchAugment"] = run_batch
    runs["TwoViewTransform"] = run_tv
    if kornia:
        try:
            import kornia.augmentation as K
        except ImportError:
            pass
        else:
            ko = torch.nn.Sequential(
                K.RandomResizedCrop((cfg.crop_size, cfg.crop_size), scale=(cfg.min_scale, cfg.max_scale)),
                K.ColorJiggle(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_prob),
                K.RandomGrayscale(p=cfg.gray_prob),
                K.RandomHorizontalFlip(p=cfg.flip_prob),
                K.Normalize(torch.tensor(cfg.mean), torch.tensor(cfg.std)),
            )

            def run_kornia() -> int:
                ko(x.float().div_(255))
                return batch

            runs["kornia"] = run_kornia
    for fn in runs.values():  # warm-up
        fn()
    out: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            out[name].append(_rate(fn, min_s))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="simclr")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-kornia", action="store_true")
    args = ap.parse_args()
    res = measure(args.recipe, args.batch, args.threads, args.rounds, kornia=not args.no_kornia)
    base = statistics.median(res["TwoViewTransform"])
    print(f"recipe={args.recipe} batch={args.batch} threads={args.threads} rounds={args.rounds}")
    for name, rates in res.items():
        med = statistics.median(rates)
        print(
            f"{name:17s} median {med:9.0f} views/s  (min {min(rates):.0f}, max {max(rates):.0f})  "
            f"x{med / base:.1f} vs TwoViewTransform"
        )


if __name__ == "__main__":
    main()
