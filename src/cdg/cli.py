"""``cdg`` command line: pretrain, linear, finetune, knn, flops, report.

Every number printed or written to ``metrics.json`` carries its protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from cdg.config import ConfigError, load_config
from cdg.fileio import check_writable


def _set_threads() -> None:
    import torch

    n = int(os.environ.get("CDG_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)


def _eval_sets(cfg, backbone, progress: bool = True, cache: Path | None = None, finite: bool = True):
    """Features, labels and gate statistics of the train and test sets (branch a1, eval mode).

    With ``cache`` (a file in the run directory) they are computed once per backbone and data: the
    file is reused only while its key matches (the backbone weights' content, the dataset and a
    fingerprint of both splits, precision and layout). With ``finite``, inf/NaN features raise
    (see :func:`cdg.eval.features.check_finite`).
    """
    import torch

    from cdg.builders import dataset_kwargs
    from cdg.data import build_train_test, dataset_fingerprint
    from cdg.eval.features import check_finite, extract_features
    from cdg.fileio import RunFileError, atomic_torch_save, file_digest, load_torch_file

    train, test = build_train_test(cfg.data.dataset, cfg.data.root, cfg.data.download, **dataset_kwargs(cfg))
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
    bf16 = cfg.trainer.bf16
    tr, te = (extract_features(backbone, ds, cfg.data.dataset, cfg.data.eval_batch_size, bf16, cfg.trainer.channels_last,
                               progress, finite) for ds in (train, test))
    if key is not None:
        atomic_torch_save({"key": key, "train": tr, "test": te}, cache)
    return tr, te


def _sparsity_values(cfg, stats: dict[str, Any], backbone) -> dict[str, Any]:
    """eta on the test set (branch a1, eval mode) and both FLOPs reductions."""
    if not stats:
        return {}
    rep = mac_report(cfg)
    return {
        "eta": stats["eta"], "eta_flop_weighted": stats["eta_flop_weighted"], "eta_per_layer": stats["eta_per_layer"],
        "flops_reduction_eq13": _nominal_reduction(cfg, stats["eta"]),
        "flops_reduction_exact": rep.reduction_exact(stats["eta_per_layer"]),
    }


def _nominal_reduction(cfg, eta: float) -> float:
    """Eq. 13 for CDG/CGNet; 1 / (1 - eta) (no base path, predictors excluded) for FBS / DGC."""
    from cdg.metrics import flops_reduction_eq13

    if cfg.gating.mode in ("fbs", "dgc"):
        return 1.0 / (1.0 - eta) if eta < 1 else float("inf")
    return flops_reduction_eq13(eta, cfg.gating.groups)


def mac_report(cfg):
    import copy

    from cdg.builders import build_backbone
    from cdg.data import dataset_info
    from cdg.metrics import count_macs
    from cdg.nn import gated_layers

    gated = {n: (m.gate_groups, m.group_size, getattr(m, "gating_kind", "cdg"),
                 m.predictor_macs() if hasattr(m, "predictor_macs") else 0)
             for n, m in gated_layers(build_backbone(cfg))}
    dense_cfg = copy.deepcopy(cfg)
    dense_cfg.gating.mode = "dense"
    size = dataset_info(cfg.data.dataset).image_size or 224
    return count_macs(build_backbone(dense_cfg), (3, size, size), gated)


def cmd_pretrain(a: argparse.Namespace) -> int:
    from cdg.train import pretrain

    out = Path(a.out)
    if a.resume:
        if not (out / "config.yaml").is_file():
            raise ConfigError(f"--resume: {out} holds no run (no config.yaml)")
        cfg = load_config(out / "config.yaml", a.overrides)
    else:
        if a.config is None:
            raise ConfigError("pretrain needs --config FILE (or --resume with an existing --out)")
        cfg = load_config(a.config, a.overrides)
    values = pretrain(cfg, out, resume=a.resume)
    print(json.dumps({k: v for k, v in values.items()}, indent=2))
    return 0


def cmd_knn(a: argparse.Namespace) -> int:
    from cdg.eval.features import nonfinite_rows
    from cdg.eval.knn import knn_accuracy
    from cdg.runs import base_protocol, load_run, update_metrics

    cfg, backbone = load_run(a.run)
    check_writable(a.run)
    (trf, try_, _), (tef, tey, stats) = _eval_sets(cfg, backbone, cache=Path(a.run) / "features_a1.pt",
                                                   finite=not a.count_nonfinite)
    acc = knn_accuracy(trf, try_, tef, tey, cfg.eval.knn_k, cfg.eval.knn_temperature)
    name = f"kNN (k={cfg.eval.knn_k}, cosine, T={cfg.eval.knn_temperature})"
    values = {"knn_top1": acc}
    if a.count_nonfinite:
        bad = [int(nonfinite_rows(f).sum()) for f in (trf, tef)]
        values.update(knn_nonfinite_train=bad[0], knn_nonfinite_test=bad[1])
        name += f"; inf/NaN features: {bad[0]} train images left out of the memory, {bad[1]} test images scored wrong"
    prot = base_protocol(cfg, protocol=name, train_split="train (all)", eval_split="test", label_fraction=1.0,
                         pretrain_epochs=cfg.trainer.max_epochs, branch="a1")
    values.update(_sparsity_values(cfg, stats, backbone))
    _print_result("kNN top-1", acc, prot, values)
    update_metrics(a.run, values, prot)
    return 0


def cmd_linear(a: argparse.Namespace) -> int:
    from cdg.eval.linear import linear_probe_fast
    from cdg.runs import base_protocol, load_run, update_metrics

    if not a.fast:
        if a.random_init:
            raise ConfigError("--random-init is available with --fast only")
        return _supervised(a, finetune=False)
    cfg, backbone = load_run(a.run)
    check_writable(a.run)
    key = "linear_top1"
    if a.random_init:  # the floor: the same probe on a randomly initialised backbone of this config
        import torch

        from cdg.builders import build_backbone

        torch.manual_seed(cfg.trainer.seed)
        backbone, key = build_backbone(cfg), "linear_top1_random_init"
    t0 = time.time()
    cache = None if a.random_init else Path(a.run) / "features_a1.pt"
    (trf, try_, _), (tef, tey, stats) = _eval_sets(cfg, backbone, cache=cache)
    acc = linear_probe_fast(trf, try_, tef, tey, cfg.eval.fast_linear_l2, cfg.eval.fast_linear_max_iter)
    prot = base_protocol(cfg, protocol="linear probe (fast: logistic regression on standardised frozen features of un-augmented images, L-BFGS)",
                         train_split="train (all)", eval_split="test", label_fraction=1.0,
                         pretrain_epochs=cfg.trainer.max_epochs, branch="a1")
    if a.random_init:
        prot["backbone"] = "random initialisation (no pre-training)"
        values = {key: acc}
    else:
        values = {key: acc, "linear_wall_s": time.time() - t0, **_sparsity_values(cfg, stats, backbone)}
    _print_result("linear top-1" + (" (random-init backbone)" if a.random_init else ""), acc, prot, values)
    update_metrics(a.run, values, prot)
    return 0


def _supervised(a: argparse.Namespace, finetune: bool) -> int:
    """Fine-tuning on a stratified label fraction, or the SGD linear protocol, on branch a1."""
    import copy

    import lightning as L
    from torch.utils.data import DataLoader

    from cdg.builders import dataset_kwargs
    from cdg.data import TensorImageDataset, build_train_test, save_split, stratified_subset
    from cdg.eval.supervised import SupervisedHead, evaluate_classifier
    from cdg.nn import gate_statistics, reset_gate_stats
    from cdg.runs import base_protocol, load_run, update_metrics
    from cdg.train import BatchedTensorDataset, _as_batch, build_trainer

    cfg, backbone = load_run(a.run)
    check_writable(a.run)
    cfg = copy.deepcopy(cfg)
    # evaluation trains on its whole split: pre-training's batch limit is not an evaluation setting
    cfg.trainer.limit_train_batches = None
    if a.epochs is not None:
        if finetune:
            cfg.eval.finetune_epochs = a.epochs
        else:
            cfg.eval.linear_epochs = a.epochs
    train, test = build_train_test(cfg.data.dataset, cfg.data.root, cfg.data.download, **dataset_kwargs(cfg))
    if not isinstance(train, TensorImageDataset):
        raise ConfigError(f"fine-tuning and the SGD linear protocol support in-memory datasets (CIFAR) only, not {cfg.data.dataset}")
    fraction = cfg.eval.finetune_fraction if finetune else 1.0
    if fraction < 1.0:
        idx = stratified_subset(train.targets, fraction, cfg.eval.split_seed)
        save_split(Path(a.run) / "finetune_split.json", idx, fraction=fraction, seed=cfg.eval.split_seed)
        train = train.subset(idx)
    # the SGD probe has its own batch size (eval.linear_batch_size); fine-tuning uses pre-training's
    batch = cfg.data.batch_size if finetune else cfg.eval.linear_batch_size
    loader = DataLoader(BatchedTensorDataset(train), batch_size=batch, shuffle=True, drop_last=True,
                        collate_fn=_as_batch)
    model = SupervisedHead(cfg, backbone, len(train.classes), finetune, len(loader))
    if cfg.trainer.channels_last:
        model = model.to(memory_format=__import__("torch").channels_last)
    epochs = cfg.eval.finetune_epochs if finetune else cfg.eval.linear_epochs
    stage = "finetune" if finetune else "linear_sgd"
    L.seed_everything(cfg.trainer.seed)
    t0 = time.time()
    trainer = build_trainer(cfg, Path(a.run) / stage, [], max_epochs=epochs, enable_checkpointing=False)
    trainer.fit(model, loader)
    reset_gate_stats(model.backbone)
    acc = evaluate_classifier(model, test, cfg.data.eval_batch_size)
    stats = gate_statistics(model.backbone, "eval")
    key = "finetune_top1" if finetune else "linear_sgd_top1"
    name = (f"fine-tune (SGD lr {cfg.eval.finetune_lr}, cosine, wd {cfg.eval.finetune_weight_decay}, gating active, tau trained to s)"
            if finetune else f"linear probe (SGD, frozen backbone and gates, batch {batch}, lr {cfg.eval.linear_lr}, steps at {cfg.eval.linear_milestones})")
    prot = base_protocol(cfg, protocol=name, train_split=f"train, stratified {fraction:.0%} (seed {cfg.eval.split_seed})",
                         eval_split="test", label_fraction=fraction, pretrain_epochs=cfg.trainer.max_epochs,
                         epochs=epochs, branch="a1")
    values: dict[str, Any] = {key: acc, f"{stage}_wall_s": time.time() - t0}
    if finetune and stats:
        sp = _sparsity_values(cfg, stats, model.backbone)
        values.update({f"finetune_{k}": v for k, v in sp.items()})
    elif stats:
        values.update(_sparsity_values(cfg, stats, model.backbone))
    label = "fine-tune top-1" if finetune else "linear probe (SGD) top-1"
    _print_result(label, acc, prot, {k.replace("finetune_", ""): v for k, v in values.items()})
    if finetune:
        from cdg.fileio import atomic_torch_save

        atomic_torch_save(model.backbone.state_dict(), Path(a.run) / "finetuned_backbone.pt")
    update_metrics(a.run, values, prot)
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    return _supervised(a, finetune=True)


def _print_result(label: str, acc: float, prot: dict[str, Any], values: dict[str, Any]) -> None:
    print(f"{label}: {100 * acc:.2f}%  [{prot['protocol']}; {prot['dataset']} {prot['eval_split']}; "
          f"{prot['model']} x{prot['width']}; {prot['method']} {prot['pretrain_epochs']} epochs; {prot['gating']}; "
          f"label fraction {prot['label_fraction']}; seed {prot['seed']}]")
    if "eta" in values:
        print(f"  eta (test, branch a1) {100 * values['eta']:.2f}%  FLOPs reduction: Eq. 13 (nominal for FBS/DGC) {values['flops_reduction_eq13']:.2f}x, "
              f"exact whole network {values['flops_reduction_exact']:.2f}x")


def cmd_flops(a: argparse.Namespace) -> int:
    from cdg.runs import read_metrics

    cfg = load_config(a.config, a.overrides)
    rep = mac_report(cfg)
    out: dict[str, Any] = {"config": a.config, **rep.to_dict()}
    eta: Any = a.eta
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise ConfigError(f"--eta is a fraction of the conditional path that is skipped: expected 0 <= eta <= 1, got {eta}")
    if eta is not None and eta >= 1.0 and cfg.gating.mode in ("fbs", "dgc"):
        raise ConfigError(f"--eta {eta}: {cfg.gating.mode} always keeps some channels (gating.keep_ratio > 0); expected eta < 1")
    if a.run:
        eta = read_metrics(a.run).get("eta_per_layer")
        if eta is None:
            raise ConfigError(f"{a.run}/metrics.json has no eta_per_layer; run `cdg linear --fast --run {a.run}` first")
    if eta is not None and cfg.gating.mode != "dense":
        out["gated_macs"] = rep.gated_macs(eta)
        out["flops_reduction_exact"] = rep.reduction_exact(eta)
        if isinstance(eta, float):
            out["flops_reduction_eq13"] = _nominal_reduction(cfg, eta)
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'layer':<28}{'MACs':>14}  gated")
    for l in rep.layers:
        print(f"{l.name:<28}{l.macs:>14,}  {'G=%d C_g=%d' % (l.gate_groups, l.group_size) if l.gated else ''}")
    print(f"{'total (dense)':<28}{rep.total_dense:>14,}  ({rep.total_dense / 1e9:.4f} GMACs per image)")
    if "gated_macs" in out:
        print(f"{'total (gated)':<28}{int(out['gated_macs']):>14,}  exact reduction {out['flops_reduction_exact']:.2f}x"
              + (f", {'Eq. 13' if cfg.gating.mode not in ('fbs', 'dgc') else 'nominal 1/(1-eta)'} {out['flops_reduction_eq13']:.2f}x"
                 if "flops_reduction_eq13" in out else ""))
    return 0


REPORT_KEYS = (
    ("linear_top1", "linear probe top-1", "%"), ("linear_top1_random_init", "same probe, random-init backbone", "%"),
    ("linear_sgd_top1", "linear probe (SGD) top-1", "%"),
    ("knn_top1", "kNN top-1", "%"), ("finetune_top1", "fine-tune top-1", "%"), ("eta", "eta (test, a1)", "%"),
    ("flops_reduction_eq13", "FLOPs reduction Eq. 13", "x"), ("flops_reduction_exact", "FLOPs reduction exact", "x"),
    ("pretrain_wall_s", "pre-training wall time", "s"), ("pretrain_images_per_s", "pre-training throughput", "img/s"),
)


def cmd_report(a: argparse.Namespace) -> int:
    """Print (and write ``report.md``) every metric of a run with the protocol that produced it."""
    from cdg.runs import read_metrics

    m = read_metrics(a.run)
    if not m:
        raise FileNotFoundError(f"{a.run}/metrics.json not found or empty; run pretrain and an evaluation first")
    prot = m.get("protocol", {})
    lines = [f"# cdg run report: {a.run}", "", "| metric | value | protocol |", "|---|---|---|"]
    for key, label, unit in REPORT_KEYS:
        if m.get(key) is None:
            continue
        v = m[key]
        val = f"{100 * v:.2f}%" if unit == "%" else (f"{v:.2f}x" if unit == "x" else f"{v:.1f} {unit}")
        p = prot.get(key, {})
        desc = "; ".join(f"{k}={v}" for k, v in p.items())
        lines.append(f"| {label} | {val} | {desc} |")
    text = "\n".join(lines) + "\n"
    print(text)
    from cdg.fileio import atomic_write_text

    atomic_write_text(Path(a.run) / "report.md", text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cdg", description="Contrastive Dual Gating: sparse self-supervised learning")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("pretrain", help="self-supervised pre-training into a run directory")
    s.add_argument("--config")
    s.add_argument("--out", required=True)
    s.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.width=0.25")
    s.set_defaults(fn=cmd_pretrain)
    for name, fn, helptext in (("linear", cmd_linear, "linear probe of a run's frozen backbone (SGD protocol, or --fast)"),
                               ("knn", cmd_knn, "kNN accuracy of a run's frozen backbone"),
                               ("finetune", cmd_finetune, "fine-tune on a stratified label fraction (50%%) with gating active")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--run", required=True)
        if name in ("linear", "finetune"):
            s.add_argument("--epochs", type=int, help="override eval.linear_epochs / eval.finetune_epochs")
        if name == "knn":
            s.add_argument("--count-nonfinite", action="store_true",
                           help="score test images with inf/NaN features as wrong (and leave such training images "
                                "out of the memory) instead of stopping; the counts go into metrics.json")
        if name == "linear":
            s.add_argument("--fast", action="store_true", help="cached features + logistic regression (CPU protocol)")
            s.add_argument("--random-init", action="store_true", help="probe a randomly initialised backbone (the floor)")
        s.set_defaults(fn=fn)
    s = sub.add_parser("report", help="all metrics of a run with their protocols (also writes report.md)")
    s.add_argument("--run", required=True)
    s.set_defaults(fn=cmd_report)
    s = sub.add_parser("flops", help="MACs per layer and in total; FLOPs reduction for an eta")
    s.add_argument("--config", required=True)
    s.add_argument("--eta", type=float, help="one conditional-path sparsity for every gated layer")
    s.add_argument("--run", help="use the measured per-layer eta of this run")
    s.add_argument("--json", action="store_true")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_flops)
    a, extra = p.parse_known_args(argv)
    # argparse stops filling `overrides` at the first option, so `--config X a=1 --out Y b=2` leaves b=2 over
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if overrides and hasattr(a, "overrides"):
        a.overrides += overrides
        extra = [e for e in extra if e not in overrides]
    if extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    _set_threads()
    from cdg.data import DataError
    from cdg.eval.features import NonFiniteFeaturesError
    from cdg.fileio import RunFileError
    from cdg.train import NonFiniteLossError

    try:
        return a.fn(a)
    except (ConfigError, FileNotFoundError, FileExistsError, PermissionError, RunFileError, NonFiniteFeaturesError) as e:
        print(f"cdg {a.cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"cdg {a.cmd}: data error: {_one_line(e)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"cdg {a.cmd}: error: {e}", file=sys.stderr)
        return 3
    except OSError as e:  # e.g. the disk filled up while writing a result
        print(f"cdg {a.cmd}: error: {e}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    """The error's own message: an error raised in a DataLoader worker arrives with the worker's
    traceback inside its message ("Caught DataError in DataLoader worker process 0. Original
    Traceback ..."); keep the original message only."""
    text = str(e)
    if "Original Traceback" in text:
        name = type(e).__name__
        tail = [ln for ln in text.strip().splitlines() if ln.split(":", 1)[0].endswith(name)]
        if tail:
            return tail[-1].split(":", 1)[1].strip()
    return text.strip()


if __name__ == "__main__":
    sys.exit(main())
