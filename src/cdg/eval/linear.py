"""Linear evaluation of a frozen backbone (branch a1, gates frozen; docs/design.md §4).

* ``linear_probe_fast``: the CPU protocol: features of the un-augmented images cached once, then
  multinomial logistic regression on standardised features (full-batch L-BFGS, small L2).
* ``linear_probe_sgd``: solo-learn's offline protocol: frozen backbone in eval mode, random crop +
  flip, SGD (momentum 0.9, no weight decay), ``epochs`` (100) with lr steps at 60 and 80.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def standardize(train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    mu, sd = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return tuple((t - mu) / sd for t in (train, *others))


def logistic_regression(train_f: Tensor, train_y: Tensor, num_classes: int, l2: float = 1e-4,
                        max_iter: int = 500, seed: int = 0) -> nn.Linear:
    """Multinomial logistic regression fitted with full-batch L-BFGS (deterministic given seed)."""
    torch.manual_seed(seed)
    clf = nn.Linear(train_f.shape[1], num_classes).double()
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    x, y = train_f.double(), train_y
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + 0.5 * l2 * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def linear_probe_fast(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor,
                      l2: float = 1e-4, max_iter: int = 500) -> float:
    """Top-1 accuracy of logistic regression on standardised frozen features."""
    tr, te = standardize(train_f.double(), test_f.double())
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    clf = logistic_regression(tr, train_y, num_classes, l2, max_iter)
    with torch.no_grad():
        return float((clf(te).argmax(1) == test_y).double().mean())
