"""The inference form of a trained CDG backbone: eval mode, branch a1, BatchNorm folded, sparse
conditional path (docs/design.md §1, §4; :mod:`cdg.sparse.kernel`).

:func:`export_inference` turns a :class:`cdg.models.resnet.ResNet` (or a run directory) into a
:class:`SparseResNet` that computes the same features as ``backbone.eval()`` on branch a1:

* the stem, the 1x1 shortcuts (and ResNet-50's 1x1 convolutions) and every dense 3x3 convolution are
  folded with the BatchNorm after them (``W' = a W``, bias ``b``; ``a = gamma / sqrt(var + eps)``,
  ``b = beta - a mean``): exact;
* a gated convolution (:class:`SparseGatedConv`) computes the base path Y_base (Eq. 1, the
  diagonal blocks of W, unscaled: the gate reads it), the mask M = [S > mu + tau std] (Eq. 2, 12),
  and Y = Y_base + M * conv(X, W - W_b) (Eq. 3) only at the open entries. The BatchNorm after it is
  a per-channel affine map of Y, so it is applied after Eq. 3, in the kernel's epilogue, together
  with the block's shortcut and ReLU: ``relu(a * Y + b + shortcut)``. (Folding ``a`` into W would
  scale Y_base too, and the gate's ``eps`` inside ``sqrt(var + eps)`` would then change the mask;
  a negative ``a`` would also flip the comparison.) With C_g a multiple of 8 the kernel computes
  whole open entries as GEMM register blocks (``cond_blocks``, the block order). Unstructured layers
  with at least :data:`DENSE_COND_MIN_CIN` input channels compute conv(X, W - W_b) densely (oneDNN)
  and only Eq. 3 + the epilogue in C++, where that is faster;
* channels-last float32 throughout.

``dense=True`` gives the same network with every gated convolution replaced by its dense W
(BatchNorm folded): the dense backbone of the same architecture, for speed comparisons
(:mod:`cdg.sparse.speed`). :func:`save_inference` / :func:`load_inference` write and read a
self-describing file that ``torch.load(weights_only=True)`` reads (``cdg export --format sparse``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdg.sparse import kernel as K

FORMAT = "cdg.sparse"
VERSION = 1
KERNELS = ("auto", "cpp", "torch")
#: unstructured gated layers (C_g not a multiple of 8) with at least this many input channels
#: compute the conditional path densely (oneDNN) and only Eq. 3 + the epilogue in C++: there a W_c
#: row (9 x C_in floats) and the patches
#: no longer fit the caches of the sparse kernel's loops, which then lose to the dense convolution
#: (ResNet-18 width 1, layer4: 2.3x the dense conv at 42% density, AMD EPYC AVX2, README
#: "Speed"). Same values.
DENSE_COND_MIN_CIN = 512


# ----------------------------------------------------------------------------- folding helpers


def bn_affine(bn: nn.Module, where: str) -> tuple[Tensor, Tensor]:
    """(a, b) with ``bn(y) = a * y + b`` per channel in eval mode."""
    if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats or bn.running_var is None:
        raise ValueError(f"{where}: expected a BatchNorm2d with running statistics, got {bn}")
    a = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        a = a * bn.weight.detach().double()
    b = -a * bn.running_mean.double()
    if bn.affine:
        b = b + bn.bias.detach().double()
    return a, b


def _fold(weight: Tensor, bn: nn.Module, where: str) -> tuple[Tensor, Tensor]:
    a, b = bn_affine(bn, where)
    w = (weight.detach().double() * a.view(-1, 1, 1, 1)).float()
    return w.contiguous(memory_format=torch.channels_last), b.float()


# ----------------------------------------------------------------------------- modules


class FoldedConv(nn.Module):
    """A convolution with its BatchNorm folded in: ``relu?(conv(x, W') + b' [+ residual])`` (oneDNN)."""

    def __init__(self, weight: Tensor, bias: Tensor, stride: int, padding: int, relu: bool) -> None:
        super().__init__()
        self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", bias.contiguous())
        self.stride, self.padding, self.relu = stride, padding, relu

    def spec(self) -> dict[str, Any]:
        return {"type": "dense", "out_channels": self.weight.shape[0], "in_channels": self.weight.shape[1],
                "kernel": self.weight.shape[2], "stride": self.stride, "padding": self.padding, "relu": self.relu}

    @classmethod
    def from_spec(cls, s: Mapping[str, Any]) -> "FoldedConv":
        w = torch.zeros(s["out_channels"], s["in_channels"], s["kernel"], s["kernel"])
        return cls(w, torch.zeros(s["out_channels"]), s["stride"], s["padding"], s["relu"])

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        if residual is not None:
            y = y.add_(residual)
        return torch.relu_(y) if self.relu else y

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel={k}, stride={self.stride}, relu={self.relu} (BN folded)"


class SparseGatedConv(nn.Module):
    """A GatedConv2d on branch a1 followed by its BatchNorm (and the block's shortcut and ReLU), with
    the conditional path computed only at the open entries (:mod:`cdg.sparse.kernel`).

    ``forward(x, residual)`` returns ``relu?(a * (Y_base + M * conv(X, W_c)) + b + residual)``.

    Attributes:
        kernel: ``auto`` (the C++ kernel, PyTorch with a warning where it cannot be built), ``cpp``
            (the kernel or an error) or ``torch`` (the PyTorch forms: same values, no speed-up).
        keep_mask: keep the latest mask (N x C/C_g x H x W, uint8) in ``last_mask``.
        track: count open entries (``opened``/``entries``, for eta).
        profile: accumulate the seconds of each step in ``times`` (base, gate, cond).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, group_size: int,
                 relu: bool, norm: str = "instance", kernel: str = "auto") -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
        if norm not in ("instance", "batch"):
            raise ValueError(f"unknown gate norm {norm!r}; valid: instance, batch")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.groups, self.group_size, self.relu, self.norm, self.kernel = groups, group_size, relu, norm, kernel
        # the block order (C_g a multiple of 8) stays faster than the dense conditional path at 512
        self.dense_cond = in_channels >= DENSE_COND_MIN_CIN and group_size % 8 != 0
        co, ci, e = out_channels, in_channels, out_channels // group_size
        # persistent: W_b (grouped conv weight), W_c = W - W_b as (C_out, 9, C_in), tau, the BN affine
        self.register_buffer("weight_b", torch.zeros(co, ci // groups, 3, 3).contiguous(memory_format=torch.channels_last))
        self.register_buffer("weight_c", torch.zeros(co, 9, ci))
        self.register_buffer("tau", torch.zeros(e))
        self.register_buffer("scale", torch.ones(co))
        self.register_buffer("bias", torch.zeros(co))
        # norm="batch": the gate's BatchNorm (running statistics) makes the threshold a constant
        self.register_buffer("threshold", torch.zeros(e) if norm == "batch" else None)
        self._pack()
        self.keep_mask, self.track, self.profile = False, False, False
        self.last_mask: Tensor | None = None
        self.opened, self.entries = 0, 0
        self.times = {"base": 0.0, "gate": 0.0, "cond": 0.0}

    def _pack(self) -> None:
        """The kernel's base-path weights, derived from ``weight_b`` (not saved)."""
        co, g = self.out_channels, self.groups
        cig = self.in_channels // g
        w = torch.zeros(co, self.in_channels, 3, 3)
        for o in range(g):
            w[o * (co // g):(o + 1) * (co // g), o * cig:(o + 1) * cig] = self.weight_b[o * (co // g):(o + 1) * (co // g)]
        pack, meta = K.pack_base(w, g)
        self.register_buffer("base_pack", pack, persistent=False)
        self.register_buffer("base_meta", meta, persistent=False)
        # C_g a multiple of 8: W_c per 8-channel chunk for the kernel's block order
        blocks = K.pack_cond_blocks(self.weight_c) if self.group_size % 8 == 0 else None
        self.register_buffer("cond_blocks", blocks, persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self._pack()

    @property
    def conv_weight_c(self) -> Tensor:
        """W_c as a (C_out, C_in, 3, 3) channels-last conv weight (a view of ``weight_c``)."""
        return self.weight_c.view(self.out_channels, 3, 3, self.in_channels).permute(0, 3, 1, 2)

    def spec(self) -> dict[str, Any]:
        return {"type": "gated", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "stride": self.stride, "groups": self.groups, "group_size": self.group_size, "relu": self.relu,
                "norm": self.norm}

    @classmethod
    def from_spec(cls, s: Mapping[str, Any], kernel: str = "auto") -> "SparseGatedConv":
        return cls(s["in_channels"], s["out_channels"], s["stride"], s["groups"], s["group_size"], s["relu"],
                   s.get("norm", "instance"), kernel)

    def _ext(self):
        return None if self.kernel == "torch" else K.extension(required=self.kernel == "cpp")

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if x.dtype != torch.float32:
            raise TypeError(f"SparseGatedConv: float32 input expected, got {x.dtype}")
        x = x.contiguous(memory_format=torch.channels_last)
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)
        ext = self._ext()
        clock = time.perf_counter
        t0 = clock() if self.profile else 0.0
        y_base = K.base_conv(x, (self.base_pack, self.base_meta), self.weight_b, self.groups, self.stride, ext)
        t1 = clock() if self.profile else 0.0
        if self.threshold is not None:
            thr = self.threshold.expand(x.shape[0], -1).contiguous()
        else:
            thr = K.thresholds(y_base, self.tau, self.group_size, ext)
        t2 = clock() if self.profile else 0.0
        out, mask, n_open = K.cond(x, y_base, thr, self.weight_c, self.conv_weight_c, self.scale, self.bias,
                                   residual, self.relu, self.stride, self.group_size, self.groups, ext,
                                   want_mask=self.keep_mask, dense=self.dense_cond, blocks=self.cond_blocks)
        if self.profile:
            t3 = clock()
            self.times["base"] += t1 - t0
            self.times["gate"] += t2 - t1
            self.times["cond"] += t3 - t2
        if self.keep_mask:
            self.last_mask = mask
        if self.track:
            self.opened += n_open
            self.entries += out.numel()
        return out

    def reset_stats(self) -> None:
        self.opened, self.entries = 0, 0
        self.times = {"base": 0.0, "gate": 0.0, "cond": 0.0}

    @property
    def eta(self) -> float | None:
        """Fraction of (sample, position, channel) entries whose conditional path was skipped."""
        return None if self.entries == 0 else 1.0 - self.opened / self.entries

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, G={self.groups}, "
                f"C_g={self.group_size}, relu={self.relu}, norm={self.norm}, kernel={self.kernel}"
                + (", cond=dense" if self.dense_cond else ", cond=blocks" if self.cond_blocks is not None else ""))


def _layer(spec: Mapping[str, Any], kernel: str) -> nn.Module:
    return SparseGatedConv.from_spec(spec, kernel) if spec["type"] == "gated" else FoldedConv.from_spec(spec)


class SparseBlock(nn.Module):
    """A BasicBlock (conv1, conv2, shortcut) or Bottleneck (conv1, conv2, conv3, shortcut) with
    folded convolutions; the last convolution adds the shortcut and applies the ReLU."""

    def __init__(self, layers: Mapping[str, nn.Module], shortcut: FoldedConv | None) -> None:
        super().__init__()
        for name, m in layers.items():
            self.add_module(name, m)
        self.names = tuple(layers)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        res = x if self.shortcut is None else self.shortcut(x)
        y = x
        for i, name in enumerate(self.names):
            last = i == len(self.names) - 1
            y = getattr(self, name)(y, res if last else None)
        return y


class SparseResNet(nn.Module):
    """The inference form of a cdg ResNet backbone (branch a1, eval, BN folded, channels-last):
    ``forward(x)`` returns the pooled features, as ``backbone.eval()(x)`` does."""

    def __init__(self, spec: Mapping[str, Any], kernel: str = "auto") -> None:
        super().__init__()
        self.spec_ = dict(spec)
        self.conv1 = FoldedConv.from_spec(spec["stem"])
        self.maxpool = nn.MaxPool2d(3, 2, 1) if spec.get("maxpool") else nn.Identity()
        for s, stage in enumerate(spec["stages"], start=1):
            blocks = nn.ModuleList()
            for b in stage:
                layers = {name: _layer(ls, kernel) for name, ls in b["layers"].items()}
                sc = FoldedConv.from_spec(b["shortcut"]) if b.get("shortcut") else None
                blocks.append(SparseBlock(layers, sc))
            setattr(self, f"layer{s}", blocks)
        self.num_features = int(spec["num_features"])

    def forward(self, x: Tensor) -> Tensor:
        x = x.float().contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.conv1(x))
        for s in range(1, len(self.spec_["stages"]) + 1):
            for blk in getattr(self, f"layer{s}"):
                x = blk(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    # --- statistics ------------------------------------------------------------------------
    def gated(self) -> list[tuple[str, SparseGatedConv]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, SparseGatedConv)]

    def set_kernel(self, kernel: str) -> "SparseResNet":
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
        for _, m in self.gated():
            m.kernel = kernel
        return self

    def set_flags(self, *, keep_mask: bool | None = None, track: bool | None = None,
                  profile: bool | None = None) -> "SparseResNet":
        for _, m in self.gated():
            if keep_mask is not None:
                m.keep_mask = keep_mask
            if track is not None:
                m.track = track
            if profile is not None:
                m.profile = profile
        return self

    def reset_stats(self) -> None:
        for _, m in self.gated():
            m.reset_stats()

    def eta_per_layer(self) -> dict[str, float]:
        return {n: m.eta for n, m in self.gated() if m.eta is not None}


# ----------------------------------------------------------------------------- export


def _dense_spec_and_state(conv: nn.Module, bn: nn.Module, where: str, relu: bool, prefix: str,
                          state: dict[str, Tensor]) -> dict[str, Any]:
    from cdg.nn import GatedConv2d
    from cdg.nn.gated import GatedLayer

    if isinstance(conv, GatedConv2d):
        weight, stride, padding = conv.weight, conv.stride, 1
    elif isinstance(conv, nn.Conv2d):
        if conv.bias is not None or conv.groups != 1 or conv.dilation != (1, 1):
            raise ValueError(f"{where}: a conv with bias/groups/dilation cannot be folded here ({conv})")
        weight, stride, padding = conv.weight, conv.stride[0], conv.padding[0]
    elif isinstance(conv, GatedLayer):
        raise ValueError(f"{where}: {type(conv).__name__} is not a CDG/CGNet gated convolution; sparse inference "
                         "covers GatedConv2d (gating.mode dual, shared_base, unified) and dense backbones")
    else:
        raise ValueError(f"{where}: cannot fold {type(conv).__name__}")
    w, b = _fold(weight, bn, where)
    state[f"{prefix}.weight"], state[f"{prefix}.bias"] = w, b
    return {"type": "dense", "out_channels": w.shape[0], "in_channels": w.shape[1], "kernel": w.shape[2],
            "stride": int(stride), "padding": int(padding), "relu": relu}


def _gated_spec_and_state(conv: nn.Module, bn: nn.Module, where: str, relu: bool, prefix: str,
                          state: dict[str, Tensor]) -> dict[str, Any]:
    from cdg.nn import GatedConv2d

    assert isinstance(conv, GatedConv2d)
    if conv.blocks[0] != tuple(range(conv.gate_groups)):  # cannot happen: a1 is the diagonal in every mode
        raise ValueError(f"{where}: branch a1's base path is not the diagonal ({conv.blocks[0]})")
    g, co, ci = conv.gate_groups, conv.out_channels, conv.in_channels
    w = conv.weight.detach().float()
    bd = K.block_diagonal_mask(co, ci, g)[:, :, None, None]
    state[f"{prefix}.weight_b"] = conv.base_weight(0).detach().float().contiguous(memory_format=torch.channels_last)
    state[f"{prefix}.weight_c"] = (w * (1 - bd)).permute(0, 2, 3, 1).reshape(co, 9, ci).contiguous()
    state[f"{prefix}.tau"] = conv.tau.detach().float().clone()
    a, b = bn_affine(bn, where)
    state[f"{prefix}.scale"], state[f"{prefix}.bias"] = a.float(), b.float()
    if conv.norm == "batch":
        gbn = conv.branch_norms[0]
        state[f"{prefix}.threshold"] = (gbn.running_mean.double()
                                        + conv.tau.detach().double() * torch.sqrt(gbn.running_var.double() + gbn.eps)).float()
    return {"type": "gated", "in_channels": ci, "out_channels": co, "stride": int(conv.stride), "groups": g,
            "group_size": conv.group_size, "relu": relu, "norm": conv.norm}


def _conv_spec(conv: nn.Module, bn: nn.Module, where: str, relu: bool, prefix: str, state: dict[str, Tensor],
               dense: bool) -> dict[str, Any]:
    from cdg.nn import GatedConv2d

    if isinstance(conv, GatedConv2d) and conv.is_gated and not dense:
        return _gated_spec_and_state(conv, bn, where, relu, prefix, state)
    return _dense_spec_and_state(conv, bn, where, relu, prefix, state)


def inference_spec(backbone: nn.Module, dense: bool = False) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The structure (plain data) and the tensors of the inference form of ``backbone``."""
    from cdg.models.resnet import BasicBlock, Bottleneck, ResNet

    if not isinstance(backbone, ResNet):
        raise TypeError(f"sparse inference expects a cdg.models.resnet.ResNet backbone, got {type(backbone).__name__}")
    state: dict[str, Tensor] = {}
    spec: dict[str, Any] = {"maxpool": isinstance(backbone.maxpool, nn.MaxPool2d), "num_features": backbone.num_features,
                            "width": backbone.width, "stem_type": backbone.stem, "stages": []}
    spec["stem"] = _dense_spec_and_state(backbone.conv1, backbone.bn1, "conv1", True, "conv1", state)
    for s in range(1, 5):
        stage = []
        for j, blk in enumerate(getattr(backbone, f"layer{s}")):
            pre = f"layer{s}.{j}"
            if isinstance(blk, BasicBlock):
                names = (("conv1", "bn1", True), ("conv2", "bn2", True))
            elif isinstance(blk, Bottleneck):
                names = (("conv1", "bn1", True), ("conv2", "bn2", True), ("conv3", "bn3", True))
            else:
                raise TypeError(f"{pre}: unknown block type {type(blk).__name__}")
            layers = {n: _conv_spec(getattr(blk, n), getattr(blk, b), f"{pre}.{n}", relu, f"{pre}.{n}", state, dense)
                      for n, b, relu in names}
            sc = blk.shortcut
            if isinstance(sc, nn.Sequential):
                short = _dense_spec_and_state(sc[0], sc[1], f"{pre}.shortcut", False, f"{pre}.shortcut", state)
            elif isinstance(sc, nn.Identity):
                short = None
            else:
                raise TypeError(f"{pre}.shortcut: expected Identity or Sequential(conv, bn), got {type(sc).__name__}")
            stage.append({"layers": layers, "shortcut": short})
        spec["stages"].append(stage)
    return spec, state


def build_inference(spec: Mapping[str, Any], state: Mapping[str, Tensor], kernel: str = "auto") -> SparseResNet:
    model = SparseResNet(spec, kernel)
    model.load_state_dict(dict(state), strict=True)
    return model.eval()


@torch.no_grad()
def export_inference(backbone_or_run: nn.Module | str | Path, *, dense: bool = False,
                     kernel: str = "auto") -> SparseResNet:
    """The inference form of a trained backbone (or of the run directory holding it): branch a1,
    eval mode, BatchNorm folded, channels-last, sparse conditional path (module docstring).

    ``dense=True``: every gated convolution becomes its dense W (the dense backbone of the same
    architecture, for speed comparisons). ``kernel``: see :class:`SparseGatedConv`."""
    backbone = backbone_or_run
    if isinstance(backbone_or_run, (str, Path)):
        from cdg.runs import load_run

        _, backbone = load_run(backbone_or_run)
    assert isinstance(backbone, nn.Module)
    spec, state = inference_spec(backbone, dense=dense)
    return build_inference(spec, state, kernel)


def save_inference(path: str | Path, model: SparseResNet, source: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as ``{"format": "cdg.sparse", "version", "spec", "state_dict", "source"}``."""
    from cdg.fileio import atomic_torch_save

    obj = {"format": FORMAT, "version": VERSION, "spec": model.spec_, "state_dict": model.state_dict(),
           "source": dict(source or {})}
    return atomic_torch_save(obj, path)


def load_inference(path: str | Path, kernel: str = "auto") -> SparseResNet:
    """The :class:`SparseResNet` a :func:`save_inference` file holds."""
    from cdg.fileio import RunFileError, load_torch_file

    obj = load_torch_file(path, "sparse inference model")
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        raise RunFileError(f"{path} is not a {FORMAT} file (write one with `cdg export --format sparse`)")
    if not isinstance(obj.get("version"), int) or obj["version"] > VERSION:
        raise RunFileError(f"{path} has format version {obj.get('version')!r}; this cdg reads up to {VERSION}")
    try:
        return build_inference(obj["spec"], obj["state_dict"], kernel)
    except (KeyError, RuntimeError, TypeError) as e:
        raise RunFileError(f"{path}: the stored model cannot be rebuilt: {str(e).splitlines()[0]}") from None


def export_run(run_or_file: str | Path, out: str | Path) -> dict[str, Any]:
    """``cdg export --format sparse``: the inference form of a run directory's backbone (or of a
    ``cdg.backbone`` file), written to ``out``; returns what was written."""
    from cdg.export import _load_backbone
    from cdg.fileio import check_writable
    from cdg.nn import get_gating_mode
    from cdg.runs import load_run

    src = Path(run_or_file)
    check_writable(Path(out).parent)
    cfg, backbone = _load_backbone(src) if src.is_file() else load_run(src)
    model = export_inference(backbone)
    gating = get_gating_mode(cfg.gating.mode).label(cfg.gating)
    source = {"from": str(src), "model": cfg.model.name, "width": cfg.model.width, "stem": cfg.model.stem,
              "gating": gating}
    save_inference(out, model, source)
    gated = model.gated()
    return {"format": FORMAT, "version": VERSION, "out": str(out), **source, "gated_layers": len(gated),
            "branch": "a1", "load": ["from cdg.sparse import load_inference",
                                     f"model = load_inference({str(out)!r})  # eval mode, float32; model(x) -> features"]}
