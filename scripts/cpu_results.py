"""The CPU-scale evidence of docs/results.md: run the rows, then regenerate the page from the runs.

One fixed recipe for every row (the CPU proxy recipe (docs/design.md §7), `configs/cpu/simclr_dense.yaml`, cut to the
RECIPE overrides below): ResNet-18 at 0.25x width, CIFAR stem, batch 256, 4 epochs over all 50k
CIFAR-10 training images, fp32, seed 0; only the method and the gating change, never tuned per row. Each row is
pre-trained, then probed (`cdg linear --fast`: logistic regression on standardised frozen features
of the un-augmented training images, scored on the 10k test images) and kNN-scored. The same probe
on a randomly initialised backbone is the floor.

    python scripts/cpu_results.py run [ROW ...]     # resumable: finished rows are skipped
    python scripts/cpu_results.py report            # writes docs/results.md and docs/img/*.png
    python scripts/cpu_results.py list
    python scripts/cpu_results.py --results runs/evidence promote ROW ...   # archive finished rows in results/cpu

``--results DIR`` (before the command) keeps the runs elsewhere than ``results/cpu``; ``run --jobs N``
runs N rows at once, each in its own process (on a GPU the small-width rows are launch-bound, so
several share one card well).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "cpu"
DOCS = ROOT / "docs"
BASE = "configs/cpu/simclr_dense.yaml"
# The session that measured these rows ran on an AVX2-only CPU (no native bf16: bf16 autocast was
# 11x *slower* than fp32 there, benchmarks/bench_precision.py), slower than the host the recipe was first sized on, so the fixed recipe is
# the CPU proxy recipe cut to 4 epochs, in fp32, with the kNN / S_c monitor every 2 epochs.
RECIPE = ["trainer.max_epochs=4", "trainer.precision=32-true", "trainer.monitor_every_n_epochs=2",
          "trainer.progress_bar=false"]

# name: (table shape, description, overrides of the fixed recipe)
ROWS: dict[str, tuple[str, str, list[str]]] = {
    "simclr_dense": ("T1/T6", "SimCLR dense", []),
    "simclr_cdg_g4": ("T1/T6", "SimCLR + CDG (dual, disjoint base paths), G=4", ["gating.mode=dual", "gating.groups=4"]),
    # the equal-FLOPs control: the widest dense ResNet-18 whose MACs do not exceed CDG G=4's measured
    # exact cost (width 0.1875: 19.80M MACs per image against 20.56M = 35.05M / 1.70)
    "simclr_dense_eqflops": ("T6", "SimCLR dense at width 0.1875 (the MACs of CDG G=4 at its measured eta)", ["model.width=0.1875"]),
    "simclr_cgnet_g4": ("T1/T2/T6", "SimCLR + CGNet_SimCLR (shared diagonal base, masks per view), G=4", ["gating.mode=shared_base", "gating.groups=4"]),
    "simclr_unified_g4": ("T1", "SimCLR + unified gating (view 1's mask on view 2), G=4", ["gating.mode=unified", "gating.groups=4"]),
    "simclr_cdg_g2": ("T3", "SimCLR + CDG, G=2", ["gating.mode=dual", "gating.groups=2"]),
    "simclr_cdg_g8": ("T3", "SimCLR + CDG, G=8", ["gating.mode=dual", "gating.groups=8"]),
    "simclr_overlap75_g4": ("T2", "SimCLR + CDG, 75% base-path overlap, G=4", ["gating.mode=dual", "gating.groups=4", "gating.overlap=75"]),
    "simclr_overlap50_g4": ("T2", "SimCLR + CDG, 50% base-path overlap, G=4", ["gating.mode=dual", "gating.groups=4", "gating.overlap=50"]),
    "simclr_cdg_g4_cg4": ("T5", "SimCLR + structured CDG, C_g=4, G=4", ["gating.mode=dual", "gating.groups=4", "gating.group_size=4"]),
    # (C_g = 8 or 16 cannot be a row of this recipe: at width 0.25 the first stage has 16 channels,
    # 4 per group with G = 4, and C_g must divide C/G. Their speed models: configs/cpu/speed_structured_w1.yaml)
    # Fig. 7: the CDG G=4 row with other threshold targets s (simclr_cdg_g4 is s = 1.0)
    "simclr_cdg_g4_s0": ("F7", "SimCLR + CDG, G=4, target s=0.0", ["gating.mode=dual", "gating.groups=4", "gating.target=0.0"]),
    "simclr_cdg_g4_s05": ("F7", "SimCLR + CDG, G=4, target s=0.5", ["gating.mode=dual", "gating.groups=4", "gating.target=0.5"]),
    "simclr_cdg_g4_s15": ("F7", "SimCLR + CDG, G=4, target s=1.5", ["gating.mode=dual", "gating.groups=4", "gating.target=1.5"]),
    # FBS and DGC as their official code builds them (gating.baseline_form=official, the default) ...
    "simclr_fbs": ("T6", "SimCLR + FBS, official form (keep 0.5 of output channels)", ["gating.mode=fbs", "gating.keep_ratio=0.5", "gating.baseline_form=official"]),
    "simclr_dgc": ("T6", "SimCLR + DGC, official form (4 heads, keep 0.45 of input channels)", ["gating.mode=dgc", "gating.groups=4", "gating.keep_ratio=0.45", "gating.baseline_form=official"]),
    # ... and the earlier v1 form (design §5 as first read; see findings), kept for comparison
    "simclr_fbs_v1": ("T6", "SimCLR + FBS, v1 form (keep 0.5 of output channels)", ["gating.mode=fbs", "gating.keep_ratio=0.5", "gating.baseline_form=v1"]),
    "simclr_fbs_scalefree": ("T6", "SimCLR + FBS, v1 form, predictor on the RMS-normalised pooled input (see findings)", ["gating.mode=fbs", "gating.keep_ratio=0.5", "gating.baseline_form=v1", "gating.scale_free_saliency=true"]),
    "simclr_dgc_v1": ("T6", "SimCLR + DGC, v1 form (4 heads, keep 0.45 of input channels)", ["gating.mode=dgc", "gating.groups=4", "gating.keep_ratio=0.45", "gating.baseline_form=v1"]),
    "mocov2_dense": ("T7", "MoCo V2+ dense", ["method.name=mocov2", "optim.name=sgd", "optim.lr=0.3", "optim.weight_decay=1e-4", "method.queue_size=32768"]),
    "mocov2_cdg_g4": ("T7", "MoCo V2+ + CDG, G=4", ["method.name=mocov2", "optim.name=sgd", "optim.lr=0.3", "optim.weight_decay=1e-4", "method.queue_size=32768", "gating.mode=dual", "gating.groups=4"]),
    "simsiam_dense": ("T7", "SimSiam dense", ["method.name=simsiam", "optim.name=sgd", "optim.lr=0.5", "optim.weight_decay=1e-5", "method.proj_output_dim=2048", "model.zero_init_residual=true"]),
    "simsiam_cdg_g4": ("T7", "SimSiam + CDG, G=4", ["method.name=simsiam", "optim.name=sgd", "optim.lr=0.5", "optim.weight_decay=1e-5", "method.proj_output_dim=2048", "model.zero_init_residual=true", "gating.mode=dual", "gating.groups=4"]),
    # MoCo V2+ with hard gates: the key encoder's masks (key_gates) and a shorter EMA horizon
    "mocov2_cdg_g4_query": ("T7", "MoCo V2+ + CDG, G=4, key encoder reuses the query's masks (deviation)", ["method.name=mocov2", "optim.name=sgd", "optim.lr=0.3", "optim.weight_decay=1e-4", "method.queue_size=32768", "gating.mode=dual", "gating.groups=4", "method.key_gates=query"]),
    "mocov2_cdg_g4_ema09": ("T7", "MoCo V2+ + CDG, G=4, momentum 0.9 -> 0.99 (deviation)", ["method.name=mocov2", "optim.name=sgd", "optim.lr=0.3", "optim.weight_decay=1e-4", "method.queue_size=32768", "gating.mode=dual", "gating.groups=4", "method.base_momentum=0.9", "method.final_momentum=0.99"]),
    "mocov2_dense_ema09": ("T7", "MoCo V2+ dense, momentum 0.9 -> 0.99 (deviation)", ["method.name=mocov2", "optim.name=sgd", "optim.lr=0.3", "optim.weight_decay=1e-4", "method.queue_size=32768", "method.base_momentum=0.9", "method.final_momentum=0.99"]),
    # diagnostic of the open MoCo V2+ gap (CDG -17 points, SimCLR -5): the SimCLR rows train with LARS,
    # the MoCo rows with SGD as solo-learn; the same MoCo recipe with LARS (lr, weight decay unchanged)
    "mocov2_cdg_g4_lars": ("T7", "MoCo V2+ + CDG, G=4, LARS instead of SGD (deviation, diagnostic)", ["method.name=mocov2", "optim.name=lars", "optim.lr=0.3", "optim.weight_decay=1e-4", "method.queue_size=32768", "gating.mode=dual", "gating.groups=4"]),
    "mocov2_dense_lars": ("T7", "MoCo V2+ dense, LARS instead of SGD (deviation, diagnostic)", ["method.name=mocov2", "optim.name=lars", "optim.lr=0.3", "optim.weight_decay=1e-4", "method.queue_size=32768"]),
    # ... and with SimCLR's weight decay (1e-5 instead of MoCo V2+'s 1e-4), the other optimizer difference
    "mocov2_cdg_g4_wd1e5": ("T7", "MoCo V2+ + CDG, G=4, weight decay 1e-5 (deviation, diagnostic)", ["method.name=mocov2", "optim.name=sgd", "optim.lr=0.3", "optim.weight_decay=1e-5", "method.queue_size=32768", "gating.mode=dual", "gating.groups=4"]),
    "mocov2_dense_wd1e5": ("T7", "MoCo V2+ dense, weight decay 1e-5 (deviation, diagnostic)", ["method.name=mocov2", "optim.name=sgd", "optim.lr=0.3", "optim.weight_decay=1e-5", "method.queue_size=32768"]),
}
# seeds 1 and 2 of the rows whose differences the findings weigh (seed 0 is the row itself)
SEEDED = ("simclr_dense", "simclr_cdg_g4", "simclr_cgnet_g4")
SEED_SUFFIXES = ("", "_seed1", "_seed2")  # the row names of seeds 0, 1, 2
#: the differences the findings weigh: CDG against dense, and C3 (disjoint against one shared base path)
PAIRED = (("simclr_cdg_g4", "simclr_dense"), ("simclr_cdg_g4", "simclr_cgnet_g4"))
for _row in SEEDED:
    for _seed, _suffix in enumerate(SEED_SUFFIXES[1:], start=1):
        _shape, _desc, _over = ROWS[_row]
        ROWS[_row + _suffix] = ("seeds", f"{_desc}, seed {_seed}", [*_over, f"trainer.seed={_seed}"])


def cdg(*args: str) -> None:
    cmd = [sys.executable, "-m", "cdg", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def metrics(row: str, results: Path | None = None) -> dict:
    p = (results or RESULTS) / row / "metrics.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def run(rows: list[str], jobs: int = 1) -> None:
    rows = rows or list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown row(s) {unknown}; valid: {', '.join(ROWS)}")
    if jobs > 1:  # one process per row, `jobs` at a time, each with its own log
        RESULTS.mkdir(parents=True, exist_ok=True)
        pending, running, failed = list(rows), [], []
        while pending or running:
            while pending and len(running) < jobs:
                row = pending.pop(0)
                with (RESULTS / f"{row}.log").open("a") as log:  # the child keeps its own handle
                    cmd = [sys.executable, __file__, "--results", str(RESULTS), "run", row]
                    running.append((row, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)))
            time.sleep(2)
            for row, proc in [r for r in running if r[1].poll() is not None]:
                running.remove((row, proc))
                print(f"{row}: {'done' if proc.returncode == 0 else f'failed (exit {proc.returncode}), see {RESULTS / row}.log'}", flush=True)
                if proc.returncode:
                    failed.append(row)
        if failed:
            sys.exit(f"failed rows: {failed}")
        return
    for row in rows:
        out = RESULTS / row
        m = metrics(row)
        finished = _evaluated(m)  # evaluated rows whose weights were not kept
        if not finished and not (out / "backbone.pt").is_file():
            if (out / "checkpoints" / "last.ckpt").is_file():
                cdg("pretrain", "--resume", "--out", str(out))
            else:  # a new row, or one that stopped before its first checkpoint (pretrain starts it over)
                cdg("pretrain", "--config", BASE, "--out", str(out), *RECIPE, *ROWS[row][2])
            m = metrics(row)
        if "linear_top1" not in m and not _nonfinite(m):
            try:
                cdg("linear", "--fast", "--run", str(out))
            except subprocess.CalledProcessError:  # refused for inf/NaN features? kNN counts them as wrong
                cdg("knn", "--count-nonfinite", "--run", str(out))
                if not _nonfinite(metrics(row)):
                    raise
                print(f"{row}: no linear probe: the backbone gives non-finite features in eval mode; the kNN "
                      "leaves them out of its memory and scores them wrong", flush=True)
        if row == "simclr_dense" and "linear_top1_random_init" not in metrics(row):
            cdg("linear", "--fast", "--random-init", "--run", str(out))
        if "knn_top1" not in metrics(row):
            cdg("knn", "--run", str(out))


def _nonfinite(m: dict) -> bool:
    """Did ``cdg knn --count-nonfinite`` find images with inf/NaN features (no linear probe is possible)?"""
    return m.get("knn_nonfinite_train", 0) + m.get("knn_nonfinite_test", 0) > 0


def _evaluated(m: dict) -> bool:
    """A row's evaluations are done: kNN, and the linear probe unless its features are non-finite."""
    return "knn_top1" in m and ("linear_top1" in m or _nonfinite(m))


def promote(rows: list[str], dest: Path) -> None:
    """Copy finished rows of ``RESULTS`` (e.g. ``runs/evidence``) into ``dest`` (``results/cpu``), the
    folder docs/results.md is generated from: config.yaml, metrics.json, the CSV logs (pre-training
    with a resumed run's earlier attempts, and fine-tuning where it ran), the row's console log and the backbone in float16 (about 1.4 MB at width 0.25), so that any evaluation can
    be re-run on the archived row (``cdg linear --run results/cpu/ROW``) without re-training.
    A row already in ``dest`` is replaced (git keeps the old one)."""
    import shutil

    import torch

    from cdg.export import save_backbone
    from cdg.runs import load_run

    if RESULTS == dest.resolve():
        sys.exit(f"promote: --results is already {dest}")
    for row in rows:
        src, m = RESULTS / row, metrics(row)
        if row not in ROWS or not _evaluated(m) or not (src / "backbone.pt").is_file():
            sys.exit(f"promote: {src} is not a finished row (needs backbone.pt, the kNN result and the linear "
                     "probe's, or non-finite features counted by the kNN)")
        out = dest / row
        if out.exists():
            shutil.rmtree(out)
        # the whole logs folder: a resumed run's earlier attempts too, which cdg.runs.read_log joins
        shutil.copytree(src / "logs", out / "logs")
        for name in ("config.yaml", "metrics.json"):
            shutil.copy2(src / name, out / name)
        if (src / "finetune" / "logs" / "metrics.csv").is_file():  # eta during fine-tuning (Fig. 8b)
            (out / "finetune" / "logs").mkdir(parents=True)
            shutil.copy2(src / "finetune" / "logs" / "metrics.csv", out / "finetune" / "logs" / "metrics.csv")
        if (RESULTS / f"{row}.log").is_file():
            shutil.copy2(RESULTS / f"{row}.log", dest / f"{row}.log")
        cfg, backbone = load_run(src)
        save_backbone(out / "backbone.pt", cfg, backbone, dtype=torch.float16)
        print(f"{row}: {src} -> {out} (backbone float16, {(out / 'backbone.pt').stat().st_size / 1e6:.1f} MB)")


def _table(results: Path) -> list[str]:
    """One markdown row per run directory of ``results`` (in ROWS order)."""
    got = {row: m for row in ROWS if ROWS[row][0] != "seeds" and (m := metrics(row, results))}
    dense = {meth: got.get(f"{meth}_dense", {}).get("linear_top1") for meth in ("simclr", "mocov2", "simsiam")}
    pct = lambda v: f"{100 * v:.2f}%" if v is not None else ""  # noqa: E731
    lines = ["| row | shape of | linear probe top-1 | vs dense | kNN top-1 | eta (test) | FLOPs red. Eq. 13 "
             "| FLOPs red. exact | pre-train wall |", "|---|---|---|---|---|---|---|---|---|"]
    for row, m in got.items():
        shape, desc, over = ROWS[row]
        wall = f"{m['pretrain_wall_s'] / 60:.1f} min" if m.get("pretrain_wall_s") else "not recorded"
        knn = pct(m.get("knn_top1")) + (f" ({m['knn_nonfinite_test']} of 10,000 non-finite, scored wrong)"
                                        if m.get("knn_nonfinite_test") else "")
        meth = next((o.split("=")[1] for o in over if o.startswith("method.name=")), "simclr")
        ref = dense.get(meth)
        linear, delta = "no result: non-finite features (see findings)", ""
        if m.get("linear_top1") is not None:
            linear = pct(m["linear_top1"])
            delta = f"{100 * (m['linear_top1'] - ref):+.2f}" if ref is not None and not row.endswith("_dense") else ""
        red = lambda k: f"{m[k]:.2f}x" if m.get(k) is not None else "1.00x"  # noqa: E731
        lines.append(f"| {desc} | {shape} | {linear} | {delta} | {knn} | {pct(m.get('eta')) or '-'} "
                     f"| {red('flops_reduction_eq13')} | {red('flops_reduction_exact')} | {wall} |")
    return lines


def _seeds_table(results: Path) -> list[str]:
    """Mean and spread over seeds 0, 1, 2 of the SEEDED rows of ``results`` (those that exist)."""
    import statistics

    lines = ["| row | seeds run | linear probe top-1, mean ± sd (min-max) | kNN top-1, mean ± sd (min-max) |",
             "|---|---|---|---|"]
    for row in SEEDED:
        ms = [m for suffix in SEED_SUFFIXES if (m := metrics(row + suffix, results))]
        cells = []
        for key in ("linear_top1", "knn_top1"):
            v = [100 * m[key] for m in ms if m.get(key) is not None]
            sd = f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else ""
            cells.append(f"{statistics.mean(v):.2f}%{sd} ({min(v):.2f}-{max(v):.2f})" if v else "-")
        lines.append(f"| {ROWS[row][1]} | {len(ms)} of 3 | {cells[0]} | {cells[1]} |")
    lines += ["", "Differences between rows, paired by seed (seed 0 of one row against seed 0 of the other, and so on):", "",
              "| difference | seeds in both | linear probe, per seed | mean | kNN, per seed | mean |", "|---|---|---|---|---|---|"]
    for a, b in PAIRED:
        seeds = [(ma, mb) for suffix in SEED_SUFFIXES
                 if (ma := metrics(a + suffix, results)) and (mb := metrics(b + suffix, results))]
        cells = []
        for key in ("linear_top1", "knn_top1"):
            d = [100 * (ma[key] - mb[key]) for ma, mb in seeds if ma.get(key) is not None and mb.get(key) is not None]
            cells += [", ".join(f"{x:+.2f}" for x in d) or "-", f"{statistics.mean(d):+.2f}" if d else "-"]
        lines.append(f"| {a} - {b} | {len(seeds)} | {' | '.join(cells)} |")
    return lines


#: the figures of docs/results.md: cdg.plots name, title, what it shows
FIGURE_TEXT: tuple[tuple[str, str, str], ...] = (
    ("fig1", "Accuracy against FLOPs (Fig. 1 style)", "every row with an accuracy; linear probe left, kNN right "
     "(the v1 FBS and DGC rows and the official DGC row appear under kNN only: their eval features are not all finite, "
     "so their linear probe has no valid result)."),
    ("fig3", "Dual against unified gating (Fig. 3)", "rows that differ only in gating.mode; a row without a training "
     "log appears in the accuracy panel only (the caption names it)."),
    ("fig4", "Mask similarity S_c over training (Fig. 4)", "every row that logged it (the training monitor, every 2 epochs)."),
    ("fig7", "Accuracy against sparsity (Fig. 7)", "the CDG-family rows; rows of one results folder that differ only in "
     "the target s (simclr_cdg_g4 and the simclr_cdg_g4_s* rows) are joined by a line."),
    ("fig8a", "eta per branch during pre-training (Fig. 8a)", "every row that logged it."),
    ("fig8b", "eta during and after fine-tuning (Fig. 8b)", "rows with a fine-tuning result; the curve needs the fine-tuning log (`cdg finetune` logs finetune/eta)."),
    ("fig8c", "eta per gated layer (Fig. 8c)", "the GPU rows of CDG G = 2, 4, 8, CGNet_SimCLR and structured C_g = 4."),
)
PER_LAYER_ROWS = ("simclr_cdg_g2", "simclr_cdg_g4", "simclr_cdg_g8", "simclr_cgnet_g4", "simclr_cdg_g4_cg4")
FIG9_ROW = "simclr_cdg_g4"


def _figures(gpu: Path, cpu: Path) -> list[str]:
    """Draw the paper-style figures of the result rows into docs/img (cdg.plots, cdg.viz) and
    return the Markdown that embeds them."""
    from cdg.plots import FIGURES, load_runs, plot_runs
    from cdg.viz import visualize

    img = DOCS / "img"
    dirs = [d for results in (gpu, cpu) for row in ROWS if ROWS[row][0] != "seeds" and (d := results / row).is_dir()
            and ((d / "metrics.json").is_file() or (d / "logs" / "metrics.csv").is_file())]
    runs = load_runs(dirs)
    for r in runs:  # every label names its host folder, as the tables do
        r.label = f"{r.path.name} ({r.path.parent.name})"
    result = plot_runs(runs, img, figures=[f for f in FIGURES if f != "fig8c"])
    per_layer = [r for r in runs if r.path.parent == gpu and r.path.name in PER_LAYER_ROWS]
    r8c = plot_runs(per_layer or runs, img, figures=["fig8c"])
    result.drawn.update(r8c.drawn)
    result.notes += r8c.notes
    lines = ["", "## Figures", "",
             "Drawn by `python scripts/cpu_results.py report` with `cdg plot` (`cdg.plots`) from the run directories "
             "of the tables above (logs and metrics.json only); labels name the run and its folder "
             "(`gpu` = `results/gpu`, `cpu` = `results/cpu`). Each figure's caption gives its protocol.", ""]
    for name, title, text in FIGURE_TEXT:
        if name in result.drawn:
            lines += [f"**{title}:** {text}", "", f"![{title}](img/{result.drawn[name].path.name})", ""]
    if result.notes:
        lines += ["Not drawn: " + "; ".join(n.replace(": skipped:", ":") for n in result.notes) + ".", ""]
    # Fig. 9 needs the weights, which the result rows do not keep; a re-run of the row may have them
    sources = [gpu / FIG9_ROW, cpu / FIG9_ROW, ROOT / "runs" / "evidence" / FIG9_ROW]
    src = next((d for d in sources if (d / "backbone.pt").is_file()), None)
    if src is None:
        lines += [f"Fig. 9 (inside a gated layer) not drawn: no run directory of {FIG9_ROW} with backbone.pt "
                  f"({', '.join(str(d.relative_to(ROOT)) for d in sources)}).", ""]
        return lines
    try:
        vis = visualize(src, img / "fig9_gates.png", images=4, seed=0)
    except Exception as e:  # e.g. the test images are not found: the page is still written
        lines += [f"Fig. 9 not drawn: {type(e).__name__}: {e}", ""]
        return lines
    where = (f"the {FIG9_ROW} row's own weights, archived in float16" if src.parent in (gpu, cpu) else
             f"the {FIG9_ROW} recipe pre-trained again on the CPU with its weights kept (the row's folder keeps none)")
    lines += [f"**Inside a gated layer (Fig. 9):** `cdg visualize --run {src.relative_to(ROOT)} --out "
              f"docs/img/fig9_gates.png`, layer {vis.layer}, 4 test images (seed 0): {where}.",
              "", f"![Inside a gated layer (Fig. 9)](img/{vis.path.name})", ""]
    return lines


def report() -> None:
    """docs/results.md from results/gpu (the full table) and results/cpu (the same recipe on a CPU)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # the figures are drawn by cdg.plots / cdg.viz (_figures)
        sys.exit("the plots need matplotlib: pip install 'cdg[plots]'")

    gpu, cpu = ROOT / "results" / "gpu", ROOT / "results" / "cpu"
    floor = metrics("simclr_dense", cpu).get("linear_top1_random_init")
    lines = [
        "# Results at small scale (CIFAR-10, ResNet-18 x0.25, 4 epochs)",
        "",
        "Generated by `python scripts/cpu_results.py report` from the run directories in `results/gpu/` and",
        "`results/cpu/` (rows are produced by `python scripts/cpu_results.py [--results DIR] run [--jobs N] [ROW ...]`).",
        "**Recipe, the same for every row and not tuned per method:** ResNet-18 at 0.25x width, CIFAR stem,",
        "batch 256, 4 epochs over all 50,000 CIFAR-10 training images, fp32 weights and activations,",
        "channels_last, LARS for SimCLR (SGD for MoCo V2+ and SimSiam, design §6 learning rates), 1",
        "warm-up epoch then cosine, temperature 0.2, no blur, seed 0; CDG target s = 1.0, lambda = 1e-4.",
        "**Probe:** logistic regression (L-BFGS) on standardised frozen features (branch a1, eval mode) of",
        "the un-augmented 50k training images, scored on the real 10k CIFAR-10 test set. kNN: k = 200,",
        "cosine, T = 0.1. eta: conditional-path sparsity on the test set, branch a1. The paper's numbers",
        "come from 1000 epochs at 1x width; these do not.",
        "",
        f"Random-initialised backbone, same probe (the floor): **{100 * floor:.2f}%**" if floor is not None else
        "Random-initialised backbone floor: not measured yet.",
        "",
        "## All rows, one NVIDIA H200 (`results/gpu`)",
        "",
        "Run with `--jobs 15` (the 11 SimCLR rows together, then the 4 MoCo V2+ / SimSiam rows together),",
        "so wall times compare only within a group. On the GPU, PyTorch's default lets cuDNN run fp32",
        "convolutions in TF32.",
        "",
        *_table(gpu),
        "",
        "## The same recipe on the 2-core CPU (`results/cpu`), a replicate on other hardware",
        "",
        "An AVX2-only AMD EPYC without native bf16 (the `_ema09`, `_lars` and `_wd1e5` MoCo V2+ rows: an AVX-512 EPYC; fp32",
        "throughout), one thread per row, with one to three other jobs sharing",
        "the 2 cores, so these wall times are rough. Rows with a `backbone.pt` in their folder keep their trained",
        "weights in float16 (`scripts/cpu_results.py promote`): `cdg linear|knn|finetune|visualize --run results/cpu/ROW`",
        "re-evaluates them without re-training. The `_v1` FBS and DGC rows (`baseline_form: v1` in their config.yaml) were",
        "trained before FBS/DGC were rebuilt in their official form (see the findings below).",
        "",
        *_table(cpu),
        "",
        "### Seeds (`results/cpu`)",
        "",
        "The same rows with `trainer.seed` 1 and 2 (rows `ROW_seed1`, `ROW_seed2`); sd is the sample standard",
        "deviation over the seeds run. A difference between rows smaller than about twice the sd is noise.",
        "",
        *_seeds_table(cpu),
    ]
    lines += _figures(gpu, cpu)
    notes = DOCS / "results_findings.md"
    if notes.is_file():
        lines += ["", notes.read_text()]
    (DOCS / "results.md").write_text("\n".join(lines) + "\n")
    print((DOCS / "results.md").read_text())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the run directories")
    ap.add_argument("cmd", nargs="?", default="list", choices=["run", "report", "list", "promote"])
    ap.add_argument("rows", nargs="*")
    ap.add_argument("--jobs", type=int, default=1, help="run: rows at once, one process each")
    args = ap.parse_args()
    RESULTS = args.results.resolve()
    if args.cmd == "run":
        run(args.rows, args.jobs)
    elif args.cmd == "promote":
        promote(args.rows, ROOT / "results" / "cpu")
    elif args.cmd == "report":
        report()
    else:
        for k, (shape, desc, over) in ROWS.items():
            print(f"{k:<22} {shape:<9} {desc}  {' '.join(over)}")
