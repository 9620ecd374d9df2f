"""Data: datasets (CIFAR-10/100, ImageNet-100, image folders, synthetic), splits, augmentations.

See ``datasets`` (where data is looked for, caches), ``splits`` (stratified subsets) and
``transforms`` (the docs/design.md §6 two-view recipes, per image and batched).
"""

from __future__ import annotations

from cdg.data.datasets import (
    DATASETS,
    DataError,
    DatasetInfo,
    FolderImageDataset,
    TensorImageDataset,
    TransformedDataset,
    build_dataset,
    build_train_test,
    dataset_fingerprint,
    cache_dir,
    dataset_info,
    imagenet100_classes,
    load_cifar_arrays,
    resolve_data_root,
)
from cdg.data.splits import load_split, save_split, stratified_subset
from cdg.data.transforms import (
    RECIPES,
    AugmentConfig,
    BatchAugment,
    EvalTransform,
    TwoViewTransform,
    augment_preset,
    eval_transform,
    normalize_batch,
)

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetInfo",
    "FolderImageDataset",
    "TensorImageDataset",
    "TransformedDataset",
    "build_dataset",
    "build_train_test",
    "dataset_fingerprint",
    "cache_dir",
    "dataset_info",
    "imagenet100_classes",
    "load_cifar_arrays",
    "resolve_data_root",
    "load_split",
    "save_split",
    "stratified_subset",
    "RECIPES",
    "AugmentConfig",
    "BatchAugment",
    "EvalTransform",
    "TwoViewTransform",
    "augment_preset",
    "eval_transform",
    "normalize_batch",
]
