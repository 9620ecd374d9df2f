"""The paper's training and accuracy figures from run directories alone: ``cdg plot``.

:func:`plot_runs` reads each run's ``config.yaml``, ``metrics.json`` (every value with its
protocol) and CSV log (:func:`cdg.runs.read_log`) and writes one PNG per figure:

* ``fig1_accuracy_vs_flops.png``: accuracy against the exact FLOPs reduction, every run (Fig. 1
  style; dense at 1.0x), linear probe and kNN side by side.
* ``fig3_unified_vs_dual.png``: contrastive loss over training and linear accuracy of runs that
  differ only in ``gating.mode``, unified vs dual (Fig. 3).
* ``fig4_mask_similarity.png``: mask similarity S_c of the two branches over training (Fig. 4).
* ``fig7_accuracy_vs_sparsity.png``: linear accuracy against eta and against the exact FLOPs
  reduction, one point per CDG-family run; runs of one folder that differ only in
  ``gating.target`` are joined (Fig. 7).
* ``fig8a_eta_per_branch.png``: eta of branch a1 and a2 during pre-training (Fig. 8a).
* ``fig8b_eta_finetune.png``: eta during fine-tuning (``finetune/logs/metrics.csv``) and before / after
  it on the test set, runs with ``finetune_eta`` (Fig. 8b).
* ``fig8c_eta_per_layer.png``: eta per gated layer from ``eta_per_layer`` (Fig. 8c; bars for up to
  :data:`BAR_RUNS` runs, lines beyond).

Each figure has labelled axes, a legend and a caption with the protocol (dataset, model, width,
epochs and the protocol of the accuracy). A figure whose inputs no run has is skipped with a
note (returned and printed by the CLI). The numbers come from these runs (docs/design.md §4
defines them), never from the paper.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cdg.config import Config, ConfigError, load_config

#: accuracies a figure can show, best first: metrics.json key, axis label
LINEAR_KEYS: tuple[tuple[str, str], ...] = (("linear_sgd_top1", "linear probe (SGD) top-1 (%)"),
                                            ("linear_top1", "linear probe top-1 (%)"))
KNN_KEY: tuple[str, str] = ("knn_top1", "kNN top-1 (%)")
FIGURES: tuple[str, ...] = ("fig1", "fig3", "fig4", "fig7", "fig8a", "fig8b", "fig8c")
FILES: dict[str, str] = {
    "fig1": "fig1_accuracy_vs_flops.png", "fig3": "fig3_unified_vs_dual.png", "fig4": "fig4_mask_similarity.png",
    "fig7": "fig7_accuracy_vs_sparsity.png", "fig8a": "fig8a_eta_per_branch.png", "fig8b": "fig8b_eta_finetune.png",
    "fig8c": "fig8c_eta_per_layer.png",
}
MODE_COLORS: dict[str, str] = {"dense": "black", "dual": "tab:blue", "shared_base": "tab:green", "unified": "tab:red",
                               "fbs": "tab:purple", "dgc": "tab:brown"}
MARKERS = "osD^vPXh<>pd"
#: fig8c draws bars for up to this many runs, lines beyond
BAR_RUNS = 6
DPI = 110
_CAPTION_LINE_IN = 0.17


@dataclass
class RunData:
    """One run directory as the figures read it."""

    path: Path
    label: str
    cfg: Config | None
    metrics: dict[str, Any]
    log: list[dict[str, str]]
    #: rows of the fine-tuning log (``finetune/logs/metrics.csv``), where ``cdg finetune`` ran
    finetune_log: list[dict[str, str]] = field(default_factory=list)

    def finetune_eta_series(self) -> list[tuple[float, float]]:
        """(fine-tuning epoch, eta of the training batches) from the ``finetune/eta`` column: the
        value logged at global step s is placed at ``(s + 1) / n``, n = ``finetune_steps_per_epoch``."""
        rows = [r for r in self.finetune_log if r.get("finetune/eta") and r.get("step")]
        n = self.value("finetune_steps_per_epoch")
        if not rows or not n:
            return []
        return [((float(r["step"]) + 1) / n, float(r["finetune/eta"])) for r in rows]

    @property
    def mode(self) -> str:
        if self.cfg is not None:
            return self.cfg.gating.mode
        for proto in self.metrics.get("protocol", {}).values():  # the protocol's gating label starts with the mode
            if isinstance(proto, dict) and proto.get("gating"):
                return str(proto["gating"]).split()[0]
        return "unknown"

    def protocol_of(self, key: str) -> dict[str, Any]:
        return dict(self.metrics.get("protocol", {}).get(key) or {})

    def series(self, column: str, at: float = 1.0) -> list[tuple[float, float]]:
        """(epoch, value) of a per-epoch log column: the value of epoch e (0-based) at e + ``at``
        (1: measured at the epoch's end; 0.5: a mean over the epoch)."""
        return [(int(float(r["epoch"])) + at, float(r[column])) for r in self.log if r.get(column) and r.get("epoch")]

    def step_series(self, column: str) -> list[tuple[float, float]]:
        """(fractional epoch, value) of a per-step log column: step s of the run is (s + 1) / steps per epoch."""
        rows = [r for r in self.log if r.get(column) and r.get("step")]
        spe = self.steps_per_epoch()
        if not rows or not spe:
            return []
        return [((float(r["step"]) + 1) / spe, float(r[column])) for r in rows]

    def steps_per_epoch(self) -> float | None:
        ends = {int(float(r["epoch"])): float(r["step"]) for r in self.log
                if r.get("train/ssl_loss_epoch") and r.get("epoch") and r.get("step")}
        if 0 in ends:
            return ends[0] + 1
        m = self.metrics
        if m.get("pretrain_steps") and m.get("pretrain_epochs"):
            return m["pretrain_steps"] / m["pretrain_epochs"]
        return None

    def value(self, key: str) -> float | None:
        v = self.metrics.get(key)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    def flops_reduction(self) -> float | None:
        """The exact whole-network FLOPs reduction; 1.0 for a dense run."""
        if self.mode == "dense":
            return 1.0
        return self.value("flops_reduction_exact")

    def recipe_key(self, *ignore: str) -> tuple | None:
        """What makes two runs the same experiment, apart from the config keys in ``ignore``."""
        if self.cfg is None:
            return None
        c = self.cfg
        items = {"data.dataset": c.data.dataset, "data.train_images": c.data.train_images,
                 "data.batch_size": c.data.batch_size, "model.name": c.model.name, "model.width": c.model.width,
                 "model.stem": c.model.stem, "method.name": c.method.name, "gating.mode": c.gating.mode,
                 "gating.groups": c.gating.groups, "gating.group_size": c.gating.group_size,
                 "gating.overlap": c.gating.overlap, "gating.target": c.gating.target,
                 "gating.target_sparsity": c.gating.target_sparsity, "gating.norm": c.gating.norm,
                 "trainer.max_epochs": c.trainer.max_epochs, "trainer.seed": c.trainer.seed,
                 "optim.name": c.optim.name, "optim.lr": c.optim.lr}
        return tuple(sorted((k, v) for k, v in items.items() if k not in ignore))


@dataclass
class PlotResult:
    """What :func:`plot_runs` did: the figures written (name -> :class:`Drawn`) and why the others
    were skipped."""

    drawn: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def written(self) -> dict[str, Path]:
        return {name: d.path for name, d in self.drawn.items()}


def load_runs(paths: Sequence[str | Path]) -> list[RunData]:
    """The runs of ``paths`` with unique labels (the folder name, with its parent's name where two
    runs share one). A path that is not a run directory raises FileNotFoundError naming it."""
    from cdg.runs import read_log, read_metrics

    if not paths:
        raise ConfigError("cdg plot needs at least one run directory (--runs DIR ...)")
    found = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no such run directory")
        has_log = (p / "logs" / "metrics.csv").is_file()
        if not (p / "metrics.json").is_file() and not has_log:
            raise FileNotFoundError(f"{p} is not a cdg run directory: it has neither metrics.json nor logs/metrics.csv "
                                    f"(pre-train it with `cdg pretrain --out {p}` and evaluate it first)")
        cfg = load_config(p / "config.yaml") if (p / "config.yaml").is_file() else None
        ft = read_log(p / "finetune") if (p / "finetune" / "logs" / "metrics.csv").is_file() else []
        found.append((p, cfg, read_metrics(p), read_log(p) if has_log else [], ft))
    names = [p.name for p, *_ in found]
    runs = []
    for p, cfg, m, log, ft in found:
        label = p.name if names.count(p.name) == 1 else f"{p.name} ({p.resolve().parent.name})"
        runs.append(RunData(p, label, cfg, m, log, ft))
    return runs


def _require_matplotlib():
    from cdg.viz import require_matplotlib

    return require_matplotlib()


# --- captions ------------------------------------------------------------------------------

def _shared(values: list[Any]) -> str:
    vals = [v for v in values if v is not None]
    uniq = list(dict.fromkeys(str(v) for v in vals))
    if not uniq:
        return "not recorded"
    return uniq[0] if len(uniq) == 1 else "varies (" + ", ".join(uniq[:4]) + (", ..." if len(uniq) > 4 else "") + ")"


def _epochs(run: RunData) -> Any:
    if run.cfg is not None:
        return run.cfg.trainer.max_epochs
    return run.metrics.get("pretrain_epochs") or run.protocol_of("linear_top1").get("pretrain_epochs")


def _setting(run: RunData, cfg_get: Callable[[Config], Any], proto_key: str) -> Any:
    if run.cfg is not None:
        return cfg_get(run.cfg)
    for key in run.metrics.get("protocol", {}):
        v = run.protocol_of(key).get(proto_key)
        if v is not None:
            return v
    return None


def protocol_caption(runs: list[RunData], accuracy_keys: Sequence[str] = (), extra: str = "") -> str:
    """The protocol the plotted runs share: dataset, model, width, method, epochs, and the
    protocol of each accuracy shown (from ``metrics.json``); items that differ say so."""
    parts = [
        "dataset " + _shared([_setting(r, lambda c: c.data.dataset, "dataset") for r in runs]),
        "model " + _shared([_setting(r, lambda c: c.model.name, "model") for r in runs]),
        "width " + _shared([_setting(r, lambda c: f"{c.model.width:g}", "width") for r in runs]) + "x",
        "method " + _shared([_setting(r, lambda c: c.method.name, "method") for r in runs]),
        "pre-training epochs " + _shared([_epochs(r) for r in runs]),
    ]
    text = "Protocol: " + "; ".join(parts) + "."
    for key in accuracy_keys:
        protos = [r.protocol_of(key) for r in runs if r.value(key) is not None]
        if not protos:
            continue
        what = _shared([str(p.get("protocol", "")).split(";")[0] or None for p in protos])
        split = _shared([p.get("eval_split") for p in protos])
        branch = _shared([p.get("branch") for p in protos])
        if key.endswith("eta") and not what.startswith("gate statistics"):  # older runs: the pass that measured it
            text += f" {key}: gate statistics of the evaluation forward pass ({what}) on the {split} split, branch {branch}."
        else:
            text += f" {key}: {what}; evaluated on the {split} split, branch {branch}."
    if extra:
        text += " " + extra
    sources = _shared([str(r.path.resolve().parent) for r in runs])
    if not sources.startswith("varies"):
        text += f" Runs from {_short_path(Path(sources))}."
    return text


def _short_path(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _figure(plt, ncols: int, caption: str, panel_w: float = 5.0, panel_h: float = 3.6, legend_w: float = 0.0):
    """A figure of ``ncols`` panels with room below for the wrapped caption."""
    width = ncols * panel_w + legend_w
    lines = textwrap.wrap(caption, int((width - legend_w) * 15))  # under the panels, clear of an outside legend
    cap_h = 0.25 + len(lines) * _CAPTION_LINE_IN
    height = panel_h + cap_h
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), dpi=DPI, squeeze=False)
    fig.text(0.012, (cap_h - 0.12) / height, "\n".join(lines), ha="left", va="top", fontsize=8, linespacing=1.3)
    return fig, list(axes[0]), cap_h / height


@dataclass(frozen=True)
class Drawn:
    """A written figure: its file, its number of data panels and its size in pixels."""

    path: Path
    panels: int
    width_px: int
    height_px: int


def _save(plt, fig, rect_bottom: float, path: Path) -> Drawn:
    fig.tight_layout(rect=(0, rect_bottom, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    width, height = fig.canvas.get_width_height()
    panels = sum(1 for ax in fig.axes if ax.get_label() != "<colorbar>")
    plt.close(fig)
    return Drawn(path, panels, width, height)


#: the width of one more outside-legend column, in inches
_LEGEND_COL_IN = 2.4
#: the height of one legend entry, in multiples of the font size (marker row plus spacing)
_LEGEND_ROW_EM = 2.1


def _legend(ax, fontsize: int = 7, outside: bool = False, **kw) -> None:
    """A legend inside ``ax``, or to its right (``outside``) in as many columns as the figure's height needs;
    each column beyond the first widens the figure by ``_LEGEND_COL_IN`` so that no entry falls off its edge."""
    if outside:
        fig = ax.figure
        width, height = fig.get_size_inches()
        rows = max(1, int(height * 72 / (fontsize * _LEGEND_ROW_EM)) - 2)  # less the title and the frame
        ncol = -(-len(ax.get_legend_handles_labels()[1]) // rows)
        if ncol > 1:
            fig.set_size_inches(width + (ncol - 1) * _LEGEND_COL_IN, height)
        ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  ncol=max(ncol, 1), **kw)
    else:
        ax.legend(fontsize=fontsize, **kw)


def _style(runs: list[RunData]) -> dict[str, tuple[str, str]]:
    """(colour, marker) per run label: the colour says the gating mode; markers tell runs apart."""
    out, count = {}, {}
    for r in runs:
        i = count.get(r.mode, 0)
        count[r.mode] = i + 1
        out[r.label] = (MODE_COLORS.get(r.mode, "tab:gray"), MARKERS[i % len(MARKERS)])
    return out


def _run_colors(runs: list[RunData]) -> dict[str, Any]:
    """One distinct colour per run (line plots, where colour is the only key)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20"]
    return {r.label: cmap(i % cmap.N) for i, r in enumerate(runs)}


def _linear_key(runs: list[RunData]) -> tuple[str, str] | None:
    """The linear-probe accuracy most of ``runs`` have (SGD protocol first on a tie)."""
    best = max(LINEAR_KEYS, key=lambda k: sum(r.value(k[0]) is not None for r in runs))
    return best if any(r.value(best[0]) is not None for r in runs) else None


def _width_factors(runs: list[RunData]) -> dict[str, float]:
    """Per run label: the dense MACs of the widest run of the same model, stem and dataset over the
    run's own dense MACs (1.0 for runs at that width), so that a narrower dense network (the
    equal-FLOPs control) sits at its real saving on a "reduction vs dense" axis."""
    from cdg.metrics import mac_report

    macs: dict[tuple, int] = {}

    def dense_macs(c: Config) -> int:
        key = (c.model.name, c.model.width, c.model.stem, c.data.dataset)
        if key not in macs:
            macs[key] = mac_report(c).total_dense
        return macs[key]

    family = lambda c: (c.model.name, c.model.stem, c.data.dataset)  # noqa: E731
    widest: dict[tuple, Config] = {}
    for r in runs:
        if r.cfg is None:
            continue
        f = family(r.cfg)
        if f not in widest or r.cfg.model.width > widest[f].model.width:
            widest[f] = r.cfg
    return {r.label: (1.0 if r.cfg is None or r.cfg.model.width == widest[family(r.cfg)].model.width
                      else dense_macs(widest[family(r.cfg)]) / dense_macs(r.cfg)) for r in runs}


# --- the figures ---------------------------------------------------------------------------

def fig1_accuracy_vs_flops(plt, runs: list[RunData], path: Path, notes: list[str]) -> Drawn | None:
    """Accuracy against the exact whole-network FLOPs reduction, one point per run (Fig. 1 style)."""
    keys = [k for k in (_linear_key(runs), KNN_KEY) if k is not None]
    panels = [(k, [r for r in runs if r.value(k[0]) is not None and r.flops_reduction() is not None]) for k in keys]
    panels = [(k, rs) for k, rs in panels if rs]
    if not panels:
        notes.append("fig1: skipped: no run has both an accuracy (linear_top1 / linear_sgd_top1 / knn_top1) and an "
                     "exact FLOPs reduction (flops_reduction_exact; dense runs count as 1.0x)")
        return None
    shown = list({r.label: r for _, rs in panels for r in rs}.values())
    missing = [r.label for r in runs if r not in shown]
    factor = _width_factors(shown)
    narrow = [r.label for r in shown if factor[r.label] != 1.0]
    caption = ("Fig. 1 style: accuracy against the exact whole-network FLOPs reduction (dense = 1.0x; docs/design.md "
               "§4), one point per run; colour = gating mode. "
               + (f"Runs narrower than the widest run of their model are placed at their MACs relative to that "
                  f"widest dense network ({', '.join(f'{n} {factor[n]:.2f}x' for n in narrow)}). " if narrow else "")
               + protocol_caption(shown, [k[0] for k, _ in panels])
               + (f" Not shown (no accuracy or FLOPs reduction): {', '.join(missing)}." if missing else ""))
    fig, axes, bottom = _figure(plt, len(panels), caption, legend_w=2.6)
    style = _style(shown)
    for ax, ((key, ylabel), rs) in zip(axes, panels):
        for r in rs:
            c, m = style[r.label]
            ax.scatter(r.flops_reduction() * factor[r.label], 100 * r.value(key), color=c, marker=m, s=42, label=r.label,
                       edgecolors="white", linewidths=0.5, zorder=3)
        ax.axvline(1.0, color="gray", lw=0.8, ls=":", zorder=1)
        ax.set(xlabel="exact FLOPs reduction (x, vs dense)", ylabel=ylabel, title=f"{ylabel[:-4]} vs FLOPs saved")
        ax.grid(alpha=0.3)
    _legend(axes[-1], outside=True, title="run", title_fontsize=7)
    return _save(plt, fig, bottom, path)


def fig3_unified_vs_dual(plt, runs: list[RunData], path: Path, notes: list[str]) -> Drawn | None:
    """Contrastive loss over training and linear accuracy, dual vs unified gating (Fig. 3)."""
    groups: dict[tuple, list[RunData]] = {}
    for r in runs:
        if r.mode in ("dual", "unified") and (key := r.recipe_key("gating.mode")) is not None:
            if r.mode == "unified" or r.cfg.gating.overlap == 0:
                groups.setdefault(key, []).append(r)
    pairs = [rs for rs in groups.values() if {r.mode for r in rs} == {"dual", "unified"}]
    chosen = [r for rs in pairs for r in rs]
    if not chosen:
        notes.append("fig3: skipped: needs a dual and a unified run (gating.mode) of the same recipe otherwise")
        return None
    chosen.sort(key=lambda r: (r.mode != "dual", r.label))
    with_loss = [r for r in chosen if r.step_series("train/ssl_loss_step") or r.series("train/ssl_loss_epoch")]
    acc = _linear_key(chosen) or KNN_KEY
    with_acc = [r for r in chosen if r.value(acc[0]) is not None]
    if not with_loss and not with_acc:
        notes.append("fig3: skipped: the dual/unified runs have neither a training log nor an accuracy")
        return None
    no_log = [r.label for r in chosen if r not in with_loss]
    caption = ("Fig. 3: dual gating (each view its own mask, disjoint base paths) against unified gating (view 1's "
               "mask applied to view 2), runs that differ only in gating.mode. Loss: the method's contrastive loss "
               "per logged step (thin) and its mean over each epoch (markers, at mid-epoch). " + protocol_caption(chosen, [acc[0]])
               + (f" No training log: {', '.join(no_log)}." if no_log else ""))
    ncols = (1 if with_loss else 0) + (1 if with_acc else 0)
    fig, axes, bottom = _figure(plt, ncols, caption)
    colors = _run_colors(chosen)
    ax_iter = iter(axes)
    if with_loss:
        ax = next(ax_iter)
        for r in with_loss:
            c = colors[r.label]
            steps = r.step_series("train/ssl_loss_step")
            if steps:
                ax.plot(*zip(*steps), color=c, lw=0.8, alpha=0.6, ls="-" if r.mode == "dual" else "--")
            ep = r.series("train/ssl_loss_epoch", at=0.5)
            if ep:
                ax.plot(*zip(*ep), color=c, marker="o", ls="-" if r.mode == "dual" else "--", lw=1.5,
                        label=f"{r.label}, {r.mode}")
            elif steps:
                ax.plot([], [], color=c, label=f"{r.label}, {r.mode}")
        ax.set(xlabel="epoch", ylabel="contrastive loss", title="(a) contrastive loss during pre-training")
        ax.grid(alpha=0.3)
        _legend(ax)
    if with_acc:
        ax = next(ax_iter)
        xs = range(len(with_acc))
        for i, r in zip(xs, with_acc):
            v = 100 * r.value(acc[0])
            ax.bar(i, v, color=MODE_COLORS[r.mode], label=r.mode if r.mode not in
                   [x.mode for x in with_acc[:i]] else None, width=0.6)
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [r.label for r in with_acc], rotation=20, ha="right", fontsize=8)
        ax.set(ylabel=acc[1], title="(b) accuracy after pre-training")
        ax.set_ylim(0, max(100 * r.value(acc[0]) for r in with_acc) * 1.15)
        ax.grid(alpha=0.3, axis="y")
        _legend(ax, title="gating.mode", title_fontsize=7)
    return _save(plt, fig, bottom, path)


def fig4_mask_similarity(plt, runs: list[RunData], path: Path, notes: list[str]) -> Drawn | None:
    """S_c over training (Fig. 4), from the log column ``monitor/mask_similarity``."""
    shown = [r for r in runs if r.series("monitor/mask_similarity")]
    if not shown:
        notes.append("fig4: skipped: no run logged monitor/mask_similarity (S_c; trainer.monitor_every_n_epochs > 0 "
                     "and a gated model)")
        return None
    every = _shared([r.cfg.trainer.monitor_every_n_epochs for r in shown if r.cfg is not None])
    caption = ("Fig. 4: mask similarity S_c, the cosine similarity of branch a1's and a2's binary H x W masks of the "
               "same channel for two augmented views of the same image, averaged over gated layers, channels and images "
               f"(docs/design.md §4); measured in eval mode by the training monitor on up to 256 training images every "
               f"{every} epoch(s). " + protocol_caption(shown))
    fig, axes, bottom = _figure(plt, 1, caption, panel_w=6.5, legend_w=2.6)
    ax = axes[0]
    style, colors = _style(shown), _run_colors(shown)
    for r in shown:
        ax.plot(*zip(*r.series("monitor/mask_similarity")), marker=style[r.label][1], color=colors[r.label],
                label=f"{r.label}, {r.mode}")
    ax.set(xlabel="epoch", ylabel="S_c (mask similarity)", title="similarity of the two branches' masks during training")
    ax.grid(alpha=0.3)
    _legend(ax, outside=True)
    return _save(plt, fig, bottom, path)


def fig7_accuracy_vs_sparsity(plt, runs: list[RunData], path: Path, notes: list[str]) -> Drawn | None:
    """Linear accuracy against eta and against the exact FLOPs reduction, CDG-family runs (Fig. 7)."""
    from cdg.nn import get_gating_mode

    cand = [r for r in runs if r.mode in ("dual", "shared_base", "unified") and r.value("eta") is not None]
    acc = _linear_key(cand)
    shown = [r for r in cand if acc is not None and r.value(acc[0]) is not None]
    if not shown:
        notes.append("fig7: skipped: no CDG-family run (gating.mode dual/shared_base/unified) has eta and a linear "
                     "probe accuracy (linear_top1 or linear_sgd_top1)")
        return None
    caption = ("Fig. 7: linear accuracy against the conditional-path sparsity eta (test set, branch a1) and against the "
               "exact FLOPs reduction, one point per run; runs that differ only in the threshold target s "
               "(gating.target) in one results folder are joined by a line. " + protocol_caption(shown, [acc[0], "eta"]))
    fig, axes, bottom = _figure(plt, 2, caption, legend_w=3.0)
    style = _style(shown)
    def target(r: RunData) -> str:
        if r.cfg is None:
            return "?"
        g = r.cfg.gating
        return f"p={g.target_sparsity}" if g.target_sparsity is not None else f"s={g.target:g}"

    sweeps: dict[tuple, list[RunData]] = {}
    for r in shown:  # a sweep: runs of one results folder that differ only in the target
        key = r.recipe_key("gating.target", "gating.target_sparsity")
        if key is not None:
            sweeps.setdefault((r.path.resolve().parent, key), []).append(r)
    sweeps = {k: rs for k, rs in sweeps.items() if len({target(r) for r in rs}) > 1}

    for ax, (xkey, xlabel, scale) in zip(axes, (("eta", "eta, conditional-path sparsity (%)", 100.0),
                                                  ("flops_reduction_exact", "exact FLOPs reduction (x, vs dense)", 1.0))):
        for rs in sweeps.values():
            order = sorted(rs, key=lambda r: (r.cfg.gating.target_sparsity or 0.0, r.cfg.gating.target))
            pts = [(r.value(xkey), r.value(acc[0])) for r in order if r.value(xkey) is not None]
            if len(pts) > 1:
                ax.plot([scale * x for x, _ in pts], [100 * y for _, y in pts], color="gray", lw=0.8, zorder=1)
        for r in shown:
            if r.value(xkey) is None:
                continue
            c, m = style[r.label]
            ax.scatter(scale * r.value(xkey), 100 * r.value(acc[0]), color=c, marker=m, s=42, zorder=3,
                       edgecolors="white", linewidths=0.5,
                       label=f"{r.label}: {get_gating_mode(r.mode).label(r.cfg.gating)}" if r.cfg else r.label)
        ax.set(xlabel=xlabel, ylabel=acc[1])
        ax.grid(alpha=0.3)
    axes[0].set_title("(a) accuracy vs sparsity")
    axes[1].set_title("(b) accuracy vs FLOPs saved")
    _legend(axes[1], outside=True)
    return _save(plt, fig, bottom, path)


def fig8a_eta_per_branch(plt, runs: list[RunData], path: Path, notes: list[str]) -> Drawn | None:
    """eta of each branch per pre-training epoch (Fig. 8a): log columns ``train/eta_a1``, ``train/eta_a2``."""
    shown = [r for r in runs if r.series("train/eta_a1") or r.series("train/eta_a2")]
    if not shown:
        notes.append("fig8a: skipped: no run logged train/eta_a1 or train/eta_a2 (gated runs log them every epoch)")
        return None
    caption = ("Fig. 8a: conditional-path sparsity eta of each branch during pre-training (training mode, all "
               "training steps of the epoch; solid a1, dashed a2). " + protocol_caption(shown))
    fig, axes, bottom = _figure(plt, 1, caption, panel_w=6.5, legend_w=2.6)
    ax = axes[0]
    colors = _run_colors(shown)
    for r in shown:
        for col, ls in (("train/eta_a1", "-"), ("train/eta_a2", "--")):
            s = r.series(col)
            if s:
                ax.plot([e for e, _ in s], [100 * v for _, v in s], ls=ls, marker="o", ms=3, color=colors[r.label])
        ax.plot([], [], color=colors[r.label], label=f"{r.label}, {r.mode}")
    ax.plot([], [], color="black", ls="-", label="branch a1")
    ax.plot([], [], color="black", ls="--", label="branch a2")
    ax.set(xlabel="epoch", ylabel="eta, training (%)", title="eta per branch during pre-training")
    ax.grid(alpha=0.3)
    _legend(ax, outside=True)
    return _save(plt, fig, bottom, path)


def fig8b_eta_finetune(plt, runs: list[RunData], path: Path, notes: list[str]) -> Drawn | None:
    """eta during fine-tuning (Fig. 8b): the training batches' eta over the fine-tuning epochs
    (``finetune/eta`` in ``finetune/logs/metrics.csv``), and eta on the test set of the pre-trained
    and of the fine-tuned backbone (``eta``, ``finetune_eta``)."""
    shown = [r for r in runs if r.value("finetune_eta") is not None]
    if not shown:
        notes.append("fig8b: skipped: no run has finetune_eta (run `cdg finetune --run DIR` first)")
        return None
    curves = [r for r in shown if r.finetune_eta_series()]
    caption = ("Fig. 8b: eta during fine-tuning with gating active (tau trained toward the target s)"
               + (": left, eta of the training batches (branch a1, augmented, logged every "
                  "trainer.log_every_n_steps steps) over the fine-tuning epochs, the dotted line at the pre-trained "
                  "backbone's test-set eta; right, " if curves else ": ")
               + "eta on the test set (branch a1) after pre-training and after fine-tuning. "
               + protocol_caption(shown, ["eta", "finetune_eta", "finetune_top1"]))
    fig, axes, bottom = _figure(plt, 2 if curves else 1, caption, panel_w=max(5.0, 1.2 * len(shown) + 2))
    if curves:
        ax = axes[0]
        for i, r in enumerate(curves):
            xs, ys = zip(*r.finetune_eta_series())
            line = ax.plot(xs, [100 * y for y in ys], marker=MARKERS[i % len(MARKERS)], ms=3, label=r.label)[0]
            if r.value("eta") is not None:
                ax.axhline(100 * r.value("eta"), color=line.get_color(), ls=":", lw=1)
        ax.set(xlabel="fine-tuning epoch", ylabel="eta, training batches (%)", title="eta during fine-tuning",
               ylim=(0, 100))
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=8)
    ax = axes[-1]
    w = 0.38
    for i, r in enumerate(shown):
        for j, (key, c, lab) in enumerate((("eta", "tab:gray", "after pre-training"),
                                           ("finetune_eta", "tab:orange", "after fine-tuning"))):
            v = r.value(key)
            if v is None:
                continue
            ax.bar(i + (j - 0.5) * w, 100 * v, w, color=c, label=lab if i == 0 else None)
            ax.text(i + (j - 0.5) * w, 100 * v, f"{100 * v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(shown)), [r.label for r in shown], rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="eta, test set (%)", title="eta before and after fine-tuning", ylim=(0, 100))
    ax.grid(alpha=0.3, axis="y")
    _legend(ax, fontsize=8)
    return _save(plt, fig, bottom, path)


def fig8c_eta_per_layer(plt, runs: list[RunData], path: Path, notes: list[str]) -> Drawn | None:
    """eta per gated layer (Fig. 8c), from ``eta_per_layer`` (test set, branch a1)."""
    shown = [r for r in runs if isinstance(r.metrics.get("eta_per_layer"), dict) and r.metrics["eta_per_layer"]]
    if not shown:
        notes.append("fig8c: skipped: no run has eta_per_layer (an evaluation, e.g. `cdg knn --run DIR`, writes it)")
        return None
    layers = list(dict.fromkeys(k for r in shown for k in r.metrics["eta_per_layer"]))
    n = len(shown)
    bars = n <= BAR_RUNS
    panel_w = min(max(7.0, 1.2 + len(layers) * (0.09 * n + 0.2)), 16.0) if bars else min(max(7.0, 0.5 * len(layers)), 16.0)
    caption = ("Fig. 8c: eta of every gated layer in network order (test set, branch a1, eval mode)"
               + ("" if bars else f"; one line per run (bars for up to {BAR_RUNS} runs)") + ". "
               + protocol_caption(shown, ["eta"]))
    fig, axes, bottom = _figure(plt, 1, caption, panel_w=panel_w, panel_h=3.9, legend_w=2.6)
    ax = axes[0]
    colors, style = _run_colors(shown), _style(shown)
    w = 0.8 / n
    for i, r in enumerate(shown):
        per = r.metrics["eta_per_layer"]
        idx = [j for j, name in enumerate(layers) if per.get(name) is not None]
        ys = [100 * per[layers[j]] for j in idx]
        if bars:
            ax.bar([j + (i - (n - 1) / 2) * w for j in idx], ys, w, color=colors[r.label], label=f"{r.label}, {r.mode}")
        else:
            ax.plot(idx, ys, marker=style[r.label][1], ms=4, lw=1, color=colors[r.label], label=f"{r.label}, {r.mode}")
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=7)
    ax.set(xlabel="gated layer", ylabel="eta, test set (%)", title="eta per gated layer", ylim=(0, 100))
    ax.grid(alpha=0.3, axis="y")
    _legend(ax, outside=True)
    return _save(plt, fig, bottom, path)


_DRAW: dict[str, Callable[..., Drawn | None]] = {
    "fig1": fig1_accuracy_vs_flops, "fig3": fig3_unified_vs_dual, "fig4": fig4_mask_similarity,
    "fig7": fig7_accuracy_vs_sparsity, "fig8a": fig8a_eta_per_branch, "fig8b": fig8b_eta_finetune,
    "fig8c": fig8c_eta_per_layer,
}


def plot_runs(runs: Sequence[str | Path | RunData], out_dir: str | Path,
              figures: Sequence[str] = FIGURES) -> PlotResult:
    """Write the figures of ``runs`` into ``out_dir`` (see the module docstring); figures whose
    inputs are missing are skipped with a note in :attr:`PlotResult.notes`."""
    unknown = [f for f in figures if f not in _DRAW]
    if unknown:
        raise ConfigError(f"unknown figure(s) {unknown}; valid: {', '.join(FIGURES)}")
    data = [r for r in runs if isinstance(r, RunData)]
    paths = [r for r in runs if not isinstance(r, RunData)]
    data += load_runs(paths) if paths else []
    if not data:
        raise ConfigError("cdg plot needs at least one run directory (--runs DIR ...)")
    plt = _require_matplotlib()
    out = Path(out_dir)
    result = PlotResult()
    for name in figures:
        drawn = _DRAW[name](plt, data, out / FILES[name], result.notes)
        if drawn is not None:
            result.drawn[name] = drawn
    return result
