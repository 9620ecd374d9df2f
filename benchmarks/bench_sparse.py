"""Sparse inference vs dense and masked-dense gated eval: images/s and per-layer times (cdg.sparse).

The measurement of ``cdg speed`` (cdg/sparse/speed.py: one process, interleaved rounds, medians,
fp32, channels-last, branch a1), on a run directory or on a synthetic backbone:

* ``--run DIR``: a trained run (what ``cdg speed --run DIR`` prints);
* otherwise a ResNet-18 with random weights at ``--width``, ``--groups``, ``--group-size``, BatchNorm
  statistics from two training-mode batches of random images, and every tau set to
  ``Phi^-1(--eta)`` (about that fraction of each layer's entries closed; the measured eta is
  printed), saved as a temporary run directory. Random images.

Run with the allocator settings of docs/design.md §7 and one thread, e.g.::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824 \\
    OMP_NUM_THREADS=1 python benchmarks/bench_sparse.py --width 1.0 --groups 4 --group-size 16 --eta 0.6

Usage: python benchmarks/bench_sparse.py [--run DIR | --width W --groups G --group-size C --eta E]
       [--batches 1 64] [--threads 1 2] [--rounds 7] [--no-rss] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from statistics import NormalDist

import torch
from torch import nn

from cdg.builders import build_backbone
from cdg.config import config_from_dict
from cdg.export import save_backbone
from cdg.nn import GatedConv2d
from cdg.sparse.speed import format_report, speed_report


def synthetic_run(folder: Path, width: float, groups: int, group_size: int, eta: float, seed: int = 0) -> Path:
    cfg = config_from_dict({"model": {"name": "resnet18", "width": width, "stem": "cifar"},
                            "gating": {"mode": "dual", "groups": groups, "group_size": group_size}})
    torch.manual_seed(seed)
    bb = build_backbone(cfg)
    tau = NormalDist().inv_cdf(eta)
    with torch.no_grad():
        for m in bb.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
            if isinstance(m, GatedConv2d):
                m.tau.fill_(tau)
        bb.train()
        for _ in range(2):
            bb(torch.randn(16, 3, 32, 32))
    run = folder / f"synthetic_w{width:g}_g{groups}_cg{group_size}_eta{eta:g}"
    cfg.save(run / "config.yaml")
    save_backbone(run / "backbone.pt", cfg, bb.eval())
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=1)
    p.add_argument("--eta", type=float, default=0.58, help="target fraction of closed entries (sets tau)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--random-input", action="store_true", help="with --run: random images instead of the test set")
    p.add_argument("--json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = a.run or str(synthetic_run(Path(tmp), a.width, a.groups, a.group_size, a.eta))
        r = speed_report(run, batches=tuple(a.batches), threads=tuple(a.threads), rounds=a.rounds,
                         random_input=a.random_input or not a.run, rss=not a.no_rss)
    if not a.run:
        r["run"] = f"synthetic (random weights, tau = Phi^-1({a.eta}))"
    print(format_report(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2, default=str))


if __name__ == "__main__":
    main()
