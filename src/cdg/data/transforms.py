"""Augmentations: the two-view SSL recipes of docs/design.md §6, per image and per batch.

docs/design.md §6 (solo-learn's 2021 CIFAR scripts, which the paper follows): two views per image, each
``RandomResizedCrop(32, scale 0.08-1)``, colour jitter with p 0.8 (SimCLR 0.8/0.8/0.8/0.2; MoCo V2+
and SimSiam 0.4/0.4/0.4/0.1), grayscale p 0.2, no blur on CIFAR, horizontal flip p 0.5, per-dataset
normalisation. ImageNet-type data: crop 224 and Gaussian blur (kernel 23, sigma 0.1-2.0) p 0.5.

Two implementations of the same distribution:

* :class:`TwoViewTransform` - torchvision.transforms.v2, one image at a time (DataLoader workers).
* :class:`BatchAugment` - an ``nn.Module`` that augments a whole uint8 batch with batched tensor ops,
  every random parameter drawn independently per sample (docs/design.md §7: per-image torchvision
  is far slower than batched tensor ops; ``python -m cdg.data.bench`` measures both). kornia.augmentation was
  measured first on this machine (2 threads, batch 256, 32x32, same pipeline): ~10,000 views/s,
  below the 15,000 views/s bar, so the batched ops are written here (see ``BatchAugment``).

Both take uint8 RGB images ``3 x H x W`` (or ``N x 3 x H x W``) and return float32 normalised views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdg.data.datasets import dataset_info

__all__ = [
    "RECIPES",
    "AugmentConfig",
    "augment_preset",
    "TwoViewTransform",
    "BatchAugment",
    "EvalTransform",
    "eval_transform",
    "normalize_batch",
]

#: colour-jitter strengths (brightness, contrast, saturation, hue) per recipe (docs/design.md §6).
RECIPES: dict[str, tuple[float, float, float, float]] = {
    "simclr": (0.8, 0.8, 0.8, 0.2),
    "mocov2": (0.4, 0.4, 0.4, 0.1),
    "mocov2plus": (0.4, 0.4, 0.4, 0.1),
    "simsiam": (0.4, 0.4, 0.4, 0.1),
}

_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)


@dataclass
class AugmentConfig:
    """Parameters of one SSL view (docs/design.md §6); defaults are SimCLR on CIFAR-10.

    ``brightness``/``contrast``/``saturation`` ``b`` mean a factor drawn from
    ``[max(0, 1 - b), 1 + b]``; ``hue`` ``h`` a shift drawn from ``[-h, h]`` (torchvision's
    ColorJitter semantics). The jitter is applied with probability ``jitter_prob`` and its four
    operations in a random order per sample, as torchvision's ColorJitter.
    """

    crop_size: int = 32
    min_scale: float = 0.08
    max_scale: float = 1.0
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    jitter_prob: float = 0.8
    gray_prob: float = 0.2
    flip_prob: float = 0.5
    blur_prob: float = 0.0
    blur_kernel: int = 23
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    mean: tuple[float, float, float] = _CIFAR10_MEAN
    std: tuple[float, float, float] = _CIFAR10_STD

    def __post_init__(self) -> None:
        if self.crop_size < 1:
            raise ValueError(f"AugmentConfig.crop_size={self.crop_size}: expected a positive int")
        if not 0.0 < self.min_scale <= self.max_scale <= 1.0:
            raise ValueError(
                f"AugmentConfig scale=({self.min_scale}, {self.max_scale}): expected "
                "0 < min_scale <= max_scale <= 1"
            )
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"AugmentConfig.ratio={self.ratio}: expected 0 < low <= high")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentConfig.{name}={getattr(self, name)}: expected >= 0")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"AugmentConfig.hue={self.hue}: expected 0 <= hue <= 0.5")
        for name in ("jitter_prob", "gray_prob", "flip_prob", "blur_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentConfig.{name}={getattr(self, name)}: expected in [0, 1]")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"AugmentConfig.blur_kernel={self.blur_kernel}: expected an odd int")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"AugmentConfig.blur_sigma={self.blur_sigma}: expected 0 < low <= high")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"AugmentConfig mean={self.mean} std={self.std}: expected 3 values each, std > 0"
            )
        self.mean = tuple(float(m) for m in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(s) for s in self.std)  # type: ignore[assignment]

    def factor_range(self, name: str) -> tuple[float, float]:
        """The uniform range of a jitter factor (``hue``: of the shift), torchvision's rule."""
        v = float(getattr(self, name))
        if name == "hue":
            return (-v, v)
        return (max(0.0, 1.0 - v), 1.0 + v)


def augment_preset(recipe: str, dataset: str) -> AugmentConfig:
    """The view augmentation of ``recipe`` (simclr, mocov2[plus], simsiam) for ``dataset``.

    docs/design.md §6: CIFAR-type data (native size 32: cifar10, cifar100, synthetic) get crop 32 and no
    blur; ImageNet-type data (imagenet100, imagefolder) crop 224 and Gaussian blur p 0.5 (kernel 23,
    sigma 0.1-2.0) on both views. Mean/std come from :func:`cdg.data.dataset_info`.
    """
    key = recipe.lower().replace("+", "plus").replace("-", "").replace("_", "")
    if key not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}: expected one of {sorted(RECIPES)}")
    info = dataset_info(dataset)
    b, c, s, h = RECIPES[key]
    cifar_like = info.image_size is not None and info.image_size <= 64
    return AugmentConfig(
        crop_size=32 if cifar_like else 224,
        brightness=b,
        contrast=c,
        saturation=s,
        hue=h,
        blur_prob=0.0 if cifar_like else 0.5,
        mean=info.mean,
        std=info.std,
    )


# --------------------------------------------------------------------------------------------
# per-image torchvision pipeline


class TwoViewTransform:
    """Two independently augmented views of one image, with torchvision.transforms.v2.

    Pipeline (docs/design.md §6): RandomResizedCrop(crop, scale, antialias) -> RandomApply(ColorJitter,
    p) -> RandomGrayscale(p) -> [RandomApply(GaussianBlur(kernel, sigma), p) if blur_prob > 0] ->
    RandomHorizontalFlip(p) -> ToDtype(float32, scale) -> Normalize(mean, std).
    Randomness comes from torch's global RNG, per call, so DataLoader worker seeding applies.
    Input: a uint8 ``3 x H x W`` tensor (or a PIL image); output: ``(view1, view2)`` float32 tensors.
    """

    def __init__(self, cfg: AugmentConfig | None = None) -> None:
        from torchvision.transforms import v2

        self.cfg = cfg = cfg if cfg is not None else AugmentConfig()
        steps: list[object] = [
            v2.ToImage(),
            v2.RandomResizedCrop(
                cfg.crop_size, scale=(cfg.min_scale, cfg.max_scale), ratio=cfg.ratio, antialias=True
            ),
            v2.RandomApply(
                [v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
                p=cfg.jitter_prob,
            ),
            v2.RandomGrayscale(p=cfg.gray_prob),
        ]
        if cfg.blur_prob > 0:
            steps.append(
                v2.RandomApply(
                    [v2.GaussianBlur(cfg.blur_kernel, sigma=cfg.blur_sigma)], p=cfg.blur_prob
                )
            )
        steps += [
            v2.RandomHorizontalFlip(p=cfg.flip_prob),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
        ]
        self.view = v2.Compose(steps)

    def one_view(self, image: Tensor) -> Tensor:
        """One augmented view as a plain float32 tensor ``3 x crop x crop``."""
        return self.view(image).as_subclass(Tensor)

    def __call__(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.one_view(image), self.one_view(image)

    def __repr__(self) -> str:
        return f"TwoViewTransform({self.cfg})"


# --------------------------------------------------------------------------------------------
# batched tensor-op pipeline


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64).mul_(high - low).add_(low)


def _crop_params(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample (top, left, h, w) with torchvision's RandomResizedCrop rule (10 tries, fallback).

    Vectorised over samples: all 10 tries are drawn at once and the first valid one kept.
    """
    tries = 10
    area = float(height * width)
    target = torch.rand(n, tries, generator=generator, dtype=torch.float64)
    target = target.mul_(scale[1] - scale[0]).add_(scale[0]).mul_(area)
    log_r = torch.rand(n, tries, generator=generator, dtype=torch.float64)
    log_r = log_r.mul_(math.log(ratio[1]) - math.log(ratio[0])).add_(math.log(ratio[0]))
    aspect = log_r.exp()
    w = torch.sqrt(target * aspect).round().long()
    h = torch.sqrt(target / aspect).round().long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)
    any_ok = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    u_top = torch.rand(n, generator=generator, dtype=torch.float64)
    u_left = torch.rand(n, generator=generator, dtype=torch.float64)
    top = (u_top * (height - h + 1)).floor().long().clamp_(max=height - 1)
    left = (u_left * (width - w + 1)).floor().long().clamp_(max=width - 1)
    if not bool(any_ok.all()):
        in_ratio = width / height
        if in_ratio < ratio[0]:
            fw, fh = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            fw, fh = int(round(height * ratio[1])), height
        else:
            fw, fh = width, height
        bad = ~any_ok
        w[bad], h[bad] = fw, fh
        top[bad], left[bad] = (height - fh) // 2, (width - fw) // 2
    return top, left, h, w


def _apply_subset(
    y: Tensor, mask: Tensor, fn: Callable[[Tensor, Tensor], Tensor], arg: Tensor | None
) -> None:
    """In place: ``y[mask] = fn(y[mask], arg[mask])`` (``mask`` a CPU bool vector over samples)."""
    if not bool(mask.any()):
        return
    idx = mask.nonzero().squeeze(1)
    idx_d = idx.to(y.device)
    sub_arg = arg[idx].to(y.device) if arg is not None else idx_d
    y.index_copy_(0, idx_d, fn(y.index_select(0, idx_d), sub_arg))


def _resize_weights(
    start: Tensor,
    length: Tensor,
    in_size: int,
    out_size: int,
    device: torch.device,
    gain: float = 1.0,
) -> Tensor:
    """``n x out x in`` matrices resampling ``[start, start+length)`` of each row to ``out`` pixels.

    Exactly the weights of PyTorch's antialiased bilinear resize (``interpolate(..., antialias=True)``,
    which torchvision's ``RandomResizedCrop(antialias=True)`` uses): a triangle filter centred at
    ``scale * (u + 0.5)`` in crop coordinates, widened by ``scale`` when downscaling, clipped to the
    crop and renormalised. When upscaling this equals plain bilinear with ``align_corners=False``.
    """
    start = start.to(device=device, dtype=torch.float32).view(-1, 1, 1)
    length = length.to(device=device, dtype=torch.float32).view(-1, 1, 1)
    scale = length / out_size
    support = scale.clamp(min=1.0)  # filter half-width in input pixels
    u = torch.arange(out_size, device=device, dtype=torch.float32).view(1, -1, 1)
    p = torch.arange(in_size, device=device, dtype=torch.float32).view(1, 1, -1) - start
    center = scale * (u + 0.5)
    wgt = (1.0 - ((p + 0.5 - center) / support).abs()).clamp_(min=0.0)
    wgt = wgt * ((p >= 0) & (p < length))
    return wgt.mul_(gain / wgt.sum(dim=2, keepdim=True).clamp_(min=1e-12))


def _crop_matmul(
    x: Tensor,
    top: Tensor,
    left: Tensor,
    h: Tensor,
    w: Tensor,
    flip: Tensor,
    out: int,
    gain: float,
) -> Tensor:
    """Crop, resize (antialiased bilinear) and flip as ``Ry @ x @ Rx^T`` with two plain bmm."""
    n, _, height, width = x.shape
    ry = _resize_weights(top, h, height, out, x.device, gain)  # n x out x H
    rx = _resize_weights(left, w, width, out, x.device)  # n x out x W
    rx = torch.where(flip.to(x.device).view(-1, 1, 1), rx.flip(1), rx)
    y = torch.bmm(x.view(n, 3 * height, width), rx.transpose(1, 2))  # n x 3H x out
    y = y.view(n, 3, height, out).transpose(1, 2).reshape(n, height, 3 * out)
    return torch.bmm(ry, y).view(n, out, 3, out).transpose(1, 2).contiguous()


def _crop_upscale(
    x: Tensor, top: Tensor, left: Tensor, h: Tensor, w: Tensor, flip: Tensor, out: int
) -> Tensor:
    """Crop, resize and flip with ``grid_sample`` when no crop side exceeds ``out``.

    Sampling position of output pixel ``u`` in the crop: ``(u + 0.5) * len / out - 0.5``, clamped
    to the crop ``[0, len - 1]``; that is exactly ``interpolate(bilinear, align_corners=False)``
    of the cropped image (with or without antialias, which only acts when downscaling).
    """
    n, _, height, width = x.shape
    dev = x.device
    u = torch.arange(out, device=dev, dtype=torch.float32).add_(0.5).div_(out).view(1, -1)

    def axis(start: Tensor, length: Tensor, size: int, flipped: Tensor | None) -> Tensor:
        s = start.to(device=dev, dtype=torch.float32).view(-1, 1)
        ln = length.to(device=dev, dtype=torch.float32).view(-1, 1)
        pos = (u * ln - 0.5).clamp_(min=0.0)
        pos = torch.minimum(pos, ln - 1.0).add_(s)
        if flipped is not None:
            pos = torch.where(flipped.to(dev).view(-1, 1), pos.flip(1), pos)
        return pos.add_(0.5).mul_(2.0 / size).sub_(1.0)  # align_corners=False normalisation

    gx = axis(left, w, width, flip)  # n x out
    gy = axis(top, h, height, None)
    grid = torch.stack((gx.view(n, 1, out).expand(n, out, out), gy.view(n, out, 1).expand(n, out, out)), dim=3)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    """Luma ``N x 1 x H x W`` of an RGB batch (torchvision's weights)."""
    return (x[:, 0:1] * _LUMA[0]).add_(x[:, 1:2], alpha=_LUMA[1]).add_(x[:, 2:3], alpha=_LUMA[2])


def _adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return x.mul_(factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True).mul_(1.0 - f)
    return x.mul_(f).add_(mean).clamp_(0.0, 1.0)


def _adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    gray = _gray(x).mul_(1.0 - f)
    return x.mul_(f).add_(gray).clamp_(0.0, 1.0)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue of each image of ``x`` (in [0, 1]) by ``shift[i]`` (fraction of a turn).

    Same maths as torchvision's tensor ``adjust_hue`` (RGB -> HSV, ``h = (h + shift) mod 1``,
    HSV -> RGB) in closed form. With ``i`` the channel holding the maximum (first of ties: R, then
    G, as torchvision), ``6h = 2i + (x[i+1] - x[i+2]) / (max - min)`` (channels mod 3), and
    HSV -> RGB is ``c = V - V*S*clamp(d_c - 1, 0, 1)`` with ``d_c`` the circular distance (period
    6) from ``6h`` to channel c's hue ``0, 2, 4``, ``V = max`` and ``V*S = max - min``: the same
    piecewise-linear sector formula torchvision evaluates with a 6-way select.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = torch.maximum(torch.maximum(r, g), b)
    cr = maxc - torch.minimum(torch.minimum(r, g), b)
    # 6h = 0 + (g - b)/cr if max is R, 2 + (b - r)/cr if G, 4 + (r - g)/cr if B; with float
    # masks (torch.where is several times slower on CPU); cr = 0 (gray) gives h = 0 as torchvision
    m_r = (maxc == r).to(x.dtype)
    m_g = (maxc == g).to(x.dtype).mul_(1.0 - m_r)
    m_b = 1.0 - m_r - m_g
    num = (g - b).mul_(m_r).addcmul_(b - r, m_g).addcmul_(r - g, m_b)
    h6 = num.div_(cr.clamp(min=1e-12)).add_(4.0 - 4.0 * m_r - 2.0 * m_g)
    h6 = h6.add_(6.0 * shift.view(-1, 1, 1, 1))
    h6 = h6.sub_(torch.floor(h6 * (1.0 / 6.0)).mul_(6.0))  # mod 6 (torch.remainder is slow on CPU)
    centre = torch.tensor([0.0, 2.0, 4.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    dist = (h6 - centre).abs_()
    dist = torch.minimum(dist, 6.0 - dist)  # circular distance of the hue to R, G, B
    return maxc - cr * dist.sub_(1.0).clamp_(0.0, 1.0)


_JITTER_OPS = (
    ("brightness", _adjust_brightness),
    ("contrast", _adjust_contrast),
    ("saturation", _adjust_saturation),
    ("hue", _adjust_hue),
)


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """Per-sample separable Gaussian blur with reflect padding (torchvision's GaussianBlur kernel)."""
    m, c, hgt, wid = x.shape
    half = kernel // 2
    t = torch.arange(kernel, device=x.device, dtype=x.dtype) - half
    k1 = torch.softmax(-(t.view(1, -1) ** 2) / (2.0 * sigma.view(-1, 1) ** 2), dim=1)  # m x K
    weight = k1.repeat_interleave(c, dim=0)  # (m*c) x K
    y = F.pad(x.reshape(1, m * c, hgt, wid), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, weight.view(m * c, 1, kernel, 1), groups=m * c)
    y = F.conv2d(y, weight.view(m * c, 1, 1, kernel), groups=m * c)
    return y.view(m, c, hgt, wid)


class BatchAugment(nn.Module):
    """One random view of every image of a uint8 batch, with batched tensor ops (no sample loop).

    Same distribution as :class:`TwoViewTransform` (docs/design.md §6), parameters drawn per sample:

    * RandomResizedCrop: torchvision's (top, left, h, w) rule (10 tries, then centre fallback); the
      crop is resampled exactly as torchvision's antialiased bilinear resize: with ``grid_sample``
      when no crop side exceeds the output (always so on CIFAR), else with per-sample weight
      matrices of ``interpolate(antialias=True)`` as two batched matmuls ``Ry @ x @ Rx^T``. The
      horizontal flip is folded into the sampling positions (flip commutes with the colour ops and
      the symmetric blur, so this gives the same distribution).
    * ColorJitter with probability ``jitter_prob``: brightness, contrast, saturation factors and hue
      shift from torchvision's ranges, the four ops in a random order per sample (each op is applied
      to every sample at its drawn position; brightness/contrast/saturation as broadcast blends with
      factor 1 elsewhere, hue on the selected samples only).
    * RandomGrayscale, optional GaussianBlur (per-sample sigma), Normalize.

    Differences from torchvision: arithmetic stays in float32 (torchvision's uint8 kernels round or
    truncate to uint8 after every op, shifting means by < 1/255 per op).

    Random parameters are drawn on the CPU from torch's global RNG (so ``torch.manual_seed`` makes
    a call reproducible on any device) or from ``generator`` if given, then moved to ``x.device``.
    The module has no parameters; mean/std are non-persistent buffers that follow ``.to(device)``.
    """

    def __init__(self, cfg: AugmentConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else AugmentConfig()
        mean = torch.tensor(self.cfg.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.std).view(1, 3, 1, 1)
        # Normalize as one fused op: (y - mean) / std = y * scale + shift
        self.register_buffer("scale", 1.0 / std, persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def extra_repr(self) -> str:
        return repr(self.cfg)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``x``: uint8 ``N x 3 x H x W`` (or float in [0, 1]) -> float32 ``N x 3 x crop x crop``."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"BatchAugment expects an RGB batch N x 3 x H x W, got shape {tuple(x.shape)}"
            )
        cfg = self.cfg
        n, _, height, width = x.shape
        out = cfg.crop_size
        if x.dtype == torch.uint8:
            unit = 1.0 / 255.0  # folded into the resampling weights
        elif x.is_floating_point():
            unit = 1.0
        else:
            raise ValueError(f"BatchAugment expects uint8 or float images, got dtype {x.dtype}")
        xf = x.to(torch.float32)
        if n == 0:
            return xf.new_empty(0, 3, out, out)

        # ---- all random draws, on the CPU, in a fixed order ----
        top, left, ch, cw = _crop_params(
            n, height, width, (cfg.min_scale, cfg.max_scale), cfg.ratio, generator
        )
        flip = torch.rand(n, generator=generator) < cfg.flip_prob
        jitter = torch.rand(n, generator=generator) < cfg.jitter_prob
        order = torch.rand(n, 4, generator=generator).argsort(dim=1)  # random permutation per sample
        factors = {
            name: _uniform(n, *cfg.factor_range(name), generator).float()
            for name in ("brightness", "contrast", "saturation", "hue")
        }
        gray = torch.rand(n, generator=generator) < cfg.gray_prob
        blur = torch.rand(n, generator=generator) < cfg.blur_prob
        sigma = _uniform(n, *cfg.blur_sigma, generator).float()

        # ---- resized crop (+ flip) ----
        if int(ch.max()) <= out and int(cw.max()) <= out:  # upscaling only (always on CIFAR)
            y = _crop_upscale(xf, top, left, ch, cw, flip, out)
            if unit != 1.0:
                y = y.mul_(unit)
        else:  # some crop is downscaled: antialiased weights as two batched matmuls
            y = _crop_matmul(xf, top, left, ch, cw, flip, out, unit)

        # ---- colour jitter: at each of the 4 positions, every op on the samples that drew it
        # there (an op whose range is the identity is skipped, as in torchvision) ----
        if bool(jitter.any()):
            for pos in range(4):
                for op, (name, fn) in enumerate(_JITTER_OPS):
                    if getattr(cfg, name) > 0:
                        _apply_subset(y, jitter & (order[:, pos] == op), fn, factors[name])

        # ---- grayscale, blur ----
        _apply_subset(y, gray, lambda v, _: _gray(v).expand_as(v), None)
        if cfg.blur_prob > 0:
            kernel = cfg.blur_kernel
            _apply_subset(y, blur, lambda v, s: _gaussian_blur(v, s, kernel), sigma)

        return y.mul_(self.scale).add_(self.shift)

    def two_views(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Two independent views of every image of ``x`` (the module called twice)."""
        return self(x, generator), self(x, generator)


# --------------------------------------------------------------------------------------------
# evaluation


class EvalTransform:
    """Un-augmented input for evaluation: uint8 ``3 x H x W`` -> normalised float32.

    CIFAR-type data: no resize. ImageNet-type: ``Resize(resize)`` then ``CenterCrop(crop)``.
    """

    def __init__(
        self,
        mean: tuple[float, float, float] = _CIFAR10_MEAN,
        std: tuple[float, float, float] = _CIFAR10_STD,
        resize: int | None = None,
        crop: int | None = None,
    ) -> None:
        from torchvision.transforms import v2

        self.mean, self.std, self.resize, self.crop = tuple(mean), tuple(std), resize, crop
        steps: list[object] = [v2.ToImage()]
        if resize is not None:
            steps.append(v2.Resize(resize, antialias=True))
        if crop is not None:
            steps.append(v2.CenterCrop(crop))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        self.pipeline = v2.Compose(steps)

    def __call__(self, image: Tensor) -> Tensor:
        return self.pipeline(image).as_subclass(Tensor)

    def __repr__(self) -> str:
        return f"EvalTransform(mean={self.mean}, std={self.std}, resize={self.resize}, crop={self.crop})"


def eval_transform(dataset_name: str) -> EvalTransform:
    """The evaluation transform for a dataset of :data:`cdg.data.DATASETS`.

    CIFAR-type (native size <= 64): normalise only; otherwise Resize(256) + CenterCrop(224).
    """
    info = dataset_info(dataset_name)
    if info.image_size is not None and info.image_size <= 64:
        return EvalTransform(info.mean, info.std)
    return EvalTransform(info.mean, info.std, resize=256, crop=224)


def normalize_batch(
    x: Tensor, mean: tuple[float, ...] | Tensor, std: tuple[float, ...] | Tensor
) -> Tensor:
    """uint8 ``N x 3 x H x W`` (or float in [0, 1]) -> float32 ``(x / 255 - mean) / std``."""
    if x.ndim != 4 or x.shape[1] != len(mean):
        raise ValueError(
            f"normalize_batch expects N x {len(mean)} x H x W, got shape {tuple(x.shape)}"
        )
    xf = x.to(torch.float32)
    if x.dtype == torch.uint8:
        xf = xf.div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return xf.sub_(m).div_(s)

