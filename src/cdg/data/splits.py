"""Reproducible label-stratified subsets (e.g. the 1% / 10% label fractions of semi-supervised
evaluation, or a smaller training set for the CPU recipes of docs/design.md §7).

The indices depend only on the targets, the fraction and the seed: numpy's ``Generator(PCG64(seed))``
gives the same stream on every machine and numpy version that keeps PCG64, and classes are visited
in sorted label order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["stratified_subset", "save_split", "load_split"]


def _as_numpy_targets(targets: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    arr = np.asarray(targets)
    if arr.ndim != 1:
        raise ValueError(f"targets: expected a 1-D sequence of labels, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"targets: expected integer labels, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def stratified_subset(
    targets: Sequence[int] | np.ndarray | torch.Tensor, fraction: float, seed: int
) -> np.ndarray:
    """Sorted int64 indices of ``round(fraction * n_c)`` (at least 1) random samples per class c.

    ``round`` is Python's (half to even: 0.5 -> 0, then raised to 1; 2.5 -> 2).

    ``fraction`` must lie in (0, 1]; 1 returns every index. Same inputs, same indices, everywhere.
    """
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0 or not np.isfinite(fraction):
        raise ValueError(f"stratified_subset: fraction={fraction}: expected 0 < fraction <= 1")
    y = _as_numpy_targets(targets)
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    chosen = []
    for label in np.unique(y):  # sorted
        members = np.flatnonzero(y == label)
        k = max(1, int(round(fraction * members.size)))
        chosen.append(rng.choice(members, size=k, replace=False))
    if not chosen:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def save_split(path: str | os.PathLike[str], indices: Sequence[int] | np.ndarray, **meta: Any) -> None:
    """Write ``{"indices": [...], "meta": {...}}`` as JSON (meta values must be JSON-serialisable)."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(f"save_split({path}): expected 1-D integer indices, got {idx.dtype} {idx.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        text = json.dumps({"indices": [int(i) for i in idx], "meta": meta})
    except TypeError as err:
        raise ValueError(f"save_split({path}): meta is not JSON-serialisable: {err}") from err
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_split(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a split written by :func:`save_split`: ``(int64 indices, meta dict)``."""
    from cdg.data.datasets import DataError

    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read split file {path}: {err}") from err
    if not isinstance(obj, dict) or not isinstance(obj.get("indices"), list):
        raise DataError(f"{path}: expected a JSON object with an 'indices' list")
    return np.asarray(obj["indices"], dtype=np.int64), dict(obj.get("meta") or {})
