"""The ``cdg`` command (console script and ``python -m cdg``).

Before anything imports PyTorch, the process gets the runtime settings that CPU training needs
for speed (docs/design.md §7): glibc malloc that neither returns nor maps memory per batch, and
OpenMP threads that sleep instead of spinning (spinning threads collapse throughput when the cores
are shared). glibc and OpenMP read these only at process start, so when one is unset the command
re-executes itself once with it filled in. Variables the user set are kept; ``CDG_NO_REEXEC=1``
turns the re-execution off.
"""

from __future__ import annotations

import os
import sys

#: set when absent (the values the Makefile exports)
RUNTIME_ENV: dict[str, str] = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
    "OMP_WAIT_POLICY": "PASSIVE",
}


def runtime_env(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """The settings of :data:`RUNTIME_ENV` missing from ``environ``."""
    return {k: v for k, v in RUNTIME_ENV.items() if k not in environ}


def entry() -> int:
    missing = runtime_env(os.environ)
    if missing and os.environ.get("CDG_NO_REEXEC") != "1" and sys.platform.startswith("linux"):
        env = {**os.environ, **missing, "CDG_NO_REEXEC": "1"}
        os.execve(sys.executable, [sys.executable, "-m", "cdg", *sys.argv[1:]], env)
    from cdg.cli import main

    return main()


if __name__ == "__main__":
    raise SystemExit(entry())
