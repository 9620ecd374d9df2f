"""The flows a user runs beyond the default one, each on real CIFAR-10 images: an ImageFolder tree,
kills in the middle of a save, resume with changed settings, evaluation after the data changed,
NaN divergence, nonsense values and broken files. Each test names the item of the reliability
issue it guards; each failed before its fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from cdg.cli import main
from cdg.config import ConfigError, load_config
from cdg.export import read_backbone_file
from cdg.fileio import remove_partial_files
from cdg.runs import read_log
from cdg.train import NonFiniteLossError, pretrain

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "cpu" / "simclr_cdg.yaml")
TINY = ["model.width=0.125", "data.batch_size=32", "data.train_images=256", "trainer.max_epochs=1",
        "trainer.precision=32-true", "trainer.progress_bar=false", "trainer.monitor_images=128",
        "method.proj_hidden_dim=64", "method.proj_output_dim=32", "eval.knn_k=20", "gating.mode=dual",
        "gating.groups=2"]
CLASSES = ["airplane", "automobile", "bird", "cat"]


@pytest.fixture(scope="session")
def cifar_tree(tmp_path_factory, cifar10_train, cifar10_test) -> Path:
    """A small ImageFolder tree of real CIFAR-10 PNGs: 4 classes, 24 train and 8 test images each."""
    root = tmp_path_factory.mktemp("tree")
    for split, ds, n in (("train", cifar10_train, 24), ("test", cifar10_test, 8)):
        for label, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            idx = (ds.targets == label).nonzero().flatten()[:n]
            for k, i in enumerate(idx.tolist()):
                Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(d / f"{k:04d}.png")
    return root


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _params(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained weights only (BN running statistics change even at lr = 0)."""
    return {k: v for k, v in state.items() if k.endswith("weight") and v.ndim == 4}


# ----------------------------------------------------------------------- 1, 2: crashes in mission flows


@pytest.mark.parametrize("stem", ["imagenet"])
def test_imagefolder_pretrain_and_knn_on_real_pngs(cifar_tree, tmp_path, monkeypatch, stem):
    """Item 1: the per-image (worker) path pre-trains on an image tree; kNN scores its test split."""
    out = tmp_path / "run"
    over = TINY + ["data.dataset=imagefolder", f"data.root={cifar_tree}", f"model.stem={stem}", "data.batch_size=16",
                   "data.train_images=null", "data.num_workers=0", "data.eval_batch_size=16"]
    assert main(["pretrain", "--config", CONFIG, "--out", str(out), *over]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["pretrain_steps"] == 6 and m["pretrain_images"] == 96  # 96 images, 16 a batch
    assert main(["knn", "--run", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= m["knn_top1"] <= 1.0 and m["protocol"]["knn_top1"]["dataset"] == "imagefolder"


def test_worker_augmentation_on_cifar(cifar10_root, tmp_path):
    """Item 1: ``data.augment_on=workers`` (two views collated as lists) trains, in worker processes."""
    cfg = load_config(CONFIG, TINY + [f"data.root={cifar10_root}", "data.augment_on=workers", "data.num_workers=1",
                                      "trainer.monitor_every_n_epochs=0"])
    values = pretrain(cfg, tmp_path / "run")
    assert values["pretrain_steps"] == 8


def test_help_of_every_command(capsys):
    """Item 2: ``cdg --help`` (a literal % in a help string crashed argparse)."""
    for argv in (["--help"], *([c, "--help"] for c in ("pretrain", "linear", "knn", "finetune", "report", "flops"))):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "fine-tune on a stratified label fraction (50%)" in capsys.readouterr().out


# ----------------------------------------------------------------------- 3, 4: kill -9 during a save

_KILLED_SAVE = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from cdg.fileio import atomic_torch_save
    from cdg.train import AtomicCheckpointIO

    class Stall:  # pickling it blocks: the kill lands in the middle of the write
        def __reduce__(self):
            print("writing", flush=True)
            time.sleep(120)
            return (int, (0,))

    path, how = Path(sys.argv[1]), sys.argv[2]
    if how == "checkpoint":
        io = AtomicCheckpointIO()
        io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1 << 20), "stall": Stall()}, path)
    else:
        atomic_torch_save({"w": torch.zeros(1 << 20), "stall": Stall()}, path)
""")


@pytest.mark.parametrize("how,name", [("checkpoint", "last.ckpt"), ("weights", "backbone.pt"),
                                      ("weights", "features_a1.pt")])
def test_kill_during_save_keeps_a_complete_file(tmp_path, how, name):
    """Items 3 and 4: kill -9 while a file is written, with $TMPDIR on another folder (as a tmpfs /tmp
    would be): the previous checkpoint survives whole, a first write leaves no file, only a partial
    temporary file beside it, which the next start removes."""
    other_tmp = tmp_path / "elsewhere"
    other_tmp.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    path = run / name
    env = {**os.environ, "TMPDIR": str(other_tmp), "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(path), how], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = list(run.glob(f".{name}.tmp-*"))
    assert partial, "the kill should have left the partial temporary file"
    assert not list(other_tmp.iterdir())  # nothing goes through $TMPDIR
    if how == "checkpoint":
        assert torch.load(path, weights_only=False)["global_step"] == 1  # the old checkpoint, whole
        assert torch.load(path.with_name("last.ckpt.prev"), weights_only=False)["global_step"] == 1
    else:
        assert not path.exists()  # no 0-byte file that later commands would trust
    assert remove_partial_files(run) == partial and not list(run.glob(".*.tmp-*"))


def test_pretrain_writes_checkpoints_through_the_atomic_io(cifar10_root, tmp_path):
    """Item 3: the trainer really uses AtomicCheckpointIO (the replaced checkpoint is kept as .prev)."""
    cfg = load_config(CONFIG, TINY + [f"data.root={cifar10_root}", "trainer.checkpoint_every_n_steps=3"])
    pretrain(cfg, tmp_path / "run")
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt", "last.ckpt.prev"]
    assert torch.load(ck / "last.ckpt", weights_only=False)["global_step"] == 8
    assert torch.load(ck / "last.ckpt.prev", weights_only=False)["global_step"] == 6


# ----------------------------------------------------------------------- 5, 6, 7, 15: resume


def test_resume_keeps_log_history_extends_schedule_and_refuses_architecture(cifar10_root, tmp_path, monkeypatch,
                                                                            capsys, caplog):
    """Items 5, 6 (second half), 7 and 12 (no-op resume)."""
    monkeypatch.setenv("CDG_DATA", str(cifar10_root))
    out = tmp_path / "run"
    assert main(["pretrain", "--config", CONFIG, "--out", str(out), *TINY, "trainer.log_every_n_steps=1"]) == 0
    first = read_backbone_file(out / "backbone.pt")[0]
    rows = read_log(out)
    steps_1 = sorted({int(r["step"]) for r in rows if r.get("train/ssl_loss_step")})
    assert steps_1 == list(range(8))

    # 6: an override that changes the architecture is refused and the run's config is left as it was
    config_before = (out / "config.yaml").read_bytes()
    assert main(["pretrain", "--resume", "--out", str(out), "model.width=0.25"]) == 2
    err = capsys.readouterr().err
    assert "model.width: 0.125 -> 0.25" in err and "--resume cannot change" in err
    assert (out / "config.yaml").read_bytes() == config_before
    assert main(["knn", "--run", str(out)]) == 0  # the run can still be evaluated

    # 12: a no-op resume of a finished run trains nothing and writes no throughput
    ips = json.loads((out / "metrics.json").read_text())["pretrain_images_per_s"]
    assert main(["pretrain", "--resume", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["pretrain_images_per_s"] == ips

    # 7: more epochs on a finished run: the schedule is extended (lr > 0), the weights move
    with caplog.at_level("WARNING", logger="cdg"):
        assert main(["pretrain", "--resume", "--out", str(out), "trainer.max_epochs=2"]) == 0
    assert "schedule extended from 8 to 16 steps at step 8" in caplog.text
    second = read_backbone_file(out / "backbone.pt")[0]
    moved = [k for k, v in _params(first).items() if not torch.equal(v, second[k])]
    assert _params(first) and len(moved) == len(_params(first))
    m = json.loads((out / "metrics.json").read_text())
    assert m["pretrain_epochs"] == 2 and m["pretrain_steps"] == 16
    assert m["protocol"]["pretrain_steps"]["changed_on_resume"][0]["changed"]["trainer.max_epochs"] == {"from": 1, "to": 2}
    assert load_config(out / "config.yaml").trainer.max_epochs == 2

    # 5: the log keeps both attempts (steps 0-15, epoch 0's monitor row included)
    rows = read_log(out)
    assert sorted({int(r["step"]) for r in rows if r.get("train/ssl_loss_step")}) == list(range(16))
    assert len([r for r in rows if r.get("monitor/knn_top1")]) == 2
    assert (out / "logs" / "metrics.attempt-0.csv").is_file()


def test_failed_start_leaves_no_run_behind(cifar10_root, tmp_path, capsys):
    """Item 6: a start that fails (data missing, impossible settings) writes no config.yaml, so the
    same --out can be used again at once."""
    out = tmp_path / "run"
    assert main(["pretrain", "--config", CONFIG, "--out", str(out), *TINY, f"data.root={tmp_path}/nowhere"]) == 2
    assert "data error" in capsys.readouterr().err
    assert not (out / "config.yaml").exists()
    assert main(["pretrain", "--config", CONFIG, "--out", str(out), *TINY, f"data.root={cifar10_root}",
                 "data.train_images=16"]) == 2
    assert "no full batch of data.batch_size=32" in capsys.readouterr().err
    assert not (out / "config.yaml").exists()
    assert main(["pretrain", "--config", CONFIG, "--out", str(out), *TINY, f"data.root={cifar10_root}"]) == 0
    assert (out / "config.yaml").is_file() and (out / "backbone.pt").is_file()


def test_mid_epoch_resume_is_exact(cifar10_root, tmp_path, monkeypatch):
    """Item 15: a run interrupted mid-epoch and resumed ends with the same weights as one that was not
    (same images in the same order, same augmentations)."""
    from cdg.methods.simclr import SimCLR

    over = TINY + [f"data.root={cifar10_root}", "trainer.checkpoint_every_n_steps=3", "trainer.monitor_every_n_epochs=0"]
    pretrain(load_config(CONFIG, over), tmp_path / "straight")

    orig = SimCLR.training_step

    def interrupted(self, batch, batch_idx):
        if self.global_step == 5:
            raise RuntimeError("simulated crash at step 5")
        return orig(self, batch, batch_idx)

    monkeypatch.setattr(SimCLR, "training_step", interrupted)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(load_config(CONFIG, over), tmp_path / "resumed")
    monkeypatch.setattr(SimCLR, "training_step", orig)
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    pretrain(load_config(tmp_path / "resumed" / "config.yaml"), tmp_path / "resumed", resume=True)
    a = read_backbone_file(tmp_path / "straight" / "backbone.pt")[0]
    b = read_backbone_file(tmp_path / "resumed" / "backbone.pt")[0]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6), k


# ----------------------------------------------------------------------- 9, 10: evaluation (8: test_train_cli)


def test_feature_cache_follows_the_data_and_class_lists_must_match(cifar_tree, tmp_path, capsys):
    """Items 9 and 10: the cached features are recomputed when the data changes; a renamed class
    folder in one split is refused instead of shifting every label."""
    tree = _copy_tree(cifar_tree, tmp_path / "tree")
    out = tmp_path / "run"
    over = TINY + ["data.dataset=imagefolder", f"data.root={tree}", "model.stem=imagenet", "data.batch_size=16",
                   "data.train_images=null", "data.num_workers=0", "data.eval_batch_size=16",
                   "trainer.monitor_every_n_epochs=0"]
    assert main(["pretrain", "--config", CONFIG, "--out", str(out), *over]) == 0
    assert main(["knn", "--run", str(out)]) == 0
    cache = torch.load(out / "features_a1.pt", weights_only=False)
    assert len(cache["test"][0]) == 32
    for p in sorted((tree / "test" / "cat").iterdir())[:4]:  # the data changes: 4 test images fewer
        p.unlink()
    assert main(["knn", "--run", str(out)]) == 0
    cache2 = torch.load(out / "features_a1.pt", weights_only=False)
    assert len(cache2["test"][0]) == 28 and cache2["key"]["test"] != cache["key"]["test"]
    assert cache2["key"]["backbone"] == cache["key"]["backbone"]
    (tree / "train" / "cat").rename(tree / "train" / "kat")
    capsys.readouterr()
    assert main(["knn", "--run", str(out)]) == 2
    err = capsys.readouterr().err
    assert "different class lists" in err and "kat" in err


# ----------------------------------------------------------------------- 11: the NaN guard


@pytest.mark.parametrize("every", [2, 0])
def test_nan_guard_keeps_checked_weights(cifar10_root, tmp_path, monkeypatch, every):
    """Item 11: the weights diverge in update 4 (huge, and infinite in the stem); the loss of step 5
    is non-finite. The checkpoint of step 4 holds those weights and must not be the one kept; with
    no checked checkpoint the message says so instead of naming a file that does not exist.
    ``every=0`` also covers checkpoints at epoch ends only (two checkpoint callbacks clashed)."""
    from cdg.optim import LARS

    calls = {"n": 0}
    orig = LARS.step

    def exploding(self, closure=None):
        out = orig(self, closure)
        calls["n"] += 1
        if calls["n"] == 4:
            with torch.no_grad():
                convs = [p for g in self.param_groups for p in g["params"] if p.ndim == 4]
                for p in convs:
                    p.mul_(1e30)
                convs[0][0, 0, 0, 0] = float("inf")
        return out

    monkeypatch.setattr(LARS, "step", exploding)
    over = TINY + [f"data.root={cifar10_root}", f"trainer.checkpoint_every_n_steps={every}"]
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as e:
        pretrain(load_config(CONFIG, over), out)
    ck = out / "checkpoints"
    if every:
        assert "step 2" in str(e.value) and str(ck / "last.ckpt") in str(e.value)
        kept = torch.load(ck / "last.ckpt", weights_only=False)
        assert kept["global_step"] == 2
        assert max(v.abs().max().item() for v in _params({k: v for k, v in kept["state_dict"].items()}).values()) < 100
        assert torch.load(ck / "last.ckpt.diverged", weights_only=False)["global_step"] == 4
        monkeypatch.setattr(LARS, "step", orig)
        values = pretrain(load_config(out / "config.yaml") if (out / "config.yaml").is_file()
                          else load_config(CONFIG, over), out, resume=True)
        assert values["pretrain_steps"] == 8  # resumed from the kept checkpoint and finished
    else:
        assert "No checkpoint of checked weights exists" in str(e.value)
        assert not (ck / "last.ckpt").exists()
        assert main(["pretrain", "--resume", "--out", str(out)]) == 2  # says so, no traceback


# ----------------------------------------------------------------------- 12, 13, 14: values, files, messages


@pytest.mark.parametrize("override,expected", [
    ("trainer.max_epochs=-1", "'trainer.max_epochs' must be >= 1"),
    ("trainer.max_epochs=0", "'trainer.max_epochs' must be >= 1"),
    ("trainer.limit_train_batches=0", "'trainer.limit_train_batches' must be a finite number > 0"),
    ("trainer.limit_train_batches=2.5", "must be a whole number"),
    ("gating.lam=-1", "'gating.lam' must be a finite number >= 0"),
    ("optim.lr=-0.4", "'optim.lr' must be a finite number > 0 and < 1000"),
    ("optim.lr=1e300", "'optim.lr' must be a finite number > 0 and < 1000"),
    ("model.width=0.1", "not divisible by gating.groups=4 x gating.group_size=1"),
    ("gating.group_size=3", "not divisible by gating.groups=4 x gating.group_size=3"),
    ("data.train_images=0", "'data.train_images' must be >= 1"),
])
def test_nonsense_values_are_refused_at_load(override, expected):
    """Items 12 and 13: caught when the config is read, naming the key."""
    with pytest.raises(ConfigError, match=None) as e:
        load_config(CONFIG, [override, "gating.mode=dual", "gating.groups=4"])
    assert expected in str(e.value)


def test_runtime_settings_this_machine_cannot_run(tmp_path, capsys, monkeypatch):
    """Items 12 and 13: a GPU accelerator without a GPU, 16-mixed on a CPU, --eta outside [0, 1]."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for override, expected in (("trainer.accelerator=gpu", "no CUDA GPU is available"),
                               ("trainer.precision=16-mixed", "16-mixed needs a CUDA GPU")):
        assert main(["pretrain", "--config", CONFIG, "--out", str(tmp_path / "x"), override, "data.dataset=synthetic"]) == 2
        assert expected in capsys.readouterr().err
        assert not (tmp_path / "x" / "config.yaml").exists()
    # a layer that cannot be built (DGC's 8 heads on a 4-channel stage): one line, nothing written
    assert main(["pretrain", "--config", CONFIG, "--out", str(tmp_path / "d"), "gating.mode=dgc", "gating.groups=8",
                 "model.width=0.0625", "data.dataset=synthetic"]) == 2
    assert "out_channels=4 is not divisible by heads=8" in capsys.readouterr().err
    assert not (tmp_path / "d" / "config.yaml").exists()
    assert main(["flops", "--config", CONFIG, "--eta", "1.5"]) == 2
    assert "expected 0 <= eta <= 1" in capsys.readouterr().err
    assert main(["flops", "--config", CONFIG, "--eta", "1.0", "gating.mode=fbs"]) == 2
    assert "expected eta < 1" in capsys.readouterr().err


def test_broken_files_give_one_line_errors(cifar10_root, tmp_path, monkeypatch, capsys, caplog):
    """Item 13: truncated/corrupt backbone.pt and checkpoints name the file; a corrupt newest
    checkpoint falls back to the previous one; an unwritable run folder stops before any work, and a
    result is printed before it is written."""
    monkeypatch.setenv("CDG_DATA", str(cifar10_root))
    out = tmp_path / "run"
    assert main(["pretrain", "--config", CONFIG, "--out", str(out), *TINY, "trainer.checkpoint_every_n_steps=4"]) == 0
    capsys.readouterr()
    weights = out / "backbone.pt"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    assert main(["knn", "--run", str(out)]) == 2
    err = capsys.readouterr().err
    assert "backbone weights" in err and str(weights) in err and "unreadable" in err and "Traceback" not in err
    weights.write_bytes(b"")
    assert main(["linear", "--fast", "--run", str(out)]) == 2
    assert "is empty (0 bytes)" in capsys.readouterr().err
    weights.write_bytes(good)

    ck = out / "checkpoints" / "last.ckpt"
    ck.write_bytes(b"not a checkpoint")
    with caplog.at_level("WARNING", logger="cdg"):
        assert main(["pretrain", "--resume", "--out", str(out), "trainer.max_epochs=2"]) == 0
    assert "resuming from the previous checkpoint" in caplog.text
    assert json.loads((out / "metrics.json").read_text())["pretrain_steps"] == 16
    ck.write_bytes(b"x")
    (ck.with_name("last.ckpt.prev")).write_bytes(b"y")
    capsys.readouterr()
    assert main(["pretrain", "--resume", "--out", str(out), "trainer.max_epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "unreadable" in err and "last.ckpt.prev" in err

    # an unwritable run folder: stop before computing anything (root ignores file modes, so the
    # failing write is simulated)
    real_write = Path.write_bytes

    def refuse(self, data):
        if self.name.startswith(".write-test"):
            raise PermissionError(13, "Permission denied")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    assert main(["knn", "--run", str(out)]) == 2
    assert "cannot write to" in capsys.readouterr().err
    monkeypatch.setattr(Path, "write_bytes", real_write)

    import cdg.runs

    def failing_update(*a, **k):
        raise PermissionError(13, "Permission denied", str(out / "metrics.json"))

    monkeypatch.setattr(cdg.runs, "update_metrics", failing_update)
    assert main(["knn", "--run", str(out)]) == 2
    captured = capsys.readouterr()
    assert "kNN top-1:" in captured.out and "Permission denied" in captured.err


def test_messages_name_the_culprit(cifar_tree, tmp_path, capsys):
    """Item 14: a decode error in a DataLoader worker is one line naming the file; a stray flag is
    named alone; a missing base: file names the config that named it; no message suggests a flag
    that does not exist."""
    tree = _copy_tree(cifar_tree, tmp_path / "tree")
    bad = tree / "train" / "bird" / "0003.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    over = TINY + ["data.dataset=imagefolder", f"data.root={tree}", "data.batch_size=16", "data.train_images=null",
                   "data.augment_on=workers", "data.num_workers=1", "trainer.monitor_every_n_epochs=0"]
    assert main(["pretrain", "--config", CONFIG, "--out", str(tmp_path / "run"), *over]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("cdg pretrain: data error: cannot decode image") and str(bad) in last
    assert "Traceback" not in err and "DataLoader worker" not in err

    with pytest.raises(SystemExit):
        main(["pretrain", "--config", CONFIG, "--out", str(tmp_path / "y"), "model.width=0.5", "--bogus", "trainer.seed=1"])
    assert capsys.readouterr().err.strip().endswith("unrecognized arguments: --bogus")

    child = tmp_path / "child.yaml"
    child.write_text("base: missing.yaml\nmodel:\n  width: 0.5\n")
    assert main(["flops", "--config", str(child)]) == 2
    err = capsys.readouterr().err
    assert "missing.yaml" in err and f"named by 'base: ...' in {child}" in err

    src = "\n".join(p.read_text() for p in (REPO / "src" / "cdg").rglob("*.py"))
    assert "--data-root" not in src
