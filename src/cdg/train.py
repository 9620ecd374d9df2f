"""Pre-training with Lightning: data, callbacks (checkpoints, NaN stop, gate monitor), resume."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from cdg.config import Config, native_bf16
from cdg.data import TensorImageDataset, TransformedDataset, TwoViewTransform, augment_preset, build_dataset, stratified_subset, save_split
from cdg.eval.knn import knn_monitor
from cdg.methods import SSLMethod, build_method
from cdg.nn import gate_statistics, gated_layers, mask_similarity, reset_gate_stats
from cdg.runs import base_protocol, update_metrics

log = logging.getLogger("cdg")


class BatchedTensorDataset(Dataset):
    """In-memory uint8 images fetched a whole batch at a time (``__getitems__``): no per-image Python."""

    def __init__(self, ds: TensorImageDataset) -> None:
        self.images, self.targets = ds.images, ds.targets

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]

    def __getitems__(self, idx: list[int]):
        i = torch.as_tensor(idx)
        return self.images[i], self.targets[i]


def _as_batch(batch):
    return batch


def train_dataset(cfg: Config, run_dir: Path | None = None):
    """The pre-training images (optionally a seeded stratified subset, saved with the run)."""
    kw = {"label_type": cfg.data.label_type} if cfg.data.dataset == "cifar100" else {}
    ds = build_dataset(cfg.data.dataset, cfg.data.root, "train", cfg.data.download, **kw)
    if cfg.data.train_images is not None and cfg.data.train_images < len(ds):
        idx = stratified_subset(ds.targets, cfg.data.train_images / len(ds), cfg.trainer.seed)
        if run_dir is not None:
            save_split(run_dir / "pretrain_split.json", idx, fraction=cfg.data.train_images / len(ds), seed=cfg.trainer.seed)
        ds = ds.subset(idx)
    return ds


def train_loader(cfg: Config, ds) -> DataLoader:
    d = cfg.data
    if d.augment_on == "batch" and isinstance(ds, TensorImageDataset):
        return DataLoader(BatchedTensorDataset(ds), batch_size=d.batch_size, shuffle=True, drop_last=True,
                          collate_fn=_as_batch, num_workers=0)
    two = TransformedDataset(ds, TwoViewTransform(augment_preset(cfg.method.name, d.dataset)))
    return DataLoader(two, batch_size=d.batch_size, shuffle=True, drop_last=True, num_workers=d.num_workers,
                      persistent_workers=d.num_workers > 0, pin_memory=torch.cuda.is_available())


class NaNGuard(Callback):
    """Stops the run on a non-finite loss, before any checkpoint of the bad state is written."""

    def __init__(self, every_n_steps: int = 1) -> None:
        self.every = max(1, every_n_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).item():
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at step {trainer.global_step}, epoch {trainer.current_epoch}; "
                f"the run stopped and the last good checkpoint is kept in {trainer.default_root_dir}/checkpoints/last.ckpt "
                "(try a lower optim.lr or trainer.precision=32-true)"
            )


class GateMonitor(Callback):
    """Per epoch: eta per branch (Fig. 8a); every N epochs: kNN accuracy and mask similarity S_c (Fig. 4)."""

    def __init__(self, cfg: Config, monitor_data: tuple[torch.Tensor, torch.Tensor] | None, test_data=None) -> None:
        self.cfg, self.monitor_data, self.test_data = cfg, monitor_data, test_data
        self.last_train_stats: dict[str, Any] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        reset_gate_stats(pl_module.backbone)

    def on_train_epoch_end(self, trainer, pl_module: SSLMethod) -> None:
        stats = gate_statistics(pl_module.backbone, "train")
        self.last_train_stats = stats
        for k in ("eta_a1", "eta_a2"):
            if k in stats:
                pl_module.log(f"train/{k}", stats[k], on_epoch=True)
        every = self.cfg.trainer.monitor_every_n_epochs
        if every > 0 and self.monitor_data is not None and (trainer.current_epoch + 1) % every == 0:
            was = pl_module.training
            pl_module.eval()
            try:
                metrics = knn_monitor(pl_module, self.cfg, self.monitor_data, self.test_data)
                for k, v in metrics.items():
                    pl_module.log(f"monitor/{k}", v, on_epoch=True)
            except Exception:  # a broken monitor must not cost the epoch: it runs before the checkpoint
                log.exception("monitor failed at epoch %d; training continues without it", trainer.current_epoch + 1)
            finally:
                pl_module.train(was)
            reset_gate_stats(pl_module.backbone)


class WallClock(Callback):
    """Pre-training wall time across resumes (kept in every checkpoint; work lost after the last
    checkpoint is not counted) and this process's own throughput."""

    def __init__(self) -> None:
        self.before, self.start, self.start_step = 0.0, time.time(), 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start, self.start_step = time.time(), trainer.global_step

    def elapsed(self) -> float:
        return self.before + time.time() - self.start

    def images_per_s(self, trainer, batch_size: int) -> float | None:
        wall = time.time() - self.start
        return (trainer.global_step - self.start_step) * batch_size * trainer.world_size / wall if wall > 0 else None

    def state_dict(self) -> dict[str, float]:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.before = float(state_dict.get("elapsed_s", 0.0))


def build_trainer(cfg: Config, out: Path, callbacks: list[Callback], max_epochs: int | None = None, **kw: Any) -> L.Trainer:
    t = cfg.trainer
    return L.Trainer(
        default_root_dir=str(out), max_epochs=max_epochs or t.max_epochs, precision=t.resolved_precision(),
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        logger=CSVLogger(str(out), name="logs", version=""), callbacks=callbacks,
        log_every_n_steps=t.log_every_n_steps, enable_progress_bar=t.progress_bar,
        limit_train_batches=t.limit_train_batches, num_sanity_val_steps=0, **kw,
    )


def device_name(device: torch.device) -> str:
    """What a wall time was measured on: the GPU's name, or the CPU's model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "CPU") if Path("/proc/cpuinfo").is_file() else "CPU"
    return f"{cpu}, {torch.get_num_threads()} threads"


def pretrain(cfg: Config, out: str | Path, resume: bool = False) -> dict[str, Any]:
    """Pre-train ``cfg`` into run directory ``out``; resumes from ``out/checkpoints/last.ckpt``."""
    out = Path(out)
    ckpt = out / "checkpoints" / "last.ckpt"
    if (out / "config.yaml").exists() and not resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not ckpt.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    L.seed_everything(cfg.trainer.seed, workers=True)
    if cfg.trainer.resolved_precision() == "bf16-mixed" and cfg.trainer.device().type == "cpu" and not native_bf16():
        log.warning("trainer.precision=bf16-mixed on a CPU without native bf16 (no AVX512-BF16/AMX): bf16 "
                    "autocast is emulated (benchmarks/bench_precision.py measured it 11x slower than fp32 on such a CPU); use trainer.precision=auto")
    ds = train_dataset(cfg, out)
    loader = train_loader(cfg, ds)
    steps = len(loader)
    if cfg.trainer.limit_train_batches is not None:
        lim = cfg.trainer.limit_train_batches
        steps = int(lim) if lim >= 1 else max(1, int(steps * lim))
    model = build_method(cfg, steps)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    monitor = None
    if isinstance(ds, TensorImageDataset) and cfg.trainer.monitor_every_n_epochs > 0:
        n = min(cfg.trainer.monitor_images, len(ds))
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.trainer.seed))[:n]
        monitor = (ds.images[idx], ds.targets[idx])
    gate_monitor = GateMonitor(cfg, monitor)
    callbacks: list[Callback] = [
        # both write last.ckpt, the newer save winning (without enable_version_counter=False the second
        # wrote last-v1.ckpt, and --resume, which reads last.ckpt, lost the steps since the last 200)
        ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0, enable_version_counter=False,
                        every_n_train_steps=cfg.trainer.checkpoint_every_n_steps or None),
        ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0, enable_version_counter=False,
                        save_on_train_epoch_end=True),
        NaNGuard(cfg.trainer.nan_check_every_n_steps),
        gate_monitor,
        clock := WallClock(),
    ]
    if cfg.trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    trainer = build_trainer(cfg, out, callbacks)
    trainer.fit(model, loader, ckpt_path=str(ckpt) if resume else None)
    if trainer.global_rank == 0:
        torch.save(model.backbone.state_dict(), out / "backbone.pt")
        stats = gate_monitor.last_train_stats
        values: dict[str, Any] = {"pretrain_wall_s": clock.elapsed(), "pretrain_epochs": trainer.current_epoch,
                                  "pretrain_images_per_s": clock.images_per_s(trainer, cfg.data.batch_size),
                                  "pretrain_images": len(ds), "pretrain_device": device_name(trainer.strategy.root_device)}
        if stats:
            values["train_eta_a1_last_epoch"] = stats.get("eta_a1")
            values["train_eta_a2_last_epoch"] = stats.get("eta_a2")
        update_metrics(out, values, base_protocol(cfg, stage="pretrain", epochs=cfg.trainer.max_epochs,
                                                  train_images=len(ds), batch_size=cfg.data.batch_size,
                                                  precision=cfg.trainer.resolved_precision()))
        return values
    return {}
