"""The fused C++ CPU kernel of the training gate (``csrc/instance_gate.cpp``), built on first use.

The PyTorch form of the gate (:func:`cdg.nn.gated_conv._gate_forward` / ``_gate_backward``) makes
about 15 passes over memory per layer; the kernel makes one read of each input and one write of
each output, per sample, and is 2-3x faster on a CPU (``benchmarks/bench_gate_kernel.py``). It
covers the default gate only: instance norm, C_g = 1, sigmoid surrogate, channels-last float32 or
float64 CPU tensors. Everything else runs the PyTorch form.

The kernel is compiled with the system C++ compiler (and ``ninja``, a dependency of the package)
through ``torch.utils.cpp_extension`` the first time a layer needs it (about a minute), and cached
in ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) per CPU capability. If it cannot be built, :func:`instance_gate`
warns once and returns None, and the gate runs in PyTorch (same values).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

SOURCE = Path(__file__).with_name("csrc") / "instance_gate.cpp"
# vector instructions to compile for, per CPU capability that PyTorch detected on this machine
_ARCH_FLAGS = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma"]}
_state: dict[str, ModuleType | str | None] = {}


def instance_gate(required: bool = False) -> ModuleType | None:
    """The compiled kernel module (``forward`` and ``backward``), or None where it cannot be built.

    With ``required`` a failed build raises a RuntimeError that says why, instead of warning.
    """
    return load_once(_state, lambda: build_extension("cdg_instance_gate", SOURCE), required,
                     "cdg: the C++ gate kernel could not be built ({error}); the gate runs in PyTorch (same values, "
                     "slower). gating.gate_kernel=torch silences this.",
                     "gate_kernel='cpp': the C++ gate kernel could not be built: {error}")


def load_once(state: dict, build: Callable[[], tuple[ModuleType | None, str | None]], required: bool,
              warning: str, error: str) -> ModuleType | None:
    """``build()`` once per process, cached in ``state``; where it failed, warn (``warning``) once or,
    with ``required``, raise a RuntimeError (``error``); both formatted with ``{error}`` = why."""
    if "module" not in state:
        state["module"], state["error"] = build()
        if state["module"] is None and not required:
            warnings.warn(warning.format(error=state["error"]), stacklevel=4)
    if state["module"] is None and required:
        raise RuntimeError(error.format(error=state["error"]))
    return state["module"]


def build_extension(name: str, source: Path, extra_cflags: list[str] | None = None) -> tuple[ModuleType | None, str | None]:
    """Compile ``source`` on first use (OpenMP, -O3, vector flags of this CPU): (module, None), or
    (None, why) where it cannot be built (no compiler, no ninja, no headers)."""
    try:
        log = logging.getLogger("torch.utils.cpp_extension")  # its import warns "No CUDA runtime" on CPU hosts
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load
        finally:
            log.setLevel(level)

        venv_bin = str(Path(sys.executable).parent)  # pip's ninja, when the venv is not activated
        if shutil.which("ninja") is None and shutil.which("ninja", path=venv_bin):
            os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")

        capability = torch.backends.cpu.get_cpu_capability()
        flags = ["-O3", "-fopenmp", "-fno-trapping-math", *(extra_cflags or [])] + _ARCH_FLAGS.get(capability, [])
        module = load(name=f"{name}_{capability.lower()}", sources=[str(source)],
                      extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
        return module, None
    except Exception as e:  # the PyTorch forms still work
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"


def supports(y_full: torch.Tensor, y_base: torch.Tensor, group_size: int, surrogate: str) -> bool:
    """Whether the kernel covers this call (the caller passes channels-last N x H x W x C views)."""
    return (group_size == 1 and surrogate == "sigmoid" and y_base.device.type == "cpu"
            and y_base.dtype in (torch.float32, torch.float64) and y_full.dtype == y_base.dtype
            and y_base.is_contiguous() and y_full.is_contiguous())
