"""Are a run's eval-mode features usable? Non-finite counts, the spread of per-image feature scale,
and (``--trace``) the largest activation at every gated layer for one overflowing and one ordinary
image: the check behind docs/results.md's FBS/DGC findings.

    python scripts/feature_health.py --run results/gpu/simclr_fbs_v1 [--split test] [--trace]
"""

from __future__ import annotations

import argparse

import torch

from cdg.data import build_dataset, dataset_info, normalize_batch
from cdg.eval.features import extract_features, nonfinite_rows
from cdg.nn import gated_layers
from cdg.runs import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--split", default="test", choices=["train", "test"])
    ap.add_argument("--trace", action="store_true")
    a = ap.parse_args()
    cfg, bb = load_run(a.run)
    ds = build_dataset(cfg.data.dataset, cfg.data.root, a.split)
    feats, _, _ = extract_features(bb, ds, cfg.data.dataset, cfg.data.eval_batch_size, bf16=False,
                                   channels_last=False, finite=False)
    bad = nonfinite_rows(feats)
    scale = feats[~bad].abs().amax(1)
    q = torch.quantile(scale, torch.tensor([0.5, 0.99, 0.999])).tolist()
    print(f"{a.run} ({a.split}, eval mode, fp32): non-finite features for {int(bad.sum())} of {len(feats)} images; "
          f"per-image max |feature| median {q[0]:.3g}, 99th percentile {q[1]:.3g}, 99.9th {q[2]:.3g}, max {scale.max():.3g}")
    if a.trace and bad.any():
        pick = torch.stack([bad.nonzero()[0, 0], (~bad).nonzero()[0, 0]])
        info = dataset_info(cfg.data.dataset)
        rows: list[tuple[str, list[float], list[float]]] = []
        for name, m in gated_layers(bb):
            m.register_forward_hook(lambda m, i, o, n=name: rows.append(
                (n, i[0].abs().amax((1, 2, 3)).tolist(), o.abs().amax((1, 2, 3)).tolist())))
        with torch.no_grad():
            bb(normalize_batch(ds.images[pick], info.mean, info.std), 0)
        print(f"largest |activation| per gated layer, image {int(pick[0])} (overflows) / image {int(pick[1])} (ordinary):")
        for n, i, o in rows:
            print(f"  {n:18s} in {i[0]:9.3g} / {i[1]:6.3g}   out {o[0]:9.3g} / {o[1]:6.3g}")


if __name__ == "__main__":
    main()
