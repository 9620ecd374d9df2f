"""Frozen-backbone features on branch a1, with the conditional-path sparsity measured on the way."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cdg.data import TensorImageDataset, TransformedDataset, dataset_info, eval_transform, normalize_batch
from cdg.nn import gate_statistics, reset_gate_stats


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def autocast_for(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


class NonFiniteFeaturesError(ValueError):
    """The backbone produced inf/NaN features: any accuracy measured on them would be meaningless."""


def nonfinite_rows(feats: Tensor) -> Tensor:
    """Boolean mask of the rows (images) of ``feats`` with any inf/NaN entry."""
    return ~torch.isfinite(feats).all(1)


def check_finite(feats: Tensor, dataset: str) -> Tensor:
    """``feats`` unchanged, or :class:`NonFiniteFeaturesError`: a probe on inf/NaN features scores chance."""
    bad = int(nonfinite_rows(feats).sum())
    if bad:
        raise NonFiniteFeaturesError(f"the backbone gives non-finite (inf/NaN) features for {bad} of {len(feats)} "
                                     f"{dataset} images in eval mode; no accuracy is reported for them")
    return feats


@torch.no_grad()
def extract_features(
    backbone: nn.Module, ds: Any, dataset: str, batch_size: int = 512, bf16: bool = True,
    channels_last: bool = True, progress: bool = False, finite: bool = True,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Features (float32, N x D) and labels of ``ds`` on branch a1 in eval mode, and gate stats.

    The statistics (eta, eta_flop_weighted, eta_per_layer) cover exactly these images. With
    ``finite`` (the default) inf/NaN features raise :class:`NonFiniteFeaturesError`.
    """
    backbone.eval()
    dev = device_of(backbone)
    info = dataset_info(dataset)
    reset_gate_stats(backbone)
    feats, labels = [], []
    if isinstance(ds, TensorImageDataset):
        batches = ((ds.images[i:i + batch_size], ds.targets[i:i + batch_size]) for i in range(0, len(ds), batch_size))
        total = (len(ds) + batch_size - 1) // batch_size
        norm = lambda x: normalize_batch(x.to(dev), info.mean, info.std)  # noqa: E731
    else:
        batches = DataLoader(TransformedDataset(ds, eval_transform(dataset)), batch_size=batch_size, num_workers=2)
        total = len(batches)
        norm = lambda x: x.to(dev)  # noqa: E731
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=total, desc="features", leave=False, disable=None)  # off when not a TTY
    for x, y in batches:
        x = norm(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(dev, bf16):
            f = backbone(x, 0)
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y))
    stats = gate_statistics(backbone, "eval")
    feats = torch.cat(feats)
    return check_finite(feats, dataset) if finite else feats, torch.cat(labels), stats
