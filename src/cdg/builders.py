"""Build the pieces a config describes: the backbone with its gating and the gating target."""

from __future__ import annotations

from typing import Any

from torch import nn

from cdg.config import Config, ConfigError
from cdg.models import create_model
from cdg.nn import make_conv_layer, threshold_from_sparsity


def conv_layer_for(cfg: Config):
    """The 3x3 conv factory of ``cfg.gating`` (dense, dual, shared_base or unified)."""
    g = cfg.gating
    if g.mode == "dense":
        return make_conv_layer("dense")
    if g.mode == "fbs":
        return make_conv_layer("fbs", keep_ratio=g.keep_ratio if g.keep_ratio is not None else 0.5,
                               l1=g.predictor_loss if g.predictor_loss is not None else 1e-8,
                               scale_free=g.scale_free_saliency)
    if g.mode == "dgc":
        return make_conv_layer("dgc", heads=g.groups, keep_ratio=g.keep_ratio if g.keep_ratio is not None else 0.45,
                               squeeze=g.squeeze, loss_coef=g.predictor_loss if g.predictor_loss is not None else 1e-5,
                               scale_free=g.scale_free_saliency)
    return make_conv_layer(
        g.mode, gate_groups=g.groups, overlap=g.overlap if g.mode == "dual" else 0,
        group_size=g.group_size, norm=g.norm, surrogate=g.surrogate, alpha=g.alpha, tau_init=g.tau_init,
        compile_gate=g.compile_gate, base_conv=g.base_conv, gate_kernel=g.gate_kernel,
    )


def build_backbone(cfg: Config) -> nn.Module:
    """ResNet backbone of ``cfg.model`` with the 3x3 convolutions of ``cfg.gating``.

    A layer that cannot be built at these settings (e.g. channels an FBS/DGC layer cannot split)
    raises ConfigError naming the model and gating settings."""
    m, g = cfg.model, cfg.gating
    try:
        return create_model(
            m.name, width=m.width, stem=m.stem, zero_init_residual=m.zero_init_residual, conv_layer=conv_layer_for(cfg)
        )
    except ValueError as e:
        raise ConfigError(f"model.name={m.name} model.width={m.width:g} with gating.mode={g.mode} "
                          f"gating.groups={g.groups} gating.group_size={g.group_size} cannot be built: {e}") from None


def dataset_kwargs(cfg: Config) -> dict[str, Any]:
    """The dataset options of ``cfg.data`` for :func:`cdg.data.build_dataset` (CIFAR-100's label type)."""
    return {"label_type": cfg.data.label_type} if cfg.data.dataset == "cifar100" else {}


def gating_target(cfg: Config) -> float:
    """The threshold target s of Eq. 11: ``gating.target``, or Phi^-1(``gating.target_sparsity``)."""
    g = cfg.gating
    return threshold_from_sparsity(g.target_sparsity) if g.target_sparsity is not None else g.target
