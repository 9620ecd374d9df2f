"""Pre-training throughput of our Lightning loop against a plain PyTorch loop (same model, batch, data).

Both run SimCLR on the same in-memory CIFAR-10 uint8 images with the same batched augmentation,
the config's precision (``auto``: bf16 autocast only on hardware with native bf16), channels_last and LARS. Alternating rounds of a fixed number of steps. Prints
images/s for both and the overhead of the framework (target: under 10%).

Usage: python benchmarks/bench_framework_overhead.py [--steps 20] [--rounds 2] [overrides ...]
Needs the data (CDG_DATA or data.root=...); defaults to configs/cpu/simclr_dense.yaml.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch

from cdg.config import load_config
from cdg.methods import build_method
from cdg.train import build_trainer, train_dataset, train_loader


def plain_loop(cfg, loader, steps: int) -> float:
    model = build_method(cfg, steps).to(memory_format=torch.channels_last)
    opt = model.configure_optimizers()["optimizer"]
    model.train()
    it = iter(loader)
    t = time.perf_counter()
    for _ in range(steps):
        images, _ = next(it)
        v1, v2 = model.augment.two_views(images)
        v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.trainer.bf16):
            loss = model.ssl_loss(v1, v2)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * cfg.data.batch_size / (time.perf_counter() - t)


def lightning_loop(cfg, loader, steps: int, out: str) -> float:
    model = build_method(cfg, steps).to(memory_format=torch.channels_last)
    trainer = build_trainer(cfg, __import__("pathlib").Path(out), [], max_epochs=1, enable_checkpointing=False)
    trainer.limit_train_batches = steps
    t = time.perf_counter()
    trainer.fit(model, loader)
    return steps * cfg.data.batch_size / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/cpu/simclr_dense.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config(a.config, a.overrides + ["trainer.progress_bar=false", "trainer.monitor_every_n_epochs=0"])
    L.seed_everything(0)
    loader = train_loader(cfg, train_dataset(cfg))
    plain, light = [], []
    for r in range(a.rounds):
        light.append(lightning_loop(cfg, loader, a.steps, f"/tmp/cdg-bench-{r}"))
        plain.append(plain_loop(cfg, loader, a.steps))
        print(f"round {r}: lightning {light[-1]:.1f} img/s, plain PyTorch {plain[-1]:.1f} img/s", flush=True)
    bl, bp = max(light), max(plain)
    print(f"{cfg.model.name} x{cfg.model.width}, gating {cfg.gating.mode}, batch {cfg.data.batch_size}, {cfg.trainer.resolved_precision()}: "
          f"best lightning {bl:.1f} img/s, best plain {bp:.1f} img/s, framework overhead {100 * (bp / bl - 1):+.1f}%")


if __name__ == "__main__":
    main()
