"""Method-level behaviour: branch routing per view, MoCo's key encoder, linear-probe freezing."""

from __future__ import annotations

import pytest
import torch

from cdg.config import load_config
from cdg.eval.supervised import SupervisedHead
from cdg.methods import build_method
from cdg.nn import gated_layers

SMALL = ["model.width=0.125", "gating.mode=dual", "gating.groups=2", "method.proj_hidden_dim=32",
         "method.proj_output_dim=16", "method.queue_size=64", "data.dataset=synthetic", "trainer.channels_last=false"]


@pytest.mark.parametrize("method", ["simclr", "mocov2", "simsiam"])
def test_view1_runs_on_a1_and_view2_on_a2(method):
    m = build_method(load_config(None, SMALL + [f"method.name={method}"]))
    calls: list[tuple[str, int]] = []
    encoders = [("query", m.backbone)] + ([("key", m.momentum_backbone)] if method == "mocov2" else [])
    for tag, enc in encoders:
        first = gated_layers(enc)[0][1]
        first.register_forward_hook(lambda mod, args, out, tag=tag: calls.append((tag, args[1])))
    v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss = m.ssl_loss(v1, v2)
    assert torch.isfinite(loss)
    assert [b for t, b in calls if t == "query"] == [0, 1]
    if method == "mocov2":  # k1 = f_k(x1; a1), k2 = f_k(x2; a2)
        assert [b for t, b in calls if t == "key"] == [0, 1]


def test_moco_queue_and_momentum_update():
    m = build_method(load_config(None, SMALL + ["method.name=mocov2"]), steps_per_epoch=10)
    before = [q.tensor.clone() for q in m.queues]
    m.ssl_loss(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    for q, b in zip(m.queues, before):  # each view's 4 keys went into its own queue
        assert (q.tensor != b).any(dim=1).sum() == 4
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    k_before = {n: p.clone() for n, p in m.momentum_backbone.named_parameters()}
    m.on_train_batch_end(None, None, 0)
    for n, p in m.momentum_backbone.named_parameters():
        q = dict(m.backbone.named_parameters())[n]
        torch.testing.assert_close(p, m.momentum * k_before[n] + (1 - m.momentum) * q)
    assert any(n.endswith("tau") for n in k_before)  # the EMA covers the thresholds too


def test_tau_has_its_own_group_without_weight_decay_or_lars():
    m = build_method(load_config(None, SMALL))
    groups = m.param_groups()
    tau_group = [g for g in groups if g.get("name") == "tau"]
    assert len(tau_group) == 1 and tau_group[0]["weight_decay"] == 0.0 and tau_group[0]["lars_exclude"]
    assert len(tau_group[0]["params"]) == len(gated_layers(m.backbone))
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len([p for p in m.parameters() if p.requires_grad])


def test_linear_probe_freezes_backbone_and_gates():
    cfg = load_config(None, SMALL)
    m = build_method(cfg)
    head = SupervisedHead(cfg, m.backbone, 10, finetune=False, steps_per_epoch=1)
    state = {k: v.clone() for k, v in head.backbone.state_dict().items()}
    head.on_train_epoch_start()
    opt = head.configure_optimizers()["optimizer"]
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(2):
        loss = head.training_step((x, y), 0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not head.backbone.training
    assert all(not p.requires_grad for p in head.backbone.parameters())
    for k, v in head.backbone.state_dict().items():  # weights, tau, BN running statistics unchanged
        assert torch.equal(v, state[k]), k


def test_feature_extraction_refuses_non_finite_features():
    from cdg.data import TensorImageDataset
    from cdg.eval.features import NonFiniteFeaturesError, extract_features

    ds = TensorImageDataset(torch.zeros(6, 3, 8, 8, dtype=torch.uint8), torch.arange(6) % 2, ["a", "b"])
    with pytest.raises(NonFiniteFeaturesError, match=r"non-finite \(inf/NaN\) features for 1 of 6 cifar10 images"):
        extract_features(_Features(explode=True), ds, "cifar10", batch_size=6, bf16=False, channels_last=False)
    feats, labels, _ = extract_features(_Features(), ds, "cifar10", batch_size=4, bf16=False, channels_last=False)
    assert feats.shape == (6, 3) and torch.isfinite(feats).all() and labels.tolist() == [0, 1, 0, 1, 0, 1]
    feats, _, _ = extract_features(_Features(explode=True), ds, "cifar10", batch_size=6, bf16=False,
                                   channels_last=False, finite=False)  # `cdg knn --count-nonfinite`
    assert torch.isinf(feats[0]).all() and torch.isfinite(feats[1:]).all()


def test_knn_leaves_out_and_scores_wrong_non_finite_features():
    from cdg.eval.knn import knn_accuracy

    inf = float("inf")
    train_f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [inf, 0.0]])
    train_y = torch.tensor([0, 1, 1])  # the inf image would be every query's neighbour if it counted
    test_f = torch.tensor([[2.0, 0.1], [0.1, 3.0], [1.0, 0.0], [float("nan"), 0.0]])
    test_y = torch.tensor([0, 1, 1, 0])  # right, right, wrong, non-finite (wrong)
    assert knn_accuracy(train_f, train_y, test_f, test_y, k=1) == 0.5


class _Features(torch.nn.Module):
    """Mean colour per image as features; ``explode`` makes the first image's inf, as an unstable FBS backbone did."""

    def __init__(self, explode: bool = False) -> None:
        super().__init__()
        self.explode = explode
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, branch: int = 0) -> torch.Tensor:
        f = x.mean((2, 3)) * self.scale
        if self.explode:
            f[0] = float("inf")
        return f


def test_moco_per_view_queues_pair_as_solo_learn():
    """L = (InfoNCE(q1, k2, queue[1]) + InfoNCE(q2, k1, queue[0])) / 2; queue[0] <- k1, queue[1] <- k2."""
    import torch.nn.functional as F

    m = build_method(load_config(None, SMALL + ["method.name=mocov2"]), steps_per_epoch=10)
    v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    queues = [q.tensor.clone() for q in m.queues]
    with torch.no_grad():  # the same forward passes by hand (no dropout; BN in train mode both times)
        state = {k: v.clone() for k, v in m.state_dict().items()}
        q1, q2 = m.projector(m.backbone(v1, 0)), m.projector(m.backbone(v2, 1))
        k1 = m.momentum_projector(m.momentum_backbone(v1, 0))
        k2 = m.momentum_projector(m.momentum_backbone(v2, 1))
        m.load_state_dict(state)  # undo the BN running-statistics updates of the hand pass

    def info_nce(q, k, queue):
        q, k, queue = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / m.cfg.method.temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))

    expected = 0.5 * (info_nce(q1, k2, queues[1]) + info_nce(q2, k1, queues[0]))
    loss = m.ssl_loss(v1, v2)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.queues[0].tensor[:4], F.normalize(k1, dim=1))
    torch.testing.assert_close(m.queues[1].tensor[:4], F.normalize(k2, dim=1))


@pytest.mark.parametrize("key_gates", ["own", "query"])
def test_moco_key_gates_and_consistency_monitor(key_gates, monkeypatch):
    """key_gates=query: the key encoder uses the query's masks (no disagreement on identical input
    and branch); own: it gates itself, and after the weights drift apart the monitor sees it."""
    m = build_method(load_config(None, SMALL + ["method.name=mocov2", f"method.key_gates={key_gates}",
                                                "trainer.log_every_n_steps=1"]), steps_per_epoch=10)
    logged: dict[str, float] = {}
    monkeypatch.setattr(m, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    monkeypatch.setattr(type(m), "_measure_now", lambda self: True)
    with torch.no_grad():  # the query encoder drifts from its EMA copy (as after many steps)
        for p in m.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.ssl_loss(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32))
    per_layer = {k: v for k, v in logged.items() if k.startswith("monitor/key_gate_disagreement/")}
    assert len(per_layer) == len(gated_layers(m.backbone))
    if key_gates == "query":
        assert logged["monitor/key_gate_disagreement"] == 0.0 and max(per_layer.values()) == 0.0
    else:
        assert logged["monitor/key_gate_disagreement"] > 0.01
    assert -1.0 <= logged["monitor/key_feature_cosine"] <= 1.0
    # the masks are not kept beyond the step unless key_gates=query needs them
    assert all(bool(l.last_masks) == (key_gates == "query") for _, l in gated_layers(m.backbone))
    assert all(not l.last_masks for _, l in gated_layers(m.momentum_backbone))
