"""A few real training steps on a slice of real CIFAR-10 through the CLI, resume, NaN stop, errors."""

from __future__ import annotations

import json

import pytest
import torch

from cdg.cli import main
from cdg.config import load_config
from cdg.export import read_backbone_file
from cdg.runs import code_version, read_log
from cdg.train import pretrain

TINY = ["model.width=0.125", "data.batch_size=32", "data.train_images=256", "trainer.max_epochs=1",
        "trainer.precision=32-true", "trainer.progress_bar=false", "trainer.monitor_images=128",
        "method.proj_hidden_dim=64", "method.proj_output_dim=32", "eval.knn_k=20"]


@pytest.mark.parametrize("method,mode", [("simclr", "dual"), ("mocov2", "dual"), ("simsiam", "unified"), ("simclr", "dense")])
def test_pretrain_real_cifar_few_steps(cifar10_root, tmp_path, method, mode):
    cfg = load_config(None, TINY + [f"method.name={method}", f"gating.mode={mode}", "gating.groups=2",
                                    f"data.root={cifar10_root}", "method.queue_size=256"])
    out = tmp_path / "run"
    values = pretrain(cfg, out)
    assert (out / "backbone.pt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "config.yaml").is_file() and (out / "pretrain_split.json").is_file()
    assert values["pretrain_epochs"] == 1
    if mode != "dense":
        assert 0.0 <= values["train_eta_a1_last_epoch"] <= 1.0
    logged = [r for r in read_log(out) if r.get("monitor/knn_top1")]
    assert logged and 0.0 <= float(logged[-1]["monitor/knn_top1"]) <= 1.0  # the monitor ran and logged


def test_cli_pretrain_eval_report_resume(cifar10_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CDG_DATA", str(cifar10_root))
    out = tmp_path / "run"
    over = TINY + ["gating.mode=dual", "gating.groups=2", "trainer.max_epochs=1", "trainer.checkpoint_every_n_steps=1"]
    assert main(["pretrain", "--config", "configs/cpu/simclr_cdg.yaml", "--out", str(out), *over]) == 0
    # the step and the epoch-end checkpoints are one file, so --resume always finds the newest (the
    # one it replaced is kept as last.ckpt.prev for the NaN guard)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt", "last.ckpt.prev"]
    assert main(["pretrain", "--config", "configs/cpu/simclr_cdg.yaml", "--out", str(out), *over]) == 2  # exists
    assert "already holds a run" in capsys.readouterr().err
    # resume for one more epoch: continues from the checkpoint (global step keeps counting)
    steps_before = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    wall_before = json.loads((out / "metrics.json").read_text())["pretrain_wall_s"]
    assert main(["pretrain", "--resume", "--out", str(out), "trainer.max_epochs=2"]) == 0
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2 * steps_before
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["pretrain_wall_s"] > wall_before  # wall time accumulates across the resume
    assert resumed["pretrain_images_per_s"] > 0
    assert main(["knn", "--run", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= m["knn_top1"] <= 1.0 and 0.0 <= m["eta"] <= 1.0
    assert m["protocol"]["knn_top1"]["dataset"] == "cifar10" and m["protocol"]["knn_top1"]["width"] == 0.125
    # every number names the code that produced it, training and evaluation alike
    assert m["protocol"]["knn_top1"]["code"] == m["protocol"]["pretrain_wall_s"]["code"] == code_version()
    assert m["flops_reduction_exact"] > 1.0 and m["flops_reduction_eq13"] > 1.0
    # eta and the FLOPs reductions keep the protocol of the pass that measured them, not the kNN's
    assert m["protocol"]["eta"]["protocol"].startswith("gate statistics of the evaluation forward pass")
    assert m["protocol"]["flops_reduction_exact"] == m["protocol"]["eta"]
    # the same evaluation from Python, without the CLI and without writing: the cached features
    from cdg.eval import linear_probe

    r = linear_probe(out, save=False, progress=False)
    assert 0.0 <= r.accuracy <= 1.0 and r.protocol["protocol"].startswith("linear probe (fast")
    assert r.values["eta"] == pytest.approx(m["eta"]) and r.protocols["eta"]["protocol"] == m["protocol"]["eta"]["protocol"]
    assert "linear_top1" not in json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["report", "--run", str(out)]) == 0
    report = capsys.readouterr().out
    shared = next(ln for ln in report.splitlines() if ln.startswith("Shared by every row: "))
    assert "dataset=cifar10" in shared and "width=0.125" in shared  # said once, above the table
    knn_row = next(ln for ln in report.splitlines() if ln.startswith("| kNN top-1 |"))
    assert "kNN (k=20" in knn_row and "dataset=" not in knn_row
    eta_row = next(ln for ln in report.splitlines() if ln.startswith("| eta (test, a1) |"))
    assert "gate statistics" in eta_row and "kNN" not in eta_row
    seen = next(ln for ln in report.splitlines() if ln.startswith("| pre-training images seen |"))
    assert f"{2 * steps_before * 32:,}" in seen


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from cdg.methods.simclr import SimCLR

    cfg = load_config(None, TINY + ["data.dataset=synthetic", "trainer.checkpoint_every_n_steps=2"])
    calls = {"n": 0}
    orig = SimCLR.ssl_loss

    def flaky(self, v1, v2):
        calls["n"] += 1
        loss = orig(self, v1, v2)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(SimCLR, "ssl_loss", flaky)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        pretrain(cfg, tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_cli_errors_name_the_culprit(tmp_path, capsys):
    assert main(["pretrain", "--config", "configs/cpu/simclr_cdg.yaml", "--out", str(tmp_path / "x"), "model.widht=1"]) == 2
    assert "unknown config key 'model.widht'" in capsys.readouterr().err
    assert main(["pretrain", "--config", "configs/cpu/simclr_cdg.yaml", "--out", str(tmp_path / "y"),
                 f"data.root={tmp_path}/nowhere"]) == 2
    err = capsys.readouterr().err
    assert "data error" in err and "nowhere" in err
    assert main(["knn", "--run", str(tmp_path / "missing")]) == 2
    assert "not a cdg run directory" in capsys.readouterr().err
    # overrides may come before and after options: the one after --out is still read (and named)
    assert main(["pretrain", "--config", "configs/cpu/simclr_cdg.yaml", "model.width=0.5", "--out",
                 str(tmp_path / "z"), "model.widht=1"]) == 2
    assert "unknown config key 'model.widht'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["knn", "--run", str(tmp_path), "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_cli_flops(capsys):
    assert main(["flops", "--config", "configs/cpu/simclr_cdg.yaml", "--eta", "0.7", "--json", "model.width=1.0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert abs(out["total_dense_macs"] / 1e9 - 0.5554) < 1e-3
    assert out["flops_reduction_eq13"] == pytest.approx(1 / (0.25 + 0.3 * 0.75))
    assert 1.0 < out["flops_reduction_exact"] < out["flops_reduction_eq13"]


def test_finetune_and_sgd_linear_protocols(cifar10_root, tmp_path, monkeypatch, capsys):
    """Fine-tuning trains tau and keeps gating on a1; the SGD linear probe freezes backbone and gates.

    The SGD probe trains on the whole split although pre-training had trainer.limit_train_batches
    set, and writes its own key (linear_sgd_top1), not the fast probe's (linear_top1)."""
    from cdg.data import load_split
    from cdg.runs import update_metrics

    monkeypatch.setenv("CDG_DATA", str(cifar10_root))
    out = tmp_path / "run"
    over = TINY + ["gating.mode=dual", "gating.groups=2", "data.batch_size=128", "trainer.limit_train_batches=1"]
    assert main(["pretrain", "--config", "configs/cpu/simclr_cdg.yaml", "--out", str(out), *over]) == 0
    assert json.loads((out / "metrics.json").read_text())["pretrain_steps"] == 1
    update_metrics(out, {"linear_top1": 0.1234})  # stands for a fast-probe result
    before = read_backbone_file(out / "backbone.pt")[0]
    assert main(["linear", "--run", str(out), "--epochs", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= m["linear_sgd_top1"] <= 1.0 and "SGD, frozen backbone" in m["protocol"]["linear_sgd_top1"]["protocol"]
    assert m["linear_top1"] == 0.1234
    assert max(int(r["step"]) for r in read_log(out / "linear_sgd")) >= 150  # 195 steps of 256 images, not 1
    assert main(["finetune", "--run", str(out), "--epochs", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= m["finetune_top1"] <= 1.0 and m["protocol"]["finetune_top1"]["label_fraction"] == 0.5
    assert 0.0 <= m["finetune_eta"] <= 1.0
    idx, meta = load_split(out / "finetune_split.json")
    assert len(idx) == 25000 and meta["fraction"] == 0.5
    after = torch.load(out / "finetuned_backbone.pt", weights_only=True)
    taus = [k for k in before if k.endswith("tau")]
    assert taus and any(not torch.equal(before[k], after[k]) for k in taus)  # tau trained in fine-tuning
    # eta during fine-tuning (Fig. 8b): every log_every_n_steps steps
    etas = [(int(r["step"]), float(r["finetune/eta"])) for r in read_log(out / "finetune") if r.get("finetune/eta")]
    every = load_config(out / "config.yaml").trainer.log_every_n_steps
    assert [s for s, _ in etas] == list(range(every - 1, 195, every)) and all(0.0 < e < 1.0 for _, e in etas)
    assert m["finetune_steps_per_epoch"] == 195
    from cdg.plots import load_runs, plot_runs

    assert load_runs([out])[0].finetune_eta_series()[-1][0] == pytest.approx(180 / 195)
    assert plot_runs([out], tmp_path / "plots", figures=["fig8b"]).drawn["fig8b"].panels == 2


def test_tensorboard_logger_and_lr_monitor(cifar10_root, tmp_path):
    """trainer.logger=tensorboard writes event files beside the CSV log; the learning rate is logged."""
    cfg = load_config(None, TINY + ["gating.mode=dual", "gating.groups=2", f"data.root={cifar10_root}",
                                    "trainer.logger=tensorboard", "trainer.limit_train_batches=3",
                                    "trainer.monitor_every_n_epochs=0", "trainer.log_every_n_steps=1"])
    out = tmp_path / "run"
    pretrain(cfg, out)
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    rows = read_log(out)
    key = next(k for k in rows[0] if k.startswith("lr-"))  # one column per optimizer group
    lr = [float(r[key]) for r in rows if r.get(key)]
    assert len(lr) == 3 and lr[0] < lr[1] < lr[2]  # the warm-up, step by step
    with pytest.raises(Exception, match="trainer.logger"):
        load_config(None, ["trainer.logger=wandb"])


def test_runtime_environment_of_the_cdg_command(tmp_path):
    """`cdg` run directly gets the allocator and OpenMP settings the Makefile exports (re-executing
    itself once when they are missing) and still works; settings the user chose are kept."""
    import os
    import subprocess
    import sys

    from cdg.__main__ import RUNTIME_ENV, runtime_env

    assert runtime_env({}) == RUNTIME_ENV
    assert "OMP_WAIT_POLICY" not in runtime_env({"OMP_WAIT_POLICY": "ACTIVE"})
    env = {k: v for k, v in os.environ.items() if k not in RUNTIME_ENV and k != "CDG_NO_REEXEC"}
    probe = ("import os, runpy, sys; sys.argv = ['cdg', 'flops', '--config', 'configs/cpu/simclr_cdg.yaml', '--json'];"
             "import cdg.cli; cdg.cli.main = lambda: print('ENV', {k: os.environ.get(k) for k in %r}) or 0;"
             "from cdg.__main__ import entry; sys.exit(entry())" % (list(RUNTIME_ENV),))
    # entry() re-executes `python -m cdg` with the settings filled in: the real command runs and succeeds
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ENV" not in done.stdout and '"total_dense_macs"' in done.stdout  # the re-executed, real command ran
    # with the settings present there is no re-execution: the patched main runs in this process
    done = subprocess.run([sys.executable, "-c", probe], env={**env, **RUNTIME_ENV, "OMP_WAIT_POLICY": "ACTIVE"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "'OMP_WAIT_POLICY': 'ACTIVE'" in done.stdout


def test_code_version_names_the_package_and_its_commit():
    from pathlib import Path

    from cdg import __version__

    v = code_version()
    assert v.startswith(f"cdg {__version__}")
    src = Path(__import__("cdg").__file__).resolve().parent.parent
    if (src.parent / ".git").exists():  # a git checkout (the tests run from one): the commit too
        assert "(git " in v and len(v.split("(git ")[1].rstrip(")").removesuffix("+dirty")) == 12
