"""The gating-mode registry and the gated-layer interface: one entry per mode, found by type."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import Tensor

from cdg.builders import build_backbone
from cdg.config import ConfigError, config_from_dict, load_config
from cdg.metrics import mac_report
from cdg.nn import (
    GATING_MODES,
    Conv3x3,
    DGCConv2d,
    FBSConv2d,
    GatedConv2d,
    GatedLayer,
    GatingMode,
    gate_statistics,
    gated_layers,
    get_gating_mode,
    make_conv_layer,
    pop_aux_losses,
    register_gating_mode,
    set_pruning_progress,
    threshold_layers,
)
from cdg.runs import base_protocol

ALL = ["dense", "dual", "shared_base", "unified", "fbs", "dgc"]


def _cfg(mode: str, **gating):
    return config_from_dict({"model": {"width": 0.25}, "gating": {"mode": mode, **gating}})


def test_registry_lists_every_mode_and_config_accepts_exactly_those():
    assert list(GATING_MODES) == ALL
    for mode in ALL:
        assert _cfg(mode).gating.mode == mode
    with pytest.raises(ConfigError, match=r"invalid value 'quad' for 'gating.mode'; valid: 'dense', 'dual'"):
        load_config(None, ["gating.mode=quad"])
    with pytest.raises(ValueError, match="unknown gating mode 'quad'; valid: dense, dual"):
        make_conv_layer("quad")


@pytest.mark.parametrize("mode,layer", [("dense", Conv3x3), ("dual", GatedConv2d), ("shared_base", GatedConv2d),
                                        ("unified", GatedConv2d), ("fbs", FBSConv2d), ("dgc", DGCConv2d)])
def test_each_mode_builds_its_layer_through_the_registry(mode, layer):
    net = build_backbone(_cfg(mode))
    convs = [net.layer1[0].conv1, net.layer4[1].conv2]
    assert all(type(c) is layer for c in convs)
    spec = get_gating_mode(mode)
    assert spec.gated == (mode != "dense") and spec.has_threshold == (layer is GatedConv2d)
    assert (len(gated_layers(net)) == 16) == spec.gated and (len(threshold_layers(net)) == 16) == spec.has_threshold
    if layer is GatedConv2d:
        assert convs[0].mode == mode  # the registry passes the mode to the layer


def test_defaults_have_one_owner_the_layer():
    for mode, layer, arg_for in (("fbs", FBSConv2d, {"keep_ratio": "keep_ratio", "predictor_loss": "l1"}),
                                 ("dgc", DGCConv2d, {"keep_ratio": "keep_ratio", "predictor_loss": "loss_coef"})):
        spec = get_gating_mode(mode)
        for key, arg in arg_for.items():
            assert spec.defaults[key] == inspect.signature(layer).parameters[arg].default
        net = build_backbone(_cfg(mode))
        conv = net.layer2[0].conv1
        assert conv.keep_ratio == spec.defaults["keep_ratio"]
        assert f"keep={spec.defaults['keep_ratio']}" in base_protocol(_cfg(mode))["gating"]
    # an explicit setting wins over the default
    assert build_backbone(_cfg("fbs", keep_ratio=0.25)).layer2[0].conv1.keep_ratio == 0.25


def test_nominal_reduction_per_mode():
    assert get_gating_mode("dual").nominal_reduction(0.7, _cfg("dual").gating) == pytest.approx(1 / (0.25 + 0.3 * 0.75))
    assert get_gating_mode("fbs").nominal_reduction(0.5, _cfg("fbs").gating) == pytest.approx(2.0)
    assert get_gating_mode("dense").nominal_reduction is None


def test_every_gated_layer_implements_the_interface():
    for mode in ALL[1:]:
        net = build_backbone(_cfg(mode))
        for _, m in gated_layers(net):
            assert isinstance(m, GatedLayer) and m.is_gated
            assert 0.0 <= m.base_fraction < 1.0
            assert m.gate_macs(100) >= 0.0
            assert m.pop_aux_loss().shape == ()
            m.set_progress(0.5)
    cdg = GatedConv2d(8, 8, gate_groups=4, group_size=2)
    assert cdg.base_fraction == 0.25 and cdg.gate_macs(64) == 4 * 64 / 2 + 64
    assert not GatedConv2d(8, 8, gate_groups=1).is_gated
    fbs = FBSConv2d(8, 16)
    assert fbs.base_fraction == 0.0 and fbs.gate_macs(999) == fbs.predictor_macs() == 8 * 16


def test_mac_report_follows_each_layers_cost():
    """The exact reduction is the layers' own formula: F (b + (1 - b)(1 - eta)) + gate_macs per gated layer."""
    for mode in ("dual", "fbs", "dgc"):
        cfg = _cfg(mode)
        rep = mac_report(cfg)
        layers = dict(gated_layers(build_backbone(cfg)))
        expected = rep.total_dense
        for l in rep.layers:
            if l.gated:
                m = layers[l.name]
                b = m.base_fraction
                expected += l.macs * (b + (1 - b) * 0.6) + m.gate_macs(l.out_elements) - l.macs
        assert rep.gated_macs(0.4) == pytest.approx(expected)


class _HalfConv(GatedLayer):
    """A toy gated layer for the test below: computes the conv and zeroes a random half of the
    output channels per sample (not a method anyone should use)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, keep: float = 0.5) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.keep = keep
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, 3, 3) * 0.1)

    def forward(self, x: Tensor, branch: int = 0) -> Tensor:
        y = torch.nn.functional.conv2d(x, self.weight, None, self.stride, 1)
        mask = (torch.rand(y.shape[0], y.shape[1], 1, 1) < self.keep).to(y.dtype)
        with torch.no_grad():
            self.gate_counts[0 if self.training else 1, branch] += torch.tensor(
                [float((1 - mask).sum()) * y.shape[2] * y.shape[3], float(y[:, :, :, :].numel())], dtype=torch.float64)
        return y * mask


def test_a_new_mode_is_one_registration():
    """Registering a mode makes config, builder, protocol label, statistics and FLOPs work for it."""
    spec = register_gating_mode(GatingMode(
        "half", _HalfConv, kwargs=lambda g: {"keep": 1.0 - 0.5}, label=lambda g: "half-random",
        nominal_reduction=lambda eta, g: 1.0 / (1.0 - eta), nominal_name="1/(1-eta)"))
    try:
        cfg = _cfg("half")
        net = build_backbone(cfg).eval()
        assert isinstance(net.layer1[0].conv1, _HalfConv) and len(gated_layers(net)) == 16
        assert base_protocol(cfg)["gating"] == "half-random"
        with torch.no_grad():
            net(torch.randn(4, 3, 32, 32))
        stats = gate_statistics(net, "eval")
        assert 0.2 < stats["eta"] < 0.8
        assert 1.0 < mac_report(cfg).reduction_exact(stats["eta_per_layer"]) < spec.nominal_reduction(stats["eta"], cfg.gating) + 1
        assert pop_aux_losses(net) == 0.0
        set_pruning_progress(net, 0.3)  # a layer without a schedule ignores it
    finally:
        del GATING_MODES["half"]
    with pytest.raises(ValueError, match="already registered"):
        register_gating_mode(get_gating_mode("dual"))
