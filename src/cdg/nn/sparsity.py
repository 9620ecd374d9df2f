"""The sparsity objective (Eq. 11) and the gate statistics of a gated model (docs/design.md §3-4).

Statistics accumulate on the device inside each layer (``gate_counts``) and are read here, once,
when asked: nothing in the training step synchronises with the host.
"""

from __future__ import annotations

from statistics import NormalDist

import torch
from torch import Tensor, nn

from cdg.nn.gated import GatedLayer


def gated_layers(model: nn.Module) -> list[tuple[str, GatedLayer]]:
    """The gated convolutions of ``model`` (:class:`GatedLayer` that skip computation), in module
    order, with their names: CDG/CGNet layers with G > 1 and the FBS / DGC baselines
    (docs/design.md §5). Only CDG/CGNet layers have thresholds ``tau`` (:func:`threshold_layers`).
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GatedLayer) and m.is_gated]


def threshold_from_sparsity(p: float) -> float:
    """s = Phi^-1(p): the threshold target giving sparsity p for standard-normal salience (docs/design.md §3)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"target sparsity must be in (0, 1), got {p}")
    return NormalDist().inv_cdf(p)


def sparsity_objective(model: nn.Module, target: float, lam: float = 1e-4) -> Tensor:
    """Eq. 11 regulariser: lambda * sum over gated layers and channels of (tau - s)^2.

    In the structured variant one tau serves C_g channels and is counted C_g times, so the
    regulariser per channel does not depend on the group size.
    """
    terms = [((m.tau - target) ** 2).sum() * m.group_size for _, m in threshold_layers(model)]
    if not terms:
        return torch.zeros(())
    return lam * torch.stack(terms).sum()


def reset_gate_stats(model: nn.Module) -> None:
    for _, m in gated_layers(model):
        m.reset_stats()


def gate_statistics(model: nn.Module, phase: str = "eval") -> dict[str, object]:
    """Conditional-path sparsity eta from the counts accumulated since the last reset.

    Returns ``eta`` (element-weighted over all gated layers, per branch: ``eta_a1``, ``eta_a2``),
    ``eta_flop_weighted`` (each skipped output element weighted by its MACs, 9 * C_in) and
    ``eta_per_layer`` (branch a1; Fig. 8c). ``phase`` is ``train`` or ``eval``.
    For the structured variant eta equals the fraction of closed C_g groups.
    """
    p = {"train": 0, "eval": 1}[phase]
    layers = gated_layers(model)
    if not layers:
        return {}
    counts = torch.stack([m.gate_counts[p] for _, m in layers]).cpu()  # L x branch x (closed, total)
    weights = torch.tensor([9.0 * m.in_channels for _, m in layers], dtype=torch.float64)
    out: dict[str, object] = {}
    for b, tag in ((0, "a1"), (1, "a2")):
        closed, total = counts[:, b, 0], counts[:, b, 1]
        if total.sum() > 0:
            out[f"eta_{tag}"] = float(closed.sum() / total.sum())
            out[f"eta_flop_weighted_{tag}"] = float((closed * weights).sum() / (total * weights).sum())
    if "eta_a1" in out:
        out["eta"], out["eta_flop_weighted"] = out["eta_a1"], out["eta_flop_weighted_a1"]
        out["eta_per_layer"] = {
            n: float(c[0, 0] / c[0, 1]) if c[0, 1] > 0 else None for (n, _), c in zip(layers, counts)
        }
    return out


@torch.no_grad()
def mask_similarity(model: nn.Module, x1: Tensor, x2: Tensor) -> float:
    """Fig. 4's S_c: cosine similarity of the branches' binary H x W masks of the same channel.

    Runs view ``x1`` on branch a1 and ``x2`` on branch a2 and averages over layers, channels and
    images; a pair where either mask is all zeros counts as 0.
    """
    layers = gated_layers(model)
    if not layers:
        raise ValueError("mask_similarity needs a model with gated convolutions (G > 1)")
    before = [(m.keep_masks, m.track_stats) for _, m in layers]
    for _, m in layers:
        m.keep_masks, m.track_stats = True, False
    try:
        model(x1, branch=0)
        model(x2, branch=1)
        sims = []
        for _, m in layers:
            a = m.last_masks[0].flatten(2).float()
            b = m.last_masks[1].flatten(2).float()
            num = (a * b).sum(-1)
            den = a.norm(dim=-1) * b.norm(dim=-1)
            sims.append(torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num)).mean())
        return float(torch.stack(sims).mean())
    finally:  # as before; the mask dicts are cleared in place (another layer may read one: mask_source)
        for (_, m), (keep, track) in zip(layers, before):
            m.keep_masks, m.track_stats = keep, track
            m.last_masks.clear()


def threshold_layers(model: nn.Module) -> list[tuple[str, GatedLayer]]:
    """The gated convolutions with a learned threshold ``tau`` (GatedConv2d, G > 1): Eq. 11 applies."""
    return [(n, m) for n, m in gated_layers(model) if m.has_threshold]


def pop_aux_losses(model: nn.Module) -> Tensor:
    """Sum of the salience-predictor losses of FBS / DGC layers since the last call; clears them.

    FBS: l1 * sum |g|; DGC: loss_coef * mean saliency (docs/design.md §5), for every branch called in
    training mode with gradients enabled. A 0-d zero when ``model`` has none.
    """
    terms = [m.pop_aux_loss() for m in model.modules() if isinstance(m, GatedLayer)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def set_pruning_progress(model: nn.Module, progress: float) -> None:
    """Tell every layer with a pruning schedule (DGC) the fraction of training done (0..1)."""
    for m in model.modules():
        if isinstance(m, GatedLayer):
            m.set_progress(progress)
