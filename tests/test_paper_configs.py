"""Every paper-scale table row builds and trains a few steps on the CPU (tiny width, synthetic data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdg.config import load_config
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
