"""LARS (You et al. 2017, "Large batch training of convolutional networks"), solo-learn flavour.

docs/design.md §6: "SimCLR: LARS (eta 0.02, biases and norms excluded)"; docs/design.md §3: "tau gets its own
optimizer parameter group: no weight decay, no LARS trust-ratio scaling."

This follows solo-learn's ``solo/utils/lars.py`` (itself from Lightning Bolts). For each parameter
tensor p with gradient g in a group with learning rate lr, weight decay beta, momentum mu:

    local_lr = eta * ||p|| / (||g|| + beta * ||p|| + eps)          (You et al., Eq. 6)
    if clip_lr:  local_lr = min(local_lr / lr, 1)                  (effective step <= lr)
    d        = local_lr * (g + beta * p)                           (weight decay before momentum)
    v        = mu * v + d          (v initialised to d on the first step, as torch SGD)
    p        = p - lr * v

Clipping semantics (solo-learn ``clip_lars_lr``): the effective per-tensor learning rate
lr * local_lr becomes min(eta * ||p|| / (||g|| + beta ||p||), lr), i.e. the adaptive rate never
exceeds the global (scheduled) rate. Without clipping it is lr * eta * ||p|| / (...).

Exclusions (no trust-ratio scaling):
  * a group with ``lars_exclude=True``: plain SGD with momentum, d = g + beta * p with the
    group's own weight decay (use 0 for biases, norms and gating thresholds tau; see
    ``split_params_for_lars``);
  * with ``exclude_bias_n_norm=True``, any 1-D tensor in a non-excluded group: exactly
    solo-learn's behaviour, d = g (neither scaling nor weight decay);
  * as in solo-learn, a tensor with ||p|| = 0 or ||g|| = 0 gets d = g (no scaling, no decay).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (see the module docstring).

    Args:
        params: parameters or parameter-group dicts. Groups may set ``lars_exclude`` (bool),
            ``weight_decay``, ``lr`` and any other default; unknown keys (e.g. ``fixed_lr``) are kept.
        lr: global learning rate.
        momentum: momentum factor mu.
        weight_decay: L2 coefficient beta, added to the gradient before the trust ratio's scaling.
        eta: trust coefficient (docs/design.md: 0.02).
        clip_lr: clip the trust ratio at 1 relative to lr (solo-learn ``clip_lars_lr``).
        exclude_bias_n_norm: skip scaling and weight decay for 1-D tensors (solo-learn
            ``exclude_bias_n_norm_lars``).
        eps: added to the trust-ratio denominator.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.02,
        clip_lr: bool = True,
        exclude_bias_n_norm: bool = True,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"LARS: invalid learning rate lr={lr!r}, expected >= 0")
        if momentum < 0.0:
            raise ValueError(f"LARS: invalid momentum={momentum!r}, expected >= 0")
        if weight_decay < 0.0:
            raise ValueError(f"LARS: invalid weight_decay={weight_decay!r}, expected >= 0")
        if eta <= 0.0:
            raise ValueError(f"LARS: invalid eta={eta!r}, expected > 0")
        defaults: dict[str, Any] = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            clip_lr=clip_lr,
            exclude_bias_n_norm=exclude_bias_n_norm,
            eps=eps,
            lars_exclude=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """Perform one optimisation step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr: float = group["lr"]
            wd: float = group["weight_decay"]
            momentum: float = group["momentum"]
            eta: float = group["eta"]
            eps: float = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise ValueError("LARS: sparse gradients are not supported")
                if group["lars_exclude"]:
                    d_p = g.add(p, alpha=wd) if wd != 0.0 else g.clone()
                elif p.ndim == 1 and group["exclude_bias_n_norm"]:
                    d_p = g.clone()
                else:
                    p_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    local_lr = eta * p_norm / (g_norm + wd * p_norm + eps)
                    if group["clip_lr"]:
                        # lr == 0 (e.g. the first warm-up step): the step is zero anyway.
                        local_lr = (
                            torch.clamp(local_lr / lr, max=1.0)
                            if lr > 0.0
                            else torch.ones_like(local_lr)
                        )
                    # Branch-free (no host sync): solo-learn skips scaling and decay when
                    # either norm is zero.
                    scale = (p_norm != 0) & (g_norm != 0)
                    d_p = torch.where(scale, g.add(p, alpha=wd).mul_(local_lr), g)

                if momentum != 0.0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d_p.detach().clone()
                    else:
                        buf.mul_(momentum).add_(d_p)
                    d_p = buf
                p.add_(d_p, alpha=-lr)
        return loss


def split_params_for_lars(
    module: nn.Module,
    extra_exclude: Callable[[str, nn.Parameter], bool] | None = None,
    skip: Callable[[str], bool] | None = None,
) -> list[dict[str, Any]]:
    """Split ``module``'s trainable parameters into a LARS-scaled and an excluded group.

    Returns ``[{"params": [...]}, {"params": [...], "weight_decay": 0.0, "lars_exclude": True}]``
    (empty groups are omitted). The excluded group holds every parameter with ``ndim <= 1``
    (biases, BN/LN weights, per-channel thresholds) and every parameter for which
    ``extra_exclude(name, param)`` is True, e.g. ``lambda n, p: n.endswith("tau")`` for the
    gating thresholds (docs/design.md §3: no weight decay, no trust-ratio scaling). The first group
    inherits the optimizer's defaults (weight decay, LARS scaling). Parameters with
    ``requires_grad=False``, and those whose name ``skip(name)`` accepts (a caller puts them in
    groups of its own), are left out.
    """
    scaled: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    for name, param in module.named_parameters():
        if not param.requires_grad or (skip is not None and skip(name)):
            continue
        if param.ndim <= 1 or (extra_exclude is not None and extra_exclude(name, param)):
            excluded.append(param)
        else:
            scaled.append(param)
    groups: list[dict[str, Any]] = []
    if scaled:
        groups.append({"params": scaled})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars_exclude": True})
    return groups
