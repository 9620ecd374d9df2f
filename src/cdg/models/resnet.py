"""ResNet-18 / ResNet-50 backbones with a pluggable 3x3 convolution (docs/design.md §1, §6).

Every 3x3 convolution inside the residual blocks is built by ``conv_layer(in, out, stride)``, a
factory returning a module with ``forward(x, branch=0)``. :class:`Conv3x3` is the dense default;
:func:`cdg.nn.make_conv_layer` returns the gated convolutions. The stem, the 1x1 shortcuts and any
classifier stay dense. ``forward(x, branch)`` routes the contrastive branch (0 = a1, 1 = a2) to
every block, so the two views go through the backbone in separate calls (docs/design.md §2).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from cdg.models.registry import register_model
from cdg.nn.gated import Conv3x3


class ConvLayer(Protocol):
    def __call__(self, in_channels: int, out_channels: int, stride: int = 1) -> nn.Module: ...


def _norm_after(conv: nn.Module, planes: int) -> nn.Module:
    """The BatchNorm that follows a 3x3 conv, or nothing when the conv normalises its own output
    (official FBS: BN without affine, then the gate's saliency and shift; docs/design.md §5)."""
    return nn.Identity() if getattr(conv, "owns_norm", False) else nn.BatchNorm2d(planes)


class StridedConv1x1(nn.Conv2d):
    """The 1x1 shortcut convolution with stride s; with fewer than :attr:`SAFE_CHANNELS` input
    channels on the CPU it is computed as the stride-1 convolution of ``x[:, :, ::s, ::s]`` (the same
    values: a 1x1 kernel reads only those positions).

    Why: oneDNN's 1x1 backward-weights kernel for channels-last input with stride > 1 writes past its
    workspace when the input has fewer channels than its channel block (16 with AVX-512, 8 with AVX2):
    training a width-0.125 ResNet-18 on 224-pixel images segfaults on an AVX-512 CPU (PyTorch 2.14,
    oneDNN 3.12; upstream uxlfoundation/oneDNN#6035, which also reports wrong gradients on AVX2).
    Subsampling first avoids that code path but took 2.2x the shortcut's time at 16 channels, batch
    256 (benchmarks/bench_shortcut.py), so wider shortcuts keep the plain strided convolution. Weights, ``stride`` and state-dict keys are
    those of the ``nn.Conv2d`` it replaces, so checkpoints, FLOP counts and exports are unchanged."""

    #: the widest channel block of oneDNN's x86 kernels (AVX-512); 12 channels still faulted there
    SAFE_CHANNELS = 16

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        if x.device.type != "cpu" or s == (1, 1) or self.in_channels >= self.SAFE_CHANNELS:
            return super().forward(x)
        return nn.functional.conv2d(x[:, :, :: s[0], :: s[1]], self.weight, self.bias)


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(StridedConv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, conv_layer: ConvLayer) -> None:
        super().__init__()
        self.conv1 = conv_layer(in_planes, planes, stride)
        self.bn1 = _norm_after(self.conv1, planes)
        self.conv2 = conv_layer(planes, planes, 1)
        self.bn2 = _norm_after(self.conv2, planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: Tensor, branch: int = 0) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x, branch)))
        out = self.bn2(self.conv2(out, branch))
        return torch.relu(out + self.shortcut(x))

    def last_bn(self) -> nn.Module:
        return self.bn2


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, conv_layer: ConvLayer) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv_layer(planes, planes, stride)
        self.bn2 = _norm_after(self.conv2, planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: Tensor, branch: int = 0) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out, branch)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))

    def last_bn(self) -> nn.Module:
        return self.bn3


def stage_widths(width: float = 1.0) -> list[int]:
    """Channels of the four ResNet stages at a width multiplier: 64, 128, 256, 512 times ``width``."""
    return [int(round(64 * width * 2**i)) for i in range(4)]


class ResNet(nn.Module):
    """ResNet backbone returning pooled features (``num_features`` wide).

    Args:
        block, layers: block type and blocks per stage.
        width: channel multiplier of every stage (0.25, 0.5, 1, 2, ...).
        stem: ``cifar`` (3x3 conv, stride 1, no max-pool) or ``imagenet`` (7x7/2 conv + max-pool).
        conv_layer: factory for the 3x3 convolutions inside the blocks.
        zero_init_residual: zero the last BN of each block (SimSiam recipe).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        width: float = 1.0,
        stem: str = "cifar",
        conv_layer: ConvLayer | Callable[..., nn.Module] = Conv3x3,
        zero_init_residual: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width multiplier must be > 0, got {width}")
        widths = stage_widths(width)
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            raise ValueError(f"unknown stem {stem!r}; valid: cifar, imagenet")
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.width, self.stem = width, stem
        in_planes = widths[0]
        stages = []
        for i, (planes, n) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(in_planes, planes, 2 if (i > 0 and j == 0) else 1, conv_layer))
                in_planes = planes * block.expansion
            stages.append(nn.ModuleList(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = in_planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)) and isinstance(m.last_bn(), nn.BatchNorm2d):
                    nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: Tensor, branch: int = 0) -> Tensor:
        """Pooled features of ``x`` computed on contrastive branch ``branch`` (0 = a1, 1 = a2)."""
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for blk in stage:
                x = blk(x, branch)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


@register_model("resnet18")
def resnet18(**kwargs) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2): 16 3x3 block convolutions, 512 * width features."""
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model("resnet50")
def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3): 16 3x3 block convolutions, 2048 * width features."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)
