"""Shared pytest fixtures: the real CIFAR-10 (skipped when absent) and a persistent data cache.

CIFAR-10 is looked for in ``$CDG_DATA`` and in ``<repo>/../shared/data`` (CI clones the repository
with ``shared/`` beside it), as ``cifar10.tar.gz``, ``cifar10/`` or ``cifar-10-batches-py/``.
Decoded arrays go to ``$CDG_TEST_CACHE`` (default ``~/.cache/cdg-test``), kept between runs, so
only the first run pays for extraction and decoding (~20 s).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _find_cifar10() -> tuple[Path | None, list[Path]]:
    candidates = []
    if os.environ.get("CDG_DATA"):
        candidates.append(Path(os.environ["CDG_DATA"]).expanduser())
    candidates.append(SHARED_DATA)
    for root in candidates:
        if (
            (root / "cifar10.tar.gz").is_file()
            or (root / "cifar10" / "train").is_dir()
            or (root / "cifar-10-batches-py").is_dir()
        ):
            return root, candidates
    return None, candidates


@pytest.fixture(scope="session")
def cdg_cache() -> Iterator[Path]:
    """A persistent cache folder, set as ``$CDG_CACHE`` for the whole session."""
    path = Path(os.environ.get("CDG_TEST_CACHE") or Path.home() / ".cache" / "cdg-test")
    mp = pytest.MonkeyPatch()
    mp.setenv("CDG_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def cifar10_root(cdg_cache: Path) -> Path:
    """The folder holding ``cifar10.tar.gz`` (or ``cifar10/``); skips the test when absent."""
    root, looked = _find_cifar10()
    if root is None:
        pytest.skip(
            "real CIFAR-10 not available: looked for cifar10.tar.gz, cifar10/ or "
            f"cifar-10-batches-py/ in {', '.join(map(str, looked))} (set CDG_DATA to provide it)"
        )
    return root


@pytest.fixture(scope="session")
def cifar10_train(cifar10_root: Path):  # -> cdg.data.TensorImageDataset
    """The 50,000 CIFAR-10 training images, in memory (uint8)."""
    from cdg.data import build_dataset

    return build_dataset("cifar10", cifar10_root, split="train")


@pytest.fixture(scope="session")
def cifar10_test(cifar10_root: Path):  # -> cdg.data.TensorImageDataset
    """The 10,000 CIFAR-10 test images, in memory (uint8)."""
    from cdg.data import build_dataset

    return build_dataset("cifar10", cifar10_root, split="test")
