"""Portable backbones (cdg.export): the self-describing backbone.pt, old bare files, the torchvision export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cdg.builders import build_backbone
from cdg.config import Config, config_from_dict, load_config
from cdg.cli import main as cdg_main
from cdg.export import (export_torchvision, load_backbone, read_backbone_file, save_backbone,
                        torchvision_resnet, torchvision_state_dict)
from cdg.fileio import RunFileError, atomic_torch_save
from cdg.runs import load_run

ROOT = Path(__file__).resolve().parents[1]


def _cfg(model: dict | None = None, gating: dict | None = None) -> Config:
    return config_from_dict({"model": model or {}, "gating": gating or {}})


def _perturb(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running statistics (so that eval-mode BN matters), and random
    gating parameters where there are any, deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
        for name, p in net.named_parameters():
            if name.endswith("tau"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def _features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return net(x)


# ----------------------------------------------------------------------- (a) dense -> torchvision


@pytest.mark.parametrize("name,stem,size", [("resnet18", "cifar", 32), ("resnet50", "imagenet", 64)])
def test_dense_backbone_loads_strictly_into_torchvision_with_the_same_features(name, stem, size):
    torch.manual_seed(0)
    ours = _perturb(build_backbone(_cfg({"name": name, "stem": stem, "width": 1.0})))
    state = torchvision_state_dict(ours)
    assert not any("shortcut" in k for k in state) and any(".downsample.0.weight" in k for k in state)
    assert any(k.endswith("num_batches_tracked") for k in state)
    tv = torchvision_resnet(name, stem)
    tv.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, size, size)
    want = _features(ours, x)
    assert want.shape == (2, ours.num_features)
    torch.testing.assert_close(_features(tv, x), want, rtol=1e-4, atol=1e-5)


def test_other_widths_export_but_do_not_fit_torchvision():
    small = build_backbone(_cfg({"width": 0.5}))
    full = build_backbone(_cfg({"width": 1.0}))
    assert set(torchvision_state_dict(small)) == set(torchvision_state_dict(full))  # same naming at any width
    with pytest.raises(ValueError, match=r"model.width=0.5 .*only model.width=1.0"):
        torchvision_resnet("resnet18", "cifar", width=0.5)
    with pytest.raises(ValueError, match="unknown model 'resnet34'"):
        torchvision_resnet("resnet34", "cifar")
    with pytest.raises(TypeError, match="ResNet backbone"):
        torchvision_state_dict(nn.Linear(2, 2))


# ----------------------------------------------------------------------- (b) gated -> torchvision


@pytest.mark.parametrize("gating,dropped", [
    ({"mode": "dual", "groups": 4}, {"tau"}),
    ({"mode": "dual", "groups": 4, "norm": "batch"}, {"tau", "branch_norms"}),
    ({"mode": "fbs"}, {"predictor", "norm", "beta"}),  # official FBS: its norm's statistics go to the block's bn
    ({"mode": "dgc", "groups": 4}, {"fc1_weight", "fc2_weight", "fc2_bias", "norm"}),
], ids=["dual", "dual-batchnorm", "fbs", "dgc"])
def test_gated_backbone_exports_its_dense_weights(gating, dropped):
    ours = _perturb(build_backbone(_cfg({"width": 1.0}, gating)))
    state = torchvision_state_dict(ours)
    torchvision_resnet("resnet18", "cifar").load_state_dict(state, strict=True)
    gated = {n: m for n, m in ours.named_modules() if not isinstance(m, nn.Conv2d) and hasattr(m, "weight")
             and isinstance(getattr(m, "weight"), torch.Tensor) and getattr(m, "weight").ndim == 4}
    assert len(gated) == 16  # every 3x3 block convolution is gated
    for n, m in gated.items():
        assert torch.equal(state[f"{n}.weight"], m.weight)  # the full dense convolution W
    ours_keys = set(ours.state_dict())
    gone = ours_keys - {k.replace(".downsample.", ".shortcut.") for k in state}
    assert {k.split(".")[3] for k in gone} == dropped  # layerS.J.convK.<gating tensor>...


def test_cdg_backbone_with_every_gate_open_is_the_torchvision_network():
    """For CDG the export is exactly the gated network with M = 1 (Eq. 3: Y = conv(X, W))."""
    ours = _perturb(build_backbone(_cfg({"width": 1.0}, {"mode": "dual", "groups": 4})))
    tv = torchvision_resnet("resnet18", "cifar")
    tv.load_state_dict(torchvision_state_dict(ours), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("tau"):
                p.fill_(-1e4)  # every gate open
    torch.testing.assert_close(_features(tv, x), _features(ours, x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------- (c) backbone.pt formats


def test_save_and_load_backbone_without_config_yaml(tmp_path):
    cfg = _cfg({"width": 0.25}, {"mode": "dual", "groups": 2, "group_size": 2})
    ours = _perturb(build_backbone(cfg))
    path = save_backbone(tmp_path / "alone" / "backbone.pt", cfg, ours)
    assert not (path.parent / "config.yaml").exists()
    raw = torch.load(path, weights_only=True)  # readable without unpickling code
    assert raw["format"] == "cdg.backbone" and raw["version"] == 1 and raw["num_features"] == 128
    assert raw["model"]["width"] == 0.25 and raw["gating"]["group_size"] == 2
    back = load_backbone(path)
    assert torch.equal(back.layer1[0].conv1.tau, ours.layer1[0].conv1.tau)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(_features(back, x), _features(ours, x))
    state, meta = read_backbone_file(path)
    assert set(state) == set(ours.state_dict()) and meta["gating"]["mode"] == "dual" and "state_dict" not in meta


def test_half_precision_backbone_loads_back_into_float32(tmp_path):
    """Archived result rows keep their weights in float16; they load into the float32 backbone."""
    cfg = _cfg({"width": 0.25}, {"mode": "dense"})
    ours = _perturb(build_backbone(cfg))
    path = save_backbone(tmp_path / "backbone.pt", cfg, ours, dtype=torch.float16)
    state, _ = read_backbone_file(path)
    assert state["conv1.weight"].dtype == torch.float16 and state["bn1.num_batches_tracked"].dtype == torch.int64
    back = load_backbone(path)
    assert back.conv1.weight.dtype == torch.float32
    torch.testing.assert_close(back.conv1.weight, ours.conv1.weight.half().float())
    x = torch.randn(3, 3, 32, 32)
    a, b = _features(back, x), _features(ours, x)
    assert not torch.equal(a, b) and torch.allclose(a, b, rtol=2e-2, atol=2e-2)


def test_old_bare_backbone_still_loads_through_the_run(tmp_path):
    cfg = _cfg({"width": 0.25}, {"mode": "dual", "groups": 2})
    ours = _perturb(build_backbone(cfg))
    run = tmp_path / "run"
    cfg.save(run / "config.yaml")
    atomic_torch_save(ours.state_dict(), run / "backbone.pt")  # what pretrain wrote before the format
    state, meta = read_backbone_file(run / "backbone.pt")
    assert meta is None and set(state) == set(ours.state_dict())
    cfg2, back = load_run(run)
    assert cfg2.model.width == 0.25
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_features(back, x), _features(ours, x))
    with pytest.raises(RunFileError, match="bare state dict.*load_run"):
        load_backbone(run / "backbone.pt")


def test_new_backbone_loads_through_the_run_and_mismatches_are_named(tmp_path):
    cfg = _cfg({"width": 0.25}, {"mode": "dual", "groups": 2})
    ours = _perturb(build_backbone(cfg))
    run = tmp_path / "run"
    cfg.save(run / "config.yaml")
    save_backbone(run / "backbone.pt", cfg, ours)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_features(load_run(run)[1], x), _features(ours, x))

    # settings that compute the same values may differ (a resume may change them)
    _cfg({"width": 0.25}, {"mode": "dual", "groups": 2, "gate_kernel": "torch"}).save(run / "config.yaml")
    load_run(run)
    # a setting of the architecture or of the gating may not
    _cfg({"width": 0.5}, {"mode": "dual", "groups": 2}).save(run / "config.yaml")
    with pytest.raises(RunFileError, match=r"other settings.*model.width: file 0.25, config 0.5"):
        load_run(run)
    _cfg({"width": 0.25}, {"mode": "dual", "groups": 2, "lam": 0.5}).save(run / "config.yaml")
    with pytest.raises(RunFileError, match=r"gating.lam: file 0.0001, config 0.5"):
        load_run(run)


def test_foreign_and_newer_files_are_refused(tmp_path):
    cfg = _cfg({"width": 0.25})
    ours = build_backbone(cfg)
    junk = tmp_path / "junk.pt"
    torch.save({"step": 3}, junk)
    with pytest.raises(RunFileError, match="neither a cdg.backbone file nor a state dict"):
        read_backbone_file(junk)
    newer = tmp_path / "newer.pt"
    save_backbone(newer, cfg, ours)
    obj = torch.load(newer, weights_only=True)
    obj["version"] = 2
    torch.save(obj, newer)
    with pytest.raises(RunFileError, match="format version 2.*upgrade cdg"):
        read_backbone_file(newer)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(RunFileError, match="empty"):
        load_backbone(empty)


# ----------------------------------------------------------------------- (d) export_torchvision


def test_export_torchvision_from_a_run_directory(tmp_path, monkeypatch):
    cfg = _cfg({"width": 1.0})
    ours = _perturb(build_backbone(cfg))
    run = tmp_path / "run"
    cfg.save(run / "config.yaml")
    save_backbone(run / "backbone.pt", cfg, ours)
    out = tmp_path / "export" / "r18.pt"
    info = export_torchvision(run, out)
    sidecar = json.loads(Path(str(out) + ".json").read_text())
    assert sidecar == info
    assert info["arch"] == "resnet18" and info["stem"] == "cifar" and info["width"] == 1.0
    assert info["torchvision_loadable"] and not info["gating_dropped"] and info["gating"] == "dense"

    state = torch.load(out, weights_only=True)  # a plain state dict of tensors
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    tv = torchvision_resnet("resnet18", "cifar")
    tv.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_features(tv, x), _features(ours, x), rtol=1e-4, atol=1e-5)

    # the sidecar's instructions build and load the model as written
    monkeypatch.chdir(out.parent)
    scope: dict = {}
    exec("\n".join(info["load"]), scope)
    torch.testing.assert_close(_features(scope["model"], x), _features(ours, x), rtol=1e-4, atol=1e-5)


def test_export_of_a_gated_run_says_what_was_dropped(tmp_path, capsys):
    cfg = _cfg({"width": 0.5}, {"mode": "dual", "groups": 4})
    ours = _perturb(build_backbone(cfg))
    run = tmp_path / "run"
    cfg.save(run / "config.yaml")
    atomic_torch_save(ours.state_dict(), run / "backbone.pt")  # an old run exports too
    assert cdg_main(["export", "--run", str(run), "--out", str(tmp_path / "r18.pt")]) == 0
    info = json.loads((tmp_path / "r18.pt.json").read_text())
    assert info["gating_dropped"] and info["dropped_kinds"] == ["tau"] and info["dropped_tensors"] == 16
    assert not info["torchvision_loadable"] and "model.width=0.5" in info["note"] and "gate open" in info["note"]
    assert '"gating_dropped": true' in capsys.readouterr().out
    # a cdg.backbone file exports without its run
    save_backbone(tmp_path / "bb.pt", cfg, ours)
    again = export_torchvision(tmp_path / "bb.pt", tmp_path / "again.pt")
    a, b = torch.load(tmp_path / "r18.pt", weights_only=True), torch.load(tmp_path / "again.pt", weights_only=True)
    assert again["tensors"] == info["tensors"] and all(torch.equal(a[k], b[k]) for k in a)
    assert cdg_main(["export", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_pretrain_writes_the_portable_format(tmp_path):
    """pretrain's backbone.pt is the cdg.backbone format; the run and the file alone give the same backbone."""
    from cdg.train import pretrain

    cfg = load_config(ROOT / "configs" / "cpu" / "simclr_cdg.yaml", [
        "data.dataset=synthetic", "model.width=0.125", "gating.groups=2", "data.batch_size=16",
        "data.train_images=64", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
        "trainer.precision=32-true", "trainer.progress_bar=false", "trainer.monitor_every_n_epochs=0",
        "trainer.checkpoint_every_n_steps=0", "method.proj_hidden_dim=32", "method.proj_output_dim=16",
        "data.num_workers=0", "trainer.channels_last=false"])
    pretrain(cfg, tmp_path / "run")
    state, meta = read_backbone_file(tmp_path / "run" / "backbone.pt")
    assert meta is not None and meta["model"]["width"] == 0.125 and meta["gating"]["mode"] == cfg.gating.mode
    x = torch.randn(2, 3, 32, 32)
    from_run, from_file = load_run(tmp_path / "run")[1], load_backbone(tmp_path / "run" / "backbone.pt")
    assert torch.equal(_features(from_run, x), _features(from_file, x))
