"""Sparse inference (cdg.sparse): the exported form equals the eval-mode gated backbone on branch a1.

Random weights, BatchNorm statistics from a few training-mode batches, tau ~ N(0.5, 0.5) (mixed
masks). :func:`cdg.sparse.check.compare` holds every sample whose masks equal the reference's to a
relative feature error of 1e-4, and allows a differing mask entry only at a rounding tie
(|normal(S) - tau| < 1e-4, recomputed in float64); the number of such flips is asserted small.
Every test of the C++ kernel also checks, through the kernel's own call counters, that it ran.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cdg.builders import build_backbone
from cdg.cli import main as cdg_main
from cdg.config import config_from_dict
from cdg.export import save_backbone
from cdg.nn import GatedConv2d
from cdg.sparse import SparseGatedConv, export_inference, load_inference, save_inference
from cdg.sparse import kernel as K
from cdg.sparse.check import compare


@pytest.fixture(scope="module")
def ext():
    module = K.extension()
    if module is None:
        pytest.skip(f"the C++ sparse-conv kernel cannot be built here: {K._state.get('error')}")
    return module


def _backbone(width=0.25, groups=4, group_size=1, mode="dual", norm="instance", name="resnet18", stem="cifar",
              size=32, seed=0):
    cfg = config_from_dict({"model": {"name": name, "width": width, "stem": stem},
                            "gating": {"mode": mode, "groups": groups, "group_size": group_size, "norm": norm}})
    torch.manual_seed(seed)
    bb = build_backbone(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in bb.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.momentum = None  # running statistics = the mean over the batches below
            if isinstance(m, GatedConv2d):
                m.tau.copy_(torch.randn(m.tau.shape, generator=g) * 0.5 + 0.5)
        bb.train()
        for _ in range(2):
            bb(torch.randn(8, 3, size, size, generator=g))
    return bb.eval()


def _x(n, size, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).contiguous(
        memory_format=torch.channels_last)


def _check(bb, x, kernel="cpp", max_flip_samples=None):
    sp = export_inference(bb, kernel=kernel)
    before = K.kernel_calls()
    res = compare(bb, sp, x)
    after = K.kernel_calls()
    n_gated = len(sp.gated())
    if kernel == "cpp":  # the compiled kernel itself counted one call of each step per gated layer
        n_dense = sum(m.dense_cond for _, m in sp.gated())  # C_in >= 512: dense cond path + C++ combine
        assert after["cond"] - before["cond"] == n_gated - n_dense
        assert after["combine"] - before["combine"] == n_dense
        assert after["base_conv"] - before["base_conv"] == n_gated
        n_blocks = sum(m.group_size % 8 == 0 for _, m in sp.gated())  # whole-vector entries: block order
        assert after["cond_blocks"] - before["cond_blocks"] == n_blocks
    else:
        assert after == before
    assert res.max_rel_err < 1e-4, res.summary()
    limit = max(1, x.shape[0] // 16) if max_flip_samples is None else max_flip_samples
    assert res.samples_with_flips <= limit, res.summary()
    return res, sp


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("groups", [2, 4, 8])
@pytest.mark.parametrize("batch", [1, 64])
def test_unstructured_gate_equals_the_gated_backbone(ext, groups, batch):
    """C_g = 1, width 0.25 (CIFAR 32x32: strides 1 and 2, 16 to 128 channels)."""
    bb = _backbone(groups=groups)
    res, sp = _check(bb, _x(batch, 32))
    # masks are mixed in every layer
    sp.set_flags(track=True)
    with torch.no_grad():
        sp(_x(batch, 32))
    etas = sp.eta_per_layer()
    assert len(etas) == 16 and all(0.05 < e < 0.95 for e in etas.values()), etas


@pytest.mark.parametrize("groups,group_size,width,size,batch", [
    (4, 4, 0.25, 32, 64),   # C_g = 4: 16 channels / G = 4
    (2, 8, 0.25, 32, 16),   # C_g = 8 at G = 2
    (8, 8, 1.0, 16, 4),     # C_g = 8 at G = 8, width 1 (block order also at 512 input channels)
    (4, 16, 1.0, 16, 4),    # C_g = 16 at G = 4, width 1
    (2, 16, 0.5, 16, 4),    # C_g = 16 at G = 2
])
def test_structured_gate_equals_the_gated_backbone(ext, groups, group_size, width, size, batch):
    _check(_backbone(width=width, groups=groups, group_size=group_size, size=size), _x(batch, size))


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_width_one(ext, groups):
    """Width 1 (64 to 512 channels) at 16 x 16 input, batch 4 (a 32 x 32 batch of 64 takes long).
    layer4's second convolutions (512 input channels) take the dense conditional path."""
    _, sp = _check(_backbone(width=1.0, groups=groups, size=16), _x(4, 16))
    assert [n for n, m in sp.gated() if m.dense_cond] == ["layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]


@pytest.mark.parametrize("mode,norm", [("shared_base", "instance"), ("unified", "instance"), ("dual", "batch")])
def test_other_gating_modes_and_the_batch_norm_gate(ext, mode, norm):
    """Branch a1 is the diagonal in every mode; the BatchNorm gate has constant thresholds."""
    _check(_backbone(mode=mode, norm=norm, groups=4), _x(16, 32))


def test_bottleneck_and_imagenet_stem(ext):
    _check(_backbone(name="resnet50", width=0.25, stem="imagenet", size=64), _x(2, 64))


def test_dense_backbone_exports_dense_convolutions():
    bb = _backbone(mode="dense")
    sp = export_inference(bb)
    assert sp.gated() == []
    with torch.no_grad():
        torch.testing.assert_close(sp(_x(4, 32)), bb(_x(4, 32)), rtol=1e-4, atol=1e-5)


def test_torch_fallback_gives_the_same_values(ext):
    bb = _backbone(groups=4)
    x = _x(16, 32)
    _check(bb, x, kernel="torch")
    cpp = export_inference(bb, kernel="cpp").set_flags(keep_mask=True)
    ref = export_inference(bb, kernel="torch").set_flags(keep_mask=True)
    with torch.no_grad():
        a, b = cpp(x), ref(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    flips = sum(int((m.last_mask != r.last_mask).sum()) for (_, m), (_, r) in zip(cpp.gated(), ref.gated()))
    assert flips <= 64  # rounding ties only (compare() above checks the margins of the reference's)


# the cond kernel's channel-major, position-major and block (C_g a multiple of 8) loops
@pytest.mark.parametrize("order", [1, 2, 3])
def test_kernel_steps_match_pytorch_on_odd_shapes(ext, order, monkeypatch):
    """The three steps alone, against the PyTorch forms: channels not a multiple of 8, odd sizes."""
    monkeypatch.setattr(K, "ORDER", order)
    torch.manual_seed(0)
    shapes = [(2, 12, 24, 7, 2, 4, 1), (3, 20, 20, 9, 4, 1, 2), (1, 40, 40, 5, 4, 5, 1), (2, 48, 96, 6, 2, 16, 2)]
    if order == 3:  # C_g = 8, 16, 24 (a pair and a single vector), C_in / G not a multiple of 8, 13 x 13
        shapes = [(2, 24, 32, 7, 4, 8, 1), (2, 48, 96, 6, 2, 16, 2), (1, 64, 48, 13, 2, 24, 1), (3, 32, 64, 9, 4, 16, 2)]
    blocks_before = K.kernel_calls()["cond_blocks"]
    for n, ci, co, h, g, cg, s in shapes:
        x = torch.randn(n, ci, h, h).contiguous(memory_format=torch.channels_last)
        w = torch.randn(co, ci, 3, 3)
        wb = torch.cat([w[o * co // g:(o + 1) * co // g, o * ci // g:(o + 1) * ci // g] for o in range(g)])
        pack = K.pack_base(w, g)
        y1, y2 = K.base_conv(x, pack, wb, g, s, ext), K.base_conv(x, pack, wb, g, s, None)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        tau = torch.randn(co // cg) * 0.5 + 0.5
        t1, t2 = K.thresholds(y1, tau, cg, ext), K.thresholds(y1, tau, cg, None)
        torch.testing.assert_close(t1, t2, rtol=1e-5, atol=1e-6)
        wz = K.pack_cond(w, g)
        wc = wz.view(co, 3, 3, ci).permute(0, 3, 1, 2)
        sc, bi, res = torch.rand(co) + 0.5, torch.randn(co), torch.randn_like(y1)
        blocks = K.pack_cond_blocks(wz) if order == 3 else None
        for r, relu in ((None, True), (res, True), (res, False)):
            o1, m1, k1 = K.cond(x, y1, t1, wz, wc, sc, bi, r, relu, s, cg, g, ext, True, blocks=blocks)
            o2, m2, k2 = K.cond(x, y1, t1, wz, wc, sc, bi, r, relu, s, cg, g, None, True)
            torch.testing.assert_close(o1, o2, rtol=1e-4, atol=1e-4)
            assert torch.equal(m1, m2) and k1 == k2 and 0 < k1 < y1.numel()
            o3, m3, k3 = K.cond(x, y1, t1, wz, wc, sc, bi, r, relu, s, cg, g, ext, True, dense=True)
            torch.testing.assert_close(o3, o2, rtol=1e-4, atol=1e-4)
            assert torch.equal(m3, m2) and k3 == k2
    assert K.kernel_calls()["cond_blocks"] - blocks_before == (12 if order == 3 else 0)


def test_all_open_and_all_closed_limits(ext):
    """tau -> -inf: the dense convolution (every entry open); tau -> +inf: the base path only."""
    bb = _backbone(groups=4)
    x = _x(4, 32)
    for tau, eta in ((-1e4, 0.0), (1e4, 1.0)):
        with torch.no_grad():
            for m in bb.modules():
                if isinstance(m, GatedConv2d):
                    m.tau.fill_(tau)
        sp = export_inference(bb, kernel="cpp").set_flags(track=True)
        res = compare(bb, sp, x)
        assert res.samples_with_flips == 0 and res.max_rel_err < 1e-4
        assert all(abs(e - eta) < 1e-9 for e in sp.eta_per_layer().values())


# ---------------------------------------------------------------------------- files and CLI


def test_save_load_and_cli_export(ext, tmp_path, capsys):
    bb = _backbone(groups=4)
    cfg = config_from_dict({"model": {"width": 0.25}, "gating": {"mode": "dual", "groups": 4}})
    run = tmp_path / "run"
    cfg.save(run / "config.yaml")
    save_backbone(run / "backbone.pt", cfg, bb)
    out = tmp_path / "model.sparse.pt"
    assert cdg_main(["export", "--run", str(run), "--format", "sparse", "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "cdg.sparse" and info["gated_layers"] == 16
    raw = torch.load(out, weights_only=True)
    assert raw["format"] == "cdg.sparse" and raw["version"] == 1
    loaded = load_inference(out, kernel="cpp")
    x = _x(8, 32)
    res = compare(bb, loaded, x)
    assert res.max_rel_err < 1e-4 and res.samples_with_flips <= 1
    # the in-memory export and the file agree bit for bit
    direct = export_inference(bb, kernel="cpp")
    with torch.no_grad():
        assert torch.equal(direct(x), loaded(x))
    save_inference(tmp_path / "again.pt", direct)
    assert isinstance(load_inference(tmp_path / "again.pt").layer1[0].conv1, SparseGatedConv)


def test_refuses_other_gated_layers():
    cfg = config_from_dict({"model": {"width": 0.25}, "gating": {"mode": "fbs"}})
    with pytest.raises(ValueError, match="FBSConv2d is not a CDG/CGNet gated convolution"):
        export_inference(build_backbone(cfg))
