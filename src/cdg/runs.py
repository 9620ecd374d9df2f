"""A run directory: ``config.yaml``, ``metrics.json`` (with the protocol of every number),
``checkpoints/last.ckpt``, ``backbone.pt`` and CSV logs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cdg.builders import build_backbone
from cdg.config import Config, load_config


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    p = Path(run_dir) / "metrics.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def update_metrics(run_dir: str | Path, values: dict[str, Any], protocol: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge ``values`` into ``metrics.json``; ``protocol`` is stored for each key under ``protocol``."""
    p = Path(run_dir) / "metrics.json"
    m = read_metrics(run_dir)
    m.update(values)
    if protocol is not None:
        prot = m.setdefault("protocol", {})
        for k in values:
            prot[k] = protocol
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(m, indent=2, sort_keys=True))
    os.replace(tmp, p)
    return m


def load_run(run_dir: str | Path) -> tuple[Config, torch.nn.Module]:
    """The config and the pre-trained backbone (``backbone.pt``, else the last checkpoint)."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a cdg run directory (no config.yaml); run `cdg pretrain --out {run}` first")
    cfg = load_config(run / "config.yaml")
    backbone = build_backbone(cfg)
    weights = run / "backbone.pt"
    if weights.is_file():
        state = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        ckpt = run / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"{run} has neither backbone.pt nor checkpoints/last.ckpt: pre-training has not saved yet")
        sd = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        state = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    backbone.load_state_dict(state)
    return cfg, backbone


def base_protocol(cfg: Config, **extra: Any) -> dict[str, Any]:
    """The facts every reported number carries: dataset, model, width, gating, method, seed."""
    g = cfg.gating
    if g.mode == "dense":
        gating = "dense"
    elif g.mode == "fbs":
        gating = f"fbs keep={g.keep_ratio if g.keep_ratio is not None else 0.5}"
    elif g.mode == "dgc":
        gating = f"dgc heads={g.groups} keep={g.keep_ratio if g.keep_ratio is not None else 0.45}"
    else:
        s = g.target if g.target_sparsity is None else f"Phi^-1({g.target_sparsity})"
        gating = f"{g.mode} G={g.groups} C_g={g.group_size} overlap={g.overlap}% s={s}"
    return {
        "dataset": cfg.data.dataset, "model": cfg.model.name, "width": cfg.model.width, "method": cfg.method.name,
        "gating": gating, "seed": cfg.trainer.seed, **extra,
    }
