"""Losses against loop-based references (float64), gradients, MoCo queue and momentum helpers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cdg.losses import (
    MemoryQueue,
    MoCoLoss,
    NegativeCosineSimilarity,
    NTXentLoss,
    cosine_momentum,
    gather_no_grad,
    gather_with_grad,
    momentum_update,
)


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v) / (math.sqrt(float(u @ u)) * math.sqrt(float(v @ v)))


def _fixed(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- NT-Xent


def nt_xent_reference_terms(z1: torch.Tensor, z2: torch.Tensor, t: float) -> list[float]:
    """Per-anchor loop straight from the SimCLR paper: l(i, positive of i) for the 2N anchors."""
    h = [row for row in torch.cat([z1, z2])]
    n = z1.shape[0]
    terms = []
    for i in range(2 * n):
        j = i + n if i < n else i - n
        denom = sum(math.exp(_cos(h[i], h[k]) / t) for k in range(2 * n) if k != i)
        terms.append(-math.log(math.exp(_cos(h[i], h[j]) / t) / denom))
    return terms


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    terms = nt_xent_reference_terms(z1, z2, t)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("temperature", [0.2, 0.5, 1.0])
def test_nt_xent_matches_loop_reference(temperature: float) -> None:
    z1, z2 = _fixed(6, 5, 0), _fixed(6, 5, 1)
    loss = NTXentLoss(temperature)(z1, z2)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(nt_xent_reference(z1, z2, temperature), rel=1e-12)


def test_nt_xent_scale_invariant_and_perfect_pairs_low() -> None:
    z1, z2 = _fixed(4, 8, 2), _fixed(4, 8, 3)
    crit = NTXentLoss(0.2)
    assert crit(3.0 * z1, 0.5 * z2).item() == pytest.approx(crit(z1, z2).item(), rel=1e-12)
    # identical views of orthogonal embeddings: each anchor's positive has cos 1, negatives 0
    eye = torch.eye(4, dtype=torch.float64)
    expected = -math.log(math.exp(5.0) / (math.exp(5.0) + 6 * math.exp(0.0)))
    assert crit(eye, eye.clone()).item() == pytest.approx(expected, rel=1e-12)


def test_nt_xent_gradient_symmetric() -> None:
    z1, z2 = _fixed(5, 7, 4).requires_grad_(), _fixed(5, 7, 5).requires_grad_()
    NTXentLoss(0.2)(z1, z2).backward()
    assert z1.grad is not None and z2.grad is not None
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    # swapping the views gives the same loss, so swapped gradients
    a, b = z2.detach().clone().requires_grad_(), z1.detach().clone().requires_grad_()
    NTXentLoss(0.2)(a, b).backward()
    assert torch.allclose(a.grad, z2.grad, atol=1e-14)
    assert torch.allclose(b.grad, z1.grad, atol=1e-14)
    # against finite differences
    f = lambda x, y: NTXentLoss(0.2)(x, y)  # noqa: E731
    x, y = _fixed(3, 4, 40).requires_grad_(), _fixed(3, 4, 41).requires_grad_()
    assert torch.autograd.gradcheck(f, (x, y))


def test_nt_xent_bf16_autocast_computes_in_float32() -> None:
    z1 = _fixed(8, 16, 6).to(torch.bfloat16)
    z2 = _fixed(8, 16, 7).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = NTXentLoss(0.2)(z1, z2)
    assert loss.dtype == torch.float32
    ref = nt_xent_reference(z1.double(), z2.double(), 0.2)
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_nt_xent_gather_flag_harmless_without_dist() -> None:
    z1, z2 = _fixed(3, 4, 8), _fixed(3, 4, 9)
    assert torch.equal(NTXentLoss(0.2, gather_distributed=True)(z1, z2), NTXentLoss(0.2)(z1, z2))
    assert gather_with_grad(z1) is z1
    assert torch.equal(gather_no_grad(z1), z1)


def test_nt_xent_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        NTXentLoss()(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(0.0)


# --------------------------------------------------------------------------- MoCo


def moco_reference(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> float:
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(_cos(q[i], k[i]) / t)
        neg = sum(math.exp(_cos(q[i], queue[j]) / t) for j in range(queue.shape[0]))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


@pytest.mark.parametrize("temperature", [0.2, 0.07])
def test_moco_loss_matches_loop_reference(temperature: float) -> None:
    q, k, queue = _fixed(5, 6, 10), _fixed(5, 6, 11), _fixed(9, 6, 12)
    loss = MoCoLoss(temperature)(q, k, queue)
    assert loss.item() == pytest.approx(moco_reference(q, k, queue, temperature), rel=1e-12)


def test_moco_loss_gradient_only_into_query() -> None:
    q = _fixed(4, 6, 13).requires_grad_()
    k = _fixed(4, 6, 14).requires_grad_()
    queue = _fixed(7, 6, 15).requires_grad_()
    MoCoLoss(0.2)(q, k, queue).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


def test_moco_loss_bad_queue_shape() -> None:
    with pytest.raises(ValueError, match="queue"):
        MoCoLoss()(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(5, 3))


def test_memory_queue_init_and_state_dict() -> None:
    torch.manual_seed(0)
    mq = MemoryQueue(10, 4)
    assert mq.tensor.shape == (10, 4)
    assert torch.allclose(mq.tensor.norm(dim=1), torch.ones(10))
    sd = mq.state_dict()
    assert set(sd) == {"queue", "ptr"}
    other = MemoryQueue(10, 4)
    mq.enqueue(torch.randn(3, 4))
    other.load_state_dict(mq.state_dict())
    assert torch.equal(other.tensor, mq.tensor) and int(other.ptr) == 3


def _unit_rows(values: list[float], dim: int = 3) -> torch.Tensor:
    """Rows that are distinct unit vectors identified by their first coordinate's sign pattern."""
    rows = torch.zeros(len(values), dim)
    rows[:, 0] = torch.tensor(values)
    rows[:, 1] = 1.0
    return torch.nn.functional.normalize(rows, dim=1)


def test_memory_queue_fifo_and_wraparound() -> None:
    mq = MemoryQueue(5, 3)
    a = _unit_rows([1.0, 2.0])
    b = _unit_rows([3.0, 4.0])
    c = _unit_rows([5.0, 6.0])
    mq.enqueue(a)
    mq.enqueue(b)
    assert int(mq.ptr) == 4
    assert torch.allclose(mq.tensor[:4], torch.cat([a, b]))
    mq.enqueue(c)  # 2 does not divide 5: slot 4 then wrap to slot 0
    assert int(mq.ptr) == 1
    assert torch.allclose(mq.tensor[4], c[0]) and torch.allclose(mq.tensor[0], c[1])
    assert torch.allclose(mq.tensor[1:4], torch.cat([a[1:], b]))
    # the oldest key (a[0]) is the one that was overwritten
    assert not any(torch.allclose(row, a[0]) for row in mq.tensor)


def test_memory_queue_batch_larger_than_queue_keeps_last() -> None:
    mq = MemoryQueue(3, 3)
    mq.enqueue(_unit_rows([0.5]))  # ptr 1
    keys = _unit_rows([1.0, 2.0, 3.0, 4.0, 5.0])
    mq.enqueue(keys)
    # sequential writes from slot 1: 1<-k0, 2<-k1, 0<-k2, 1<-k3, 2<-k4 ; ptr = (1 + 5) % 3 = 0
    assert int(mq.ptr) == 0
    assert torch.allclose(mq.tensor, torch.stack([keys[2], keys[3], keys[4]]))


def test_memory_queue_normalises_and_rejects_bad_dim() -> None:
    mq = MemoryQueue(4, 2)
    mq.enqueue(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    assert mq.tensor.dtype == torch.float32
    assert torch.allclose(mq.tensor[0], torch.tensor([0.6, 0.8]))
    with pytest.raises(ValueError, match="enqueue"):
        mq.enqueue(torch.zeros(2, 3))


def test_momentum_update_formula_and_buffers() -> None:
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    target = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    online.train()(torch.randn(8, 3))  # non-trivial running stats
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    m = 0.9
    momentum_update(online, target, m)
    for name, p_t in target.named_parameters():
        p_o = dict(online.named_parameters())[name]
        assert torch.allclose(p_t, m * before[name] + (1 - m) * p_o, atol=1e-7)
        assert p_t.grad is None
    for (_, b_o), (_, b_t) in zip(online.named_buffers(), target.named_buffers()):
        assert torch.equal(b_o, b_t)


def test_momentum_update_without_buffer_copy_and_mismatch() -> None:
    online, target = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    online.running_mean.fill_(5.0)
    momentum_update(online, target, 0.5, copy_buffers=False)
    assert torch.equal(target.running_mean, torch.zeros(2))
    with pytest.raises(ValueError, match="names"):
        momentum_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.5)


def test_cosine_momentum_endpoints() -> None:
    assert cosine_momentum(0, 100) == pytest.approx(0.99)
    assert cosine_momentum(100, 100) == pytest.approx(0.999)
    assert cosine_momentum(50, 100) == pytest.approx((0.99 + 0.999) / 2)
    assert cosine_momentum(500, 100) == pytest.approx(0.999)
    values = [cosine_momentum(s, 20, 0.9, 0.99) for s in range(21)]
    assert all(a <= b for a, b in zip(values, values[1:]))


# --------------------------------------------------------------------------- SimSiam


def neg_cos_reference(p: torch.Tensor, z: torch.Tensor) -> float:
    return -sum(_cos(p[i], z[i]) for i in range(p.shape[0])) / p.shape[0]


def test_negative_cosine_matches_reference_and_range() -> None:
    p, z = _fixed(6, 5, 20), _fixed(6, 5, 21)
    crit = NegativeCosineSimilarity()
    assert crit(p, z).item() == pytest.approx(neg_cos_reference(p, z), rel=1e-12)
    assert crit(p, p.clone()).item() == pytest.approx(-1.0)
    assert crit(p, -p).item() == pytest.approx(1.0)


def test_negative_cosine_stop_gradient() -> None:
    p = _fixed(4, 3, 22).requires_grad_()
    z = _fixed(4, 3, 23).requires_grad_()
    NegativeCosineSimilarity()(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


def test_symmetric_simsiam_loss_by_caller() -> None:
    p1, p2, z1, z2 = (_fixed(3, 4, s) for s in (24, 25, 26, 27))
    d = NegativeCosineSimilarity()
    sym = 0.5 * d(p1, z2) + 0.5 * d(p2, z1)
    ref = 0.5 * neg_cos_reference(p1, z2) + 0.5 * neg_cos_reference(p2, z1)
    assert sym.item() == pytest.approx(ref, rel=1e-12)


# --------------------------------------------------------------------------- DDP (2 gloo processes)

# The global batch: N = 6 images, split over 2 ranks (n = 3 each); a shared linear "projector" so
# that DDP's averaging of parameter gradients can be checked too.
_GLOBAL_N, _DIM, _OUT = 6, 5, 4


def _global_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fixed(_GLOBAL_N, _DIM, 30), _fixed(_GLOBAL_N, _DIM, 31), _fixed(_OUT, _DIM, 32)


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x1_all, x2_all, weight = _global_inputs()
        n = _GLOBAL_N // world
        x1 = x1_all[rank * n : (rank + 1) * n].clone().requires_grad_()
        x2 = x2_all[rank * n : (rank + 1) * n].clone().requires_grad_()
        proj = nn.Linear(_DIM, _OUT, bias=False).double()
        with torch.no_grad():
            proj.weight.copy_(weight)
        loss = NTXentLoss(0.2, gather_distributed=True)(proj(x1), proj(x2))
        loss.backward()
        # what DDP does with parameter gradients: average them over the ranks
        g_weight = proj.weight.grad.clone()
        dist.all_reduce(g_weight)
        g_weight /= world
        torch.save(
            {"loss": loss.detach(), "g1": x1.grad, "g2": x2.grad, "g_weight": g_weight,
             "keys": gather_no_grad(x1.detach())},
            f"{out_file}.{rank}",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_nt_xent_gather_distributed_matches_global_batch(tmp_path) -> None:
    """Each rank's loss is the global batch's NT-Xent restricted to its own anchors (so their mean
    is the global loss); its input gradient is W times the global loss's gradient of its slice
    (GatherLayer all-reduces the keys' gradients), so DDP's average over the W ranks of the
    parameter gradients is exactly the global loss's parameter gradient."""
    import torch.multiprocessing as mp

    world = 2
    out = str(tmp_path / "res")
    # spawn, not fork: forking after OpenMP was used in this process can deadlock the children.
    # Costs a few seconds (each child imports torch).
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), out), nprocs=world, join=True)
    x1_all, x2_all, weight = _global_inputs()
    x1_all.requires_grad_()
    x2_all.requires_grad_()
    proj = nn.Linear(_DIM, _OUT, bias=False).double()
    with torch.no_grad():
        proj.weight.copy_(weight)
    z1_all, z2_all = proj(x1_all), proj(x2_all)
    ref = NTXentLoss(0.2)(z1_all, z2_all)  # one process, the concatenated global batch
    ref.backward()
    per_anchor = nt_xent_reference_terms(z1_all.detach(), z2_all.detach(), 0.2)
    assert ref.item() == pytest.approx(sum(per_anchor) / len(per_anchor), rel=1e-12)
    n, big_n = _GLOBAL_N // world, _GLOBAL_N
    results = [torch.load(f"{out}.{rank}") for rank in range(world)]
    for rank, res in enumerate(results):
        own = [rank * n + i for i in range(n)] + [big_n + rank * n + i for i in range(n)]
        # the rank's value: its 2n anchors (view 1 and view 2 of its images) against all 2N keys
        assert res["loss"].item() == pytest.approx(sum(per_anchor[i] for i in own) / (2 * n), rel=1e-12)
        # per-rank input gradient = world * d(global loss)/d(its slice)
        assert torch.allclose(res["g1"], world * x1_all.grad[rank * n : (rank + 1) * n], rtol=1e-10, atol=1e-13)
        assert torch.allclose(res["g2"], world * x2_all.grad[rank * n : (rank + 1) * n], rtol=1e-10, atol=1e-13)
        # after DDP's averaging the parameter gradient is the global loss's, on every rank
        assert torch.allclose(res["g_weight"], proj.weight.grad, rtol=1e-10, atol=1e-13)
        assert torch.equal(res["keys"], x1_all.detach())
    # the ranks' losses average to the global loss (equal local batches)
    assert sum(r["loss"].item() for r in results) / world == pytest.approx(ref.item(), rel=1e-12)
    # a wrong offset would make the ranks' values equal only by accident: they differ here
    assert results[0]["loss"].item() != pytest.approx(results[1]["loss"].item(), rel=1e-6)
