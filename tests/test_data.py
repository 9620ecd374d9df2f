"""cdg.data datasets and splits: real CIFAR-10, every source form, caches, errors, stratified splits."""

from __future__ import annotations

import dataclasses
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cdg.data.datasets as D
from cdg.data import (
    DATASETS,
    DataError,
    FolderImageDataset,
    TensorImageDataset,
    TransformedDataset,
    build_dataset,
    cache_dir,
    dataset_info,
    imagenet100_classes,
    load_split,
    resolve_data_root,
    save_split,
    stratified_subset,
)

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


# ----------------------------------------------------------------------------------- helpers


def _pixels(label: int, k: int, size: int = 32) -> np.ndarray:
    """A distinct deterministic RGB image for (class, index)."""
    rng = np.random.default_rng(1000 * label + k)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _write_tree(base: Path, classes: list[str], per_split: dict[str, int]) -> dict[str, np.ndarray]:
    """``base/{split}/<class>/NNNN.png``; returns the expected uint8 N x 3 x 32 x 32 per split."""
    expected = {}
    for split, n in per_split.items():
        arrays = []
        for label, cls in enumerate(classes):
            d = base / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                arr = _pixels(label, k + (0 if split == "train" else 500))
                Image.fromarray(arr).save(d / f"{k:04d}.png")
                arrays.append(arr)
        expected[split] = np.stack(arrays).transpose(0, 3, 1, 2)
    return expected


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("CDG_CACHE", str(path))
    return path


@pytest.fixture
def small_cifar10(monkeypatch: pytest.MonkeyPatch) -> D.DatasetInfo:
    """Expect 20 train / 10 test images for cifar10 (2 and 1 per class)."""
    info = dataclasses.replace(DATASETS["cifar10"], train_count=20, test_count=10)
    monkeypatch.setitem(DATASETS, "cifar10", info)
    return info


def _no_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a: object, **k: object) -> None:
        raise AssertionError("images were decoded again instead of read from the cache")

    monkeypatch.setattr(D, "_decode_all", fail)


# ----------------------------------------------------------------------------------- real data


def test_real_cifar10_train_and_test(cifar10_train: TensorImageDataset, cifar10_test) -> None:
    for ds, n in ((cifar10_train, 50000), (cifar10_test, 10000)):
        assert isinstance(ds, TensorImageDataset)
        assert len(ds) == n
        assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.uint8
        assert ds.targets.dtype == torch.int64 and ds.targets.shape == (n,)
        assert ds.classes == CIFAR10_CLASSES
        assert torch.bincount(ds.targets).tolist() == [n // 10] * 10
        img, label = ds[123]
        assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and isinstance(label, int)
    # published per-channel statistics of the training set (README of the archive)
    mean = cifar10_train.images[::5].float().div(255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(dataset_info("cifar10").mean), atol=0.01)


def test_real_cifar10_cache_is_reused(
    cifar10_root: Path, cifar10_train: TensorImageDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert list((cache_dir() / "arrays").glob("cifar10-train-*.images.npy"))
    _no_decode(monkeypatch)
    monkeypatch.setattr(D, "_extracted_tree", lambda *a, **k: pytest.fail("extracted again"))
    t0 = time.perf_counter()
    again = build_dataset("cifar10", cifar10_root, "train")
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"cached load took {elapsed:.2f} s"
    assert torch.equal(again.targets, cifar10_train.targets)
    assert torch.equal(again.images[::997], cifar10_train.images[::997])


# ----------------------------------------------------------------------------------- source forms


def test_cifar_image_tree_and_cache(
    tmp_path: Path, tmp_cache: Path, small_cifar10: D.DatasetInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    expected = _write_tree(root / "cifar10", CIFAR10_CLASSES, {"train": 2, "test": 1})
    ds = build_dataset("cifar10", root, "train")
    assert np.array_equal(ds.images.numpy(), expected["train"])
    assert ds.targets.tolist() == [c for c in range(10) for _ in range(2)]
    assert ds.classes == CIFAR10_CLASSES
    test = build_dataset("cifar10", root, "test")
    assert np.array_equal(test.images.numpy(), expected["test"])
    assert len(list((tmp_cache / "arrays").glob("cifar10-*.json"))) == 2

    with monkeypatch.context() as m:  # second load: from the .npy cache
        _no_decode(m)
        again = build_dataset("cifar10", root, "train")
        assert torch.equal(again.images, ds.images)

    # a changed file invalidates the cache entry
    new = np.full((32, 32, 3), 7, np.uint8)
    time.sleep(0.01)
    Image.fromarray(new).save(root / "cifar10" / "train" / "bird" / "0001.png")
    changed = build_dataset("cifar10", root, "train")
    assert np.array_equal(changed.images[5].numpy(), new.transpose(2, 0, 1))


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar"])
def test_cifar_archive_extracted_once(
    tmp_path: Path,
    tmp_cache: Path,
    small_cifar10: D.DatasetInfo,
    monkeypatch: pytest.MonkeyPatch,
    suffix: str,
) -> None:
    src = tmp_path / "src"
    expected = _write_tree(src / "cifar10", CIFAR10_CLASSES, {"train": 2, "test": 1})
    (src / "cifar10" / "README.txt").write_text("not an image")
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / f"cifar10{suffix}", "w:gz" if suffix == ".tar.gz" else "w") as tf:
        tf.add(src / "cifar10", arcname="cifar10")

    ds = build_dataset("cifar10", root, "test")
    assert np.array_equal(ds.images.numpy(), expected["test"])
    extracted = [p for p in (tmp_cache / "extracted").iterdir()]
    assert len(extracted) == 1 and not extracted[0].name.startswith(".")  # no temp dir left
    assert (extracted[0] / "cifar10" / "train" / "cat").is_dir()

    train = build_dataset("cifar10", root, "train")  # reuses the extraction
    assert np.array_equal(train.images.numpy(), expected["train"])
    assert len(list((tmp_cache / "extracted").iterdir())) == 1

    with monkeypatch.context() as m:  # cached arrays: neither extracted nor decoded again
        _no_decode(m)
        m.setattr(D, "_extracted_tree", lambda *a, **k: pytest.fail("extracted again"))
        assert torch.equal(build_dataset("cifar10", root, "train").images, train.images)


def test_archive_with_wrong_counts_leaves_nothing(
    tmp_path: Path, tmp_cache: Path, small_cifar10: D.DatasetInfo
) -> None:
    src = tmp_path / "src"
    _write_tree(src / "cifar10", CIFAR10_CLASSES, {"train": 1, "test": 1})  # 10 train, not 20
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / "cifar10.tar.gz", "w:gz") as tf:
        tf.add(src / "cifar10", arcname="cifar10")
    with pytest.raises(DataError, match=r"cifar10\.tar\.gz.*expected.*20.*found.*10"):
        build_dataset("cifar10", root, "train")
    assert not any((tmp_cache / "extracted").iterdir())


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def test_torchvision_format_cifar10(
    tmp_path: Path, small_cifar10: D.DatasetInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the layout torchvision.datasets.CIFAR10 reads: pickled dicts, data N x 3072 (CHW rows)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = [(2 * i + k) % 10 for k in range(4)]
        _pickle(folder / f"data_batch_{i}", {"data": data, "labels": labels})
        batches.append((data, labels))
    test_data = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
    _pickle(folder / "test_batch", {"data": test_data, "labels": list(range(10))})
    _pickle(folder / "batches.meta", {"label_names": CIFAR10_CLASSES})
    # a tree beside it must not be used: torchvision's format comes first
    (tmp_path / "cifar10" / "train").mkdir(parents=True)

    ds = build_dataset("cifar10", tmp_path, "train")
    assert ds.images.shape == (20, 3, 32, 32)
    assert np.array_equal(ds.images.reshape(20, -1).numpy(), np.concatenate([b[0] for b in batches]))
    assert ds.targets.tolist() == sum((b[1] for b in batches), [])
    assert ds.classes == CIFAR10_CLASSES
    test = build_dataset("cifar10", tmp_path, "test")
    assert np.array_equal(test.images.reshape(10, -1).numpy(), test_data)

    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        build_dataset("cifar10", tmp_path, "train")


def test_download_goes_through_torchvision(
    tmp_path: Path, small_cifar10: D.DatasetInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:  # writes the files torchvision would download
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            folder = Path(root) / "cifar-10-batches-py"
            folder.mkdir(parents=True, exist_ok=True)
            data = np.zeros((4, 3072), np.uint8)
            for i in range(1, 6):
                _pickle(folder / f"data_batch_{i}", {"data": data, "labels": [0, 1, 2, i]})
            _pickle(folder / "test_batch", {"data": np.zeros((10, 3072), np.uint8), "labels": list(range(10))})
            _pickle(folder / "batches.meta", {"label_names": CIFAR10_CLASSES})

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    with pytest.raises(DataError):
        build_dataset("cifar10", tmp_path / "d", "train")  # download is off by default
    assert calls == []
    ds = build_dataset("cifar10", tmp_path / "d", "train", download=True)
    assert len(ds) == 20 and calls == [(str(tmp_path / "d"), True, True)]


def test_torchvision_format_cifar100_coarse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        DATASETS, "cifar100", dataclasses.replace(DATASETS["cifar100"], train_count=100, test_count=100)
    )
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine = np.arange(100)
    coarse = fine % 20
    data = np.random.default_rng(1).integers(0, 256, (100, 3072), dtype=np.uint8)
    for split in ("train", "test"):
        _pickle(folder / split, {"data": data, "fine_labels": fine.tolist(), "coarse_labels": coarse.tolist()})
    _pickle(
        folder / "meta",
        {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]},
    )
    ds = build_dataset("cifar100", tmp_path, "train")
    assert ds.targets.tolist() == fine.tolist() and len(ds.classes) == 100
    ds_c = build_dataset("cifar100", tmp_path, "test", label_type="coarse")
    assert ds_c.targets.tolist() == coarse.tolist() and ds_c.classes == [f"c{i}" for i in range(20)]
    with pytest.raises(ValueError, match="label_type"):
        build_dataset("cifar100", tmp_path, label_type="superfine")


def test_cifar100_tree_has_no_coarse_labels(tmp_path: Path, tmp_cache: Path) -> None:
    (tmp_path / "cifar100" / "train" / "apple").mkdir(parents=True)
    with pytest.raises(DataError, match="coarse") as err:
        build_dataset("cifar100", tmp_path, "train", label_type="coarse")
    assert "cifar-100-python" in str(err.value)


# ----------------------------------------------------------------------------------- errors


def test_missing_dataset_names_every_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        build_dataset("cifar10", root)
    msg = str(err.value)
    for place in ("cifar-10-batches-py", "cifar10/{train,test}", "cifar10.tar.gz", "cifar10.tar"):
        assert f"{root}/{place}" in msg, (place, msg)
    assert "data.download=true" in msg and "CDG_DATA" in msg and "data.root=" in msg and "--data-root" not in msg

    monkeypatch.setenv("CDG_DATA", str(tmp_path / "env-root"))
    with pytest.raises(DataError, match=r"CDG_DATA") as err:
        build_dataset("cifar100")
    assert str(tmp_path / "env-root" / "cifar-100-python") in str(err.value)


def test_missing_imagenet100_and_imagefolder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        build_dataset("imagenet100", tmp_path)
    assert str(tmp_path / "imagenet100" / "train") in str(err.value)
    assert str(tmp_path / "imagenet" / "train") in str(err.value)
    with pytest.raises(DataError, match=str(tmp_path / "val")):
        build_dataset("imagefolder", tmp_path, "val")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_names_the_file(
    tmp_path: Path, tmp_cache: Path, small_cifar10: D.DatasetInfo, damage: str
) -> None:
    _write_tree(tmp_path / "cifar10", CIFAR10_CLASSES, {"train": 2, "test": 1})
    bad = tmp_path / "cifar10" / "train" / "dog" / "0001.png"
    raw = bad.read_bytes()
    bad.write_bytes(b"this is not a png" if damage == "garbage" else raw[: len(raw) // 2])
    with pytest.raises(DataError, match="0001.png") as err:
        build_dataset("cifar10", tmp_path, "train")
    assert str(bad) in str(err.value)
    # the lazy dataset says the same when the item is read
    ds = build_dataset("imagefolder", tmp_path / "cifar10", "train")
    with pytest.raises(DataError, match=str(bad)):
        ds[11]


def test_wrong_class_or_image_count(
    tmp_path: Path, tmp_cache: Path, small_cifar10: D.DatasetInfo
) -> None:
    _write_tree(tmp_path / "a" / "cifar10", CIFAR10_CLASSES[:9], {"train": 2})
    with pytest.raises(DataError, match=r"expected 10 class folders for cifar10, found 9"):
        build_dataset("cifar10", tmp_path / "a", "train")
    _write_tree(tmp_path / "b" / "cifar10", CIFAR10_CLASSES, {"train": 3})
    with pytest.raises(DataError, match=r"expected 20 train images for cifar10, found 30"):
        build_dataset("cifar10", tmp_path / "b", "train")
    img = Image.fromarray(np.zeros((16, 16, 3), np.uint8))
    _write_tree(tmp_path / "c" / "cifar10", CIFAR10_CLASSES, {"train": 2})
    odd = tmp_path / "c" / "cifar10" / "train" / "cat" / "0000.png"
    img.save(odd)
    with pytest.raises(DataError, match=f"{odd}: expected a 32x32 image, found 16x16"):
        build_dataset("cifar10", tmp_path / "c", "train")


def test_unknown_names_list_the_valid_ones(tmp_path: Path) -> None:
    for call in (lambda: build_dataset("mnist", tmp_path), lambda: dataset_info("mnist")):
        with pytest.raises(ValueError) as err:
            call()
        assert not isinstance(err.value, DataError)
        for name in ("cifar10", "cifar100", "imagenet100", "imagefolder", "synthetic"):
            assert name in str(err.value)
    with pytest.raises(ValueError, match="split"):
        build_dataset("cifar10", tmp_path, split="validation")
    with pytest.raises(ValueError, match="unexpected option"):
        build_dataset("synthetic", colour="red")


# ----------------------------------------------------------------------------------- image modes


def test_gray_palette_rgba_become_rgb(tmp_path: Path, tmp_cache: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "train" / "a").mkdir(parents=True)
    (tree / "train" / "b").mkdir(parents=True)
    gray = np.arange(20 * 24, dtype=np.uint8).reshape(20, 24)
    Image.fromarray(gray, mode="L").save(tree / "train" / "a" / "gray.png")
    rgb = _pixels(0, 0, 20)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tree / "train" / "a" / "pal.png")
    rgba = np.dstack([rgb, np.full((20, 20), 128, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tree / "train" / "b" / "rgba.png")
    Image.fromarray(rgb).save(tree / "train" / "b" / "rgb.jpg", quality=95)
    (tree / "train" / "b" / "notes.txt").write_text("ignored")

    ds = build_dataset("imagefolder", tree, "train")
    assert isinstance(ds, FolderImageDataset) and len(ds) == 4 and ds.classes == ["a", "b"]
    assert ds.targets.tolist() == [0, 0, 1, 1]
    shapes = []
    for i in range(len(ds)):
        img, _ = ds[i]
        assert img.dtype == torch.uint8 and img.shape[0] == 3
        shapes.append(tuple(img.shape))
    g, _ = ds[0]  # gray.png: three equal channels
    assert shapes[0] == (3, 20, 24) and torch.equal(g[0], torch.from_numpy(gray)) and torch.equal(g[0], g[2])
    names = [Path(p).name for p, _ in ds.samples]
    assert names == ["gray.png", "pal.png", "rgb.jpg", "rgba.png"]  # sorted per class
    assert torch.equal(ds[3][0], torch.from_numpy(rgb).permute(2, 0, 1))  # RGBA: alpha dropped
    pal = ds[1][0].permute(1, 2, 0).int()  # palette: close to the original colours
    assert (pal - torch.from_numpy(rgb).int()).abs().float().mean() < 40
    assert ds.subset([3]).targets.tolist() == [1]


# ----------------------------------------------------------------------------------- other datasets


def test_imagenet100_from_full_imagenet(tmp_path: Path) -> None:
    wnids = imagenet100_classes()
    assert len(wnids) == 100 == len(set(wnids))
    assert wnids[:3] == ["n02869837", "n01749939", "n02488291"] and wnids[-1] == "n02090622"
    img = Image.fromarray(np.zeros((8, 10, 3), np.uint8))
    val = tmp_path / "imagenet" / "val"
    for w in wnids + ["n99999999"]:  # one extra class outside the list
        (val / w).mkdir(parents=True)
        img.save(val / w / f"{w}_1.JPEG")
    ds = build_dataset("imagenet100", tmp_path, "test")  # test -> val
    assert isinstance(ds, FolderImageDataset)
    assert len(ds) == 100 and ds.classes == sorted(wnids)
    assert ds[0][0].shape == (3, 8, 10)

    (val / wnids[5] / f"{wnids[5]}_1.JPEG").unlink()
    (val / wnids[5]).rmdir()
    with pytest.raises(DataError, match=f"1 missing.*{wnids[5]}"):
        build_dataset("imagenet100", tmp_path, "val")


def test_imagefolder_split_names(tmp_path: Path) -> None:
    img = Image.fromarray(np.zeros((5, 7, 3), np.uint8))
    for cls in ("x", "y", "z"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        img.save(tmp_path / "train" / cls / "0.png")
    (tmp_path / "val" / "x").mkdir(parents=True)
    img.save(tmp_path / "val" / "x" / "0.png")
    assert len(build_dataset("imagefolder", tmp_path, "train")) == 3
    assert len(build_dataset("imagefolder", tmp_path, "test")) == 1  # no test/: val/


def test_synthetic_is_seeded_and_learnable() -> None:
    a = build_dataset("synthetic", n=400, seed=3)
    b = build_dataset("synthetic", n=400, seed=3)
    c = build_dataset("synthetic", n=400, seed=4)
    test = build_dataset("synthetic", split="test", n=200, seed=3)
    assert isinstance(a, TensorImageDataset) and a.images.shape == (400, 3, 32, 32)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert not torch.equal(a.images[:200], test.images)
    assert torch.bincount(a.targets).tolist() == [40] * 10 and len(a.classes) == 10
    # a nearest-class-mean on colour + 2-D power spectrum separates the classes
    def feats(x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        spec = torch.fft.rfft2(x.mean(1) - x.mean((1, 2, 3))[:, None, None]).abs().flatten(1)
        return torch.cat([x.mean((2, 3)) * 10, spec / spec.norm(dim=1, keepdim=True)], 1)
    fa, ft = feats(a.images), feats(test.images)
    means = torch.stack([fa[a.targets == k].mean(0) for k in range(10)])
    acc = (torch.cdist(ft, means).argmin(1) == test.targets).float().mean()
    assert acc > 0.9


def test_roots_and_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDG_DATA", raising=False)
    assert resolve_data_root(None) == Path("data")
    monkeypatch.setenv("CDG_DATA", str(tmp_path))
    assert resolve_data_root(None) == tmp_path
    assert resolve_data_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv("CDG_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CDG_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "cdg"
    info = dataset_info("cifar100")
    assert (info.num_classes, info.train_count, info.test_count, info.image_size) == (100, 50000, 10000, 32)
    assert dataset_info("imagenet100").mean == (0.485, 0.456, 0.406)


def test_transformed_dataset_and_subset() -> None:
    ds = build_dataset("synthetic", n=50)
    sub = ds.subset(np.array([3, 1]))
    assert torch.equal(sub.images[0], ds.images[3]) and sub.targets.tolist() == ds.targets[[3, 1]].tolist()
    tds = TransformedDataset(ds, lambda im: im.float().mean())
    value, label = tds[7]
    assert float(value) == pytest.approx(float(ds.images[7].float().mean())) and label == int(ds.targets[7])
    assert len(tds) == 50 and tds.classes == ds.classes


# ----------------------------------------------------------------------------------- splits


def test_stratified_subset_counts_and_golden_values() -> None:
    y = np.repeat(np.arange(4), [100, 37, 5, 1])
    idx = stratified_subset(y, 0.1, seed=0)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    # round(10), round(3.7), round(0.5) -> 0 -> at least 1, round(0.1) -> at least 1
    assert np.bincount(y[idx]).tolist() == [10, 4, 1, 1]
    # identical on every machine: numpy Generator(PCG64(seed)), classes in sorted order
    assert idx.tolist() == [1, 3, 7, 17, 25, 29, 47, 58, 77, 81, 109, 124, 129, 131, 139, 142]
    assert stratified_subset(torch.arange(20) % 4, 0.5, seed=123).tolist() == [0, 1, 2, 3, 6, 7, 12, 17]


def test_stratified_subset_reproducible_and_seeded(cifar10_test: TensorImageDataset) -> None:
    a = stratified_subset(cifar10_test.targets, 0.01, seed=0)
    assert np.array_equal(a, stratified_subset(cifar10_test.targets, 0.01, seed=0))
    assert not np.array_equal(a, stratified_subset(cifar10_test.targets, 0.01, seed=1))
    assert np.bincount(cifar10_test.targets.numpy()[a]).tolist() == [10] * 10
    assert len(stratified_subset(cifar10_test.targets, 1.0, seed=5)) == 10000


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_stratified_subset_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        stratified_subset([0, 1, 1], fraction, seed=0)


def test_split_roundtrip(tmp_path: Path) -> None:
    idx = stratified_subset(np.arange(30) % 3, 0.2, seed=7)
    path = tmp_path / "splits" / "c10-20pct.json"
    save_split(path, idx, dataset="cifar10", fraction=0.2, seed=7)
    back, meta = load_split(path)
    assert back.dtype == np.int64 and np.array_equal(back, idx)
    assert meta == {"dataset": "cifar10", "fraction": 0.2, "seed": 7}
    path.write_text("{not json")
    with pytest.raises(DataError, match=str(path)):
        load_split(path)
