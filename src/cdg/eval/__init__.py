"""Evaluation protocols: features, kNN, linear probe (fast and SGD), fine-tuning, BN re-estimation.

The run-level functions (:func:`knn_probe`, :func:`linear_probe`, :func:`finetune`) do what the
``cdg`` commands of the same names do and return an :class:`EvalResult`; see
:mod:`cdg.eval.protocols`.
"""

from cdg.eval.bn import recalibrate_bn
from cdg.eval.protocols import EvalResult, eval_features, finetune, knn_probe, linear_probe, sparsity_values

__all__ = ["EvalResult", "eval_features", "finetune", "knn_probe", "linear_probe", "recalibrate_bn", "sparsity_values"]
