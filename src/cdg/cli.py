"""``cdg`` command line: pretrain, linear, finetune, knn, report, flops, recalibrate-bn, export,
speed, visualize, plot.

A thin shell: it parses, calls the library (:mod:`cdg.train`, :mod:`cdg.eval`, :mod:`cdg.metrics`,
:mod:`cdg.runs`, :mod:`cdg.export`) and prints. Every number printed or written to
``metrics.json`` carries its protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from cdg.config import ConfigError, load_config


def _set_threads() -> None:
    import torch

    n = int(os.environ.get("CDG_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)


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
    if values:  # the other DDP processes return nothing
        print(json.dumps(values, indent=2))
    return 0


def _evaluate(run: str, evaluate) -> int:
    """Check that ``run`` is writable before any work, print the result, then write it: a
    result that cannot be written is still shown."""
    from cdg.fileio import check_writable

    check_writable(run)
    result = evaluate(save=False)
    print(result.summary())
    result.save(run)
    return 0


def cmd_knn(a: argparse.Namespace) -> int:
    from cdg.eval import knn_probe

    return _evaluate(a.run, lambda save: knn_probe(a.run, count_nonfinite=a.count_nonfinite, save=save))


def cmd_linear(a: argparse.Namespace) -> int:
    from cdg.eval import linear_probe

    if a.random_init and not a.fast:
        raise ConfigError("--random-init is available with --fast only")
    return _evaluate(a.run, lambda save: linear_probe(a.run, fast=a.fast, random_init=a.random_init, epochs=a.epochs,
                                                      save=save))


def cmd_finetune(a: argparse.Namespace) -> int:
    from cdg.eval import finetune

    return _evaluate(a.run, lambda save: finetune(a.run, epochs=a.epochs, save=save))


def cmd_flops(a: argparse.Namespace) -> int:
    from cdg.metrics import mac_report
    from cdg.nn import get_gating_mode
    from cdg.runs import read_metrics

    cfg = load_config(a.config, a.overrides)
    mode = get_gating_mode(cfg.gating.mode)
    rep = mac_report(cfg)
    out: dict[str, Any] = {"config": a.config, **rep.to_dict()}
    eta: Any = a.eta
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise ConfigError(f"--eta is a fraction of the conditional path that is skipped: expected 0 <= eta <= 1, got {eta}")
    if eta is not None and eta >= 1.0 and mode.eta_below_one:
        raise ConfigError(f"--eta {eta}: {cfg.gating.mode} always keeps some channels (gating.keep_ratio > 0); expected eta < 1")
    if a.run:
        eta = read_metrics(a.run).get("eta_per_layer")
        if eta is None:
            raise ConfigError(f"{a.run}/metrics.json has no eta_per_layer; run `cdg linear --fast --run {a.run}` first")
    if eta is not None and mode.gated:
        out["gated_macs"] = rep.gated_macs(eta)
        out["flops_reduction_exact"] = rep.reduction_exact(eta)
        if isinstance(eta, float):
            out["flops_reduction_eq13"] = mode.nominal_reduction(eta, cfg.gating)
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'layer':<28}{'MACs':>14}  gated")
    for l in rep.layers:
        print(f"{l.name:<28}{l.macs:>14,}  {'G=%d C_g=%d' % (l.gate_groups, l.group_size) if l.gated else ''}")
    print(f"{'total (dense)':<28}{rep.total_dense:>14,}  ({rep.total_dense / 1e9:.4f} GMACs per image)")
    if "gated_macs" in out:
        print(f"{'total (gated)':<28}{int(out['gated_macs']):>14,}  exact reduction {out['flops_reduction_exact']:.2f}x"
              + (f", {mode.nominal_name} {out['flops_reduction_eq13']:.2f}x" if "flops_reduction_eq13" in out else ""))
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    """Print (and write ``report.md``) every metric of a run with the protocol that produced it."""
    from cdg.fileio import atomic_write_text
    from cdg.runs import run_report

    text = run_report(a.run)
    print(text)
    atomic_write_text(Path(a.run) / "report.md", text)
    return 0


def cmd_recalibrate_bn(a: argparse.Namespace) -> int:
    from cdg.eval.protocols import recalibrate_bn_run

    out = recalibrate_bn_run(a.run, a.out, a.images, {"a1": 0, "a2": 1}[a.branch])
    print(f"wrote {out}: BatchNorm statistics of branch {a.branch} on {a.images} training images; "
          f"evaluate it as any run, e.g. cdg linear --fast --run {out}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    if a.format == "sparse":
        from cdg.sparse.engine import export_run

        print(json.dumps(export_run(a.run, a.out), indent=2, default=str))
        return 0
    from cdg.export import export_torchvision

    info = export_torchvision(a.run, a.out)
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_visualize(a: argparse.Namespace) -> int:
    from cdg.viz import visualize

    vis = visualize(a.run, a.out, images=a.images, image_paths=a.image, layer=a.layer, channel=a.channel, seed=a.seed)
    print(vis.summary())
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    from cdg.plots import plot_runs

    result = plot_runs(a.runs, a.out)
    for name, path in result.written.items():
        print(f"wrote {path}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def cmd_speed(a: argparse.Namespace) -> int:
    """images/s of the dense, masked-dense and sparse inference forms of a run (cdg.sparse.speed)."""
    from cdg.sparse.speed import format_report, speed_report

    r = speed_report(a.run, batches=tuple(a.batches), threads=tuple(a.threads), rounds=a.rounds,
                     random_input=a.random_input, rss=not a.no_rss)
    print(format_report(r))
    if a.json:
        from cdg.fileio import atomic_write_text

        atomic_write_text(a.json, json.dumps(r, indent=2, default=str))
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
    s = sub.add_parser("recalibrate-bn", help="copy a run with BatchNorm statistics re-estimated on branch a1")
    s.add_argument("--run", required=True)
    s.add_argument("--out", required=True, help="the new run directory")
    s.add_argument("--images", type=int, default=10240, help="un-augmented training images to average over")
    s.add_argument("--branch", choices=["a1", "a2"], default="a1")
    s.set_defaults(fn=cmd_recalibrate_bn)
    s = sub.add_parser("export", help="write a run's backbone in another library's format (torchvision ResNet)")
    s.add_argument("--run", required=True)
    s.add_argument("--out", required=True, help="the file to write (a state dict; FILE.json says how to load it)")
    s.add_argument("--format", choices=["torchvision", "sparse"], default="torchvision",
                   help="torchvision: the dense weights under torchvision's ResNet names (gates dropped); "
                        "sparse: the sparse inference form (branch a1, BN folded; cdg.sparse.load_inference)")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("speed", help="images/s of the dense, masked-dense and sparse inference forms of a run")
    s.add_argument("--run", required=True)
    s.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    s.add_argument("--threads", type=int, nargs="+", default=[1], help="e.g. --threads 1 2")
    s.add_argument("--rounds", type=int, default=7, help="interleaved rounds per setting (medians)")
    s.add_argument("--random-input", action="store_true", help="time on random images instead of the test set")
    s.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    s.add_argument("--json", help="also write the measurements to this JSON file")
    s.set_defaults(fn=cmd_speed)
    s = sub.add_parser("visualize", help="base path, gate mask and conditional path of one gated layer, a1 and a2 (Fig. 9)")
    s.add_argument("--run", required=True)
    s.add_argument("--out", required=True, help="the PNG to write")
    pick = s.add_mutually_exclusive_group()
    pick.add_argument("--images", type=int, default=4, help="test images to show, chosen with --seed (default 4)")
    pick.add_argument("--image", action="append", metavar="PATH", help="an image file to show instead (repeatable)")
    s.add_argument("--layer", help="gated layer name (default layer1.0.conv2)")
    s.add_argument("--channel", type=int, help="mask channel drawn as a binary map (default: open closest to half the time)")
    s.add_argument("--seed", type=int, default=0, help="chooses the images and draws the two views' augmentations")
    s.set_defaults(fn=cmd_visualize)
    s = sub.add_parser("plot", help="training and accuracy figures (paper Fig. 1, 3, 4, 7, 8) from run directories")
    s.add_argument("--runs", nargs="+", required=True, metavar="DIR")
    s.add_argument("--out", required=True, help="folder for the PNGs")
    s.set_defaults(fn=cmd_plot)
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
