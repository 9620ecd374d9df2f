"""Gating modes in one registry: one entry per mode holds everything the rest of cdg needs.

An entry (:class:`GatingMode`) gives the 3x3 layer class, the adapter from the ``gating`` config
section to the layer's keyword arguments, the mode's defaults, the label every reported number
carries, and the nominal FLOPs reduction for a conditional-path sparsity eta. Adding a mode means
adding one :func:`register_gating_mode` call here (timm's layer factories work the same way).

=============  ===========================  ===========================================================
mode           layer                        what it is (docs/design.md)
=============  ===========================  ===========================================================
``dense``      :class:`Conv3x3`             no gating
``dual``       :class:`GatedConv2d`         CDG: own mask and disjoint base path per branch (§1)
``shared_base`` :class:`GatedConv2d`        CGNet_SimCLR: masks per branch, shared diagonal base path
``unified``    :class:`GatedConv2d`         Table 1 control: branch a2 reuses branch a1's mask
``fbs``        :class:`FBSConv2d`           FBS output-channel pruning baseline (§5)
``dgc``        :class:`DGCConv2d`           DGC input-channel pruning baseline (§5)
=============  ===========================  ===========================================================

The adapters read a config section by attribute (``cdg.config.GatingConfig`` or any object with
the same fields); this module does not import the config.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from torch import nn

from cdg.nn.dgc import DGCConv2d
from cdg.nn.fbs import FBSConv2d
from cdg.nn.gated import Conv3x3
from cdg.nn.gated_conv import GatedConv2d


def flops_reduction_eq13(eta: float, gate_groups: int) -> float:
    """Eq. 13: D = 1 / (1/G + (1 - eta)(1 - 1/G))."""
    g = gate_groups
    return 1.0 / (1.0 / g + (1.0 - eta) * (1.0 - 1.0 / g))


def _layer_default(layer: type, arg: str) -> Any:
    """The default of ``layer``'s constructor argument ``arg``: the layer owns its defaults."""
    return inspect.signature(layer).parameters[arg].default


def _pruning_reduction(eta: float, gating: Any) -> float:
    """FBS / DGC have no base path: 1 / (1 - eta), predictors excluded (docs/design.md §5)."""
    return 1.0 / (1.0 - eta) if eta < 1 else float("inf")


@dataclass(frozen=True)
class GatingMode:
    """One gating mode.

    Attributes:
        name: the value of ``gating.mode``.
        layer: the 3x3 convolution class built for every block convolution.
        kwargs: ``gating`` section -> keyword arguments of ``layer`` (besides in, out, stride).
        label: ``gating`` section -> the short description each reported number carries.
        defaults: values of optional settings (``keep_ratio``, ``predictor_loss``) when unset.
        nominal_reduction: (eta, gating) -> the nominal FLOPs reduction (Eq. 13 for CDG); None
            for a mode that skips nothing.
        nominal_name: how that reduction is named in reports.
        uses_groups: whether stage channels must be divisible by G x C_g (the base-path modes).
        has_threshold: Eq. 11's regulariser applies (learned thresholds tau).
        has_predictor_loss: the layers add a predictor loss to training (FBS/DGC).
        eta_below_one: eta = 1 is impossible (a mode that always keeps some channels).
    """

    name: str
    layer: Callable[..., nn.Module]
    kwargs: Callable[[Any], dict[str, Any]]
    label: Callable[[Any], str]
    defaults: dict[str, float] = field(default_factory=dict)
    nominal_reduction: Callable[[float, Any], float] | None = None
    nominal_name: str = ""
    uses_groups: bool = False
    has_threshold: bool = False
    has_predictor_loss: bool = False
    eta_below_one: bool = False

    def setting(self, gating: Any, key: str) -> Any:
        """``gating.<key>``, or this mode's default when it is unset (None)."""
        value = getattr(gating, key, None)
        return self.defaults.get(key) if value is None else value

    def conv_layer(self, gating: Any) -> Callable[..., nn.Module]:
        """The factory ``conv_layer(in, out, stride)`` a backbone takes."""
        kw = self.kwargs(gating)
        return partial(self.layer, **kw) if kw else self.layer

    @property
    def gated(self) -> bool:
        return self.nominal_reduction is not None


GATING_MODES: dict[str, GatingMode] = {}


def register_gating_mode(mode: GatingMode) -> GatingMode:
    if mode.name in GATING_MODES:
        raise ValueError(f"gating mode {mode.name!r} is already registered")
    GATING_MODES[mode.name] = mode
    return mode


def get_gating_mode(name: str) -> GatingMode:
    """The registry entry of ``name``; ValueError listing the valid modes otherwise."""
    if name not in GATING_MODES:
        raise ValueError(f"unknown gating mode {name!r}; valid: {', '.join(GATING_MODES)}")
    return GATING_MODES[name]


def make_conv_layer(mode: str = "dense", **options: Any) -> Callable[..., nn.Module]:
    """The 3x3 conv factory of ``mode`` with the layer's own keyword ``options``, to pass as
    ``conv_layer`` to a backbone, e.g. ``make_conv_layer("dual", gate_groups=4)``."""
    spec = get_gating_mode(mode)
    if spec.layer is GatedConv2d:
        options = {"mode": mode, **options}
    return partial(spec.layer, **options) if options else spec.layer


# --- the modes -------------------------------------------------------------------------------

def _cdg_kwargs(g: Any) -> dict[str, Any]:
    return dict(mode=g.mode, gate_groups=g.groups, overlap=g.overlap if g.mode == "dual" else 0,
                group_size=g.group_size, norm=g.norm, surrogate=g.surrogate, alpha=g.alpha, tau_init=g.tau_init,
                compile_gate=g.compile_gate, base_conv=g.base_conv, gate_kernel=g.gate_kernel)


def _cdg_label(g: Any) -> str:
    s = g.target if g.target_sparsity is None else f"Phi^-1({g.target_sparsity})"
    return f"{g.mode} G={g.groups} C_g={g.group_size} overlap={g.overlap}% s={s}"


register_gating_mode(GatingMode("dense", Conv3x3, kwargs=lambda g: {}, label=lambda g: "dense"))
for _name in ("dual", "shared_base", "unified"):
    register_gating_mode(GatingMode(
        _name, GatedConv2d, kwargs=_cdg_kwargs, label=_cdg_label,
        nominal_reduction=lambda eta, g: flops_reduction_eq13(eta, g.groups), nominal_name="Eq. 13",
        uses_groups=True, has_threshold=True))

_FBS = register_gating_mode(GatingMode(
    "fbs", FBSConv2d,
    kwargs=lambda g: dict(keep_ratio=_FBS.setting(g, "keep_ratio"), l1=_FBS.setting(g, "predictor_loss"),
                          scale_free=g.scale_free_saliency,
                          form=_FBS.setting(g, "baseline_form")),
    label=lambda g: (f"fbs keep={_FBS.setting(g, 'keep_ratio')} "
                     f"form={_FBS.setting(g, 'baseline_form')}"),
    defaults={"keep_ratio": _layer_default(FBSConv2d, "keep_ratio"), "predictor_loss": _layer_default(FBSConv2d, "l1"),
              "baseline_form": _layer_default(FBSConv2d, "form")},
    nominal_reduction=_pruning_reduction, nominal_name="nominal 1/(1-eta)", has_predictor_loss=True,
    eta_below_one=True))
_DGC = register_gating_mode(GatingMode(
    "dgc", DGCConv2d,
    kwargs=lambda g: dict(heads=g.groups, keep_ratio=_DGC.setting(g, "keep_ratio"), squeeze=g.squeeze,
                          loss_coef=_DGC.setting(g, "predictor_loss"), scale_free=g.scale_free_saliency,
                          form=_DGC.setting(g, "baseline_form")),
    label=lambda g: (f"dgc heads={g.groups} keep={_DGC.setting(g, 'keep_ratio')} "
                     f"form={_DGC.setting(g, 'baseline_form')}"),
    defaults={"keep_ratio": _layer_default(DGCConv2d, "keep_ratio"),
              "predictor_loss": _layer_default(DGCConv2d, "loss_coef"), "baseline_form": _layer_default(DGCConv2d, "form")},
    nominal_reduction=_pruning_reduction, nominal_name="nominal 1/(1-eta)", has_predictor_loss=True,
    eta_below_one=True))
