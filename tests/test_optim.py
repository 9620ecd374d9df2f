"""LARS against hand computations; parameter splitting; warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cdg.optim import LARS, build_warmup_cosine_scheduler, split_params_for_lars, warmup_cosine

W0 = [[3.0, 0.0], [0.0, 4.0]]  # ||w|| = 5
G0 = [[0.3, 0.0], [0.4, 0.0]]  # ||g|| = 0.5


def _norm(x: list[list[float]]) -> float:
    return math.sqrt(sum(v * v for row in x for v in row))


def _lars_reference(
    w: list[list[float]],
    grads: list[list[list[float]]],
    lr: float,
    momentum: float,
    weight_decay: float,
    eta: float,
    clip: bool,
    eps: float = 1e-8,
) -> list[list[float]]:
    """Element-wise loop version of the update in cdg.optim.lars's docstring."""
    wd = weight_decay
    w = [row[:] for row in w]
    buf: list[list[float]] | None = None
    for g in grads:
        local = eta * _norm(w) / (_norm(g) + wd * _norm(w) + eps)
        if clip:
            local = min(local / lr, 1.0)
        d = [[local * (g[i][j] + wd * w[i][j]) for j in range(2)] for i in range(2)]
        if buf is None:
            buf = d
        else:
            buf = [[momentum * buf[i][j] + d[i][j] for j in range(2)] for i in range(2)]
        w = [[w[i][j] - lr * buf[i][j] for j in range(2)] for i in range(2)]
    return w


def _run_lars(grads: list[list[list[float]]], **kw: float | bool) -> torch.Tensor:
    p = nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    opt = LARS([p], **kw)  # type: ignore[arg-type]
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach()


def test_lars_single_step_trust_ratio_by_hand() -> None:
    # local = 0.02 * 5 / (0.5 + 0.1 * 5) = 0.1; clip: min(0.1 / 1.0, 1) = 0.1
    # w1 = w0 - lr * local * (g + wd * w0) = w0 - 0.1 * (g + 0.1 w0)
    out = _run_lars([G0], lr=1.0, momentum=0.9, weight_decay=0.1, eta=0.02, clip_lr=True)
    expected = torch.tensor(
        [[3.0 - 0.1 * (0.3 + 0.3), 0.0], [0.0 - 0.1 * 0.4, 4.0 - 0.1 * 0.4]], dtype=torch.float64
    )
    assert torch.allclose(out, expected, atol=1e-9)


def test_lars_clip_caps_the_adaptive_rate_at_lr() -> None:
    # local = 0.02 * 5 / (0.5 + 0) = 0.2 > lr = 0.05  ->  clipped to ratio 1: plain SGD step
    out = _run_lars([G0], lr=0.05, momentum=0.9, weight_decay=0.0, eta=0.02, clip_lr=True)
    expected = torch.tensor(W0, dtype=torch.float64) - 0.05 * torch.tensor(G0, dtype=torch.float64)
    assert torch.allclose(out, expected, atol=1e-12)
    # without clipping the step is lr * local = 0.05 * 0.2
    out = _run_lars([G0], lr=0.05, momentum=0.9, weight_decay=0.0, eta=0.02, clip_lr=False)
    expected = torch.tensor(W0, dtype=torch.float64) - 0.01 * torch.tensor(G0, dtype=torch.float64)
    assert torch.allclose(out, expected, atol=1e-12)


@pytest.mark.parametrize("clip", [True, False])
def test_lars_three_steps_with_momentum_match_loop_reference(clip: bool) -> None:
    grads = [G0, [[-0.2, 0.1], [0.05, 0.3]], [[0.01, -0.02], [0.5, -0.4]]]
    kw = dict(lr=0.3, momentum=0.9, weight_decay=1e-2, eta=0.02)
    out = _run_lars(grads, clip_lr=clip, **kw)  # type: ignore[arg-type]
    ref = _lars_reference(W0, grads, clip=clip, **kw)  # type: ignore[arg-type]
    assert torch.allclose(out, torch.tensor(ref, dtype=torch.float64), atol=1e-12)


def test_lars_excluded_group_is_plain_sgd_with_momentum() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(3, 2, dtype=torch.float64) for _ in range(3)]
    w0 = torch.randn(3, 2, dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    q = nn.Parameter(w0.clone())
    lars = LARS([{"params": [p], "lars_exclude": True, "weight_decay": 0.05}], lr=0.1, eta=0.02)
    sgd = torch.optim.SGD([q], lr=0.1, momentum=0.9, weight_decay=0.05)
    for g in grads:
        p.grad, q.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    assert torch.allclose(p, q, atol=1e-14)
    # by hand, first two steps with weight decay 0: v1 = g0, v2 = 0.9 g0 + g1
    r = nn.Parameter(w0.clone())
    opt = LARS([{"params": [r], "lars_exclude": True, "weight_decay": 0.0}], lr=0.1)
    for g in grads[:2]:
        r.grad = g.clone()
        opt.step()
    expected = w0 - 0.1 * grads[0] - 0.1 * (0.9 * grads[0] + grads[1])
    assert torch.allclose(r, expected, atol=1e-14)


def test_lars_bias_auto_excluded_and_zero_norm() -> None:
    bias = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    zero = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = LARS([bias, zero], lr=0.5, weight_decay=0.1, eta=0.02)
    bias.grad = torch.tensor([0.2, -0.4], dtype=torch.float64)
    zero.grad = torch.ones(2, 2, dtype=torch.float64)
    opt.step()
    # solo-learn: 1-D tensors neither scaled nor decayed; ||p|| = 0: plain gradient step
    assert torch.allclose(bias, torch.tensor([0.9, 2.2], dtype=torch.float64))
    assert torch.allclose(zero, torch.full((2, 2), -0.5, dtype=torch.float64))


def test_lars_zero_lr_gives_no_step_and_no_nan() -> None:
    p = nn.Parameter(torch.tensor(W0))
    opt = LARS([p], lr=0.0, weight_decay=1e-5)
    p.grad = torch.tensor(G0)
    opt.step()
    assert torch.equal(p.detach(), torch.tensor(W0))


def test_lars_rejects_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match="lr"):
        LARS([nn.Parameter(torch.zeros(1))], lr=-1.0)
    with pytest.raises(ValueError, match="eta"):
        LARS([nn.Parameter(torch.zeros(1))], lr=0.1, eta=0.0)


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.tau = nn.Parameter(torch.zeros(1, 4, 1, 1))  # 4-D: only excluded by name
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)


def test_split_params_for_lars() -> None:
    m = _Gated()
    groups = split_params_for_lars(m, extra_exclude=lambda name, p: name.endswith("tau"))
    assert len(groups) == 2
    scaled, excluded = groups
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(scaled["params"]) == ids([m.conv.weight, m.fc.weight])
    assert ids(excluded["params"]) == ids([m.bn.weight, m.bn.bias, m.tau, m.fc.bias])
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True
    assert "weight_decay" not in scaled and not scaled.get("lars_exclude", False)
    # without the name rule the 4-D tau is scaled
    groups = split_params_for_lars(m)
    assert id(m.tau) in ids(groups[0]["params"])
    # usable directly by LARS
    opt = LARS(split_params_for_lars(m), lr=0.1, weight_decay=1e-5)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-5, 0.0]


# --------------------------------------------------------------------------- schedule


def test_warmup_cosine_values() -> None:
    kw = dict(warmup_steps=10, total_steps=110, base_lr=0.4)
    assert warmup_cosine(0, **kw) == 0.0  # type: ignore[arg-type]
    assert warmup_cosine(5, **kw) == pytest.approx(0.2)  # type: ignore[arg-type]
    assert warmup_cosine(10, **kw) == pytest.approx(0.4)  # type: ignore[arg-type]
    assert warmup_cosine(60, **kw) == pytest.approx(0.2)  # type: ignore[arg-type]
    assert warmup_cosine(110, **kw) == pytest.approx(0.0, abs=1e-15)  # type: ignore[arg-type]
    assert warmup_cosine(500, **kw) == 0.0  # type: ignore[arg-type]
    # cosine formula at a quarter of the decay, with start and final lrs
    lr = warmup_cosine(35, 10, 110, 0.4, start_lr=0.04, final_lr=0.01)
    assert lr == pytest.approx(0.01 + 0.39 * (1 + math.cos(math.pi / 4)) / 2)
    assert warmup_cosine(0, 10, 110, 0.4, start_lr=0.04) == pytest.approx(0.04)
    assert warmup_cosine(0, 0, 10, 0.4) == pytest.approx(0.4)  # no warm-up


def test_warmup_cosine_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, 20, 10, 0.1)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine(0, 0, 0, 0.1)


def test_scheduler_per_step_and_fixed_lr_group() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD(
        [{"params": [a]}, {"params": [b], "lr": 0.05, "fixed_lr": True}], lr=0.5, momentum=0.9
    )
    sched = build_warmup_cosine_scheduler(opt, warmup_steps=4, total_steps=12)
    seen: list[tuple[float, float]] = []
    for _ in range(13):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        opt.step()
        sched.step()
    for step, (lr_a, lr_b) in enumerate(seen):
        assert lr_a == pytest.approx(warmup_cosine(step, 4, 12, 0.5), abs=1e-15)
        assert lr_b == 0.05
    # the state dict round-trips (callable objects, not lambdas)
    sd = sched.state_dict()
    assert sd["lr_lambdas"][0]["warmup_steps"] == 4


def test_scheduler_factors_are_fractions_of_base_lr() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = LARS([p], lr=0.4)
    build_warmup_cosine_scheduler(opt, 10, 100, start_factor=0.1, final_factor=0.01)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.04)
