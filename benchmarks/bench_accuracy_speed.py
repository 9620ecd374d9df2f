"""Linear-probe accuracy against measured inference speed, one point per trained run (README "Speed").

For each run directory: its linear-probe and kNN accuracy (``metrics.json``) and the images/s of
its fastest inference form, all measured side by side in one process (cdg/sparse/speed.py:
interleaved rounds, medians, float32, channels-last, 1 thread unless ``--threads``; the ratio is also
given by process CPU time, which a host shared with other jobs disturbs less than wall time):

* gated runs (CDG, CGNet, structured): the sparse form, :func:`cdg.sparse.export_inference`;
* dense runs: the dense backbone with BatchNorm folded (oneDNN). A dense run that kept no weights
  is timed on its architecture with random weights (a dense network's time does not depend on them).

The first run given is the reference of the "speed vs ref." column. Writes a Markdown table to
stdout, and with ``--out`` a PNG (accuracy against images/s) and ``--json`` the figures.

    OMP_NUM_THREADS=1 python benchmarks/bench_accuracy_speed.py results/cpu/simclr_dense \\
        results/cpu/simclr_dense_eqflops results/cpu/simclr_cdg_g4 --out docs/img/speed_accuracy.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cdg.builders import build_backbone
from cdg.config import load_config
from cdg.nn import GatedConv2d
from cdg.runs import load_run, read_metrics
from cdg.sparse import export_inference
from cdg.sparse.speed import host_name, load_images, throughput


def inference_form(run: Path) -> tuple[torch.nn.Module, str]:
    """The run's fastest inference form and what it is."""
    if (run / "backbone.pt").is_file() or (run / "checkpoints" / "last.ckpt").is_file():
        _, backbone = load_run(run)
        weights = "trained weights"
    else:
        cfg = load_config(run / "config.yaml")
        if cfg.gating.mode != "dense":
            raise SystemExit(f"{run}: a gated run without backbone.pt: its masks (and so its speed) need the weights")
        backbone, weights = build_backbone(cfg), "random weights (dense: timing does not depend on them)"
    gated = any(isinstance(m, GatedConv2d) for m in backbone.modules())
    return export_inference(backbone.eval()), ("sparse form" if gated else "dense, BN folded") + ", " + weights


def plot(rows: list[dict], out: Path, host: str, threads: int, batch: int) -> None:
    """Linear-probe accuracy against images/s, one labelled point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["linear_top1"] is None:
            continue
        marker = "s" if r["form"].startswith("dense") else "o"
        ax.scatter(r["img_s"], 100 * r["linear_top1"], marker=marker, s=40)
        ax.annotate(r["run"], (r["img_s"], 100 * r["linear_top1"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set(xlabel=f"images/s (CPU, {threads} thread, batch {batch}, float32)",
           ylabel="linear-probe top-1 (%), CIFAR-10 test", title="Accuracy against measured inference speed")
    ax.grid(alpha=0.3)
    ax.margins(x=0.2, y=0.1)  # room for the labels
    fig.text(0.01, 0.01, f"{host}. Squares: dense (BN folded, oneDNN); circles: cdg sparse form. "
             "4-epoch CPU recipe, fast linear probe.", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"\nwrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", type=Path)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path, help="PNG of linear-probe accuracy against images/s")
    p.add_argument("--json", type=Path)
    p.add_argument("--replot", type=Path, help="draw --out from a --json file of an earlier run (no measuring)")
    a = p.parse_args()
    if a.replot:
        r = json.loads(a.replot.read_text())
        plot(r["rows"], a.out, r["host"], r["threads"], r["batch"])
        return
    torch.set_num_threads(a.threads)
    cfg0 = load_config(a.runs[0] / "config.yaml")
    x, what = load_images(cfg0, a.batch)
    names = [r.name for r in a.runs]
    if len(set(names)) != len(names):
        raise SystemExit(f"run folder names must differ: {names}")
    forms, kinds = {}, {}
    for run in a.runs:
        forms[run.name], kinds[run.name] = inference_form(run)
    timed = throughput({"dense": forms[names[0]], **{n: forms[n] for n in names[1:]}}, x, a.rounds)
    timed[names[0]] = timed.pop("dense")
    rows = []
    for run in a.runs:
        m = read_metrics(run)
        rows.append({"run": run.name, "form": kinds[run.name], "linear_top1": m.get("linear_top1"),
                     "knn_top1": m.get("knn_top1"), "eta": m.get("eta"),
                     "flops_reduction_exact": m.get("flops_reduction_exact"),
                     "img_s": a.batch / timed[run.name]["wall_s"],
                     "img_cpu_s": a.batch / max(timed[run.name]["cpu_s"], 1e-9), "protocol": m.get("protocol", {})})
    ref, ref_cpu = rows[0]["img_s"], rows[0]["img_cpu_s"]
    print(f"host: {host_name()}; torch {torch.__version__}; {a.threads} thread(s), batch {a.batch}, float32, "
          f"channels-last, {a.rounds} interleaved rounds, medians; images: {what}")
    print("accuracy: linear probe (fast: logistic regression on frozen features) and kNN (k=200), CIFAR-10 test, "
          "from each run's metrics.json (4-epoch CPU recipe, width in the run's config)\n")
    print(f"| run | form | linear top-1 | kNN top-1 | eta | FLOPs red. exact | img/s | speed vs {names[0]} | "
          "same, by process CPU time |")
    print("|---|---|---|---|---|---|---|---|---|")
    pct = lambda v: f"{100 * v:.2f}%" if v is not None else "-"  # noqa: E731
    for r in rows:
        red = f"{r['flops_reduction_exact']:.2f}x" if r["flops_reduction_exact"] else "1.00x"
        print(f"| {r['run']} | {r['form']} | {pct(r['linear_top1'])} | {pct(r['knn_top1'])} | {pct(r['eta'])} | {red} "
              f"| {r['img_s']:.0f} | {r['img_s'] / ref:.2f}x | {r['img_cpu_s'] / ref_cpu:.2f}x |")
    if a.json:
        a.json.write_text(json.dumps({"host": host_name(), "torch": torch.__version__, "threads": a.threads,
                                      "batch": a.batch, "rounds": a.rounds, "images": what, "rows": rows}, indent=2))
    if a.out:
        plot(rows, a.out, host_name(), a.threads, a.batch)


if __name__ == "__main__":
    main()
