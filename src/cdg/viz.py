"""Look inside one gated layer of a trained run (the paper's Fig. 9): ``cdg visualize``.

For a few test images (or image files) and one gated layer, :func:`visualize` draws, for branch
a1 and branch a2 side by side (two augmented views of the same image, made with the run's own
augmentation preset and a fixed seed):

* CDG / CGNet / unified layers (:class:`cdg.nn.GatedConv2d`, docs/design.md §1):
  the view; the base path ``Y_base`` (Eq. 1); the fraction of channels whose gate is open at each
  position; the binary mask ``M`` of one channel (Eq. 2 / 12, exactly 0 or 1); and the conditional
  path where the gate is open, ``M * Y_cond`` with ``Y_cond = conv(X, W) - Y_base`` (Eq. 3).
  Feature maps are summarised over channels as mean |.|.
* FBS / DGC layers (docs/design.md §5), whose masks select whole channels: the view, the layer's
  output (mean |.| over channels) and the binary channel mask as a strip (predictors x channels).

The layer is not changed: a forward hook records its input and output, ``keep_masks`` records the
mask it applied (in unified mode branch a2's is branch a1's), and the layer's own
:meth:`~cdg.nn.GatedConv2d.base_path` and :meth:`~cdg.nn.GatedConv2d.combine` give ``Y_base``
and ``M * Y_cond``. Everything runs on the CPU in eval mode (running BN statistics), in seconds.

The arrays of every panel are returned (:class:`Visualization`), so callers and tests can check
what was drawn. matplotlib is needed only to draw (``pip install 'cdg[plots]'``).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from cdg.config import ConfigError

#: the layer shown when none is named: the second gated 3x3 convolution of a ResNet
DEFAULT_LAYER = "layer1.0.conv2"
#: figure resolution and the side of one panel (inches; PANEL_IN * DPI pixels)
DPI = 100
PANEL_IN = 1.3
MAX_IMAGES = 16

# figure geometry in inches (multiples of 0.01, so that every size is a whole number of pixels)
_LEFT, _RIGHT, _GAP, _BLOCK_GAP = 0.45, 0.1, 0.1, 0.3
_HEADER, _ROW_GAP, _CB_W, _CB_SLOT = 0.62, 0.12, 0.12, 0.7
_CAPTION_LINE, _CAPTION_PAD = 0.16, 0.2


def require_matplotlib():
    """``matplotlib.pyplot`` with the Agg backend, or a ConfigError saying how to install it."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ConfigError("drawing needs matplotlib: pip install 'cdg[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Panel:
    """One drawn panel: ``kind`` is ``image`` (H x W x 3 in [0, 1]), ``feature`` (H x W, >= 0),
    ``fraction`` (H x W in [0, 1]), ``mask`` (H x W, exactly 0/1) or ``channel_mask``
    (predictors x channels, exactly 0/1); ``branch`` is 0 (a1), 1 (a2) or None."""

    title: str
    kind: str
    array: np.ndarray
    branch: int | None = None


@dataclass
class Visualization:
    """What :func:`visualize` drew: ``panels[row][column]``, one row per image."""

    run: str
    layer: str
    mode: str
    spatial: bool
    channel: int | None
    row_labels: list[str]
    panels: list[list[Panel]]
    open_fraction: dict[str, list[float]] = field(default_factory=dict)
    path: Path | None = None
    width_px: int = 0
    height_px: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of panels."""
        return len(self.panels), len(self.panels[0]) if self.panels else 0

    def summary(self) -> str:
        rows, cols = self.grid
        parts = [f"{self.path}: {rows} images x {cols} panels, layer {self.layer} ({self.mode})"]
        if self.channel is not None:
            parts.append(f"mask channel {self.channel}")
        for b, fr in self.open_fraction.items():
            parts.append(f"open fraction {b} " + " ".join(f"{v:.2f}" for v in fr))
        return "; ".join(parts)


def figure_size_in(rows: int, columns_per_branch: int, colorbars: int, caption_lines: int) -> tuple[float, float]:
    """Width and height (inches) of a :func:`visualize` figure: a label margin, the input column,
    two branch blocks of ``columns_per_branch`` panels, ``colorbars`` colour-bar slots, a header
    and a caption."""
    k = columns_per_branch
    width = _LEFT + PANEL_IN + 2 * (_BLOCK_GAP + k * PANEL_IN + (k - 1) * _GAP) + colorbars * _CB_SLOT + _RIGHT
    height = _HEADER + rows * PANEL_IN + (rows - 1) * _ROW_GAP + _CAPTION_PAD + caption_lines * _CAPTION_LINE
    return round(width, 2), round(height, 2)


# --- data ----------------------------------------------------------------------------------

def _test_images(cfg: Any, n: int, seed: int) -> tuple[list[Tensor], list[str]]:
    from cdg.builders import dataset_kwargs
    from cdg.data import build_dataset

    ds = build_dataset(cfg.data.dataset, cfg.data.root, "test", cfg.data.download, **dataset_kwargs(cfg))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    classes = list(getattr(ds, "classes", []))
    images, labels = [], []
    for i in idx:
        img, target = ds[i]
        images.append(img)
        labels.append(f"test #{i}" + (f"\n{classes[target]}" if target < len(classes) else ""))
    return images, labels


def _file_images(paths: Sequence[str | Path]) -> tuple[list[Tensor], list[str]]:
    from cdg.data.datasets import _decode_rgb

    images, labels = [], []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"--image {p}: no such file")
        images.append(torch.from_numpy(_decode_rgb(p).copy()).permute(2, 0, 1).contiguous())
        labels.append(textwrap.shorten(p.name, 18, placeholder="..."))
    return images, labels


def _two_views(cfg: Any, images: list[Tensor], seed: int) -> tuple[Tensor, Tensor, Any]:
    """Two augmented views of every image with the run's augmentation preset (docs/design.md §6),
    drawn from one generator seeded with ``seed`` (one image at a time: sizes may differ)."""
    from cdg.data import BatchAugment, augment_preset

    preset = augment_preset(cfg.method.name, cfg.data.dataset)
    aug = BatchAugment(preset)
    g = torch.Generator().manual_seed(seed)
    v1, v2 = [], []
    for img in images:
        v1.append(aug(img[None], g))
        v2.append(aug(img[None], g))
    return torch.cat(v1), torch.cat(v2), preset


def _to_rgb(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised 3 x H x W view back to H x W x 3 in [0, 1]."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (x * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


# --- the layer -----------------------------------------------------------------------------

def choose_layer(names: Sequence[str], layer: str | None) -> str:
    """``layer`` if it is one of ``names``; by default :data:`DEFAULT_LAYER` (else the second
    gated layer, else the first)."""
    if layer is not None:
        if layer not in names:
            raise ConfigError(f"--layer {layer}: not a gated layer of this run; valid: {', '.join(names)}")
        return layer
    if DEFAULT_LAYER in names:
        return DEFAULT_LAYER
    return names[1] if len(names) > 1 else names[0]


@torch.no_grad()
def _record_layer(backbone: torch.nn.Module, layer: Any, v1: Tensor, v2: Tensor) -> dict[int, dict[str, Tensor]]:
    """Run view 1 on branch a1, then view 2 on branch a2 (unified mode needs this order), and keep
    the layer's input, output and applied mask for each branch."""
    from cdg.nn import gated_layers

    seen: dict[int, dict[str, Tensor]] = {}
    current = {"branch": 0}

    def hook(_m, args, output):
        seen[current["branch"]] = {"x": args[0].detach(), "y": output.detach()}

    saved = [(m, m.track_stats) for _, m in gated_layers(backbone)]
    keep, masks = layer.keep_masks, layer.last_masks
    handle = layer.register_forward_hook(hook)
    try:
        for _, m in gated_layers(backbone):
            m.track_stats = False
        layer.keep_masks, layer.last_masks = True, {}
        for branch, view in ((0, v1), (1, v2)):
            current["branch"] = branch
            backbone(view, branch=branch)
            seen[branch]["mask"] = layer.last_masks[branch].float()
    finally:
        handle.remove()
        layer.keep_masks, layer.last_masks = keep, masks
        for m, track in saved:
            m.track_stats = track
    return seen


def _mean_abs(t: Tensor) -> np.ndarray:
    """mean |.| over channels of one C x H x W map, non-finite values shown as 0."""
    return torch.nan_to_num(t.float().abs().mean(0), nan=0.0, posinf=0.0, neginf=0.0).numpy()


def _pick_channel(masks: list[Tensor]) -> int:
    """The mask channel whose gate is open closest to half of the time over all images, branches
    and positions (its binary map shows the most structure); ties go to the lowest index."""
    frac = torch.stack([m.mean((0, 2, 3)) for m in masks]).mean(0)
    return int((frac - 0.5).abs().argmin())


# --- main entry ----------------------------------------------------------------------------

def visualize(
    run: str | Path,
    out: str | Path | None = None,
    *,
    images: int = 4,
    image_paths: Sequence[str | Path] | None = None,
    layer: str | None = None,
    channel: int | None = None,
    seed: int = 0,
) -> Visualization:
    """Fig. 9 of a run: the panels of one gated layer for a1 and a2 views of a few images.

    Args:
        run: a run directory (``config.yaml`` + ``backbone.pt`` or a checkpoint).
        out: the PNG to write; None draws nothing (the panel arrays are still returned).
        images: how many test images (chosen with ``seed``) when ``image_paths`` is not given.
        image_paths: image files to show instead of test images.
        layer: the gated layer's name (``cdg.nn.gated_layers``); default :data:`DEFAULT_LAYER`.
        channel: the mask channel drawn as a binary map (CDG layers); default: the channel open
            closest to half of the time.
        seed: chooses the test images and draws the augmentations.
    """
    from cdg.nn import GatedConv2d, gated_layers
    from cdg.runs import load_run

    if image_paths:
        if len(image_paths) > MAX_IMAGES:
            raise ConfigError(f"--image: at most {MAX_IMAGES} images, got {len(image_paths)}")
    elif not 1 <= images <= MAX_IMAGES:
        raise ConfigError(f"--images {images}: expected 1 to {MAX_IMAGES}")
    run = Path(run)
    cfg, backbone = load_run(run)
    backbone = backbone.float().eval()
    layers = dict(gated_layers(backbone))
    if not layers:
        raise ConfigError(f"{run}: gating.mode={cfg.gating.mode} (gating.groups={cfg.gating.groups}) has no gated layer "
                          "to show: a dense backbone, or one with G = 1, has no masks")
    name = choose_layer(list(layers), layer)
    mod = layers[name]
    originals, labels = _file_images(image_paths) if image_paths else _test_images(cfg, images, seed)
    v1, v2, preset = _two_views(cfg, originals, seed)
    rec = _record_layer(backbone, mod, v1, v2)
    spatial = isinstance(mod, GatedConv2d)
    views = {0: v1, 1: v2}
    tag = {0: "a1", 1: "a2"}

    masks = [rec[b]["mask"] for b in (0, 1)]
    if spatial:
        n_mask_channels = masks[0].shape[1]
        if channel is None:
            channel = _pick_channel(masks)
        elif not 0 <= channel < n_mask_channels:
            raise ConfigError(f"--channel {channel}: layer {name} has mask channels 0 to {n_mask_channels - 1}")
        conds = {}
        bases = {}
        with torch.no_grad():
            for b in (0, 1):
                x = rec[b]["x"]
                bases[b] = mod.base_path(x, b)
                conds[b] = mod.combine(x, bases[b], rec[b]["mask"]) - bases[b]  # M * Y_cond (Eq. 3)
    else:
        channel = None

    rows: list[list[Panel]] = []
    for i, orig in enumerate(originals):
        row = [Panel("input image", "image", orig.permute(1, 2, 0).numpy().astype(np.float32) / 255.0)]
        for b in (0, 1):
            row.append(Panel(f"view {tag[b]}", "image", _to_rgb(views[b][i], preset.mean, preset.std), b))
            m = rec[b]["mask"][i]
            if spatial:
                row += [
                    Panel("|Y_base|", "feature", _mean_abs(bases[b][i]), b),
                    Panel("open fraction", "fraction", m.mean(0).numpy(), b),
                    Panel(f"mask, channel {channel}", "mask", m[channel].numpy(), b),
                    Panel("|M·Y_cond|", "feature", _mean_abs(conds[b][i]), b),
                ]
            else:
                row += [
                    Panel("|Y| (layer output)", "feature", _mean_abs(rec[b]["y"][i]), b),
                    Panel(_channel_title(mod), "channel_mask", m[..., 0].numpy(), b),
                ]
        rows.append(row)
    vis = Visualization(
        run=str(run), layer=name, mode=cfg.gating.mode, spatial=spatial, channel=channel, row_labels=labels,
        panels=rows,
        open_fraction={tag[b]: [float(masks[b][i].mean()) for i in range(len(originals))] for b in (0, 1)},
    )
    if out is not None:
        caption = _caption(cfg, run, name, rec, vis, seed, bool(image_paths))
        _draw(vis, Path(out), _branch_labels(cfg, mod), caption)
    return vis


def _channel_title(mod: Any) -> str:
    from cdg.nn import DGCConv2d

    if isinstance(mod, DGCConv2d):
        return f"kept input channels\n(x: {mod.in_channels}, y: {mod.heads} heads)"
    return f"kept output channels\n(x: {mod.out_channels} channels)"


def _branch_labels(cfg: Any, mod: Any) -> dict[int, str]:
    from cdg.nn import GatedConv2d

    labels = {0: "branch a1 (view 1)", 1: "branch a2 (view 2)"}
    if isinstance(mod, GatedConv2d):
        for b in (0, 1):
            labels[b] += f": base blocks pi = {tuple(mod.blocks[b])}"
        if mod.mode == "unified":
            labels[1] += ", mask of a1 (unified)"
    return labels


def _caption(cfg: Any, run: Path, name: str, rec: dict, vis: Visualization, seed: int,
             files: bool) -> list[str]:
    from cdg.nn import get_gating_mode

    x, y = rec[0]["x"], rec[0]["y"]
    n = len(vis.panels)
    source = f"{n} image file(s)" if files else f"{n} {cfg.data.dataset} test images chosen with seed {seed}"
    try:
        shown = run.resolve().relative_to(Path.cwd())
    except ValueError:
        shown = run
    text = (f"Fig. 9 style. Run {shown}: {cfg.data.dataset}, {cfg.model.name} x{cfg.model.width:g}, "
            f"{cfg.method.name}, {get_gating_mode(cfg.gating.mode).label(cfg.gating)}. Gated layer {name}: "
            f"{x.shape[1]} -> {y.shape[1]} channels, {x.shape[2]}x{x.shape[3]} -> {y.shape[2]}x{y.shape[3]}, eval mode. "
            f"{source}; views: the {cfg.method.name} augmentation preset, seed {seed}. ")
    if vis.spatial:
        text += ("|Y_base|: base path (Eq. 1); open fraction: share of channels whose gate is open at each "
                 f"position (Eq. 2), 0 to 1; mask, channel {vis.channel}: that channel's binary gate M, white = open, "
                 "black = closed (the channel open closest to half of the time); |M·Y_cond|: conditional path "
                 "conv(X, W) - Y_base where the gate is open (Eq. 3). ")
    else:
        text += ("|Y|: the layer's output; mask strip: the channels each sample computes (white) or skips "
                 "(black), one row per predictor. ")
    text += "Feature maps: mean |.| over channels, one colour scale per row."
    width_in, _ = figure_size_in(1, 5 if vis.spatial else 3, 2 if vis.spatial else 1, 0)
    return textwrap.wrap(text, int(width_in * 15.5))


def _draw(vis: Visualization, out: Path, branch_labels: dict[int, str], caption: list[str]) -> None:
    plt = require_matplotlib()
    from matplotlib.colors import Normalize

    rows, cols = vis.grid
    k = (cols - 1) // 2
    n_cb = 2 if vis.spatial else 1
    width, height = figure_size_in(rows, k, n_cb, len(caption))
    fig = plt.figure(figsize=(width, height), dpi=DPI)

    def ax_at(left_in: float, top_in: float, w_in: float, h_in: float):
        return fig.add_axes((left_in / width, 1 - (top_in + h_in) / height, w_in / width, h_in / height))

    lefts = [_LEFT]
    x = _LEFT + PANEL_IN
    for _ in range(2):
        x += _BLOCK_GAP
        for j in range(k):
            lefts.append(x)
            x += PANEL_IN + (_GAP if j < k - 1 else 0)
    cb_left = x
    for b in (0, 1):
        first, last = lefts[1 + b * k], lefts[k + b * k] + PANEL_IN
        fig.text((first + last) / 2 / width, 1 - 0.16 / height, branch_labels[b], ha="center", va="center",
                 fontsize=9, weight="bold")
    cmaps = {"feature": "magma", "fraction": "viridis", "mask": "gray", "channel_mask": "gray"}
    for r, row in enumerate(vis.panels):
        top = _HEADER + r * (PANEL_IN + _ROW_GAP)
        feats = np.concatenate([p.array.ravel() for p in row if p.kind == "feature"])
        vmax = float(np.percentile(feats, 99.5)) if feats.size else 1.0
        vmax = vmax if vmax > 0 else 1.0
        images = {}
        for c, p in enumerate(row):
            ax = ax_at(lefts[c], top, PANEL_IN, PANEL_IN)
            if p.kind == "image":
                ax.imshow(p.array, interpolation="nearest")
            elif p.kind == "channel_mask":
                ax.imshow(p.array, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
            else:
                lim = (0.0, vmax) if p.kind == "feature" else (0.0, 1.0)
                images[p.kind] = ax.imshow(p.array, cmap=cmaps[p.kind], vmin=lim[0], vmax=lim[1],
                                           interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(p.title, fontsize=8, pad=3)
            if c == 0:
                ax.set_ylabel(vis.row_labels[r], fontsize=8, labelpad=3)
        for j, kind in enumerate(("feature", "fraction")[:n_cb]):
            cax = ax_at(cb_left + 0.22 + j * _CB_SLOT, top + 0.05, _CB_W, PANEL_IN - 0.1)
            mappable = images.get(kind) or plt.cm.ScalarMappable(Normalize(0, vmax if kind == "feature" else 1),
                                                                 cmaps[kind])
            cb = fig.colorbar(mappable, cax=cax)
            cb.ax.tick_params(labelsize=6, length=2, pad=1)
            cb.ax.locator_params(nbins=4)
            if r == 0:
                cax.set_title("|feature|" if kind == "feature" else "open\nfraction", fontsize=7, pad=3)
    cap_top = _HEADER + rows * PANEL_IN + (rows - 1) * _ROW_GAP + _CAPTION_PAD * 0.6
    fig.text(0.1 / width, 1 - cap_top / height, "\n".join(caption), ha="left", va="top", fontsize=8,
             linespacing=1.25)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    vis.path = out
    vis.width_px, vis.height_px = fig.canvas.get_width_height()
    plt.close(fig)
