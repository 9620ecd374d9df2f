"""A run directory: ``config.yaml``, ``metrics.json`` (with the protocol of every number),
``checkpoints/last.ckpt``, ``backbone.pt`` and CSV logs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from cdg.builders import build_backbone
from cdg.config import Config, load_config
from cdg.fileio import RunFileError, atomic_write_text, load_torch_file


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
    atomic_write_text(p, json.dumps(m, indent=2, sort_keys=True))
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
        state = load_torch_file(weights, "backbone weights")
    else:
        ckpt = run / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"{run} has neither backbone.pt nor checkpoints/last.ckpt: pre-training has not saved yet")
        sd = load_torch_file(ckpt, "checkpoint", weights_only=False).get("state_dict", {})
        state = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:
        src = weights if weights.is_file() else run / "checkpoints" / "last.ckpt"
        raise RunFileError(f"{src} does not match {run / 'config.yaml'} (other architecture or gating): "
                           f"{str(e).splitlines()[0]}") from None
    return cfg, backbone


def read_log(run_dir: str | Path) -> list[dict[str, str]]:
    """The rows of a run's training log (``logs/metrics.csv``), across resumes.

    Each resume keeps the previous attempt's log as ``logs/metrics.attempt-K.csv`` and records in
    ``logs/attempts.json`` the step it resumed from; rows an attempt logged at or after that step
    were lost work (after its last checkpoint) and are replaced by the next attempt's.
    """
    logs = Path(run_dir) / "logs"
    index = logs / "attempts.json"
    parts = [(logs / a["file"], a["superseded_from_step"]) for a in (json.loads(index.read_text()) if index.is_file() else [])]
    parts.append((logs / "metrics.csv", None))
    rows: list[dict[str, str]] = []
    for path, cut in parts:
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            new = [r for r in csv.DictReader(f) if cut is None or _step(r) < cut]
        rows.extend(new)
    return rows


def _step(row: dict[str, str]) -> int:
    try:
        return int(float(row.get("step") or -1))
    except ValueError:
        return -1


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
