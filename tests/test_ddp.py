"""Real multi-process pre-training: 2 DDP processes (gloo on the CPU) against 1 process with the same
global batch, through the CLI (``python -m cdg``, which Lightning re-launches once per extra rank),
on a slice of real CIFAR-10.

What it guards (issue item "Multi-process training a user can trust"):
- the run finishes in both settings and writes ``backbone.pt``;
- steps per epoch, and so the learning-rate schedule (warm-up and cosine horizon), count each
  process's share of the data: the same per step in both runs (before the fix the DDP run planned
  W times too many steps, so its warm-up was W times slower);
- SimCLR's NT-Xent contrasts each anchor with the *global* batch: at initialisation the loss is
  about ln(2N - 1) for 2N projections in all, ln(63) = 4.14 for N = 32, whereas ranks that did not
  gather would see only their own 2 * 16 and log about ln(31) = 3.43.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cdg.runs import read_log

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "cpu" / "simclr_cdg.yaml")
GLOBAL_BATCH = 32
IMAGES = 128  # 4 steps of 32 in one process; 4 steps of 16 on each of 2 (the split holds 130)
SMALL = ["model.width=0.125", "gating.groups=2", f"data.train_images={IMAGES}", "trainer.max_epochs=1",
         "trainer.precision=32-true", "trainer.channels_last=false", "trainer.progress_bar=false",
         "trainer.monitor_every_n_epochs=0", "trainer.log_every_n_steps=1", "method.proj_hidden_dim=64",
         "method.proj_output_dim=32"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pretrain_cli(out: Path, overrides: list[str], root: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "CDG_THREADS": "1", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "PYTHONUNBUFFERED": "1"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):  # a stray one would make the child a rank
        env.pop(var, None)
    cmd = [sys.executable, "-m", "cdg", "pretrain", "--config", CONFIG, "--out", str(out), f"data.root={root}",
           *SMALL, *overrides]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return proc, time.time() - start


def _per_step(run: Path, key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in read_log(run) if r.get(key)}


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="no torch.distributed gloo backend")
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(cifar10_root, tmp_path):
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    proc, wall = _pretrain_cli(ddp, ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                                     f"data.batch_size={GLOBAL_BATCH // 2}"], cifar10_root)
    assert proc.returncode == 0, f"DDP run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    assert "Starting with 2 processes" in proc.stdout + proc.stderr  # really two ranks
    proc1, wall1 = _pretrain_cli(one, [f"data.batch_size={GLOBAL_BATCH}"], cifar10_root)
    assert proc1.returncode == 0, f"1-process run failed (rc {proc1.returncode}):\n{proc1.stderr[-4000:]}"
    print(f"wall: DDP {wall:.1f} s, 1 process {wall1:.1f} s")

    for run in (ddp, one):
        assert (run / "backbone.pt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    m_ddp = json.loads((ddp / "metrics.json").read_text())
    m_one = json.loads((one / "metrics.json").read_text())
    steps = IMAGES // GLOBAL_BATCH
    # same global batch, same epoch: the same number of optimizer steps and images
    assert m_one["pretrain_steps"] == steps and m_ddp["pretrain_steps"] == steps
    assert m_ddp["pretrain_images"] == m_one["pretrain_images"] == IMAGES
    assert m_ddp["pretrain_images_seen"] == m_one["pretrain_images_seen"] == IMAGES
    # the data set's size stays in the protocol (the stratified split rounds per class: 130 here)
    n_data = m_one["protocol"]["pretrain_steps"]["train_images"]
    assert m_ddp["protocol"]["pretrain_steps"]["train_images"] == n_data and IMAGES <= n_data < IMAGES + GLOBAL_BATCH // 2

    # the schedule: the same (warm-up) learning rate at every step
    lr_ddp, lr_one = _per_step(ddp, "lr-LARS/pg1"), _per_step(one, "lr-LARS/pg1")
    assert sorted(lr_ddp) == sorted(lr_one) == list(range(steps))
    for s in range(steps):
        assert lr_ddp[s] == pytest.approx(lr_one[s], rel=1e-6, abs=1e-12), (s, lr_ddp, lr_one)

    # the loss: rank 0 logs its anchors against all 2N keys; not gathering would give ~ln(N - 1)
    loss_ddp, loss_one = _per_step(ddp, "train/ssl_loss_step"), _per_step(one, "train/ssl_loss_step")
    assert sorted(loss_ddp) == sorted(loss_one) == list(range(steps))
    gathered, local_only = math.log(2 * GLOBAL_BATCH - 1), math.log(GLOBAL_BATCH - 1)
    assert gathered - local_only > 0.5
    for s in range(2):  # the first steps, near initialisation (lr 0 at step 0)
        assert abs(loss_ddp[s] - loss_one[s]) < 0.25, (s, loss_ddp, loss_one)
        assert abs(loss_ddp[s] - gathered) < 0.25, (s, loss_ddp[s], gathered, local_only)


@pytest.mark.parametrize("n_images,world,limit", [(130, 1, None), (130, 2, None), (63, 2, None), (96, 4, None),
                                                  (1000, 3, 5), (1000, 2, 0.5)])
def test_steps_per_epoch_is_what_lightnings_distributed_sampler_gives(n_images, world, limit):
    """The schedule's steps per epoch are the batches each process steps through: its share of the
    images from the ``DistributedSampler`` Lightning puts in the loader under DDP (padded to
    ceil(n / W)), in full batches, cut by ``trainer.limit_train_batches`` as Lightning cuts them."""
    from torch.utils.data import DataLoader, DistributedSampler

    from cdg.config import load_config
    from cdg.train import _steps_per_epoch

    batch = 16
    cfg = load_config(None, [f"data.batch_size={batch}"] + ([] if limit is None else [f"trainer.limit_train_batches={limit}"]))
    data = list(range(n_images))
    per_rank = {len(DataLoader(data, batch_size=batch, drop_last=True,
                               sampler=DistributedSampler(data, num_replicas=world, rank=r, shuffle=True, seed=0)))
                for r in range(world)}
    assert len(per_rank) == 1  # every rank steps the same number of times
    batches = per_rank.pop()
    expected = batches if limit is None else min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    assert _steps_per_epoch(cfg, n_images, world) == expected
    if world > 1 and n_images == 63:
        assert expected == 2 > n_images // (batch * world)  # the padded share completes a batch
