"""Sparse inference for CDG backbones: the conditional path computed only where the gate is open
(docs/design.md §1, §4). :func:`export_inference` builds the inference form of a trained backbone;
:mod:`cdg.sparse.kernel` holds the C++ kernel (built on first use) and its PyTorch fallback;
:mod:`cdg.sparse.speed` measures it against the dense and the masked-dense forms (``cdg speed``)."""

from cdg.sparse.engine import (
    FoldedConv,
    SparseGatedConv,
    SparseResNet,
    export_inference,
    load_inference,
    save_inference,
)

__all__ = ["FoldedConv", "SparseGatedConv", "SparseResNet", "export_inference", "load_inference", "save_inference"]
