"""Weighted kNN classifier on L2-normalised features (k = 200, cosine, temperature 0.1; docs/design.md §4)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cdg.eval.features import nonfinite_rows


@torch.no_grad()
def knn_predict(train_f: Tensor, train_y: Tensor, test_f: Tensor, num_classes: int, k: int = 200,
                temperature: float = 0.1, chunk: int = 1024) -> Tensor:
    """Class scores: sum over the k most similar training features of exp(cos / T), per class."""
    train_f = F.normalize(train_f.float(), dim=1)
    test_f = F.normalize(test_f.float(), dim=1)
    k = min(k, train_f.shape[0])
    preds = []
    for i in range(0, test_f.shape[0], chunk):
        sim = test_f[i:i + chunk] @ train_f.T
        w, idx = sim.topk(k, dim=1)
        w = (w / temperature).exp()
        scores = torch.zeros(sim.shape[0], num_classes).scatter_add_(1, train_y[idx], w)
        preds.append(scores.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, k: int = 200,
                 temperature: float = 0.1) -> float:
    """Top-1 accuracy of :func:`knn_predict`. An image whose features are not all finite is left out
    of the memory (training side) or scored wrong (test side)."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    ok_tr, ok_te = ~nonfinite_rows(train_f), ~nonfinite_rows(test_f)
    pred = knn_predict(train_f[ok_tr], train_y[ok_tr], test_f[ok_te], num_classes, k, temperature)
    return float((pred == test_y[ok_te]).sum()) / len(test_y)


@torch.no_grad()
def knn_monitor(method: Any, cfg: Any, data: tuple[Tensor, Tensor], test: Any = None) -> dict[str, float]:
    """Cheap monitor during pre-training: kNN accuracy (half the monitor images as memory, half as
    queries) and the mask similarity S_c of two augmented views of the query half."""
    from cdg.data import TensorImageDataset
    from cdg.eval.features import extract_features
    from cdg.nn import gated_layers, mask_similarity

    images, labels = data
    half = images.shape[0] // 2
    bb = method.backbone
    ds = TensorImageDataset(images, labels, [str(i) for i in range(int(labels.max()) + 1)])
    f, y, _ = extract_features(bb, ds, cfg.data.dataset, cfg.data.eval_batch_size,
                               bf16=cfg.trainer.bf16, channels_last=cfg.trainer.channels_last)
    out = {"knn_top1": knn_accuracy(f[:half], y[:half], f[half:], y[half:], min(cfg.eval.knn_k, half), cfg.eval.knn_temperature)}
    if gated_layers(bb):
        x = images[half:half + 256].to(next(bb.parameters()).device)
        v1, v2 = method.augment.two_views(x)
        out["mask_similarity"] = mask_similarity(bb, v1, v2)
    return out
