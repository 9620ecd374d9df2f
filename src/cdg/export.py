"""Portable backbones: a self-describing ``backbone.pt`` and an export to torchvision's ResNet.

**The run's ``backbone.pt``** (written by :func:`save_backbone`, read by :func:`read_backbone_file`)
is a dict that ``torch.load(..., weights_only=True)`` reads::

    {"format": "cdg.backbone", "version": 1,
     "model": {...cfg.model...}, "gating": {...cfg.gating...}, "num_features": int,
     "state_dict": backbone.state_dict()}

:func:`load_backbone` rebuilds the backbone from that file alone (no ``config.yaml``), gates
included. Files from before this format (a bare state dict) still load through
:func:`cdg.runs.load_run`, which takes the architecture from the run's ``config.yaml``.

**The torchvision export** (:func:`torchvision_state_dict`, :func:`export_torchvision`) is the
dense part of the backbone in torchvision's ResNet naming (``shortcut`` -> ``downsample``), a
plain state dict that ``torchvision.models.resnet18/50`` takes with ``strict=True`` once its stem
and head are set as :func:`torchvision_resnet` does. What is and is not portable:

* portable: the stem, every convolution's weight (a gated 3x3 layer's ``weight`` is its full dense
  convolution W), every BatchNorm's affine parameters and running statistics;
* not portable: everything that only gates (CDG's ``tau`` and ``branch_norms``; FBS's ``predictor``,
  ``norm`` and ``beta``; DGC's ``fc1_weight``/``fc2_weight``/``fc2_bias``), which torchvision has no
  place for. For CDG (``dual``/``shared_base``/``unified``) the exported network is exactly the gated
  one with every gate open (Eq. 3 with M = 1: Y = conv(X, W)); for FBS and DGC it is not the trained
  function even with every channel kept (FBS scales and normalises each output channel, DGC scales
  each input channel). The sidecar ``FILE.json`` says which case a file is;
* only ``model.width=1.0`` fits torchvision's ResNet (fixed stages of 64-128-256-512 channels, no
  width multiplier). Other widths are exported with the same naming but cannot be loaded into
  :func:`torchvision_resnet`, which raises a ValueError naming the width;
* the CIFAR stem (3x3 conv, stride 1, no max-pool) is not torchvision's default: replace ``conv1``
  and ``maxpool`` as :func:`torchvision_resnet` does (the sidecar gives the lines). ``fc`` is
  ``nn.Identity()`` because the backbone ends at the pooled features; load with ``strict=False``
  into a model that keeps its ``fc`` to train a new classifier on top.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from cdg.builders import build_backbone
from cdg.config import RESUMABLE_KEYS, Config, ConfigError, GatingConfig, ModelConfig, config_from_dict
from cdg.fileio import RunFileError, atomic_torch_save, atomic_write_text, file_digest, load_torch_file
from cdg.models.resnet import BasicBlock, Bottleneck, ResNet
from cdg.nn import get_gating_mode

FORMAT = "cdg.backbone"
VERSION = 1
TORCHVISION_ARCHS = ("resnet18", "resnet50")
STEMS = ("cifar", "imagenet")


# --------------------------------------------------------------------------- the run's backbone.pt


def save_backbone(path: str | Path, cfg: Config, backbone: nn.Module, dtype: torch.dtype | None = None) -> Path:
    """Write ``backbone`` with the ``model`` and ``gating`` settings that build it, atomically.

    The file is the self-describing format of the module docstring; :func:`load_backbone` needs
    nothing else to rebuild the backbone. ``dtype`` (e.g. ``torch.float16``, for archived result
    rows) stores the floating-point tensors in that type; loading casts them back to the module's."""
    state = backbone.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "model": dataclasses.asdict(cfg.model),
        "gating": dataclasses.asdict(cfg.gating),
        "num_features": int(getattr(backbone, "num_features")),
        "state_dict": state,
    }
    return atomic_torch_save(obj, path)


def read_backbone_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """The state dict of a backbone file and its metadata (``None`` for an old bare state dict).

    The metadata is the file's dict without ``state_dict`` (format, version, model, gating,
    num_features). A missing, truncated or foreign file, or one written by a newer format
    version, raises :class:`cdg.fileio.RunFileError` naming the file."""
    path = Path(path)
    obj = load_torch_file(path, "backbone weights")
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        version = obj.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise RunFileError(f"backbone weights {path} have format version {version!r}; this cdg reads "
                               f"versions up to {VERSION}: upgrade cdg")
        state = obj.get("state_dict")
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise RunFileError(f"backbone weights {path} hold no valid 'state_dict' (a mapping of tensors)")
        missing = [k for k in ("model", "gating") if not isinstance(obj.get(k), Mapping)]
        if missing:
            raise RunFileError(f"backbone weights {path} lack the {' and '.join(missing)} settings of the format")
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        return dict(state), meta
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return dict(obj), None  # a backbone.pt from before the format: a bare state dict
    found = type(obj).__name__
    if isinstance(obj, Mapping):
        found += " with keys " + ", ".join(map(str, list(obj)[:6]))
    raise RunFileError(f"backbone weights {path} are neither a {FORMAT} file nor a state dict (found {found})")


def settings_mismatch(meta: Mapping[str, Any], cfg: Config) -> list[str]:
    """The ``model``/``gating`` settings on which a backbone file's metadata and ``cfg`` differ,
    as ``"section.key: file X, config Y"``.

    Keys a resume may change because they compute the same values (:data:`cdg.config.RESUMABLE_KEYS`,
    e.g. ``gating.gate_kernel``) are not compared; a key the file lacks (it predates the key)
    counts as its default."""
    diffs = []
    for section, cls in (("model", ModelConfig), ("gating", GatingConfig)):
        stored = dict(meta.get(section) or {})
        current = dataclasses.asdict(getattr(cfg, section))
        default = dataclasses.asdict(cls())
        for key in sorted(set(stored) | set(current)):
            name = f"{section}.{key}"
            if name in RESUMABLE_KEYS:
                continue
            if key not in current:
                diffs.append(f"{name}: file {stored[key]!r}, unknown to this cdg")
                continue
            have = stored.get(key, default[key])
            if have != current[key]:
                diffs.append(f"{name}: file {have!r}, config {current[key]!r}")
    return diffs


def load_backbone(path: str | Path) -> nn.Module:
    """The backbone a :func:`save_backbone` file describes, built from the file alone and loaded
    strictly (gating layers included), in training mode as built; call ``.eval()`` for features.

    An old bare state dict cannot be rebuilt without its run: load it with
    :func:`cdg.runs.load_run` on the run directory."""
    return _load_backbone(Path(path))[1]


def _load_backbone(path: Path) -> tuple[Config, nn.Module]:
    """:func:`load_backbone`, also returning the config (defaults but for ``model``/``gating``)."""
    state, meta = read_backbone_file(path)
    if meta is None:
        raise RunFileError(f"backbone weights {path} are a bare state dict (saved before the {FORMAT} format): "
                           "they need the run's config.yaml; load them with cdg.runs.load_run(<run directory>)")
    try:
        cfg = config_from_dict({"model": dict(meta["model"]), "gating": dict(meta["gating"])})
        backbone = build_backbone(cfg)
    except ConfigError as e:
        raise RunFileError(f"backbone weights {path}: the stored settings cannot be built here: {e}") from None
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RunFileError(f"backbone weights {path} do not match their own model/gating settings: "
                           f"{str(e).splitlines()[0]}") from None
    want = meta.get("num_features")
    if want is not None and want != getattr(backbone, "num_features", want):
        raise RunFileError(f"backbone weights {path} say num_features={want}, the rebuilt backbone has "
                           f"{backbone.num_features}")
    return cfg, backbone


# --------------------------------------------------------------------------- torchvision


def _dense_conv_weight(conv: nn.Module, where: str) -> Tensor:
    """The full dense 3x3/1x1 kernel of a block convolution: a plain conv's weight, or a gated
    layer's ``weight`` (the dense convolution W it gates)."""
    if isinstance(conv, nn.Conv2d):
        if conv.bias is not None or conv.groups != 1 or conv.dilation != (1, 1):
            raise ValueError(f"{where}: torchvision's ResNet has no conv with bias/groups/dilation ({conv})")
        return conv.weight.detach()
    w = getattr(conv, "weight", None)
    if not isinstance(w, Tensor) or w.ndim != 4:
        raise ValueError(f"{where}: {type(conv).__name__} has no 4-D dense 'weight' to export")
    return w.detach()


def _bn_state(bn: nn.Module, prefix: str, conv: nn.Module | None = None) -> dict[str, Tensor]:
    if isinstance(bn, nn.Identity) and getattr(conv, "owns_norm", False):
        # official FBS normalises inside the layer (BN without affine; the gate scales and shifts):
        # torchvision's block gets that BN's statistics with weight 1 and bias 0
        norm = conv.norm
        return {f"{prefix}.weight": torch.ones_like(norm.running_mean), f"{prefix}.bias": torch.zeros_like(norm.running_mean),
                **{f"{prefix}.{k}": v for k, v in norm.state_dict().items()}}
    if not isinstance(bn, nn.BatchNorm2d) or not bn.affine or not bn.track_running_stats:
        raise ValueError(f"{prefix}: expected an affine BatchNorm2d with running statistics, got {bn}")
    return {f"{prefix}.{k}": v for k, v in bn.state_dict().items()}


def torchvision_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """The dense part of a cdg ResNet backbone in torchvision's ResNet naming.

    ``conv1``/``bn1`` of the stem and of every block keep their names, ``shortcut.0/1`` becomes
    ``downsample.0/1``, a gated 3x3 layer contributes its dense ``weight`` only, and every other
    tensor of a gated layer (tau, branch_norms, predictor, norm, beta, fc1/fc2, ...) is dropped.
    BatchNorm buffers (running_mean, running_var, num_batches_tracked) are kept. Works at any width;
    only width 1.0 loads into :func:`torchvision_resnet`."""
    if not isinstance(backbone, ResNet):
        raise TypeError(f"torchvision_state_dict expects a cdg.models.resnet.ResNet backbone, got {type(backbone).__name__}")
    out: dict[str, Tensor] = {"conv1.weight": _dense_conv_weight(backbone.conv1, "conv1")}
    out.update(_bn_state(backbone.bn1, "bn1"))
    for s in range(1, 5):
        for j, blk in enumerate(getattr(backbone, f"layer{s}")):
            pre = f"layer{s}.{j}"
            n = 3 if isinstance(blk, Bottleneck) else 2 if isinstance(blk, BasicBlock) else None
            if n is None:
                raise TypeError(f"{pre}: unknown block type {type(blk).__name__}")
            for k in range(1, n + 1):
                out[f"{pre}.conv{k}.weight"] = _dense_conv_weight(getattr(blk, f"conv{k}"), f"{pre}.conv{k}")
                out.update(_bn_state(getattr(blk, f"bn{k}"), f"{pre}.bn{k}", getattr(blk, f"conv{k}")))
            sc = blk.shortcut
            if isinstance(sc, nn.Sequential):
                out[f"{pre}.downsample.0.weight"] = _dense_conv_weight(sc[0], f"{pre}.shortcut.0")
                out.update(_bn_state(sc[1], f"{pre}.downsample.1"))
            elif not isinstance(sc, nn.Identity):
                raise TypeError(f"{pre}.shortcut: expected Identity or Sequential(conv, bn), got {type(sc).__name__}")
    return out


def dropped_keys(backbone: nn.Module) -> list[str]:
    """The backbone's state-dict keys with no place in torchvision's ResNet (the gating-only tensors)."""
    kept = {k.replace(".downsample.", ".shortcut.") for k in torchvision_state_dict(backbone)}
    # official FBS: the block's bn is the layer's own norm (exported under bnK with weight 1, bias 0)
    owned = {f"{n}.norm.{b}" for n, m in backbone.named_modules() if getattr(m, "owns_norm", False)
             for b in ("running_mean", "running_var", "num_batches_tracked")}
    return [k for k in backbone.state_dict() if k not in kept and k not in owned]


def torchvision_resnet(name: str, stem: str, width: float = 1.0) -> nn.Module:
    """``torchvision.models.resnet18/50(weights=None)`` shaped like a cdg backbone, for
    ``load_state_dict(torchvision_state_dict(b), strict=True)``: for the ``cifar`` stem
    ``conv1 = Conv2d(3, 64, 3, 1, 1, bias=False)`` and ``maxpool = Identity()``; always
    ``fc = Identity()`` (the backbone returns the pooled features).

    ``width`` is the backbone's ``model.width``: torchvision's ResNet has no width multiplier, so
    anything but 1.0 raises a ValueError."""
    import torchvision

    if name not in TORCHVISION_ARCHS:
        raise ValueError(f"unknown model {name!r} for torchvision; valid: {', '.join(TORCHVISION_ARCHS)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; valid: {', '.join(STEMS)}")
    if float(width) != 1.0:
        raise ValueError(f"model.width={width:g} cannot be loaded into torchvision's {name}: its stages are fixed at "
                         "64-128-256-512 channels (no width multiplier); only model.width=1.0 can. The exported "
                         "state dict uses torchvision's naming, for a ResNet built with the scaled channels")
    model = getattr(torchvision.models, name)(weights=None)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


def _load_instructions(name: str, stem: str, file_name: str, loadable: bool) -> list[str]:
    lines = ["import torch, torchvision", "from torch import nn",
             f"model = torchvision.models.{name}(weights=None)"]
    if stem == "cifar":
        lines += ["model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # CIFAR stem: 3x3 conv, stride 1",
                  "model.maxpool = nn.Identity()  # CIFAR stem: no max-pool"]
    lines += ["model.fc = nn.Identity()  # the backbone ends at the pooled features; or keep fc and load with strict=False",
              f"model.load_state_dict(torch.load({file_name!r}, weights_only=True), strict=True)",
              "model.eval()"]
    if not loadable:
        lines.insert(0, "# model.width != 1.0: stock torchvision cannot hold these weights (see 'note');"
                        " build a ResNet with the scaled channels and the same key names")
    return lines


def export_torchvision(run_dir: str | Path, out_file: str | Path) -> dict[str, Any]:
    """Write a run's backbone as a plain torchvision state dict to ``out_file`` and its
    description to ``out_file`` + ``.json``; returns that description.

    ``run_dir`` is a run directory (read by :func:`cdg.runs.load_run`: ``backbone.pt``, else the
    last checkpoint) or a :func:`save_backbone` file. ``out_file`` holds only tensors, so
    ``model.load_state_dict(torch.load(out_file, weights_only=True))`` takes it directly (model from
    :func:`torchvision_resnet`); the sidecar records arch, stem, width, whether gating was dropped and
    the lines that build the matching torchvision model."""
    src = Path(run_dir)
    if src.is_file():
        cfg, backbone = _load_backbone(src)
        source_file = src
    else:
        from cdg.runs import load_run

        cfg, backbone = load_run(src)
        source_file = src / "backbone.pt" if (src / "backbone.pt").is_file() else src / "checkpoints" / "last.ckpt"
    m, g = cfg.model, cfg.gating
    state = torchvision_state_dict(backbone)
    dropped = dropped_keys(backbone)
    loadable = m.name in TORCHVISION_ARCHS and float(m.width) == 1.0
    out_file = Path(out_file)
    atomic_torch_save(state, out_file)
    if g.mode == "dense":
        note = "dense backbone: the torchvision model computes the same features"
    elif get_gating_mode(g.mode).has_threshold:  # CDG's layers: Y = Y_base + M * Y_cond
        note = ("gated backbone (CDG): the gates are dropped; the torchvision model is the backbone with every "
                "gate open (Eq. 3 with M = 1), not the sparse network it computes with gates")
    else:
        note = (f"gated backbone ({g.mode}): the gating layers are dropped with everything they apply besides the "
                "convolution (FBS normalises and scales each output channel, DGC scales each input channel); the "
                "torchvision model is the plain dense network of the convolution weights W, not the function the "
                "backbone computes even with every channel kept")
    if not loadable:
        note += (f"; model.width={m.width:g}: torchvision's {m.name} has fixed 64-128-256-512 stages, so this state "
                 "dict (torchvision naming) fits only a ResNet built with the scaled channels")
    sidecar = out_file.with_name(out_file.name + ".json")
    info: dict[str, Any] = {
        "format": "torchvision",
        "weights": str(out_file),
        "sidecar": str(sidecar),
        "arch": m.name,
        "stem": m.stem,
        "width": m.width,
        "num_features": int(backbone.num_features),
        "torchvision_loadable": loadable,
        "gating": g.mode,
        "gating_dropped": bool(dropped),
        "dropped_tensors": len(dropped),
        "dropped_kinds": sorted({_kind(k) for k in dropped}),
        "tensors": len(state),
        "source": str(source_file),
        "source_blake2b": file_digest(source_file) if source_file.is_file() else None,
        "note": note,
        "load": _load_instructions(m.name, m.stem, out_file.name, loadable),
    }
    atomic_write_text(sidecar, json.dumps(info, indent=2) + "\n")
    return info


def _kind(key: str) -> str:
    """``layer1.0.conv1.branch_norms.0.running_mean`` -> ``branch_norms``: the gating tensor's name."""
    found = re.search(r"\.conv\d\.([^.]+)", key)
    return found.group(1) if found else key
