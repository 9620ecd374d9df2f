"""Datasets: CIFAR-10/100 (in memory), ImageNet-100 and image folders (lazy), a synthetic set.

Every dataset built here has ``.targets`` (int64 1-D tensor), ``.classes`` (list of names),
``len()`` and ``ds[i] -> (uint8 RGB tensor 3 x H x W, int label)``; augmentation is applied later
(``cdg.data.transforms``), per image in DataLoader workers or per batch with ``BatchAugment``.

Where data is looked for (docs/design.md §6 names the datasets; ``data_root`` is the ``root``
argument, else ``$CDG_DATA``, else ``./data``):

* ``cifar10`` / ``cifar100``, in this order: torchvision's own format
  (``<data_root>/cifar-10-batches-py``, ``<data_root>/cifar-100-python``); an image-folder tree
  ``<data_root>/<name>/{train,test}/<class>/*.png|jpg``; an archive ``<data_root>/<name>.tar.gz`` or
  ``<name>.tar`` holding such a tree, extracted once into ``<cache>/extracted/``; finally, with
  ``download=True``, torchvision downloads its format. Decoded images are cached as ``.npy`` in
  ``<cache>/arrays/`` (``<cache>`` = ``$CDG_CACHE``, else ``~/.cache/cdg``), so a second load of
  an image tree or archive takes a fraction of a second.
* ``imagenet100``: ``<data_root>/imagenet100/{train,val}/<wnid>/*`` or a full ImageNet tree
  ``<data_root>/imagenet/{train,val}/<wnid>/*`` restricted to the standard 100 classes.
* ``imagefolder``: ``<root>/{train,test|val}/<class>/*`` where ``root`` is the tree itself.
* ``synthetic``: seeded 32x32 images of 10 classes with a class-dependent pattern, for tests only.
  It is never used in place of missing data.

Every data problem raises :class:`DataError` naming the path and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "DataError",
    "DatasetInfo",
    "DATASETS",
    "dataset_info",
    "resolve_data_root",
    "cache_dir",
    "TensorImageDataset",
    "FolderImageDataset",
    "TransformedDataset",
    "build_dataset",
    "build_train_test",
    "dataset_fingerprint",
    "load_cifar_arrays",
    "imagenet100_classes",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".ppm",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)


class DataError(ValueError):
    """A data problem: missing, unreadable or inconsistent data (the message names the path)."""


# --------------------------------------------------------------------------------------------
# dataset registry


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset name.

    ``num_classes`` is None where it comes from the folder tree; ``train_count``/``test_count`` are
    the expected image counts where known; ``image_size`` is the native side (None: varies).
    """

    name: str
    num_classes: int | None
    train_count: int | None
    test_count: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int | None


_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

#: Facts per dataset name (looked up at call time, so tests may patch an entry).
DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, 50000, 10000, *_CIFAR10_STATS, 32),
    "cifar100": DatasetInfo("cifar100", 100, 50000, 10000, *_CIFAR100_STATS, 32),
    "imagenet100": DatasetInfo("imagenet100", 100, None, None, *_IMAGENET_STATS, None),
    "imagefolder": DatasetInfo("imagefolder", None, None, None, *_IMAGENET_STATS, None),
    "synthetic": DatasetInfo("synthetic", 10, None, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32),
}


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; ValueError listing the valid names otherwise."""
    key = str(name).lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {sorted(DATASETS)}")
    return DATASETS[key]


def resolve_data_root(root: str | os.PathLike[str] | None) -> Path:
    """``root`` if given, else ``$CDG_DATA``, else ``./data`` (user ``~`` expanded)."""
    if root is None or str(root) == "":
        root = os.environ.get("CDG_DATA") or "data"
    return Path(root).expanduser()


def cache_dir() -> Path:
    """``$CDG_CACHE``, else ``~/.cache/cdg`` (decoded arrays, extracted archives)."""
    env = os.environ.get("CDG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cdg"


def _root_origin(root: str | os.PathLike[str] | None) -> str:
    if root is not None and str(root) != "":
        return "the root argument"
    return "$CDG_DATA" if os.environ.get("CDG_DATA") else "the default ./data (CDG_DATA is unset)"


# --------------------------------------------------------------------------------------------
# dataset classes


class TensorImageDataset(Dataset[tuple[Tensor, int]]):
    """Images held in memory: ``images`` uint8 ``N x 3 x H x W``, ``targets`` int64 ``N``."""

    def __init__(self, images: Tensor, targets: Tensor, classes: Sequence[str]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"TensorImageDataset images: expected uint8 N x 3 x H x W, got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        targets = torch.as_tensor(targets, dtype=torch.int64)
        if targets.ndim != 1 or targets.shape[0] != images.shape[0]:
            raise ValueError(
                f"TensorImageDataset targets: expected shape ({images.shape[0]},), "
                f"got {tuple(targets.shape)}"
            )
        self.images = images
        self.targets = targets
        self.classes = list(classes)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.targets[index])

    def subset(self, indices: Sequence[int] | np.ndarray | Tensor) -> TensorImageDataset:
        """A dataset of the given rows (e.g. from :func:`cdg.data.stratified_subset`)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return TensorImageDataset(self.images[idx], self.targets[idx], self.classes)

    def __repr__(self) -> str:
        return (
            f"TensorImageDataset(n={len(self)}, image={tuple(self.images.shape[1:])}, "
            f"classes={len(self.classes)})"
        )


def _decode_rgb(path: str | Path) -> np.ndarray:
    """Decode one image file to an ``H x W x 3`` uint8 RGB array (gray/palette/RGBA/CMYK -> RGB)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode != "RGB":
                if im.mode == "P" or im.mode in ("LA", "PA") or "transparency" in im.info:
                    im = im.convert("RGBA")
                im = im.convert("RGB")
            else:
                im.load()
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        raise DataError(
            f"cannot decode image {path}: {type(err).__name__}: {err} "
            "(expected a readable PNG/JPEG image; the file may be corrupt or truncated)"
        ) from err
    return arr


class FolderImageDataset(Dataset[tuple[Tensor, int]]):
    """Images decoded lazily from files with PIL, as uint8 RGB tensors of their native size."""

    def __init__(
        self, samples: Sequence[tuple[str, int]], classes: Sequence[str], root: str | Path
    ) -> None:
        self.samples = [(str(p), int(t)) for p, t in samples]
        self.classes = list(classes)
        self.root = Path(root)
        self.targets = torch.tensor([t for _, t in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, target = self.samples[index]
        arr = _decode_rgb(path)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), target

    def subset(self, indices: Sequence[int] | np.ndarray | Tensor) -> FolderImageDataset:
        """A dataset of the given samples (e.g. from :func:`cdg.data.stratified_subset`)."""
        idx = np.asarray(indices, dtype=np.int64)
        return FolderImageDataset([self.samples[i] for i in idx], self.classes, self.root)

    def __repr__(self) -> str:
        return f"FolderImageDataset(root={str(self.root)!r}, n={len(self)}, classes={len(self.classes)})"


class TransformedDataset(Dataset[tuple[Any, int]]):
    """``(transform(image), label)`` over a base dataset (e.g. ``TwoViewTransform`` in workers)."""

    def __init__(self, base: Dataset[tuple[Tensor, int]], transform: Callable[[Tensor], Any]) -> None:
        self.base = base
        self.transform = transform
        self.targets = getattr(base, "targets", None)
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, target = self.base[index]
        return self.transform(image), target


# --------------------------------------------------------------------------------------------
# image trees


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_tree(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted sub-folder names) and ``(path, label)`` samples of ``split_dir/<class>/*``."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: expected a folder of class sub-folders, found none")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        loose = [e.name for e in os.scandir(split_dir) if e.is_file() and _is_image(e.name)]
        hint = (
            f" (it holds {len(loose)} images directly: sort them into <class>/ sub-folders)"
            if loose
            else ""
        )
        raise DataError(f"{split_dir}: expected class sub-folders <class>/<image>, found none{hint}")
    samples: list[tuple[str, int]] = []
    for label, cls in enumerate(classes):
        cdir = split_dir / cls
        files = sorted(e.name for e in os.scandir(cdir) if e.is_file() and _is_image(e.name))
        if not files:
            raise DataError(
                f"{cdir}: class folder holds no images (expected files ending in "
                f"{', '.join(IMAGE_EXTENSIONS)})"
            )
        samples.extend((str(cdir / f), label) for f in files)
    return classes, samples


def _count_images(split_dir: Path) -> int:
    if not split_dir.is_dir():
        return 0
    n = 0
    for e in os.scandir(split_dir):
        if e.is_dir() and not e.name.startswith("."):
            n += sum(1 for f in os.scandir(e.path) if f.is_file() and _is_image(f.name))
    return n


def _decode_all(samples: Sequence[tuple[str, int]], size: int) -> np.ndarray:
    """Decode every sample into one uint8 ``N x 3 x size x size`` array (all must be that size)."""
    out = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        arr = _decode_rgb(path)
        if arr.shape != (size, size, 3):
            raise DataError(
                f"{path}: expected a {size}x{size} image, found {arr.shape[1]}x{arr.shape[0]}"
            )
        out[i] = arr
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------------------------
# caches


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _key(*parts: object) -> str:
    return hashlib.sha1("|".join(str(p) for p in parts).encode()).hexdigest()[:16]


def _array_cache_paths(name: str, split: str, key: str) -> tuple[Path, Path, Path]:
    base = cache_dir() / "arrays" / f"{name}-{split}-{key}"
    return (
        base.with_name(base.name + ".images.npy"),
        base.with_name(base.name + ".targets.npy"),
        base.with_name(base.name + ".json"),
    )


def _load_cached(
    name: str, split: str, key: str, signature: str
) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    img_p, tgt_p, meta_p = _array_cache_paths(name, split, key)
    try:
        meta = json.loads(meta_p.read_text())
        if meta.get("signature") != signature:
            return None
        images = np.load(img_p)
        targets = np.load(tgt_p)
    except (OSError, ValueError):
        return None
    if images.shape[0] != targets.shape[0] or images.shape[0] != meta.get("count"):
        return None
    return images, targets.astype(np.int64, copy=False), list(meta["classes"])


def _store_cached(
    name: str,
    split: str,
    key: str,
    signature: str,
    source: Path,
    images: np.ndarray,
    targets: np.ndarray,
    classes: list[str],
) -> None:
    """Write the arrays, then the meta file last (its presence marks a complete entry)."""
    img_p, tgt_p, meta_p = _array_cache_paths(name, split, key)
    try:
        img_p.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(img_p, lambda fh: np.save(fh, images))
        _atomic_write(tgt_p, lambda fh: np.save(fh, targets))
        meta = {
            "name": name,
            "split": split,
            "source": str(source),
            "signature": signature,
            "count": int(images.shape[0]),
            "classes": classes,
        }
        _atomic_write(meta_p, lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
    except OSError:
        pass  # the cache is an optimisation; an unwritable cache only costs time


def _tree_signature(samples: Sequence[tuple[str, int]]) -> str:
    h = hashlib.sha1()
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"tree:{len(samples)}:{h.hexdigest()}"


def _file_signature(path: Path) -> str:
    st = path.stat()
    return f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


# --------------------------------------------------------------------------------------------
# archives


def _safe_extract(tf: tarfile.TarFile, dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        tf.extractall(dest, filter="data")
        return
    base = dest.resolve()
    for m in tf.getmembers():  # Python < 3.11.4: refuse absolute paths, '..' and links
        target = (dest / m.name).resolve()
        if not str(target).startswith(str(base)) or m.issym() or m.islnk():
            raise DataError(f"unsafe member {m.name!r} in archive: refusing to extract")
    tf.extractall(dest)


def _find_tree(dest: Path, name: str) -> Path:
    """The folder holding ``train/`` inside an extracted archive (``<name>/`` or the top)."""
    for cand in (dest / name, dest):
        if (cand / "train").is_dir():
            return cand
    subs = [p for p in dest.iterdir() if p.is_dir() and (p / "train").is_dir()]
    if len(subs) == 1:
        return subs[0]
    return dest / name


def _extracted_tree(archive: Path, name: str, expected: dict[str, int | None]) -> Path:
    """Extract ``archive`` once into ``cache_dir()/extracted/`` and return its image tree.

    Extraction goes to a temporary folder renamed into place when complete, so an interrupted
    extraction never looks complete; the tree is checked by image count against ``expected``.
    """

    def counts(tree: Path) -> dict[str, int]:
        return {s: _count_images(tree / s) for s in expected}

    def matches(found: dict[str, int]) -> bool:
        return all(e is None or found[s] == e for s, e in expected.items())

    final = cache_dir() / "extracted" / f"{name}-{_key(_file_signature(archive))}"
    if final.is_dir():
        if matches(counts(_find_tree(final, name))):
            return _find_tree(final, name)
        shutil.rmtree(final, ignore_errors=True)  # modified after extraction: extract again
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
    except OSError as err:
        raise DataError(
            f"cannot create the extraction folder under {final.parent}: {err} "
            "(set CDG_CACHE to a writable folder)"
        ) from err
    try:
        try:
            with tarfile.open(archive) as tf:
                _safe_extract(tf, tmp)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(
                f"cannot extract {archive}: {type(err).__name__}: {err} "
                f"(expected a tar or tar.gz archive holding {name}/train/<class>/*.png)"
            ) from err
        found = counts(_find_tree(tmp, name))
        if not matches(found):
            raise DataError(
                f"{archive}: expected {name}/{{train,test}}/<class>/ images with counts "
                f"{expected}, found {found}"
            )
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # another process finished first otherwise
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _find_tree(final, name)


# --------------------------------------------------------------------------------------------
# CIFAR


_TV_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _unpickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: expected this file of torchvision's CIFAR format, not found")
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh, encoding="latin1")
    except Exception as err:
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_torchvision_cifar(
    name: str, folder: Path, split: str, label_type: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read torchvision's pickled CIFAR batches (the format ``torchvision.datasets.CIFAR10/100``
    loads) directly, which also gives CIFAR-100's coarse labels and skips torchvision's md5 check.
    """
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta = _unpickle(folder / "batches.meta")
        classes = list(meta.get("label_names", []))
        label_key = "labels"
    else:
        files = ["train" if split == "train" else "test"]
        meta = _unpickle(folder / "meta")
        classes = list(meta.get(f"{label_type}_label_names", []))
        label_key = f"{label_type}_labels"
    datas, labels = [], []
    for f in files:
        entry = _unpickle(folder / f)
        if "data" not in entry or label_key not in entry:
            raise DataError(
                f"{folder / f}: expected keys 'data' and {label_key!r}, found {sorted(entry)}"
            )
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{folder / f}: expected data of shape N x 3072, found {data.shape}")
        datas.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[label_key], dtype=np.int64))
    return np.concatenate(datas), np.concatenate(labels), classes


def _missing_message(
    name: str, root: Path, origin: str, looked: list[str], download_ok: bool
) -> str:
    tried = "\n".join(f"  - {p}" for p in looked)
    how = [
        "pass data.download=true to let torchvision download it" if download_ok else None,
        f"or set data.root= (or $CDG_DATA) to a folder holding {name}/ ({{train,test}}/<class>/"
        f"images) or {name}.tar.gz",
    ]
    return (
        f"{name} not found under data root {root} (from {origin}). Looked for:\n{tried}\n"
        "To get it: " + "; ".join(h for h in how if h)
    )


def load_cifar_arrays(
    name: str,
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    download: bool = False,
    label_type: str = "fine",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10/100 as ``(images uint8 N x 3 x 32 x 32, targets int64 N, class names)``.

    Sources in order (see the module docstring): torchvision format, image tree, archive, download.
    Checked against :data:`DATASETS` (class and image counts); ``split`` is ``train`` or ``test``
    (``val`` is read as ``test``). ``label_type="coarse"`` gives CIFAR-100's 20 superclasses
    (torchvision format only).
    """
    name = name.lower()
    if name not in _TV_DIRS:
        raise ValueError(f"load_cifar_arrays: unknown CIFAR name {name!r}: expected cifar10 or cifar100")
    info = dataset_info(name)
    split = {"train": "train", "test": "test", "val": "test"}.get(split, split)
    if split not in ("train", "test"):
        raise ValueError(f"{name}: unknown split {split!r}: expected 'train' or 'test'")
    if label_type not in ("fine", "coarse") or (name == "cifar10" and label_type != "fine"):
        allowed = "'fine' or 'coarse'" if name == "cifar100" else "'fine'"
        raise ValueError(f"{name}: unknown label_type {label_type!r}: expected {allowed}")
    expected_classes = 20 if label_type == "coarse" else info.num_classes
    expected_n = info.train_count if split == "train" else info.test_count
    origin = _root_origin(root)
    data_root = resolve_data_root(root)

    tv_dir = data_root / _TV_DIRS[name]
    tree = data_root / name
    archives = [data_root / f"{name}.tar.gz", data_root / f"{name}.tar"]

    def check(source: Path, n: int, classes: Sequence[str], targets: np.ndarray) -> None:
        found_classes = max(len(classes), int(targets.max()) + 1 if targets.size else 0)
        if expected_classes is not None and found_classes != expected_classes:
            raise DataError(
                f"{source}: expected {expected_classes} classes for {name} ({label_type} labels), "
                f"found {found_classes}"
            )
        if expected_n is not None and n != expected_n:
            raise DataError(
                f"{source}: expected {expected_n} {split} images for {name}, found {n}"
            )

    def from_tree(split_dir: Path, key_source: Path, signature: str | None) -> tuple[
        np.ndarray, np.ndarray, list[str]
    ]:
        if label_type == "coarse":
            raise DataError(
                f"{split_dir}: an image-folder tree of {name} holds only the 100 fine labels; "
                "coarse labels need torchvision's cifar-100-python format "
                f"(put it at {tv_dir} or pass data.download=true)"
            )
        key = _key(key_source.resolve(), split)
        classes, samples = _scan_tree(split_dir)
        if expected_classes is not None and len(classes) != expected_classes:
            raise DataError(
                f"{split_dir}: expected {expected_classes} class folders for {name}, "
                f"found {len(classes)}"
            )
        if expected_n is not None and len(samples) != expected_n:
            raise DataError(
                f"{split_dir}: expected {expected_n} {split} images for {name}, found {len(samples)}"
            )
        if signature is None:
            signature = _tree_signature(samples)
            hit = _load_cached(name, split, key, signature)
            if hit is not None:
                return hit
        images = _decode_all(samples, 32)
        targets = np.asarray([t for _, t in samples], dtype=np.int64)
        _store_cached(name, split, key, signature, key_source, images, targets, classes)
        return images, targets, classes

    result: tuple[np.ndarray, np.ndarray, list[str]] | None = None
    source: Path
    if tv_dir.is_dir():
        source = tv_dir
        if download:  # torchvision checks the files' md5 and downloads only what is missing
            result = _download_torchvision_cifar(name, data_root, split, label_type)
        else:
            result = _read_torchvision_cifar(name, tv_dir, split, label_type)
    elif (tree / "train").is_dir() or (tree / "test").is_dir():
        source = tree / split
        result = from_tree(tree / split, tree / split, None)
    else:
        archive = next((a for a in archives if a.is_file()), None)
        if archive is not None:
            source = archive
            signature = _file_signature(archive)
            if label_type != "coarse":
                hit = _load_cached(name, split, _key(archive.resolve(), split), signature)
                if hit is not None:
                    result = hit
            if result is None:
                extracted = _extracted_tree(
                    archive, name, {"train": info.train_count, "test": info.test_count}
                )
                result = from_tree(extracted / split, archive, signature)
        elif download:
            source = tv_dir
            result = _download_torchvision_cifar(name, data_root, split, label_type)
        else:
            shown = data_root.absolute()
            looked = [
                f"{shown / tv_dir.name}/ (torchvision format)",
                f"{shown / name}/{{train,test}}/<class>/ (image folders)",
                *(str(shown / a.name) for a in archives),
            ]
            msg = _missing_message(name, shown, origin, looked, True)
            if (data_root / "train").is_dir() or (data_root / "test").is_dir():
                msg += (
                    f"\n(note: {shown} itself holds train/ or test/; the data root is the folder "
                    f"*containing* {name}/, i.e. {shown.parent})"
                )
            raise DataError(msg)
    images, targets, classes = result
    check(source, int(images.shape[0]), classes, targets)
    return images, targets, classes


def _download_torchvision_cifar(
    name: str, data_root: Path, split: str, label_type: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from torchvision import datasets as tvd

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    try:
        data_root.mkdir(parents=True, exist_ok=True)
        cls(str(data_root), train=split == "train", download=True)
    except Exception as err:
        raise DataError(
            f"downloading {name} into {data_root} with torchvision failed: "
            f"{type(err).__name__}: {err} (no network? put {name}.tar.gz or {_TV_DIRS[name]}/ there)"
        ) from err
    return _read_torchvision_cifar(name, data_root / _TV_DIRS[name], split, label_type)


# --------------------------------------------------------------------------------------------
# ImageNet-100 and generic folders


def imagenet100_classes() -> list[str]:
    """The standard 100 ImageNet-100 WordNet ids, in the order of the published list.

    The list is the one of CMC (Tian, Krishnan, Isola 2019, ``imagenet100.txt`` in
    github.com/HobbitLong/CMC), reused unchanged by solo-learn
    (``solo/data/dataset_subset/imagenet100_classes.txt``); the file shipped here was compared
    with both. Checked on load: exactly 100 unique ids of the form ``nXXXXXXXX``.
    """
    path = Path(__file__).with_name("imagenet100_classes.txt")
    wnids = [w for w in path.read_text().split() if w]
    bad = [w for w in wnids if len(w) != 9 or w[0] != "n" or not w[1:].isdigit()]
    if len(wnids) != 100 or len(set(wnids)) != 100 or bad:
        raise DataError(
            f"{path}: expected 100 unique WordNet ids (nXXXXXXXX), found {len(wnids)} "
            f"({len(set(wnids))} unique, malformed: {bad[:5]})"
        )
    return wnids


def _build_imagenet100(root: str | os.PathLike[str] | None, split: str) -> FolderImageDataset:
    sub = {"train": "train", "val": "val", "test": "val"}.get(split)
    if sub is None:
        raise ValueError(f"imagenet100: unknown split {split!r}: expected 'train', 'val' or 'test'")
    data_root = resolve_data_root(root)
    own = data_root / "imagenet100" / sub
    full = data_root / "imagenet" / sub
    if own.is_dir():
        classes, samples = _scan_tree(own)
        if len(classes) != 100:
            raise DataError(f"{own}: expected 100 class folders for imagenet100, found {len(classes)}")
        return FolderImageDataset(samples, classes, own)
    if full.is_dir():
        wnids = sorted(imagenet100_classes())  # ImageFolder order: sorted folder names
        present = {e.name for e in os.scandir(full) if e.is_dir()}
        missing = [w for w in wnids if w not in present]
        if missing:
            loose = sum(1 for e in os.scandir(full) if e.is_file() and _is_image(e.name))
            hint = (
                f"; it holds {loose} images directly: sort them into <wnid>/ sub-folders"
                if loose
                else ""
            )
            raise DataError(
                f"{full}: expected the 100 ImageNet-100 class folders, {len(missing)} missing "
                f"(e.g. {missing[:5]}){hint}"
            )
        samples = []
        for label, w in enumerate(wnids):
            cdir = full / w
            files = sorted(e.name for e in os.scandir(cdir) if e.is_file() and _is_image(e.name))
            if not files:
                raise DataError(f"{cdir}: class folder holds no images")
            samples.extend((str(cdir / f), label) for f in files)
        return FolderImageDataset(samples, wnids, full)
    raise DataError(
        f"imagenet100 not found under data root {data_root.absolute()} (from {_root_origin(root)}). "
        f"Looked for:\n  - {own.absolute()}/<wnid>/ (ImageNet-100 image folders)\n"
        f"  - {full.absolute()}/<wnid>/ "
        "(full ImageNet, restricted to the 100 classes)\nTo get it: download ImageNet (ILSVRC-2012) "
        "yourself (it cannot be downloaded automatically) and set data.root= (or $CDG_DATA) to the "
        "folder holding imagenet100/ or imagenet/"
    )


def _build_imagefolder(root: str | os.PathLike[str] | None, split: str) -> FolderImageDataset:
    tree = resolve_data_root(root)
    order = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test")}.get(split)
    if order is None:
        raise ValueError(f"imagefolder: unknown split {split!r}: expected 'train', 'val' or 'test'")
    for sub in order:
        if (tree / sub).is_dir():
            classes, samples = _scan_tree(tree / sub)
            return FolderImageDataset(samples, classes, tree / sub)
    looked = ", ".join(str((tree / s).absolute()) for s in order)
    raise DataError(
        f"imagefolder split {split!r} not found: looked for {looked} "
        "(expected <root>/{train,test or val}/<class>/<image>, root being the tree's own folder)"
    )


# --------------------------------------------------------------------------------------------
# synthetic


def _synthetic(n: int, seed: int, split: str) -> TensorImageDataset:
    """``n`` seeded 32x32 images of 10 classes; class c = a colour + stripes of its own
    orientation and period, with random phase, contrast and pixel noise (learnable, not trivial).
    """
    if n < 1:
        raise ValueError(f"synthetic: n={n}: expected a positive number of images")
    num_classes, size = 10, 32
    palette = np.array(
        [
            [0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.3, 0.9], [0.9, 0.9, 0.2], [0.8, 0.2, 0.8],
            [0.2, 0.8, 0.8], [0.95, 0.6, 0.2], [0.5, 0.5, 0.5], [0.6, 0.3, 0.1], [0.3, 0.1, 0.5],
        ]
    )
    offset = {"train": 0, "test": 1, "val": 1}.get(split)
    if offset is None:
        raise ValueError(f"synthetic: unknown split {split!r}: expected 'train' or 'test'")
    rng = np.random.Generator(np.random.PCG64([int(seed), offset]))
    labels = rng.permutation(np.arange(n) % num_classes)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = (labels % 4) * (np.pi / 4)  # 0, 45, 90, 135 degrees
    period = 4.0 + 2.0 * (labels // 4)  # 4, 6, 8 pixels
    phase = rng.uniform(0, 2 * np.pi, n)
    coord = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * coord / period[:, None, None] + phase[:, None, None])
    amp = rng.uniform(0.5, 1.0, n)[:, None, None, None]
    img = palette[labels][:, :, None, None] * (0.4 + amp * 0.6 * stripes[:, None])
    img = img + rng.normal(0.0, 0.08, img.shape)
    images = torch.from_numpy((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return TensorImageDataset(
        images, torch.from_numpy(labels.astype(np.int64)), [f"class{c}" for c in range(num_classes)]
    )


# --------------------------------------------------------------------------------------------
# entry point


def dataset_fingerprint(ds: Dataset[tuple[Tensor, int]]) -> str:
    """What identifies the data of ``ds``: a hash of its images and labels (in memory), or of its
    files' paths, labels, sizes and modification times (image folders), and its class names.

    Used to key caches computed from the data (e.g. a run's feature cache), so that a cache is not
    reused after the data changed."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(list(getattr(ds, "classes", []))).encode())
    if isinstance(ds, TensorImageDataset):
        h.update(str(tuple(ds.images.shape)).encode())
        h.update(ds.images.contiguous().numpy())  # the buffer itself: no 150 MB copy
        h.update(ds.targets.contiguous().numpy())
        return f"tensor:{len(ds)}:{h.hexdigest()}"
    if isinstance(ds, FolderImageDataset):
        h.update(_tree_signature(ds.samples).encode())
        return f"folder:{len(ds)}:{h.hexdigest()}"
    raise TypeError(f"dataset_fingerprint: unsupported dataset type {type(ds).__name__}")


def build_train_test(
    name: str, root: str | os.PathLike[str] | None = None, download: bool = False, **kw: Any
) -> tuple[Dataset[tuple[Tensor, int]], Dataset[tuple[Tensor, int]]]:
    """The train and test splits of dataset ``name`` (see :func:`build_dataset`), checked to have the
    same class list: a renamed, missing or extra class folder in one split would shift every label."""
    train = build_dataset(name, root, "train", download, **kw)
    test = build_dataset(name, root, "test", download, **kw)
    a, b = list(train.classes), list(test.classes)  # type: ignore[attr-defined]
    if a != b:
        only_train, only_test = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        detail = (f"only in train: {only_train[:5]}, only in test: {only_test[:5]}" if only_train or only_test
                  else "same names in a different order")
        raise DataError(f"{name} at {resolve_data_root(root)}: the train and test splits have different class lists "
                        f"({len(a)} vs {len(b)} classes; {detail}); labels would not match. Make both splits hold the same "
                        "class folders")
    return train, test


def build_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    download: bool = False,
    **kw: Any,
) -> Dataset[tuple[Tensor, int]]:
    """Build dataset ``name`` (see :data:`DATASETS`) for ``split`` (train / test; val = test).

    Keyword options: ``label_type`` ("fine" or "coarse", cifar100); ``n`` (default 512) and
    ``seed`` (default 0) for ``synthetic``. ``download`` applies to CIFAR only (torchvision).
    Returns a :class:`TensorImageDataset` (cifar10, cifar100, synthetic) or a
    :class:`FolderImageDataset` (imagenet100, imagefolder).
    """
    key = str(name).lower()
    dataset_info(key)  # ValueError listing the valid names

    def take(allowed: dict[str, Any]) -> dict[str, Any]:
        extra = sorted(set(kw) - set(allowed))
        if extra:
            raise ValueError(
                f"build_dataset({key!r}): unexpected option(s) {extra}: expected "
                f"{sorted(allowed) or 'none'}"
            )
        return {**allowed, **kw}

    if key in ("cifar10", "cifar100"):
        opts = take({"label_type": "fine"})
        images, targets, classes = load_cifar_arrays(key, root, split, download, opts["label_type"])
        return TensorImageDataset(torch.from_numpy(images), torch.from_numpy(targets), classes)
    if download:
        raise ValueError(f"build_dataset({key!r}): download=True is supported for cifar10/cifar100 only")
    if key == "imagenet100":
        take({})
        return _build_imagenet100(root, split)
    if key == "imagefolder":
        take({})
        return _build_imagefolder(root, split)
    opts = take({"n": 512, "seed": 0})
    return _synthetic(int(opts["n"]), int(opts["seed"]), split)
