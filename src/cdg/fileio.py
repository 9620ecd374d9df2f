"""Files that survive a kill: atomic writes, the previous checkpoint kept, clear errors on bad files.

Every file ``cdg`` writes into a run directory (checkpoints, ``backbone.pt``, the feature cache,
``metrics.json``, ``config.yaml``) is written to a temporary file *beside* its destination, flushed
and ``fsync``-ed, then renamed over it with :func:`os.replace`. A rename within one folder is
atomic, so a reader (or a resumed run) sees either the old complete file or the new complete
file, never a partial one, whatever ``$TMPDIR`` is. A kill in the middle of a write leaves only a
``.<name>.tmp-<pid>`` file, which :func:`remove_partial_files` deletes at the next start.

A checkpoint save (``cdg.train.AtomicCheckpointIO``) also keeps the checkpoint it replaces as ``<name>.prev`` (a hard link, so no
copy), which the NaN guard falls back to when the newest checkpoint holds diverged weights.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

PREV_SUFFIX = ".prev"


class RunFileError(ValueError):
    """A file of a run (checkpoint, weights, cache) is missing, truncated or not what was expected."""


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[io.BufferedWriter], None]) -> Path:
    """Run ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)``, atomically (see the module docstring)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def keep_previous(path: str | os.PathLike[str]) -> Path | None:
    """Keep the current ``path`` as ``path.prev`` (hard link, else copy) before it is replaced."""
    path = Path(path)
    if not path.is_file():
        return None
    prev = path.with_name(path.name + PREV_SUFFIX)
    tmp = _tmp_path(prev)
    try:
        os.link(path, tmp)
    except OSError:  # no hard links on this filesystem: copy
        import shutil

        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)
    return prev


def remove_partial_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that killed writes left in ``folder``; returns what was deleted."""
    folder = Path(folder)
    gone = []
    if folder.is_dir():
        for p in folder.glob(".*.tmp-*"):
            if p.is_file():
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone


def load_torch_file(path: str | os.PathLike[str], what: str, weights_only: bool = True,
                    map_location: Any = "cpu") -> Any:
    """``torch.load`` with a one-line :class:`RunFileError` that names the file when it is missing,
    empty, truncated or not a PyTorch file."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise RunFileError(f"{what} {path} is empty (0 bytes): a write was interrupted; delete it")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFileError(f"{what} {path} is unreadable (truncated or corrupt: {first[:200]}); "
                           "delete it, or restore it from a copy") from None



def check_writable(folder: str | os.PathLike[str]) -> None:
    """PermissionError now, rather than after minutes of work, when ``folder`` cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.tmp-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to {folder}: {e.strerror or e}; choose a writable folder") from None


def file_digest(path: str | os.PathLike[str]) -> str:
    """A content hash of a file (BLAKE2b, 128 bits): what it holds, not when it was written."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
