"""Typed run configuration: dataclasses loaded from YAML with ``dotted.key=value`` overrides.

An unknown key or a value outside its allowed set stops with a message that names the key and
lists what is valid. ``Config`` is the single source of truth saved as ``config.yaml`` in a run.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import yaml


class ConfigError(ValueError):
    """A configuration problem, with the offending key and the valid choices in the message."""


@dataclass
class DataConfig:
    dataset: Literal["cifar10", "cifar100", "imagenet100", "imagefolder", "synthetic"] = "cifar10"
    root: Optional[str] = None  # else $CDG_DATA, else ./data
    download: bool = False  # let torchvision download CIFAR
    label_type: Literal["fine", "coarse"] = "fine"  # CIFAR-100
    train_images: Optional[int] = None  # use a seeded stratified subset of this many images
    batch_size: int = 256
    num_workers: int = 2
    augment_on: Literal["batch", "workers"] = "batch"  # batched tensor augmentation, or per-sample v2
    eval_batch_size: int = 512


@dataclass
class ModelConfig:
    name: Literal["resnet18", "resnet50"] = "resnet18"
    width: float = 1.0
    stem: Literal["cifar", "imagenet"] = "cifar"
    zero_init_residual: bool = False


@dataclass
class GatingConfig:
    """docs/design.md §1, §3, §5. ``mode``: a gating mode of :data:`cdg.nn.GATING_MODES` (dense,
    dual (CDG), shared_base (CGNet_SimCLR), unified, fbs, dgc)."""

    mode: str = "dense"
    groups: int = 4  # G
    overlap: Literal[0, 50, 75, 100] = 0  # Table 2 ablation (dual mode)
    group_size: int = 1  # C_g of the structured variant (Eq. 12)
    norm: Literal["instance", "batch"] = "instance"
    surrogate: Literal["sigmoid", "one_sided", "hard_sigmoid"] = "sigmoid"
    alpha: float = 2.0
    tau_init: float = 0.0
    target: float = 1.0  # threshold target s of Eq. 11
    target_sparsity: Optional[float] = None  # or a sparsity target p: s = Phi^-1(p)
    lam: float = 1e-4  # lambda of Eq. 11
    ramp_epochs: int = 0  # linear ramp of s from tau_init over this many epochs (0: off)
    # baselines (docs/design.md §5): mode fbs / dgc; DGC heads = groups
    keep_ratio: Optional[float] = None  # FBS d / DGC g; None: the layer's default (cdg.nn.GATING_MODES)
    predictor_loss: Optional[float] = None  # FBS l1 / DGC loss_coef; None: the layer's default
    squeeze: int = 16  # DGC r of the salience generators (halved when C_in < 80)
    # FBS / DGC predictors on the RMS-normalised pooled input: no longer squares an atypical image's
    # scale at every layer as the design §5 form does (finite eval features at 4 epochs, but still
    # heavy-tailed; see docs/results.md). Off: the docs/design.md §5 form.
    scale_free_saliency: bool = False
    # FBS / DGC as their official code builds them (official) or our first form (v1: the block's own
    # BN after FBS, DGC reading raw x, ceil keep count; the form of the earlier docs/results.md rows)
    baseline_form: Literal["official", "v1"] = "official"
    # torch.compile the PyTorch form of the fused training gate instead of the C++ kernel (same values;
    # slower than the kernel on the AVX2 CPU, README Speed)
    compile_gate: bool = False
    # how Eq. 1's base path is computed (same values): a grouped conv, the dense conv with the
    # non-base weights zeroed, or auto (masked on a CPU when in_channels / G < 8: faster there)
    base_conv: Literal["auto", "grouped", "masked"] = "auto"
    # who runs the fused training gate on a CPU (same values): the C++ kernel of cdg.nn.gate_kernel
    # (cpp; built on first use), PyTorch operations (torch), or auto (the kernel, PyTorch if it
    # cannot be built). The kernel is 2-3x faster than the PyTorch gate (README Speed)
    gate_kernel: Literal["auto", "cpp", "torch"] = "auto"


@dataclass
class MethodConfig:
    name: Literal["simclr", "mocov2", "simsiam"] = "simclr"
    temperature: float = 0.2
    proj_hidden_dim: int = 2048
    proj_output_dim: int = 256
    pred_hidden_dim: int = 512  # SimSiam predictor
    queue_size: int = 32768  # MoCo V2+
    base_momentum: float = 0.99
    final_momentum: float = 0.999
    # MoCo V2+ with hard gates: the key encoder computes its own masks (own, the paper's) or reuses
    # the masks the query encoder computed on the same view and branch (query; our deviation)
    key_gates: Literal["own", "query"] = "own"


@dataclass
class OptimConfig:
    name: Literal["lars", "sgd"] = "lars"
    lr: float = 0.4  # per 256 images when scale_lr is true
    scale_lr: bool = True
    weight_decay: float = 1e-5
    momentum: float = 0.9
    lars_eta: float = 0.02
    warmup_epochs: float = 10.0
    predictor_fixed_lr: bool = True  # SimSiam


@dataclass
class TrainerConfig:
    max_epochs: int = 1000
    # "auto": bf16 autocast where the hardware has native bf16 (CUDA with bf16, CPUs with AVX512-BF16
    # or AMX), else fp32 on the CPU. On an AVX2-only CPU bf16 autocast measured 11x *slower*
    # than fp32 (benchmarks/bench_precision.py).
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    channels_last: bool = True
    seed: int = 0
    # Lightning's meaning: an integer counts batches per epoch, a float <= 1.0 is a fraction of the epoch
    limit_train_batches: Any = None
    log_every_n_steps: int = 20
    checkpoint_every_n_steps: int = 200  # also at every epoch end
    monitor_every_n_epochs: int = 1  # kNN accuracy and mask similarity S_c
    monitor_images: int = 2000  # images used by the kNN/S_c monitor
    nan_check_every_n_steps: int = 1
    progress_bar: bool = True
    # CSV logs always (logs/metrics.csv); tensorboard adds TensorBoard event files (logs/tensorboard)
    logger: Literal["csv", "tensorboard"] = "csv"
    # synchronise BatchNorm statistics across DDP processes (SimSiam's BN heads want it on multi-GPU runs)
    sync_batchnorm: bool = False


    def resolved_precision(self) -> str:
        """The Lightning precision string this run uses (resolves ``auto``, see :func:`native_bf16`)."""
        if self.precision != "auto":
            return self.precision
        if self.device().type == "cuda":
            return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        return "bf16-mixed" if native_bf16() else "32-true"

    def device(self) -> torch.device:
        """Where a single-process job (evaluation, feature extraction) runs: the first GPU when
        ``accelerator`` allows one and CUDA is available, else the CPU."""
        use_gpu = torch.cuda.is_available() and self.accelerator in ("auto", "gpu", "cuda")
        return torch.device("cuda" if use_gpu else "cpu")

    def check_runtime(self) -> None:
        """ConfigError for settings this machine cannot run: a GPU accelerator without CUDA, or
        ``16-mixed`` on a CPU (Lightning would silently run bf16 there instead)."""
        if self.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={self.accelerator} but no CUDA GPU is available here; "
                              "use trainer.accelerator=auto or cpu")
        if self.precision == "16-mixed" and self.device().type == "cpu":
            raise ConfigError("trainer.precision=16-mixed needs a CUDA GPU (on a CPU it would run as bf16); "
                              "use trainer.precision=auto, 32-true or bf16-mixed")

    @property
    def bf16(self) -> bool:
        """Whether forward passes (training and evaluation) run under bf16 autocast."""
        return self.resolved_precision() == "bf16-mixed"


def native_bf16() -> bool:
    """True when this CPU computes bf16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # older or unusual builds: do not guess
        return False


@dataclass
class EvalConfig:
    linear_epochs: int = 100
    linear_lr: float = 0.1
    linear_milestones: list = field(default_factory=lambda: [60, 80])
    linear_batch_size: int = 256
    fast_linear_max_iter: int = 500  # logistic regression on cached features (CPU protocol)
    fast_linear_l2: float = 1e-4
    knn_k: int = 200
    knn_temperature: float = 0.1
    finetune_epochs: int = 100
    finetune_fraction: float = 0.5
    finetune_lr: float = 0.05
    finetune_weight_decay: float = 5e-4
    split_seed: int = 0


@dataclass
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    gating: GatingConfig = field(default_factory=GatingConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML, atomically (a kill leaves the old file or the new one)."""
        from cdg.fileio import atomic_write_text

        atomic_write_text(path, self.to_yaml())


# --- loading and validation --------------------------------------------------------------------


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"invalid value {value!r} for '{key}'; valid: {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-4, without a dot, as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        return value
    return value


def _fill(obj: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in fields:
            raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(sorted(fields))}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"'{key}' is a section; give a mapping of its keys, got {v!r}")
            _fill(current, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def _check_range(key: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, what: str = "") -> None:
    """ConfigError unless ``value`` is a finite number within the bounds (open or closed)."""
    import math

    if value is None:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise ConfigError(f"'{key}' must be a finite number {bounds}{what}, got {value!r}")


def _validate(cfg: Config) -> None:
    """Reject values that cannot run or make no sense, naming the key and what is expected."""
    from cdg.models.resnet import stage_widths

    from cdg.nn.modes import GATING_MODES

    g, t, d, o, m, e = cfg.gating, cfg.trainer, cfg.data, cfg.optim, cfg.method, cfg.eval
    if g.mode not in GATING_MODES:
        raise ConfigError(f"invalid value {g.mode!r} for 'gating.mode'; valid: {', '.join(map(repr, GATING_MODES))}")
    if g.mode != "dense" and g.groups not in (1, 2, 4, 8):
        raise ConfigError(f"invalid value {g.groups!r} for 'gating.groups'; valid: 1, 2, 4, 8")
    _check_range("model.width", cfg.model.width, 0, low_open=True)
    if GATING_MODES[g.mode].uses_groups:
        if g.group_size < 1:
            raise ConfigError(f"'gating.group_size' must be >= 1, got {g.group_size}")
        for c in stage_widths(cfg.model.width):
            if c % g.groups or (c // g.groups) % g.group_size:
                raise ConfigError(
                    f"model.width={cfg.model.width:g} gives stages of {stage_widths(cfg.model.width)} channels; "
                    f"{c} is not divisible by gating.groups={g.groups} x gating.group_size={g.group_size}: "
                    "choose a width whose stage channels (64, 128, 256, 512 times the width) are multiples of G*C_g")
    _check_range("gating.lam", g.lam, 0, what=" (the weight of Eq. 11's regulariser)")
    _check_range("gating.alpha", g.alpha, 0, low_open=True)
    _check_range("gating.target", g.target)
    _check_range("gating.tau_init", g.tau_init)
    _check_range("gating.predictor_loss", g.predictor_loss, 0)
    if g.ramp_epochs < 0:
        raise ConfigError(f"'gating.ramp_epochs' must be >= 0, got {g.ramp_epochs}")
    if g.squeeze < 1:
        raise ConfigError(f"'gating.squeeze' must be >= 1, got {g.squeeze}")
    if t.max_epochs < 1:
        raise ConfigError(f"'trainer.max_epochs' must be >= 1, got {t.max_epochs}")
    lim = t.limit_train_batches
    if lim is not None:
        if isinstance(lim, bool) or not isinstance(lim, (int, float)):
            raise ConfigError(f"'trainer.limit_train_batches' must be a number (batches, or a fraction <= 1.0), got {lim!r}")
        _check_range("trainer.limit_train_batches", lim, 0, low_open=True,
                     what=" (a fraction <= 1 of the epoch, or a whole number of batches)")
        if lim > 1 and float(lim) != int(lim):
            raise ConfigError(f"'trainer.limit_train_batches' above 1 counts batches and must be a whole number, got {lim}")
    for key, value, low in (("trainer.log_every_n_steps", t.log_every_n_steps, 1),
                            ("trainer.checkpoint_every_n_steps", t.checkpoint_every_n_steps, 0),
                            ("trainer.monitor_every_n_epochs", t.monitor_every_n_epochs, 0),
                            ("trainer.monitor_images", t.monitor_images, 1),
                            ("trainer.nan_check_every_n_steps", t.nan_check_every_n_steps, 1),
                            ("trainer.num_nodes", t.num_nodes, 1),
                            ("data.num_workers", d.num_workers, 0), ("data.eval_batch_size", d.eval_batch_size, 1),
                            ("method.queue_size", m.queue_size, 1), ("method.proj_hidden_dim", m.proj_hidden_dim, 1),
                            ("method.proj_output_dim", m.proj_output_dim, 1), ("method.pred_hidden_dim", m.pred_hidden_dim, 1),
                            ("eval.linear_epochs", e.linear_epochs, 1), ("eval.finetune_epochs", e.finetune_epochs, 1),
                            ("eval.linear_batch_size", e.linear_batch_size, 1), ("eval.knn_k", e.knn_k, 1),
                            ("eval.fast_linear_max_iter", e.fast_linear_max_iter, 1)):
        if value < low:
            raise ConfigError(f"'{key}' must be >= {low}, got {value}")
    if d.train_images is not None and d.train_images < 1:
        raise ConfigError(f"'data.train_images' must be >= 1 (or null for the whole training set), got {d.train_images}")
    # a learning rate of 1e3 or more diverges at once in every recipe here; it is a typo, not a setting
    _check_range("optim.lr", o.lr, 0, 1e3, low_open=True, high_open=True)
    _check_range("optim.weight_decay", o.weight_decay, 0)
    _check_range("optim.momentum", o.momentum, 0, 1, high_open=True)
    _check_range("optim.lars_eta", o.lars_eta, 0, low_open=True)
    _check_range("optim.warmup_epochs", o.warmup_epochs, 0)
    _check_range("method.temperature", m.temperature, 0, low_open=True)
    _check_range("method.base_momentum", m.base_momentum, 0, 1)
    _check_range("method.final_momentum", m.final_momentum, 0, 1)
    _check_range("eval.linear_lr", e.linear_lr, 0, low_open=True)
    _check_range("eval.finetune_lr", e.finetune_lr, 0, low_open=True)
    _check_range("eval.fast_linear_l2", e.fast_linear_l2, 0)
    _check_range("eval.knn_temperature", e.knn_temperature, 0, low_open=True)
    _check_range("eval.finetune_weight_decay", e.finetune_weight_decay, 0)
    if g.overlap and (g.mode != "dual" or g.groups != 4):
        raise ConfigError("'gating.overlap' (Table 2) needs gating.mode=dual and gating.groups=4")
    if g.keep_ratio is not None and not 0 < g.keep_ratio <= 1:
        raise ConfigError(f"'gating.keep_ratio' must be in (0, 1], got {g.keep_ratio}")
    if g.target_sparsity is not None and not 0 < g.target_sparsity < 1:
        raise ConfigError(f"'gating.target_sparsity' must be in (0, 1), got {g.target_sparsity}")
    if cfg.data.batch_size < 2:
        raise ConfigError("'data.batch_size' must be at least 2 for contrastive learning")
    if not 0 < cfg.eval.finetune_fraction <= 1:
        raise ConfigError(f"'eval.finetune_fraction' must be in (0, 1], got {cfg.eval.finetune_fraction}")


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _read_yaml(p: Path, cfg: Config, seen: tuple[Path, ...] = ()) -> None:
    """Fill ``cfg`` from ``p``; a top-level ``base: FILE`` (relative to ``p``) is applied first."""
    if not p.is_file():
        named_by = f" (named by 'base: ...' in {seen[-1]})" if seen else ""
        raise ConfigError(f"config file not found: {p}{named_by}")
    if p.resolve() in seen:
        raise ConfigError(f"config file {p} includes itself through 'base'")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections")
    base = values.pop("base", None)
    if base is not None:
        _read_yaml((p.parent / str(base)), cfg, seen + (p.resolve(),))
    try:
        _fill(cfg, values, "")
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Config from a YAML file (sections data, model, gating, method, optim, trainer, eval).

    A file may start from another with a top-level ``base: other.yaml`` and change only some keys.
    """
    cfg = Config()
    if path is not None:
        _read_yaml(Path(path), cfg)
    for text in overrides or []:
        key, value = parse_override(text)
        _fill(cfg, _nest(key, value), "")
    _validate(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    cfg = Config()
    _fill(cfg, values, "")
    _validate(cfg)
    return cfg


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"section.key": value}`` for every setting of ``cfg``."""
    out: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


#: Settings that may change when a run is resumed: how the run is executed, observed and evaluated,
#: and its length. Everything else (the architecture, the gating, the method, the optimiser, the
#: data, the seed, the global batch) would make the resumed run a different experiment.
RESUMABLE_KEYS: frozenset[str] = frozenset({
    "name", "trainer.max_epochs", "trainer.precision", "trainer.accelerator", "trainer.strategy",
    "trainer.channels_last", "trainer.log_every_n_steps", "trainer.checkpoint_every_n_steps",
    "trainer.monitor_every_n_epochs", "trainer.monitor_images", "trainer.nan_check_every_n_steps",
    "trainer.progress_bar", "trainer.logger", "data.root", "data.download", "data.num_workers", "data.eval_batch_size",
    "gating.compile_gate", "gating.base_conv", "gating.gate_kernel",  # the same values, computed differently
}) | {f"eval.{f.name}" for f in dataclasses.fields(EvalConfig)}


def resume_changes(saved: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """The settings that differ between a run's saved config and the one it is resumed with.

    ConfigError when any of them is outside :data:`RESUMABLE_KEYS`.
    """
    old, cur = flatten(saved), flatten(new)
    changed = {k: (old.get(k), cur[k]) for k in cur if old.get(k) != cur[k]}
    refused = sorted(k for k in changed if k not in RESUMABLE_KEYS)
    if refused:
        what = ", ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise ConfigError(f"--resume cannot change {what}: the run was trained with the saved values. "
                          "Start a new run (another --out) for different settings; on resume only the run's "
                          "length, precision, logging, checkpointing, data location and evaluation settings may change")
    return changed
