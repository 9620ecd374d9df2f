"""Build the pieces a config describes: the backbone with its gating and the gating target."""

from __future__ import annotations

from typing import Any

from torch import nn

from cdg.config import Config, ConfigError
from cdg.models import create_model
from cdg.nn import get_gating_mode, threshold_from_sparsity


def conv_layer_for(cfg: Config):
    """The 3x3 conv factory of ``cfg.gating`` (its mode's entry in :data:`cdg.nn.GATING_MODES`)."""
    return get_gating_mode(cfg.gating.mode).conv_layer(cfg.gating)


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


def build_eval_datasets(cfg: Config):
    """The (train, test) splits of ``cfg.data`` that evaluation reads (checked to share classes)."""
    from cdg.data import build_train_test

    return build_train_test(cfg.data.dataset, cfg.data.root, cfg.data.download, **dataset_kwargs(cfg))


def gating_target(cfg: Config) -> float:
    """The threshold target s of Eq. 11: ``gating.target``, or Phi^-1(``gating.target_sparsity``)."""
    g = cfg.gating
    return threshold_from_sparsity(g.target_sparsity) if g.target_sparsity is not None else g.target
