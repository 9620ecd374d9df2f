"""Where the gate thresholds tau of CPU rows went, and how hard the task loss pulls on them.

The check behind docs/results.md's reading of the MoCo V2+ gap. Two parts:

* ``--runs DIR ...``: the trained tau of every gated layer (mean over its channels) and the layer's
  test-set eta from ``metrics.json``; with a per-sample instance norm, eta of a layer is about Phi(tau).
* ``--rows ROW ...``: at initialisation (seed 0), on one batch of 256 augmented CIFAR-10 training
  images, the mean |d L_ssl / d tau| per gated layer of each row of ``scripts/cpu_results.py`` beside
  the Eq. 11 term's pull at tau = 0 (2 lambda s), and the norm of the task gradient on the conv weights.

    python scripts/gate_thresholds.py --runs results/cpu/simclr_cdg_g4 results/cpu/mocov2_cdg_g4
    CDG_DATA=/path/to/data python scripts/gate_thresholds.py --rows simclr_cdg_g4 mocov2_cdg_g4
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

from cdg.config import load_config
from cdg.data import build_dataset
from cdg.methods import build_method
from cdg.nn import threshold_layers
from cdg.runs import load_run, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def trained_thresholds(run: str) -> None:
    _, backbone = load_run(run)
    per_layer = read_metrics(run).get("eta_per_layer", {})
    taus = {name: float(layer.tau.detach().float().mean()) for name, layer in threshold_layers(backbone)}
    print(f"{run}: tau {min(taus.values()):.3f} to {max(taus.values()):.3f} over {len(taus)} gated layers")
    for name, tau in taus.items():
        eta = per_layer.get(name)
        print(f"  {name:18s} tau {tau:+.3f}  Phi(tau) {100 * float(torch.special.ndtr(torch.tensor(tau))):5.1f}%"
              + (f"  eta (test) {100 * eta:5.1f}%" if eta is not None else ""))


def initial_pull(rows: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("cpu_results", ROOT / "scripts" / "cpu_results.py")
    cr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cr)  # type: ignore[union-attr]
    batches: dict[tuple[str, str], torch.Tensor] = {}  # one load per dataset, shared by the rows
    for row in rows:
        cfg = load_config(str(ROOT / cr.BASE), cr.RECIPE + cr.ROWS[row][2])
        key = (cfg.data.dataset, str(cfg.data.root))
        if key not in batches:
            batches[key] = build_dataset(cfg.data.dataset, cfg.data.root, "train").images[:256]
        images = batches[key]
        torch.manual_seed(0)
        method = build_method(cfg, steps_per_epoch=195)
        torch.manual_seed(1)
        v1, v2 = method.augment.two_views(images)
        for _ in range(2):  # MoCo: the second call scores against a queue that holds the first batch's keys
            method.zero_grad(set_to_none=True)
            loss = method.ssl_loss(v1, v2)
            loss.backward()
        pull = sorted(float(layer.tau.grad.abs().mean()) for _, layer in threshold_layers(method.backbone))
        weights = [p.grad.float() for p in method.backbone.parameters() if p.grad is not None and p.ndim == 4]
        norm = float(torch.sqrt(sum((g**2).sum() for g in weights)))
        print(f"{row}: L_ssl {loss.item():.3f}; mean |dL_ssl/dtau| per layer {pull[0]:.2e} to {pull[-1]:.2e} "
              f"(median {pull[len(pull) // 2]:.2e}); Eq. 11 pull at tau = 0: {2 * cfg.gating.lam * cfg.gating.target:.1e}; "
              f"conv-weight gradient norm {norm:.3f}  [init, seed 0, one batch of 256, {cfg.optim.name}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="*", default=[], help="run directories with a trained backbone")
    ap.add_argument("--rows", nargs="*", default=[], help="rows of scripts/cpu_results.py, measured at init")
    a = ap.parse_args()
    if not a.runs and not a.rows:
        ap.error("give --runs and/or --rows")
    for run in a.runs:
        trained_thresholds(run)
    if a.rows:
        initial_pull(a.rows)


if __name__ == "__main__":
    main()
