"""Pre-training with Lightning: data, callbacks (checkpoints, NaN stop, gate monitor), resume."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset, Sampler

from cdg.config import Config, ConfigError, load_config, native_bf16, resume_changes
from cdg.data import TensorImageDataset, TransformedDataset, TwoViewTransform, augment_preset, build_dataset, stratified_subset, save_split
from cdg.builders import dataset_kwargs
from cdg.eval.knn import knn_monitor
from cdg.methods import SSLMethod, build_method
from cdg.nn import gate_statistics, reset_gate_stats
from cdg.fileio import (PREV_SUFFIX, RunFileError, atomic_torch_save, atomic_write_text, keep_previous,
                        load_torch_file, remove_partial_files, check_writable)
from cdg.runs import base_protocol, read_metrics, update_metrics

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
    ds = build_dataset(cfg.data.dataset, cfg.data.root, "train", cfg.data.download, **dataset_kwargs(cfg))
    if cfg.data.train_images is not None and cfg.data.train_images < len(ds):
        idx = stratified_subset(ds.targets, cfg.data.train_images / len(ds), cfg.trainer.seed)
        if run_dir is not None:
            save_split(run_dir / "pretrain_split.json", idx, fraction=cfg.data.train_images / len(ds), seed=cfg.trainer.seed)
        ds = ds.subset(idx)
    return ds


class EpochSampler(Sampler[int]):
    """A seeded shuffle per epoch (the permutation depends on ``seed`` and the epoch only) that can
    start part-way through an epoch, so that a run resumed mid-epoch sees the images it would have
    seen without the interruption.

    :class:`ExactResume` keeps :attr:`consumed` (batches the training loop finished this epoch);
    :class:`ResumableLoader` saves it in every checkpoint and skips those batches on resume.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self.consumed = 0  # batches of this epoch the training loop has finished
        self.epoch_batches = 0  # batches per epoch (set by ExactResume)
        self._skip = 0  # samples to skip at the next iteration (set when a checkpoint is loaded)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        skip, self._skip = self._skip, 0
        return iter(perm[skip:])


class ResumableLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved with every checkpoint (Lightning's
    ``state_dict`` / ``load_state_dict`` loader protocol) and restored on resume."""

    sampler: EpochSampler

    def state_dict(self) -> dict[str, int]:
        s = self.sampler
        return {"epoch": s.epoch, "consumed": s.consumed, "epoch_batches": s.epoch_batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        s = self.sampler
        if state.get("epoch_batches") and state["consumed"] >= state["epoch_batches"]:
            s.epoch, s._skip = state["epoch"] + 1, 0  # saved at the end of an epoch: the next one starts
        else:
            s.epoch, s._skip = state["epoch"], state["consumed"] * int(self.batch_size or 1)
        s.consumed = state["consumed"] if s._skip else 0


def train_loader(cfg: Config, ds, resumable: bool = True) -> DataLoader:
    """The pre-training loader: whole uint8 batches for in-memory data (``augment_on=batch``), else
    two views per image augmented in worker processes. ``resumable``: a :class:`ResumableLoader`
    (one process); otherwise a plain shuffled loader, which Lightning shards under DDP."""
    d = cfg.data
    if d.augment_on == "batch" and isinstance(ds, TensorImageDataset):
        data, kw = BatchedTensorDataset(ds), {"collate_fn": _as_batch, "num_workers": 0}
    else:
        data = TransformedDataset(ds, TwoViewTransform(augment_preset(cfg.method.name, d.dataset)))
        kw = {"num_workers": d.num_workers, "persistent_workers": d.num_workers > 0,
              "pin_memory": torch.cuda.is_available()}
    if not resumable:
        return DataLoader(data, batch_size=d.batch_size, shuffle=True, drop_last=True, **kw)
    # its own generator: creating an iterator then draws no number from the global RNG, so a resumed
    # run's augmentations (global RNG, restored by ExactResume) match the uninterrupted run's
    return ResumableLoader(data, batch_size=d.batch_size, sampler=EpochSampler(len(data), cfg.trainer.seed),
                           drop_last=True, generator=torch.Generator().manual_seed(cfg.trainer.seed), **kw)


class ExactResume(Callback):
    """What a mid-epoch resume needs beyond Lightning's own state: the loader's position in the
    epoch (kept on :class:`EpochSampler`) and the RNG states that the batched augmentation draws
    from (torch, CUDA, NumPy, Python), saved with every checkpoint and restored on resume."""

    def __init__(self, sampler: EpochSampler | None) -> None:
        self.sampler = sampler

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.sampler is not None:
            self.sampler.epoch_batches = int(trainer.num_training_batches)
            if not trainer.fit_loop.epoch_loop.restarting:
                self.sampler.consumed = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.sampler is not None:
            self.sampler.consumed = batch_idx + 1  # before ModelCheckpoint, which Lightning runs last

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "torch" in state_dict:
            torch.set_rng_state(state_dict["torch"])
            np.random.set_state(state_dict["numpy"])
            random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with the save made atomic in the checkpoint's own folder.

    Lightning's own save goes through a temporary file in ``$TMPDIR``; where that is another
    filesystem (a tmpfs ``/tmp``) the final move is an in-place copy, and a kill during it leaves a
    truncated checkpoint. Here the temporary file sits beside the checkpoint and is renamed over it
    (:func:`cdg.fileio.atomic_torch_save`), and the checkpoint it replaces is kept as
    ``<name>.prev`` (:func:`cdg.fileio.keep_previous`) for the NaN guard.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        keep_previous(path)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_torch_file(path, "checkpoint", weights_only=False, map_location=map_location or "cpu")


def _finite_params(state_dict: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state_dict.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


def _checkpoint_step(path: Path) -> tuple[int, bool] | None:
    """(global step, all weights finite) of a readable checkpoint, else None."""
    try:
        ck = load_torch_file(path, "checkpoint", weights_only=False)
    except RunFileError:
        return None
    return int(ck.get("global_step", -1)), _finite_params(ck.get("state_dict", {}))


class NaNGuard(Callback):
    """Stops the run on a non-finite loss and leaves ``last.ckpt`` holding weights whose loss was
    seen finite.

    The loss of step t is computed with the weights after t-1 updates, so the checkpoint written
    right after update t-1 cannot have been checked yet. When the guard trips, any checkpoint
    newer than the last weights seen to give a finite loss (or with non-finite weights) is moved
    to ``last.ckpt.diverged`` and the previous checkpoint (``last.ckpt.prev``) takes its place.
    """

    def __init__(self, checkpoint_dir: Path, every_n_steps: int = 1) -> None:
        self.dir, self.every = Path(checkpoint_dir), max(1, every_n_steps)
        self.last_good = -1  # newest weights version (number of updates) whose loss was finite

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        version = trainer.global_step - 1  # the weights this loss was computed with
        if torch.isfinite(loss).item():
            self.last_good = version
            return
        kept = self._keep_last_good()
        raise NonFiniteLossError(
            f"non-finite loss ({loss.item()}) at step {version + 1}, epoch {trainer.current_epoch}; the run stopped. "
            f"{kept} Try a new run with a lower optim.lr, or trainer.precision=32-true.")

    def _keep_last_good(self) -> str:
        last = self.dir / "last.ckpt"
        prev = last.with_name(last.name + PREV_SUFFIX)
        info = {p: _checkpoint_step(p) for p in (last, prev) if p.is_file()}
        good = [p for p, i in info.items() if i is not None and i[0] <= self.last_good and i[1]]
        if last in info and last not in good:
            os.replace(last, last.with_name(last.name + ".diverged"))
            if good:  # the previous checkpoint, checked, becomes the one --resume reads
                os.replace(prev, last)
        if not good:
            return ("No checkpoint of checked weights exists (none was written before the loss diverged"
                    + (f"; the unchecked one is kept as {last.name}.diverged" if last in info else "") + ").")
        step = info[good[0]][0]
        return f"The last good checkpoint, {last} (step {step}), is kept; `cdg pretrain --resume` continues from it."


class NonFiniteLossError(FloatingPointError):
    """Pre-training stopped on an inf/NaN loss (the message names the checkpoint that was kept)."""


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
        self.before, self.start, self.steps = 0.0, time.time(), 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start, self.steps = time.time(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1

    def elapsed(self) -> float:
        return self.before + time.time() - self.start

    def images_per_s(self, trainer, batch_size: int) -> float | None:
        """Images per second of this process's own steps; None when it ran none."""
        wall = time.time() - self.start
        return self.steps * batch_size * trainer.world_size / wall if self.steps and wall > 0 else None

    def state_dict(self) -> dict[str, float]:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.before = float(state_dict.get("elapsed_s", 0.0))


class SaveConfig(Callback):
    """Writes the run's ``config.yaml`` when training starts (after a resume's checkpoint has been
    restored), so that a start that fails leaves no config behind and a resume that fails leaves
    the old one untouched. Settings changed on resume are appended to ``resumes.json``."""

    def __init__(self, cfg: Config, out: Path, changes: dict[str, tuple[Any, Any]] | None = None,
                 resumed_at: int | None = None) -> None:
        self.cfg, self.out, self.changes, self.resumed_at = cfg, out, changes or {}, resumed_at

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        self.cfg.save(self.out / "config.yaml")
        if self.changes:
            p = self.out / "resumes.json"
            history = json.loads(p.read_text()) if p.is_file() else []
            history.append({"resumed_at_step": self.resumed_at,
                            "changed": {k: {"from": a, "to": b} for k, (a, b) in self.changes.items()}})
            atomic_write_text(p, json.dumps(history, indent=2))


def build_loggers(cfg: Config, out: Path) -> list[Any]:
    """CSV always (``logs/metrics.csv``: the run's plots and results read it), plus TensorBoard
    (``logs/tensorboard``) with ``trainer.logger=tensorboard`` (needs the ``tensorboard`` extra)."""
    loggers: list[Any] = [CSVLogger(str(out), name="logs", version="")]
    if cfg.trainer.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        try:
            loggers.append(TensorBoardLogger(str(out / "logs"), name="tensorboard", version=""))
        except ModuleNotFoundError as e:
            raise ConfigError(f"trainer.logger=tensorboard needs TensorBoard ({e}): pip install 'cdg[tensorboard]' "
                              "or use trainer.logger=csv") from None
    return loggers


def build_trainer(cfg: Config, out: Path, callbacks: list[Callback], max_epochs: int | None = None,
                  logger: Any = None, **kw: Any) -> L.Trainer:
    """The Lightning Trainer of ``cfg.trainer``: precision, devices and strategy (DDP across GPUs or
    CPU processes, ``sync_batchnorm``), the loggers of :func:`build_loggers` with a learning-rate
    monitor, and atomic checkpoint writes (:class:`AtomicCheckpointIO`)."""
    t = cfg.trainer
    loggers = logger if logger is not None else build_loggers(cfg, out)
    callbacks = [*callbacks, LearningRateMonitor(logging_interval="step")] if loggers else callbacks
    return L.Trainer(
        default_root_dir=str(out), max_epochs=max_epochs or t.max_epochs, precision=t.resolved_precision(),
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        sync_batchnorm=t.sync_batchnorm, logger=loggers, callbacks=callbacks,
        log_every_n_steps=t.log_every_n_steps, enable_progress_bar=t.progress_bar, plugins=[AtomicCheckpointIO()],
        limit_train_batches=t.limit_train_batches, num_sanity_val_steps=0, **kw,
    )


def device_name(device: torch.device) -> str:
    """What a wall time was measured on: the GPU's name, or the CPU's model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "CPU") if Path("/proc/cpuinfo").is_file() else "CPU"
    return f"{cpu}, {torch.get_num_threads()} threads"


def _steps_per_epoch(cfg: Config, n_images: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch: full batches of one process's share of the images, cut by
    ``trainer.limit_train_batches``.

    Under DDP each of the ``world_size`` processes gets ceil(n_images / world_size) images per
    epoch (Lightning's ``DistributedSampler`` pads the last share by repeating images) and steps
    through its full batches of ``data.batch_size``; all processes step together. With one process
    this is n_images // batch_size; with W it is n_images // (batch_size * W), or one more where the
    padding completes a batch.
    """
    steps = -(-n_images // world_size) // cfg.data.batch_size
    lim = cfg.trainer.limit_train_batches
    if lim is not None:
        # Lightning's reading: an int (or a whole float above 1) counts batches, a float <= 1.0 is a fraction
        steps = min(steps, int(lim)) if isinstance(lim, int) or lim > 1 else int(steps * lim)
    if steps < 1:
        share = "" if world_size == 1 else f" on each of {world_size} processes"
        why = (f"trainer.limit_train_batches={lim} leaves no batch" if -(-n_images // world_size) >= cfg.data.batch_size
               else f"{n_images} training images give no full batch of data.batch_size={cfg.data.batch_size}{share}")
        raise ConfigError(f"nothing to train on: {why} (data.train_images={cfg.data.train_images})")
    return steps


def resume_checkpoint(out: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``--resume`` continues from: ``last.ckpt``, or ``last.ckpt.prev`` (with a
    warning) when the newest one is unreadable; RunFileError naming both when neither can be read."""
    last = out / "checkpoints" / "last.ckpt"
    prev = last.with_name(last.name + PREV_SUFFIX)
    if not last.is_file() and not prev.is_file():
        raise RunFileError(f"--resume: no checkpoint in {last.parent} (the run stopped before its first checkpoint); "
                           f"start it again without --resume")
    try:
        return last, load_torch_file(last, "checkpoint", weights_only=False)
    except RunFileError as e:
        if not prev.is_file():
            raise
        try:
            state = load_torch_file(prev, "checkpoint", weights_only=False)
        except RunFileError:
            raise RunFileError(f"{e}; the previous checkpoint {prev} is unreadable too") from None
        log.warning("%s; resuming from the previous checkpoint %s (step %s)", e, prev, state.get("global_step"))
        os.replace(last, last.with_name(last.name + ".corrupt"))
        os.replace(prev, last)
        return last, state


def _rotate_log(logs: Path, resumed_at: int | None) -> None:
    """Keep the previous attempt's ``metrics.csv`` as ``metrics.attempt-K.csv`` (Lightning's CSV
    logger would delete it); :func:`cdg.runs.read_log` merges the attempts."""
    cur = logs / "metrics.csv"
    if not cur.is_file():
        return
    if resumed_at is None:  # a fresh start over a run that never checkpointed: its log is void
        cur.unlink()
        return
    index = logs / "attempts.json"
    attempts = json.loads(index.read_text()) if index.is_file() else []
    name = f"metrics.attempt-{len(attempts)}.csv"
    os.replace(cur, logs / name)
    attempts.append({"file": name, "superseded_from_step": resumed_at})
    atomic_write_text(index, json.dumps(attempts, indent=2))


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a run that trained (a checkpoint or ``backbone.pt``), not a failed start."""
    ck = out / "checkpoints"
    return (out / "backbone.pt").is_file() or (ck / "last.ckpt").is_file() or (ck / f"last.ckpt{PREV_SUFFIX}").is_file()


def pretrain(cfg: Config, out: str | Path, resume: bool = False) -> dict[str, Any]:
    """Pre-train ``cfg`` into run directory ``out``; with ``resume``, continue from its last checkpoint.

    Everything is checked (settings, data, model) before anything is written; ``config.yaml`` is
    written when training starts. On resume only :data:`cdg.config.RESUMABLE_KEYS` may differ from
    the saved config; a longer ``trainer.max_epochs`` extends the learning-rate schedule (see
    :meth:`cdg.methods.SSLMethod.on_train_start`).
    """
    out = Path(out)
    cfg.trainer.check_runtime()
    changes: dict[str, tuple[Any, Any]] = {}
    resumed_at = None
    if resume:
        if not (out / "config.yaml").is_file():
            raise ConfigError(f"--resume: {out} holds no run (no config.yaml)")
        changes = resume_changes(load_config(out / "config.yaml"), cfg)
    elif holds_run(out):
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    check_writable(out)
    for folder in (out, out / "checkpoints", out / "logs"):
        remove_partial_files(folder)
    ckpt = None
    if resume:
        ckpt, state = resume_checkpoint(out)
        resumed_at = int(state.get("global_step", 0))
        del state
    L.seed_everything(cfg.trainer.seed, workers=True)
    if cfg.trainer.resolved_precision() == "bf16-mixed" and cfg.trainer.device().type == "cpu" and not native_bf16():
        log.warning("trainer.precision=bf16-mixed on a CPU without native bf16 (no AVX512-BF16/AMX): bf16 "
                    "autocast is emulated (benchmarks/bench_precision.py measured it 11x slower than fp32 on such a CPU); use trainer.precision=auto")
    ds = train_dataset(cfg, out)
    monitor = None
    if isinstance(ds, TensorImageDataset) and cfg.trainer.monitor_every_n_epochs > 0:
        n = min(cfg.trainer.monitor_images, len(ds))
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.trainer.seed))[:n]
        monitor = (ds.images[idx], ds.targets[idx])
    gate_monitor = GateMonitor(cfg, monitor)
    exact = ExactResume(None)
    callbacks: list[Callback] = [
        # the guard and ExactResume run before the checkpoints: Lightning moves ModelCheckpoint last.
        # Both checkpoints write last.ckpt, the newer save winning (without enable_version_counter=False
        # the second wrote last-v1.ckpt, and --resume, which reads last.ckpt, lost the steps since the last 200)
        ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0, enable_version_counter=False,
                        save_on_train_epoch_end=True),
        NaNGuard(out / "checkpoints", cfg.trainer.nan_check_every_n_steps),
        gate_monitor,
        exact,
        clock := WallClock(),
        SaveConfig(cfg, out, changes, resumed_at),
    ]
    if cfg.trainer.checkpoint_every_n_steps:  # 0: at epoch ends only (two such callbacks would clash)
        callbacks.append(ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0,
                                         enable_version_counter=False,
                                         every_n_train_steps=cfg.trainer.checkpoint_every_n_steps))
    if cfg.trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    # the trainer before the model: the schedule's steps per epoch depend on its world size (the
    # trainer needs no model; it neither writes nor draws random numbers before fit)
    trainer = build_trainer(cfg, out, callbacks)
    steps = _steps_per_epoch(cfg, len(ds), trainer.world_size)
    model = build_method(cfg, steps)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if resume and resumed_at >= model.total_steps and (out / "backbone.pt").is_file():
        load_torch_file(out / "backbone.pt", "backbone weights")  # readable, or a clear error
        log.warning("%s already finished %d epochs (step %d); nothing to do. Raise trainer.max_epochs to train longer.",
                    out, cfg.trainer.max_epochs, resumed_at)
        return {k: v for k, v in read_metrics(out).items() if k.startswith("pretrain_")}
    _rotate_log(out / "logs", resumed_at)
    loader = train_loader(cfg, ds, resumable=trainer.world_size == 1)
    if isinstance(loader, ResumableLoader):
        exact.sampler = loader.sampler
    trainer.fit(model, loader, ckpt_path=str(ckpt) if ckpt is not None else None)
    if trainer.global_rank == 0:
        from cdg.export import save_backbone  # self-describing backbone.pt (cdg.export)
        save_backbone(out / "backbone.pt", cfg, model.backbone)
        stats = gate_monitor.last_train_stats
        seen = trainer.global_step * cfg.data.batch_size * trainer.world_size
        values: dict[str, Any] = {"pretrain_wall_s": clock.elapsed(), "pretrain_epochs": trainer.current_epoch,
                                  "pretrain_steps": trainer.global_step,
                                  # images the processes together step through per epoch (full batches,
                                  # cut by limit_train_batches); the data set's size is protocol.train_images
                                  "pretrain_images": steps * cfg.data.batch_size * trainer.world_size,
                                  "pretrain_images_seen": seen, "pretrain_device": device_name(trainer.strategy.root_device)}
        ips = clock.images_per_s(trainer, cfg.data.batch_size)
        if ips is not None:  # a resume that ran no step keeps the throughput measured before
            values["pretrain_images_per_s"] = ips
        if stats:
            values["train_eta_a1_last_epoch"] = stats.get("eta_a1")
            values["train_eta_a2_last_epoch"] = stats.get("eta_a2")
        extra: dict[str, Any] = {}
        history = out / "resumes.json"
        if history.is_file():
            extra["changed_on_resume"] = json.loads(history.read_text())
        update_metrics(out, values, base_protocol(cfg, stage="pretrain", epochs=cfg.trainer.max_epochs,
                                                  train_images=len(ds), batch_size=cfg.data.batch_size,
                                                  processes=trainer.world_size,
                                                  global_batch=cfg.data.batch_size * trainer.world_size,
                                                  precision=cfg.trainer.resolved_precision(), **extra))
        return values
    return {}
