"""cdg.eval.recalibrate_bn: running statistics become those of the chosen branch's own activations."""

from __future__ import annotations

import torch

from cdg.eval.bn import recalibrate_bn
from cdg.models import create_model
from cdg.nn import make_conv_layer


def test_running_stats_are_the_branch_inputs_own():
    torch.manual_seed(0)
    net = create_model("resnet18", width=0.125, conv_layer=make_conv_layer("dual", gate_groups=2, gate_kernel="torch"))
    bn = net.layer1[0].bn1
    bn.running_mean.fill_(5.0)  # stands for statistics mixed over both branches
    seen = []
    handle = bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().float()))
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8)
    n = recalibrate_bn(net, images, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), branch=0, batch_size=32)
    handle.remove()
    assert n == 20 and not net.training and bn.momentum == 0.1
    x = torch.cat(seen)  # branch a1's inputs to this BN, all 96 images
    torch.testing.assert_close(bn.running_mean, x.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    # BatchNorm averages the per-batch unbiased variances (momentum=None): three equal batches
    per_batch = torch.stack([b.var((0, 2, 3), unbiased=True) for b in x.split(32)]).mean(0)
    torch.testing.assert_close(bn.running_var, per_batch, rtol=1e-4, atol=1e-5)


def test_cdg_recalibrate_bn_writes_a_run_that_evaluates(cifar10_root, tmp_path, monkeypatch, capsys):
    """`cdg recalibrate-bn` copies a run with branch a1's own BN statistics; the copy loads as a run."""
    import json

    from cdg.cli import main
    from cdg.runs import load_run

    monkeypatch.setenv("CDG_DATA", str(cifar10_root))
    run, out = tmp_path / "run", tmp_path / "run-bn-a1"
    tiny = ["model.width=0.125", "gating.groups=2", "data.batch_size=32", "data.train_images=256", "trainer.max_epochs=1",
            "trainer.limit_train_batches=2", "trainer.precision=32-true", "trainer.progress_bar=false",
            "trainer.monitor_every_n_epochs=0", "method.proj_hidden_dim=32", "method.proj_output_dim=16"]
    assert main(["pretrain", "--config", "configs/cpu/simclr_cdg.yaml", "--out", str(run), *tiny]) == 0
    assert main(["recalibrate-bn", "--run", str(run), "--out", str(out), "--images", "256"]) == 0
    _, before = load_run(run)
    cfg, after = load_run(out)
    assert cfg.gating.mode == "dual"
    sb, sa = before.state_dict(), after.state_dict()
    stats = [k for k in sb if k.endswith("running_mean")]
    assert stats and all(not torch.equal(sb[k], sa[k]) for k in stats)  # every BN re-estimated
    assert all(torch.equal(sb[k], sa[k]) for k in sb if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    rec = json.loads((out / "metrics.json").read_text())["bn_recalibration"]
    assert rec == {"source_run": str(run), "branch": "a1", "images": 256, "bn_layers": len(stats)}
    capsys.readouterr()
    assert main(["recalibrate-bn", "--run", str(run), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
