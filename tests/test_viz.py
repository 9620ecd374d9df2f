"""`cdg visualize` (Fig. 9) and `cdg plot` (Fig. 1, 3, 4, 7, 8) on tiny runs pre-trained on real CIFAR-10."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from cdg.builders import build_backbone  # noqa: E402
from cdg.cli import main  # noqa: E402
from cdg.config import load_config  # noqa: E402
from cdg.export import save_backbone  # noqa: E402
from cdg.plots import FILES, plot_runs  # noqa: E402
from cdg.runs import update_metrics  # noqa: E402
from cdg.train import pretrain  # noqa: E402
from cdg.viz import DPI, PANEL_IN, figure_size_in, visualize  # noqa: E402

TINY = ["model.width=0.125", "data.batch_size=32", "data.train_images=256", "trainer.max_epochs=2",
        "trainer.precision=32-true", "trainer.progress_bar=false", "trainer.monitor_images=128",
        "trainer.monitor_every_n_epochs=1", "trainer.log_every_n_steps=2", "method.proj_hidden_dim=64",
        "method.proj_output_dim=32", "eval.knn_k=20", "gating.groups=2"]


@pytest.fixture(scope="module")
def runs(cifar10_root, tmp_path_factory):
    """Two tiny runs that differ only in gating.mode (dual, unified): 2 epochs of 8 steps each."""
    root = tmp_path_factory.mktemp("viz")
    out = {}
    for mode in ("dual", "unified"):
        cfg = load_config(None, TINY + [f"gating.mode={mode}", f"data.root={cifar10_root}"])
        pretrain(cfg, root / mode)
        out[mode] = root / mode
    return out


def _untrained_run(path, cifar10_root, overrides):
    """A run directory holding only config.yaml and a freshly initialised backbone.pt."""
    cfg = load_config(None, TINY + overrides + [f"data.root={cifar10_root}"])
    path.mkdir(parents=True)
    cfg.save(path / "config.yaml")
    save_backbone(path / "backbone.pt", cfg, build_backbone(cfg))
    return path


def _binary(a: np.ndarray) -> bool:
    return bool(np.isin(a, (0.0, 1.0)).all())


def test_visualize_panels_and_png(runs, tmp_path):
    out = tmp_path / "fig9.png"
    vis = visualize(runs["dual"], out, images=2, seed=1)
    assert vis.grid == (2, 11) and vis.layer == "layer1.0.conv2" and vis.spatial
    kinds = [p.kind for p in vis.panels[0]]
    per_branch = ["image", "feature", "fraction", "mask", "feature"]
    assert kinds == ["image"] + per_branch + per_branch
    assert [p.branch for p in vis.panels[0]] == [None] + [0] * 5 + [1] * 5
    for row in vis.panels:
        for b in (0, 1):
            view, base, frac, mask, cond = row[1 + 5 * b:6 + 5 * b]
            assert view.array.shape == (32, 32, 3) and 0.0 <= view.array.min() and view.array.max() <= 1.0
            assert base.array.shape == frac.array.shape == mask.array.shape == cond.array.shape == (32, 32)
            assert _binary(mask.array)  # one channel's gate: exactly 0 or 1
            assert 0.0 <= frac.array.min() and frac.array.max() <= 1.0
            assert np.all(cond.array[frac.array == 0] == 0)  # no open gate: no conditional path
            assert base.array.max() > 0
    # the PNG: one panel per grid cell at the documented size (width does not depend on the caption)
    img = imread(out)
    assert img.shape[:2] == (vis.height_px, vis.width_px)
    assert vis.width_px == round(figure_size_in(2, 5, 2, 0)[0] * DPI)
    assert vis.height_px >= 2 * PANEL_IN * DPI
    # seeded: the same images, views and masks again
    again = visualize(runs["dual"], None, images=2, seed=1)
    assert all(np.array_equal(p.array, q.array) for r1, r2 in zip(vis.panels, again.panels) for p, q in zip(r1, r2))


def test_visualize_unified_reuses_a1_mask(runs):
    vis = visualize(runs["unified"], None, images=1, layer="layer2.0.conv1")
    row = vis.panels[0]
    assert vis.layer == "layer2.0.conv1" and row[2].array.shape == (16, 16)
    assert np.array_equal(row[3].array, row[8].array) and np.array_equal(row[4].array, row[9].array)


@pytest.mark.parametrize("overrides,grid,mask_shape", [
    (["gating.mode=fbs"], (1, 7), (1, 8)),  # FBS: one predictor over the 8 output channels
    (["gating.mode=dgc"], (1, 7), (2, 8)),  # DGC: 2 heads over the 8 input channels
    (["gating.mode=shared_base"], (1, 11), (32, 32)),
    (["gating.mode=dual", "gating.group_size=2"], (1, 11), (32, 32)),  # structured C_g = 2
])
def test_visualize_every_gating_mode(cifar10_root, tmp_path, overrides, grid, mask_shape):
    run = _untrained_run(tmp_path / "run", cifar10_root, overrides)
    out = tmp_path / "v.png"
    vis = visualize(run, out, images=1)
    assert vis.grid == grid
    masks = [p for p in vis.panels[0] if p.kind in ("mask", "channel_mask")]
    assert len(masks) == 2 and all(p.array.shape == mask_shape and _binary(p.array) for p in masks)
    assert imread(out).shape[:2] == (vis.height_px, vis.width_px)


def test_visualize_cli_image_file_and_errors(runs, cifar10_root, tmp_path, capsys):
    picture = tmp_path / "in.png"
    visualize(runs["dual"], picture, images=1)  # any PNG will do as an input image
    out = tmp_path / "cli.png"
    assert main(["visualize", "--run", str(runs["dual"]), "--image", str(picture), "--out", str(out)]) == 0
    assert "1 images x 11 panels" in capsys.readouterr().out and out.is_file()
    dense = _untrained_run(tmp_path / "dense", cifar10_root, ["gating.mode=dense"])
    assert main(["visualize", "--run", str(dense), "--out", str(tmp_path / "d.png")]) == 2
    assert "no gated layer" in capsys.readouterr().err
    assert main(["visualize", "--run", str(runs["dual"]), "--layer", "layer9.conv", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdg visualize: error: --layer layer9.conv") and "layer1.0.conv2" in err


def _add_eval_metrics(run, linear, eta, finetune_eta=None):
    """Evaluation values written as an evaluation would (the plots read only metrics.json)."""
    proto = {"dataset": "cifar10", "model": "resnet18", "width": 0.125, "protocol": "test values", "eval_split": "test",
             "branch": "a1"}
    layers = {f"layer{i}.{j}.conv{k}": eta for i in range(1, 5) for j in range(2) for k in (1, 2)}
    values = {"linear_top1": linear, "knn_top1": linear - 0.02, "eta": eta, "eta_per_layer": layers,
              "flops_reduction_exact": 1.0 / (0.5 + 0.5 * (1 - eta))}
    if finetune_eta is not None:
        values["finetune_eta"] = finetune_eta
    update_metrics(run, values, proto)


def test_plot_figures_from_run_directories(runs, tmp_path, capsys):
    _add_eval_metrics(runs["dual"], 0.31, 0.55, finetune_eta=0.6)
    _add_eval_metrics(runs["unified"], 0.22, 0.52)
    out = tmp_path / "plots"
    assert main(["plot", "--runs", str(runs["dual"]), str(runs["unified"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = plot_runs([runs["dual"], runs["unified"]], tmp_path / "again")
    assert not result.notes and sorted(result.drawn) == sorted(FILES)
    panels = {"fig1": 2, "fig3": 2, "fig4": 1, "fig7": 2, "fig8a": 1, "fig8b": 1, "fig8c": 1}
    for name, drawn in result.drawn.items():
        assert drawn.panels == panels[name], name
        assert f"wrote {out / FILES[name]}" in printed
        img = imread(out / FILES[name])
        assert img.shape[:2] == (drawn.height_px, drawn.width_px)


def test_fig1_legend_of_many_runs_stays_inside_the_figure(runs, tmp_path, monkeypatch):
    """40 runs: the outside legend takes more columns and the figure widens, so no entry falls off its edge."""
    import cdg.plots as plots

    _add_eval_metrics(runs["dual"], 0.31, 0.55)
    dirs = []
    for i in range(40):
        d = tmp_path / "runs" / f"a_run_with_a_long_name_{i:02d}"
        d.mkdir(parents=True)
        shutil.copy(runs["dual"] / "metrics.json", d / "metrics.json")
        dirs.append(d)
    boxes, save = [], plots._save

    def spy(plt, fig, rect_bottom, path):
        fig.tight_layout(rect=(0, rect_bottom, 1, 1))
        fig.canvas.draw()
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        boxes.extend((leg.get_window_extent(fig.canvas.get_renderer()), fig.bbox) for leg in legends)
        return save(plt, fig, rect_bottom, path)

    monkeypatch.setattr(plots, "_save", spy)
    result = plot_runs(dirs, tmp_path / "p", figures=["fig1"])
    assert "fig1" in result.drawn and len(boxes) == 1
    legend, figure = boxes[0]
    assert figure.x0 <= legend.x0 and legend.x1 <= figure.x1 + 1, (legend, figure)
    assert figure.y0 <= legend.y0 and legend.y1 <= figure.y1 + 1, (legend, figure)


def test_plot_skips_missing_inputs_and_rejects_non_runs(runs, tmp_path, capsys):
    only_metrics = tmp_path / "only_metrics"
    only_metrics.mkdir()
    shutil.copy(runs["dual"] / "metrics.json", only_metrics / "metrics.json")  # no log, no config
    m = json.loads((only_metrics / "metrics.json").read_text())
    m.setdefault("eta", 0.5)
    (only_metrics / "metrics.json").write_text(json.dumps(m))
    result = plot_runs([only_metrics], tmp_path / "p")
    skipped = {n.split(":")[0] for n in result.notes}
    assert {"fig3", "fig4", "fig8a"} <= skipped and not (tmp_path / "p" / FILES["fig4"]).exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", "--runs", str(empty), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdg plot: error: ") and str(empty) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_fig1_places_a_narrower_dense_run_at_its_real_saving():
    """The equal-FLOPs control (a narrower dense network) sits at its MACs relative to the widest
    dense network of its model, not at 1.0x."""
    from cdg.config import config_from_dict
    from cdg.metrics import mac_report
    from pathlib import Path

    from cdg.plots import RunData, _width_factors

    wide, narrow = (config_from_dict({"model": {"width": w}}) for w in (0.25, 0.125))
    runs = [RunData(Path("a"), "wide", wide, {}, []), RunData(Path("b"), "narrow", narrow, {}, [])]
    f = _width_factors(runs)
    assert f["wide"] == 1.0
    assert f["narrow"] == pytest.approx(mac_report(wide).total_dense / mac_report(narrow).total_dense)
    assert 3.0 < f["narrow"] < 4.2  # about (0.25 / 0.125)^2
