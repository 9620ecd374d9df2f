"""Linear warm-up then cosine learning-rate schedule, stepped per optimizer step.

docs/design.md §6: "All: 10 warm-up epochs then cosine". With W warm-up steps and S total steps:

    lr(t) = start_lr + (base_lr - start_lr) * t / W                                 for t < W
    lr(t) = final_lr + (base_lr - final_lr) * (1 + cos(pi * (t - W) / (S - W))) / 2  for W <= t <= S
    lr(t) = final_lr                                                                for t > S

so lr(0) = start_lr, lr(W) = base_lr, lr((W + S) / 2) = (base_lr + final_lr) / 2, lr(S) = final_lr.
(Lightning Bolts' LinearWarmupCosineAnnealingLR, used by solo-learn, reaches base_lr one step
earlier, at t = W - 1; the difference is one step out of thousands.)

SimSiam's predictor keeps a fixed learning rate (docs/design.md §2; solo-learn ``static_lr``): a
parameter group with ``fixed_lr=True`` gets multiplier 1.0 at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def total_steps(epochs: int, steps_per_epoch: int) -> int:
    """Optimizer steps of a run of ``epochs`` epochs (at least 1): the schedules' horizon."""
    return max(1, int(epochs) * int(steps_per_epoch))


def warmup_cosine(
    step: int,
    warmup_steps: int,
    total_steps: int,
    base_lr: float,
    start_lr: float = 0.0,
    final_lr: float = 0.0,
) -> float:
    """Learning rate at optimizer step ``step`` (0-based); see the module docstring."""
    if total_steps < 1:
        raise ValueError(f"warmup_cosine: total_steps must be >= 1, got {total_steps!r}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_cosine: warmup_steps must be in [0, total_steps={total_steps}], "
            f"got {warmup_steps!r}"
        )
    if step < 0:
        raise ValueError(f"warmup_cosine: step must be >= 0, got {step!r}")
    if step < warmup_steps:
        return start_lr + (base_lr - start_lr) * step / warmup_steps
    if step >= total_steps:
        return final_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_lr + (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0


@dataclass
class WarmupCosineFactor:
    """Picklable multiplier for ``LambdaLR``: ``warmup_cosine(step, ...) / base`` with base 1.

    A dataclass rather than a lambda so that ``LambdaLR.state_dict()`` stores its fields.
    """

    warmup_steps: int
    total_steps: int
    start_factor: float = 0.0
    final_factor: float = 0.0

    def __call__(self, step: int) -> float:
        return warmup_cosine(
            step,
            self.warmup_steps,
            self.total_steps,
            base_lr=1.0,
            start_lr=self.start_factor,
            final_lr=self.final_factor,
        )


@dataclass
class ConstantFactor:
    """Multiplier 1.0 at every step (groups with ``fixed_lr=True``)."""

    def __call__(self, step: int) -> float:
        return 1.0


def build_warmup_cosine_scheduler(
    optimizer: Optimizer,
    warmup_steps: int,
    total_steps: int,
    start_factor: float = 0.0,
    final_factor: float = 0.0,
) -> LambdaLR:
    """``LambdaLR`` applying ``warmup_cosine`` to every group's initial lr, per optimizer step.

    Each group's lr at step t is ``initial_lr * warmup_cosine(t, W, S, 1, start_factor,
    final_factor)``: ``start_factor`` and ``final_factor`` are fractions of the group's base lr.
    Groups with ``fixed_lr=True`` keep their initial lr. Call ``scheduler.step()`` after every
    ``optimizer.step()`` (Lightning: ``{"scheduler": s, "interval": "step"}``). Constructing the
    scheduler sets the lrs for step 0 immediately.
    """
    factor = WarmupCosineFactor(warmup_steps, total_steps, start_factor, final_factor)
    factor(0)  # validate the arguments now, not at the first step
    lambdas = [
        ConstantFactor() if group.get("fixed_lr", False) else factor
        for group in optimizer.param_groups
    ]
    return LambdaLR(optimizer, lr_lambda=lambdas)  # type: ignore[arg-type]
