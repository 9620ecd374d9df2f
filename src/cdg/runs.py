"""A run directory: ``config.yaml``, ``metrics.json`` (with the protocol of every number),
``checkpoints/last.ckpt``, ``backbone.pt`` and CSV logs."""

from __future__ import annotations

import csv
import functools
import json
import subprocess
from pathlib import Path
from typing import Any

import torch

from cdg.builders import build_backbone
from cdg.config import Config, load_config
from cdg.fileio import RunFileError, atomic_write_text, load_torch_file
from cdg.nn import get_gating_mode


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
    """The config and the pre-trained backbone (``backbone.pt``, else the last checkpoint).

    ``backbone.pt`` may be the self-describing format of :mod:`cdg.export` (its model/gating
    settings must match ``config.yaml``'s, else :class:`RunFileError` names the keys) or a bare
    state dict from before it."""
    from cdg.export import read_backbone_file, settings_mismatch

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a cdg run directory (no config.yaml); run `cdg pretrain --out {run}` first")
    cfg = load_config(run / "config.yaml")
    backbone = build_backbone(cfg)
    weights = run / "backbone.pt"
    if weights.is_file():
        state, meta = read_backbone_file(weights)
        diffs = settings_mismatch(meta, cfg) if meta is not None else []
        if diffs:
            raise RunFileError(f"{weights} was saved for other settings than {run / 'config.yaml'}: {'; '.join(diffs)}")
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


@functools.cache
def code_version() -> str:
    """Which code produced a number: ``cdg <version>``, plus the git commit when the package is
    imported from a git checkout of this repository (``src/cdg``), ``+dirty`` when its ``src/``
    differs from that commit. An installed copy (site-packages) gives the version alone."""
    from cdg import __version__

    version = f"cdg {__version__}"
    src = Path(__file__).resolve().parent.parent
    if not (src.parent / ".git").exists():
        return version
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(src), "diff", "--quiet", "HEAD", "--", str(src)],
                               capture_output=True, timeout=10).returncode == 1
    except (OSError, subprocess.SubprocessError):  # no git program
        return version
    return f"{version} (git {head.stdout.strip()}{'+dirty' if dirty else ''})" if head.returncode == 0 else version


def base_protocol(cfg: Config, **extra: Any) -> dict[str, Any]:
    """The facts every reported number carries: dataset, model, width, gating, method, seed, and
    the code that produced it (:func:`code_version`)."""
    gating = get_gating_mode(cfg.gating.mode).label(cfg.gating)
    return {
        "dataset": cfg.data.dataset, "model": cfg.model.name, "width": cfg.model.width, "method": cfg.method.name,
        "gating": gating, "seed": cfg.trainer.seed, "code": code_version(), **extra,
    }


#: the rows of :func:`run_report`: metrics.json key, label, unit
REPORT_KEYS: tuple[tuple[str, str, str], ...] = (
    ("linear_top1", "linear probe top-1", "%"), ("linear_top1_random_init", "same probe, random-init backbone", "%"),
    ("linear_sgd_top1", "linear probe (SGD) top-1", "%"), ("knn_top1", "kNN top-1", "%"),
    ("finetune_top1", "fine-tune top-1", "%"), ("eta", "eta (test, a1)", "%"),
    ("flops_reduction_eq13", "FLOPs reduction, nominal (Eq. 13 for CDG)", "x"),
    ("flops_reduction_exact", "FLOPs reduction, exact whole network", "x"),
    ("finetune_eta", "eta after fine-tuning (test, a1)", "%"),
    ("finetune_flops_reduction_exact", "FLOPs reduction after fine-tuning, exact", "x"),
    ("pretrain_wall_s", "pre-training wall time", "s"), ("pretrain_images_per_s", "pre-training throughput", "img/s"),
    ("pretrain_images_seen", "pre-training images seen", "images"),
)


def _fmt(value: Any, unit: str) -> str:
    if unit == "%":
        return f"{100 * value:.2f}%"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:,.0f} {unit}" if unit == "images" else f"{value:.1f} {unit}"


def run_report(run_dir: str | Path) -> str:
    """A run's metrics as a Markdown table: the protocol items every row shares once, above the
    table, then each row with only the protocol items where it differs from them."""
    m = read_metrics(run_dir)
    if not m:
        raise FileNotFoundError(f"{run_dir}/metrics.json not found or empty; run pretrain and an evaluation first")
    prot = m.get("protocol", {})
    rows = [(key, label, unit) for key, label, unit in REPORT_KEYS if m.get(key) is not None]
    protos = [prot.get(key, {}) for key, _, _ in rows]
    shared = dict(protos[0]) if protos else {}
    for p in protos[1:]:
        shared = {k: v for k, v in shared.items() if p.get(k) == v}
    lines = [f"# cdg run report: {run_dir}", ""]
    if shared:
        lines += ["Shared by every row: " + "; ".join(f"{k}={v}" for k, v in shared.items()), ""]
    lines += ["| metric | value | protocol (where it differs) |", "|---|---|---|"]
    for (key, label, unit), p in zip(rows, protos):
        own = "; ".join(f"{k}={v}" for k, v in p.items() if k not in shared)
        lines.append(f"| {label} | {_fmt(m[key], unit)} | {own} |")
    return "\n".join(lines) + "\n"
