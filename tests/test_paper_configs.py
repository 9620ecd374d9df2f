"""Every paper-scale table row builds and trains a few steps on the CPU (tiny width, synthetic data)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from cdg.config import flatten, load_config, parse_override
from cdg.train import pretrain

ROOT = Path(__file__).resolve().parents[1]
ROWS = sorted((ROOT / "configs" / "paper").glob("table*.yaml"))
SMALL = ["data.dataset=synthetic", "model.width=0.125", "data.batch_size=16", "trainer.max_epochs=1",
         "trainer.limit_train_batches=2", "trainer.precision=32-true", "trainer.progress_bar=false",
         "trainer.monitor_every_n_epochs=0", "method.proj_hidden_dim=32", "method.queue_size=64",
         "data.num_workers=0"]


def test_every_table_row_has_a_config():
    names = {p.stem for p in ROWS}
    for row in ("table1_unified_g4", "table1_dual_g4", "table2_overlap75", "table2_overlap50", "table2_disjoint",
                "table3_cdg_g2", "table3_cdg_g8", "table4_cifar100_r18x2_cdg", "table4_imagenet100_r18x1_cdg",
                "table5_cifar10_structured_cg8", "table6_cdg_simclr", "table6_cgnet_simclr",
                "table7_cdg_mocov2", "table7_cgnet_simsiam", "table6_fbs_simclr", "table6_dgc_simclr",
                "table7_fbs_mocov2", "table7_dgc_simsiam"):
        assert row in names


@pytest.mark.parametrize("path", ROWS, ids=lambda p: p.stem)
def test_paper_config_runs_a_few_steps(path, tmp_path):
    full = load_config(path)
    assert full.trainer.max_epochs in (400, 1000) and full.data.batch_size == 256
    over = list(SMALL)
    if full.gating.group_size > 1:
        over.append("model.width=0.5")  # C_g = 8 must divide channels/G: 32/4 at width 0.5
    if full.method.name == "simsiam":
        over.append("method.proj_output_dim=32")
    cfg = load_config(path, over)
    values = pretrain(cfg, tmp_path / "run")
    assert values["pretrain_epochs"] == 1


@functools.cache
def _cpu_results():
    """scripts/cpu_results.py as a module, loaded once for the tests that read its ROWS."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cpu_results", ROOT / "scripts" / "cpu_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_cpu_results_row_is_a_valid_config():
    """A row whose overrides the validation rejects (e.g. a C_g that does not divide C/G at the
    recipe's width) would only fail hours into `cpu_results.py run`; catch it here."""
    cr = _cpu_results()
    assert cr.ROWS
    for name, (_, _, overrides) in cr.ROWS.items():
        cfg = load_config(ROOT / cr.BASE, cr.RECIPE + overrides)
        assert cfg.trainer.max_epochs == 4, name


def test_archived_rows_match_their_row_definition():
    """An archived row (results/{cpu,gpu}/ROW) was trained with what ROWS says of ROW: e.g. an FBS
    row of the v1 form must not sit under the name of the official one."""
    cr = _cpu_results()
    archived = [d for host in ("cpu", "gpu") for d in sorted((ROOT / "results" / host).glob("*"))
                if (d / "config.yaml").is_file()]
    assert archived
    for d in archived:
        assert d.name in cr.ROWS, f"{d} is not a row of scripts/cpu_results.py"
        overrides = cr.ROWS[d.name][2]
        row, defined = flatten(load_config(d / "config.yaml")), flatten(load_config(ROOT / cr.BASE, cr.RECIPE + overrides))
        for key in (parse_override(o)[0] for o in overrides):
            assert row[key] == defined[key], f"{d}: {key} is {row[key]!r}, row {d.name} defines {defined[key]!r}"


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "cpu").glob("*.yaml")), ids=lambda p: p.stem)
def test_cpu_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.width in (0.25, 1.0)


def test_structured_rows_at_recipe_width_are_rejected_with_the_reason():
    from cdg.config import ConfigError

    cr = _cpu_results()
    with pytest.raises(ConfigError, match=r"16 is not divisible by gating.groups=4 x gating.group_size=8"):
        load_config(ROOT / cr.BASE, cr.RECIPE + ["gating.mode=dual", "gating.groups=4", "gating.group_size=8"])


def test_promote_archives_a_resumed_row_whole_and_refuses_an_unfinished_one(tmp_path, monkeypatch):
    """`cpu_results.py promote` on a row that was resumed once and has no linear probe (DGC's
    non-finite features): every log attempt and attempts.json arrive byte for byte, with the
    metrics, config and console log, and the float16 backbone loads to the same weights. A row
    without its kNN result is refused by name."""
    import json
    import shutil

    import torch

    from cdg.runs import load_run

    cr = _cpu_results()
    archived = ROOT / "results" / "cpu" / "simclr_dgc"
    src, dest = tmp_path / "runs", tmp_path / "archive"
    shutil.copytree(archived, src / "simclr_dgc")
    (src / "simclr_dgc.log").write_text("console of the row\n")
    monkeypatch.setattr(cr, "RESULTS", src)  # the module is cached: the other tests must keep results/cpu
    cr.promote(["simclr_dgc"], dest)

    out = dest / "simclr_dgc"
    logs = sorted(p.name for p in (archived / "logs").iterdir())
    assert "attempts.json" in logs and len([n for n in logs if n.startswith("metrics.")]) >= 2
    for name in logs:
        assert (out / "logs" / name).read_bytes() == (archived / "logs" / name).read_bytes(), name
    for name in ("config.yaml", "metrics.json"):
        assert (out / name).read_bytes() == (archived / name).read_bytes(), name
    assert (dest / "simclr_dgc.log").read_text() == "console of the row\n"
    (_, before), (_, after) = load_run(archived), load_run(out)
    for (key, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items(), strict=True):
        assert torch.equal(a, b), key  # float16 in, float16 out: no rounding on the way

    unfinished = src / "simclr_dgc"
    m = json.loads((unfinished / "metrics.json").read_text())
    del m["knn_top1"]
    (unfinished / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(SystemExit, match="simclr_dgc is not a finished row"):
        cr.promote(["simclr_dgc"], dest)
