"""Backbones and registry, MAC counting against PyTorch's counter and by hand, Eq. 13, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cdg.config import ConfigError, load_config
from cdg.metrics import count_macs, flops_reduction_eq13
from cdg.models import Conv3x3, create_model, list_models
from cdg.models.resnet import StridedConv1x1
from cdg.nn import GatedConv2d, gated_layers, make_conv_layer

ROOT = Path(__file__).resolve().parents[1]


def test_registry_and_shapes():
    assert {"resnet18", "resnet50"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'resnet7'.*resnet18"):
        create_model("resnet7")
    for w, feats in ((0.25, 128), (0.5, 256), (1.0, 512), (2.0, 1024)):
        m = create_model("resnet18", width=w)
        assert m.num_features == feats
    net = create_model("resnet18", width=0.25)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    assert isinstance(net.maxpool, torch.nn.Identity) and net.conv1.kernel_size == (3, 3)
    big = create_model("resnet50", width=0.25, stem="imagenet")
    assert big(torch.randn(1, 3, 64, 64)).shape == (1, 512)
    assert big.conv1.kernel_size == (7, 7)


def test_conv_factory_plugs_gated_conv_into_every_block_conv():
    net = create_model("resnet18", width=0.25, conv_layer=make_conv_layer("dual", gate_groups=4))
    layers = gated_layers(net)
    assert len(layers) == 16 and all(isinstance(m, GatedConv2d) for _, m in layers)
    assert not isinstance(net.conv1, GatedConv2d)  # stem stays dense
    r50 = create_model("resnet50", width=0.25, conv_layer=make_conv_layer("dual", gate_groups=4))
    assert len(gated_layers(r50)) == 16
    dense = create_model("resnet18", width=0.25)
    assert isinstance(dense.layer1[0].conv1, Conv3x3)
    with pytest.raises(ValueError, match="not divisible by gate_groups G=8"):
        create_model("resnet18", width=0.0625, conv_layer=make_conv_layer("dual", gate_groups=8))


def test_branch_routing_reaches_every_gated_layer():
    net = create_model("resnet18", width=0.25, conv_layer=make_conv_layer("dual", gate_groups=4)).eval()
    seen = []
    for _, m in gated_layers(net):
        m.register_forward_hook(lambda mod, args, out: seen.append(args[1]))
    with torch.no_grad():
        net(torch.randn(1, 3, 32, 32), branch=1)
    assert seen == [1] * 16


def test_macs_match_pytorch_counter_and_hand_count():
    net = create_model("resnet18")
    rep = count_macs(net, (3, 32, 32))
    with FlopCounterMode(display=False) as fc:
        net(torch.zeros(1, 3, 32, 32))
    assert rep.total_dense * 2 == fc.get_total_flops()
    assert abs(rep.total_dense / 1e9 - 0.5554) < 1e-3  # "about 0.556 GMACs"
    by = {l.name: l.macs for l in rep.layers}
    assert by["layer1.0.conv1"] == 64 * 64 * 9 * 32 * 32
    assert by["layer2.0.conv1"] == 128 * 64 * 9 * 16 * 16
    assert by["layer2.0.shortcut.0"] == 128 * 64 * 16 * 16


@pytest.mark.parametrize("in_ch,size", [(8, 56), (4, 33), (12, 112), (16, 32)])
def test_strided_shortcut_equals_the_strided_conv_and_trains_channels_last(in_ch, size):
    """The 1x1 stride-2 shortcut (computed as a stride-1 conv of the subsampled input, to avoid a
    oneDNN backward-weights fault on narrow channels-last inputs) gives nn.Conv2d's output and
    gradients; (8, 56) is a width-0.125 ResNet-18's layer2 shortcut on 224-pixel images, which
    segfaulted on an AVX-512 CPU as a plain nn.Conv2d (so did (12, 112)); odd sizes keep the last row
    and column; 16 channels take the plain strided conv."""
    net = create_model("resnet18", width=0.125, stem="imagenet")
    sc = net.layer2[0].shortcut[0]
    assert isinstance(sc, StridedConv1x1) and sc.stride == (2, 2) and sc.in_channels == 8
    torch.manual_seed(0)
    conv = StridedConv1x1(in_ch, 2 * in_ch, 2).to(memory_format=torch.channels_last)
    x = torch.randn(16, in_ch, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(16, 2 * in_ch, (size + 1) // 2, (size + 1) // 2)
    y = conv(x)
    y.backward(g)
    ref_w = conv.weight.detach().double().requires_grad_()
    ref_x = x.detach().double().contiguous().requires_grad_()
    ref = torch.nn.functional.conv2d(ref_x, ref_w, stride=2)
    ref.backward(g.double())
    assert y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # a sum over N*H*W/4 fp32 products: tolerance relative to the gradient's scale
    torch.testing.assert_close(conv.weight.grad.double(), ref_w.grad, rtol=1e-4, atol=1e-5 * float(ref_w.grad.abs().max()))
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-5, atol=1e-5)


def test_exact_reduction_reduces_to_hand_formula():
    net = create_model("resnet18", width=0.5)
    twin = create_model("resnet18", width=0.5, conv_layer=make_conv_layer("dual", gate_groups=4))
    gated = dict(gated_layers(twin))
    assert set(gated) == {n for n, m in net.named_modules() if isinstance(m, Conv3x3)}
    rep = count_macs(net, (3, 32, 32), gated)
    eta = 0.7
    gated_macs = sum(l.macs for l in rep.layers if l.gated)
    overhead = sum(4 * l.out_elements for l in rep.layers if l.gated)
    expected = rep.total_dense - gated_macs + gated_macs * (0.25 + 0.75 * 0.3) + overhead
    assert rep.gated_macs(eta) == pytest.approx(expected)
    assert 1.0 < rep.reduction_exact(eta) < flops_reduction_eq13(eta, 4)


@pytest.mark.parametrize("eta,g,expected", [(0.7248, 4, 2.19), (0.7515, 2, 1.60), (0.7164, 4, 2.16)])
def test_eq13_reproduces_tables_3_and_5(eta, g, expected):
    assert round(flops_reduction_eq13(eta, g), 2) == expected


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(ROOT / "configs/cpu/simclr_cdg.yaml", ["model.width=0.5", "gating.groups=2"])
    assert cfg.model.width == 0.5 and cfg.gating.groups == 2 and cfg.gating.mode == "dual"
    with pytest.raises(ConfigError, match=r"unknown config key 'model.widht'.*width"):
        load_config(None, ["model.widht=1"])
    with pytest.raises(ConfigError, match=r"invalid value 'quad' for 'gating.mode'; valid: 'dense', 'dual'"):
        load_config(None, ["gating.mode=quad"])
    with pytest.raises(ConfigError, match="'data.batch_size' must be an integer"):
        load_config(None, ["data.batch_size=big"])
    # YAML 1.1 reads 1e-4 (no dot) as a string; a float field still takes it, in overrides and files
    assert load_config(None, ["optim.weight_decay=1e-4"]).optim.weight_decay == 1e-4
    sci = tmp_path / "sci.yaml"
    sci.write_text("optim: {lr: 3e-1, weight_decay: 5E-5}\n")
    assert (load_config(sci).optim.lr, load_config(sci).optim.weight_decay) == (0.3, 5e-5)
    with pytest.raises(ConfigError, match="'optim.lr' must be a number, got '1e-4x'"):
        load_config(None, ["optim.lr=1e-4x"])
    with pytest.raises(ConfigError, match="gating.groups"):
        load_config(None, ["gating.mode=dual", "gating.groups=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: {max_epoch: 3}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'trainer.max_epoch'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_precision_auto_uses_bf16_only_with_native_support(monkeypatch):
    import cdg.config as config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(None, [])
    assert cfg.trainer.precision == "auto"
    for native, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(config, "native_bf16", lambda native=native: native)
        assert cfg.trainer.resolved_precision() == expected and cfg.trainer.bf16 == (expected == "bf16-mixed")
    explicit = load_config(None, ["trainer.precision=bf16-mixed"]).trainer
    assert explicit.resolved_precision() == "bf16-mixed" and explicit.bf16  # an explicit choice is kept
    assert load_config(None, ["trainer.precision=32-true"]).trainer.bf16 is False


def test_config_roundtrip(tmp_path):
    cfg = load_config(ROOT / "configs/cpu/simclr_cdg.yaml")
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds(path):
    from cdg.builders import build_backbone

    cfg = load_config(path)
    build_backbone(cfg)


def test_gating_base_conv_reaches_every_gated_layer():
    from cdg.builders import build_backbone
    from cdg.nn import gated_layers

    for choice in ("grouped", "masked"):
        cfg = load_config(ROOT / "configs/cpu/simclr_cdg.yaml", [f"gating.base_conv={choice}"])
        layers = [m for _, m in gated_layers(build_backbone(cfg))]
        assert layers and all(m.base_conv == choice for m in layers)
    with pytest.raises(ValueError, match="base_conv"):
        load_config(ROOT / "configs/cpu/simclr_cdg.yaml", ["gating.base_conv=sparse"])


def test_gating_gate_kernel_reaches_every_gated_layer():
    from cdg.builders import build_backbone
    from cdg.nn import gated_layers

    for choice in ("auto", "cpp", "torch"):
        cfg = load_config(ROOT / "configs/cpu/simclr_cdg.yaml", [f"gating.gate_kernel={choice}"])
        layers = [m for _, m in gated_layers(build_backbone(cfg))]
        assert layers and all(m.gate_kernel == choice for m in layers)
    with pytest.raises(ValueError, match="gate_kernel"):
        load_config(ROOT / "configs/cpu/simclr_cdg.yaml", ["gating.gate_kernel=cuda"])
