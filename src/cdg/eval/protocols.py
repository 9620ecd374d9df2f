"""Evaluation of a run directory, as a library: what ``cdg knn``, ``cdg linear`` and ``cdg finetune`` do.

Every function takes a run directory (``cdg pretrain --out DIR``), evaluates branch a1 of its
backbone and returns an :class:`EvalResult`: the accuracy, the other values measured on the way
(conditional-path sparsity eta and both FLOPs reductions for gated backbones) and the protocol of
each value. With ``save=True`` (the default) they are merged into the run's ``metrics.json``::

    from cdg.eval import knn_probe, linear_probe, finetune
    r = linear_probe("runs/demo-cdg")            # fast protocol: logistic regression on cached features
    print(r.accuracy, r.values["eta"], r.protocol["protocol"])
    knn_probe("runs/demo-cdg").accuracy
    linear_probe("runs/demo-cdg", fast=False)    # SGD protocol (eval.linear_*), trains a classifier
    finetune("runs/demo-cdg", epochs=5)          # label fraction eval.finetune_fraction, gating active

Protocols (docs/design.md §4): kNN (k, cosine, temperature) and the fast linear probe read the
features of the un-augmented training and test images (cached in ``features_a1.pt`` while the
backbone and data are unchanged); eta and the FLOPs reductions carry the protocol of the pass
that measured them (eval mode, branch a1, the test images), not that of the classifier.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cdg.builders import build_backbone, build_eval_datasets
from cdg.config import Config, ConfigError
from cdg.data import TensorImageDataset, dataset_fingerprint, save_split, stratified_subset
from cdg.eval.features import check_finite, extract_features, nonfinite_rows
from cdg.eval.knn import knn_accuracy
from cdg.eval.linear import linear_probe_fast
from cdg.fileio import RunFileError, atomic_torch_save, check_writable, file_digest, load_torch_file
from cdg.metrics import mac_report
from cdg.nn import gate_statistics, get_gating_mode, reset_gate_stats
from cdg import runs
from cdg.runs import base_protocol, load_run

Features = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]

#: the keys measured by the evaluation forward pass (not by the classifier trained on its features)
SPARSITY_KEYS = ("eta", "eta_flop_weighted", "eta_per_layer", "flops_reduction_eq13", "flops_reduction_exact")


@dataclass
class EvalResult:
    """One evaluation: ``values[key]`` is the accuracy; ``protocols`` holds each value's protocol."""

    key: str
    label: str
    values: dict[str, Any]
    protocols: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: files the evaluation produced besides the metrics (e.g. the fine-tuned backbone), written by
    #: :meth:`save`: each is called with the run directory
    writers: list[Callable[[Path], None]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return float(self.values[self.key])

    @property
    def protocol(self) -> dict[str, Any]:
        return self.protocols[self.key]

    def summary(self) -> str:
        """The result with its protocol, as ``cdg`` prints it (two lines for a gated backbone)."""
        p = self.protocol
        line = (f"{self.label}: {100 * self.accuracy:.2f}%  [{p['protocol']}; {p['dataset']} {p['eval_split']}; "
                f"{p['model']} x{p['width']}; {p['method']} {p['pretrain_epochs']} epochs; {p['gating']}; "
                f"label fraction {p['label_fraction']}; seed {p['seed']}]")
        v = {k.replace("finetune_", ""): x for k, x in self.values.items()}
        if "eta" in v:
            line += (f"\n  eta (test, branch a1) {100 * v['eta']:.2f}%  FLOPs reduction: {v['nominal_name']} "
                     f"{v['flops_reduction_eq13']:.2f}x, exact whole network {v['flops_reduction_exact']:.2f}x")
        return line

    def save(self, run_dir: str | Path) -> dict[str, Any]:
        """Write the evaluation's files and merge the values, each with its own protocol, into
        ``run_dir/metrics.json``; returns the merged metrics."""
        for write in self.writers:
            write(Path(run_dir))
        merged: dict[str, Any] = {}
        for prot in {id(p): p for p in self.protocols.values()}.values():
            keys = {k: v for k, v in self.values.items() if self.protocols.get(k) is prot}
            merged = runs.update_metrics(run_dir, keys, prot)
        return merged


def eval_features(cfg: Config, backbone: nn.Module, progress: bool = True, cache: Path | None = None,
                  finite: bool = True) -> tuple[Features, Features]:
    """Features, labels and gate statistics of the train and test sets (branch a1, eval mode).

    With ``cache`` (a file in the run directory) they are computed once per backbone and data: the
    file is reused only while its key matches (the content of ``backbone.pt`` beside it, the
    dataset and a fingerprint of both splits, precision and layout). With ``finite``, inf/NaN
    features raise :class:`cdg.eval.features.NonFiniteFeaturesError`.
    """
    train, test = build_eval_datasets(cfg)
    weights = cache.parent / "backbone.pt" if cache is not None else None
    key = None
    if cache is not None and weights.is_file():
        key = {"backbone": file_digest(weights), "dataset": cfg.data.dataset, "train": dataset_fingerprint(train),
               "test": dataset_fingerprint(test), "bf16": cfg.trainer.bf16, "channels_last": cfg.trainer.channels_last}
        if cache.is_file():
            try:
                stored = load_torch_file(cache, "feature cache", weights_only=False)
            except RunFileError:
                stored = None  # a damaged cache is recomputed
            if isinstance(stored, dict) and stored.get("key") == key:
                tr, te = stored["train"], stored["test"]
                for feats, _, _ in (tr, te) if finite else ():
                    check_finite(feats, cfg.data.dataset)
                return tr, te
    backbone = backbone.to(cfg.trainer.device())
    if cfg.trainer.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    tr, te = (extract_features(backbone, ds, cfg.data.dataset, cfg.data.eval_batch_size, cfg.trainer.bf16,
                               cfg.trainer.channels_last, progress, finite) for ds in (train, test))
    if key is not None:
        atomic_torch_save({"key": key, "train": tr, "test": te}, cache)
    return tr, te


def sparsity_values(cfg: Config, stats: dict[str, Any]) -> dict[str, Any]:
    """eta (from :func:`cdg.nn.gate_statistics`) and both FLOPs reductions: the nominal one of the
    gating mode (Eq. 13 for CDG) and the exact whole-network one (per-layer eta, PyTorch's counter).
    Empty for a dense backbone."""
    if not stats:
        return {}
    mode = get_gating_mode(cfg.gating.mode)
    return {
        "eta": stats["eta"], "eta_flop_weighted": stats["eta_flop_weighted"], "eta_per_layer": stats["eta_per_layer"],
        "flops_reduction_eq13": mode.nominal_reduction(stats["eta"], cfg.gating),
        "flops_reduction_exact": mac_report(cfg).reduction_exact(stats["eta_per_layer"]),
        "nominal_name": mode.nominal_name,
    }


def _sparsity_protocol(cfg: Config, split: str = "test", **extra: Any) -> dict[str, Any]:
    return base_protocol(cfg, protocol="gate statistics of the evaluation forward pass (eval mode, gates as trained)",
                         eval_split=split, pretrain_epochs=cfg.trainer.max_epochs, branch="a1", **extra)


def _result(cfg: Config, key: str, label: str, acc: float, prot: dict[str, Any], extra: dict[str, Any],
            sparsity: dict[str, Any], sparsity_prot: dict[str, Any] | None, prefix: str = "") -> EvalResult:
    values = {key: acc, **extra}
    protocols = {k: prot for k in values}
    if sparsity:
        sp_prot = sparsity_prot or _sparsity_protocol(cfg)
        for k, v in sparsity.items():
            values[prefix + k if k != "nominal_name" else k] = v
            protocols[prefix + k if k != "nominal_name" else k] = sp_prot
    return EvalResult(key, label, values, protocols)


def knn_probe(run_dir: str | Path, count_nonfinite: bool = False, save: bool = True,
              progress: bool = True) -> EvalResult:
    """Weighted kNN accuracy (``eval.knn_k``, cosine, ``eval.knn_temperature``) of a run's frozen
    backbone: memory = the un-augmented training images, queries = the test images.

    With ``count_nonfinite``, images with inf/NaN features are scored wrong (and left out of the
    memory) and counted, instead of raising."""
    run = Path(run_dir)
    cfg, backbone = load_run(run)
    if save:
        check_writable(run)
    (trf, try_, _), (tef, tey, stats) = eval_features(cfg, backbone, progress, cache=run / "features_a1.pt",
                                                      finite=not count_nonfinite)
    acc = knn_accuracy(trf, try_, tef, tey, cfg.eval.knn_k, cfg.eval.knn_temperature)
    name = f"kNN (k={cfg.eval.knn_k}, cosine, T={cfg.eval.knn_temperature})"
    extra: dict[str, Any] = {}
    if count_nonfinite:
        bad = [int(nonfinite_rows(f).sum()) for f in (trf, tef)]
        extra = {"knn_nonfinite_train": bad[0], "knn_nonfinite_test": bad[1]}
        name += f"; inf/NaN features: {bad[0]} train images left out of the memory, {bad[1]} test images scored wrong"
    prot = base_protocol(cfg, protocol=name, train_split="train (all)", eval_split="test", label_fraction=1.0,
                         pretrain_epochs=cfg.trainer.max_epochs, branch="a1")
    r = _result(cfg, "knn_top1", "kNN top-1", acc, prot, extra, sparsity_values(cfg, stats), None)
    if save:
        r.save(run)
    return r


def linear_probe(run_dir: str | Path, fast: bool = True, random_init: bool = False, epochs: int | None = None,
                 save: bool = True, progress: bool = True) -> EvalResult:
    """Linear evaluation of a run's frozen backbone (branch a1, gates frozen).

    ``fast`` (the CPU protocol): logistic regression (L-BFGS, ``eval.fast_linear_*``) on the
    standardised features of the un-augmented images. Otherwise the SGD protocol (random crop +
    flip, ``eval.linear_*``; ``epochs`` overrides ``eval.linear_epochs``). ``random_init`` probes
    a randomly initialised backbone of the same config (the floor; fast protocol only).
    """
    if not fast:
        if random_init:
            raise ConfigError("random_init is available with the fast linear protocol only")
        return _supervised(run_dir, finetune=False, epochs=epochs, save=save)
    run = Path(run_dir)
    cfg, backbone = load_run(run)
    if save:
        check_writable(run)
    key, cache = "linear_top1", run / "features_a1.pt"
    if random_init:
        torch.manual_seed(cfg.trainer.seed)
        backbone, key, cache = build_backbone(cfg), "linear_top1_random_init", None
    t0 = time.time()
    (trf, try_, _), (tef, tey, stats) = eval_features(cfg, backbone, progress, cache=cache)
    acc = linear_probe_fast(trf, try_, tef, tey, cfg.eval.fast_linear_l2, cfg.eval.fast_linear_max_iter)
    prot = base_protocol(cfg, protocol="linear probe (fast: logistic regression on standardised frozen features "
                                       "of un-augmented images, L-BFGS)",
                         train_split="train (all)", eval_split="test", label_fraction=1.0,
                         pretrain_epochs=cfg.trainer.max_epochs, branch="a1")
    if random_init:
        prot["backbone"] = "random initialisation (no pre-training)"
        r = _result(cfg, key, "linear top-1 (random-init backbone)", acc, prot, {}, {}, None)
    else:
        r = _result(cfg, key, "linear top-1", acc, prot, {"linear_wall_s": time.time() - t0},
                    sparsity_values(cfg, stats), None)
    if save:
        r.save(run)
    return r


def finetune(run_dir: str | Path, epochs: int | None = None, save: bool = True) -> EvalResult:
    """Fine-tune a run's backbone with a linear classifier on a seeded stratified label fraction
    (``eval.finetune_fraction``), gating active on branch a1 and tau trained toward s (Sec. 5.2).
    Also writes ``finetuned_backbone.pt`` (with ``save``)."""
    return _supervised(run_dir, finetune=True, epochs=epochs, save=save)


def _supervised(run_dir: str | Path, finetune: bool, epochs: int | None, save: bool) -> EvalResult:
    """Fine-tuning on a stratified label fraction, or the SGD linear protocol, on branch a1."""
    import lightning as L
    from torch.utils.data import DataLoader

    from cdg.eval.supervised import SupervisedHead, evaluate_classifier
    from cdg.train import BatchedTensorDataset, _as_batch, build_trainer

    run = Path(run_dir)
    cfg, backbone = load_run(run)
    if save:
        check_writable(run)
    cfg = copy.deepcopy(cfg)
    # evaluation trains on its whole split: pre-training's batch limit is not an evaluation setting
    cfg.trainer.limit_train_batches = None
    if epochs is not None:
        if finetune:
            cfg.eval.finetune_epochs = epochs
        else:
            cfg.eval.linear_epochs = epochs
    train, test = build_eval_datasets(cfg)
    if not isinstance(train, TensorImageDataset):
        raise ConfigError(f"fine-tuning and the SGD linear protocol support in-memory datasets (CIFAR) only, "
                          f"not {cfg.data.dataset}")
    fraction = cfg.eval.finetune_fraction if finetune else 1.0
    writers: list[Callable[[Path], None]] = []
    if fraction < 1.0:
        idx = stratified_subset(train.targets, fraction, cfg.eval.split_seed)
        writers.append(lambda d: save_split(d / "finetune_split.json", idx, fraction=fraction, seed=cfg.eval.split_seed))
        train = train.subset(idx)
    # the SGD probe has its own batch size (eval.linear_batch_size); fine-tuning uses pre-training's
    batch = cfg.data.batch_size if finetune else cfg.eval.linear_batch_size
    loader = DataLoader(BatchedTensorDataset(train), batch_size=batch, shuffle=True, drop_last=True,
                        collate_fn=_as_batch)
    model = SupervisedHead(cfg, backbone, len(train.classes), finetune, len(loader))
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_epochs = cfg.eval.finetune_epochs if finetune else cfg.eval.linear_epochs
    stage = "finetune" if finetune else "linear_sgd"
    L.seed_everything(cfg.trainer.seed)
    t0 = time.time()
    trainer = build_trainer(cfg, run / stage, [], max_epochs=n_epochs, enable_checkpointing=False)
    trainer.fit(model, loader)
    reset_gate_stats(model.backbone)
    acc = evaluate_classifier(model, test, cfg.data.eval_batch_size)
    stats = gate_statistics(model.backbone, "eval")
    key = "finetune_top1" if finetune else "linear_sgd_top1"
    name = (f"fine-tune (SGD lr {cfg.eval.finetune_lr}, cosine, wd {cfg.eval.finetune_weight_decay}, gating active, "
            f"tau trained to s)" if finetune else
            f"linear probe (SGD, frozen backbone and gates, batch {batch}, lr {cfg.eval.linear_lr}, "
            f"steps at {cfg.eval.linear_milestones})")
    split = f"train, stratified {fraction:.0%} (seed {cfg.eval.split_seed})"
    prot = base_protocol(cfg, protocol=name, train_split=split, eval_split="test", label_fraction=fraction,
                         pretrain_epochs=cfg.trainer.max_epochs, epochs=n_epochs, branch="a1")
    # after fine-tuning the gates are the fine-tuned ones: eta then belongs to the fine-tuned backbone
    sp_prot = (_sparsity_protocol(cfg, stage=f"after fine-tuning {n_epochs} epochs on {split}") if finetune else None)
    r = _result(cfg, key, "fine-tune top-1" if finetune else "linear probe (SGD) top-1", acc, prot,
                {f"{stage}_wall_s": time.time() - t0, f"{stage}_steps_per_epoch": len(loader)},
                sparsity_values(cfg, stats), sp_prot,
                prefix="finetune_" if finetune else "")
    r.writers.extend(writers)
    if finetune:
        state = model.backbone.state_dict()
        r.writers.append(lambda d: atomic_torch_save(state, d / "finetuned_backbone.pt"))
    if save:
        r.save(run)
    return r


def recalibrate_bn_run(run_dir: str | Path, out_dir: str | Path, images: int = 10240, branch: int = 0) -> Path:
    """A copy of a run whose BatchNorm running statistics are re-estimated on one branch.

    Pre-training runs view 1 on branch a1 and view 2 on a2, so each BatchNorm's running statistics
    average both branches; evaluation reads branch a1. This re-estimates them on ``branch``'s own
    activations for ``images`` un-augmented training images (seeded by ``trainer.seed``; gates as
    trained, :func:`cdg.eval.bn.recalibrate_bn`) and writes ``out_dir`` as a run directory
    (``config.yaml``, ``backbone.pt``, ``metrics.json`` recording what was done), which every
    evaluation then reads like any run.
    """
    from cdg.data import dataset_info
    from cdg.eval.bn import recalibrate_bn
    from cdg.export import save_backbone
    from cdg.train import holds_run

    run, out = Path(run_dir), Path(out_dir)
    if out.resolve() == run.resolve() or holds_run(out):
        raise FileExistsError(f"{out} already holds a run; recalibrate-bn writes a new run directory")
    cfg, backbone = load_run(run)
    train, _ = build_eval_datasets(cfg)
    if not isinstance(train, TensorImageDataset):
        raise ConfigError(f"recalibrate-bn supports in-memory datasets (CIFAR) only, not {cfg.data.dataset}")
    if images < 1:
        raise ConfigError(f"--images must be >= 1, got {images}")
    check_writable(out)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.trainer.seed))[:images]
    info = dataset_info(cfg.data.dataset)
    backbone = backbone.to(cfg.trainer.device())
    with torch.autocast(cfg.trainer.device().type, dtype=torch.bfloat16, enabled=cfg.trainer.bf16):
        layers = recalibrate_bn(backbone, train.images[idx], info.mean, info.std, branch=branch,
                                batch_size=cfg.data.eval_batch_size, channels_last=cfg.trainer.channels_last)
    cfg.save(out / "config.yaml")
    save_backbone(out / "backbone.pt", cfg, backbone.cpu())
    record = {"source_run": str(run), "branch": ["a1", "a2"][branch], "images": len(idx), "bn_layers": layers}
    runs.update_metrics(out, {"bn_recalibration": record},
                        base_protocol(cfg, protocol="BatchNorm running statistics re-estimated on one branch "
                                                    "(un-augmented training images, gates as trained)"))
    return out
