"""Dataset layer: sources, preparation, bad input, cache, loader, MLflow input logging."""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import pickle
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import (BatchLoader, DataConfig, DataError, dataset_version, fingerprint, lineage_history,
                       load_prepared, prepare_dataset, validate_for_model)


def _mnist_dir() -> Path | None:
    for candidate in (os.environ.get("DDPM_MNIST_DIR"),
                      Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist",
                      "/work/shared/data/mnist"):
        if candidate and (Path(candidate) / "t10k-images-idx3-ubyte.gz").is_file():
            return Path(candidate).resolve()
    return None


MNIST_DIR = _mnist_dir()


# ---------------------------------------------------------------------------- fake files

def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An IDX file (gz when the name ends in .gz) holding a uint8 array."""
    magic = 0x0800 | array.ndim
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def fake_mnist(folder: Path, splits=("train", "t10k"), n=(12, 8), gz=True, seed=0) -> dict:
    """Small MNIST-format files; returns {split: (images, labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out, suffix = {}, ".gz" if gz else ""
    for split, count in zip(splits, n):
        x = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, count, dtype=np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", x)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", y)
        out[split] = (x, y)
    return out


def fake_cifar_archive(path: Path, sizes=(10, 6), names=("data_batch_1", "test_batch"),
                       seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A cifar-10-python.tar.gz in the published layout with small batches."""
    rng = np.random.default_rng(seed)
    all_x, all_y = [], []
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        def add(name, obj):
            blob = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        add("batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]})
        for name, count in zip(names, sizes):
            x = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
            y = rng.integers(0, 10, count).tolist()
            add(name, {b"data": x, b"labels": y, b"batch_label": name.encode()})
            all_x.append(x.reshape(-1, 3, 32, 32))
            all_y.append(y)
    return np.concatenate(all_x), np.concatenate(all_y)


def write_png(path: Path, size: tuple[int, int], color, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)   # size is (W, H)
    return path


@pytest.fixture
def http_dir(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/served; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def no_output(out_dir: Path) -> bool:
    """True when out_dir holds no prepared or temporary dataset folder (downloads aside)."""
    return not out_dir.exists() or all(p.name == "downloads" for p in out_dir.iterdir())


# ---------------------------------------------------------------------------- sources

def test_digits_default_manifest_and_round_trip(tmp_path):
    path = prepare_dataset(DataConfig(), tmp_path)
    data = load_prepared(path)
    m = data.manifest
    assert (m["source"], m["image_size"], m["channels"], m["count"]) == ("digits", 16, 1, 1797)
    assert m["splits"] == {"train": 1438, "holdout": 359}
    assert m["class_names"] == [str(i) for i in range(10)]
    assert data.images.dtype == torch.uint8 and data.images.shape == (1797, 1, 16, 16)
    assert data.labels.dtype == torch.int64 and set(data.labels.tolist()) == set(range(10))
    assert int(data.images.max()) == 255 and int(data.images.min()) == 0
    assert m["fingerprint"] == fingerprint(data.images.numpy(), data.labels.numpy(),
                                           data.train_indices.numpy(), data.holdout_indices.numpy())
    train_x, train_y = data.split("train")
    assert train_x.shape == (1438, 1, 16, 16) and train_y.shape == (1438,)
    assert path.name.startswith("digits-16x16x1-")
    # the default dataset is what it always was: its config's JSON (hence the folder name) and its
    # fingerprint are those of every run trained before content splits and versions existed
    assert m["config"] == DEFAULT_CONFIG_JSON and DataConfig().model_dump() == DEFAULT_CONFIG_JSON
    key = json.dumps({"config": DEFAULT_CONFIG_JSON, "identity": m["source_identity"]}, sort_keys=True)
    assert path.name == f"digits-16x16x1-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    assert m["fingerprint"] == DEFAULT_DIGITS_FINGERPRINT
    assert path.stat().st_mode & 0o777 == 0o777 & ~current_umask()   # not mkdtemp's 0700


# DataConfig().model_dump() and the default digits fingerprint before `split` defaulted per source
DEFAULT_CONFIG_JSON = {"source": "digits", "image_size": 16, "channels": 1, "holdout_fraction": 0.2,
                       "split_seed": 0, "resize": "center_crop", "split": "random", "max_images": None}
DEFAULT_DIGITS_FINGERPRINT = "4639b1f4d13728460dbfe2171f838900a9901b1a1692531d05a42b93c43d30ad"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_split_is_deterministic_disjoint_complete_and_in_the_fingerprint(tmp_path):
    config = DataConfig(max_images=300, holdout_fraction=0.25, split_seed=3)
    a = load_prepared(prepare_dataset(config, tmp_path / "a"))
    b = load_prepared(prepare_dataset(config, tmp_path / "b"))
    assert torch.equal(a.train_indices, b.train_indices) and torch.equal(a.holdout_indices, b.holdout_indices)
    assert torch.equal(a.images, b.images) and a.fingerprint == b.fingerprint
    train, holdout = set(a.train_indices.tolist()), set(a.holdout_indices.tolist())
    assert len(holdout) == 75 and not train & holdout and train | holdout == set(range(300))
    assert a.holdout_indices.tolist() != list(range(225, 300))   # random, not a cut in order

    c = load_prepared(prepare_dataset(config.model_copy(update={"split_seed": 4}), tmp_path / "c"))
    assert not torch.equal(c.holdout_indices, a.holdout_indices)
    assert c.fingerprint != a.fingerprint


def test_fingerprint_changes_when_one_pixel_label_or_split_changes():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 10, 20).astype(np.int64)
    train, holdout = np.arange(16), np.arange(16, 20)
    base = fingerprint(x, y, train, holdout)
    assert base == fingerprint(x.copy(), y.copy(), train.copy(), holdout.copy())
    x2 = x.copy()
    x2[7, 0, 3, 3] ^= 1
    assert fingerprint(x2, y, train, holdout) != base
    y2 = y.copy()
    y2[0] = (y2[0] + 1) % 10
    assert fingerprint(x, y2, train, holdout) != base
    assert fingerprint(x, y, np.arange(1, 17), np.r_[0, 17:20]) != base
    assert fingerprint(x, None, train, holdout) != base


@pytest.mark.skipif(MNIST_DIR is None, reason="real MNIST test split (../shared/data/mnist) absent")
def test_real_mnist_test_split(tmp_path):
    data = load_prepared(prepare_dataset(DataConfig(source=f"mnist:{MNIST_DIR}"), tmp_path))
    m = data.manifest
    assert m["count"] == 10000 and m["splits"] == {"train": 8000, "holdout": 2000}
    assert m["source_details"]["splits"] == {"t10k": 10000}
    assert data.images.shape == (10000, 1, 16, 16)
    # MNIST is white digits on black: most pixels dark, mean around 34 at 16x16
    assert 25 < data.images.float().mean() < 45
    assert torch.bincount(data.labels, minlength=10).min() >= 892   # the t10k class counts
    # both writer pools (first and last 5,000 images) are in the holdout in near-equal parts
    first_half = int((data.holdout_indices < 5000).sum())
    assert 900 < first_half < 1100


def test_mnist_local_gz_and_raw_with_md5sums(tmp_path):
    folder = tmp_path / "mnist"
    fake = fake_mnist(folder, gz=False)
    (folder / "MD5SUMS").write_text("".join(f"{md5(p)}  {p.name}\n" for p in sorted(folder.iterdir())))
    config = DataConfig(source=f"mnist:{folder}", image_size=28, resize="none", holdout_fraction=0.25)
    data = load_prepared(prepare_dataset(config, tmp_path / "out"))
    expected = np.concatenate([fake["train"][0], fake["t10k"][0]])[:, None]
    assert np.array_equal(data.images.numpy(), expected)   # train first, pixels untouched
    assert data.labels.tolist() == np.concatenate([fake["train"][1], fake["t10k"][1]]).tolist()
    assert data.manifest["source_details"]["splits"] == {"train": 12, "t10k": 8}
    assert data.manifest["splits"] == {"train": 15, "holdout": 5}


def test_official_split_keeps_the_sources_own_train_and_test_files(tmp_path):
    folder = tmp_path / "mnist"
    fake = fake_mnist(folder, n=(12, 8), gz=False)   # raw IDX: no published md5 to match
    config = DataConfig(source=f"mnist:{folder}", image_size=32, resize="pad", split="official")
    data = load_prepared(prepare_dataset(config, tmp_path / "out"))
    assert data.manifest["splits"] == {"train": 12, "holdout": 8}
    assert data.train_indices.tolist() == list(range(12)) and data.holdout_indices.tolist() == list(range(12, 20))
    holdout, labels = data.split("holdout")
    # padded 28 -> 32: a 2-pixel black border, every original pixel in place (no resampling)
    assert holdout.shape == (8, 1, 32, 32) and np.array_equal(holdout[:, 0, 2:30, 2:30].numpy(), fake["t10k"][0])
    assert int(holdout[:, :, :2].sum() + holdout[:, :, 30:].sum() + holdout[..., :2].sum() + holdout[..., 30:].sum()) == 0
    assert labels.tolist() == fake["t10k"][1].tolist()
    # a subset keeps each image's membership
    subset = load_prepared(prepare_dataset(config.model_copy(update={"max_images": 10}), tmp_path / "out"))
    assert subset.manifest["splits"]["train"] + subset.manifest["splits"]["holdout"] == 10
    assert subset.manifest["fingerprint"] != data.manifest["fingerprint"]

    only_test = tmp_path / "t10k-only"
    fake_mnist(only_test, splits=("t10k",), n=(6,), gz=False)
    with pytest.raises(DataError, match=r"split='official' needs both the train and the test files .*found only t10k"):
        prepare_dataset(config.model_copy(update={"source": f"mnist:{only_test}"}), tmp_path / "out2")
    with pytest.raises(DataError, match="source 'digits' has no official train/test split"):
        prepare_dataset(DataConfig(split="official"), tmp_path / "out2")
    with pytest.raises(DataError, match="images are 28x28, larger than image_size=16: resize='pad'"):
        prepare_dataset(config.model_copy(update={"image_size": 16}), tmp_path / "out2")
    assert no_output(tmp_path / "out2")


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared/data/mnist-full/train-images-idx3-ubyte.gz").exists(),
                    reason="all four MNIST files (../shared/data/mnist-full) absent")
def test_real_mnist_full_size_official_split(tmp_path):
    folder = Path(__file__).resolve().parents[2] / "shared/data/mnist-full"
    config = DataConfig(source=f"mnist:{folder}", image_size=32, resize="pad", split="official")
    data = load_prepared(prepare_dataset(config, tmp_path))
    assert data.manifest["splits"] == {"train": 60000, "holdout": 10000}
    assert data.manifest["source_details"]["splits"] == {"train": 60000, "t10k": 10000}
    assert torch.bincount(data.split("holdout")[1], minlength=10).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]   # the published t10k class counts
    assert data.images[:, :, :2].max() == 0 and data.images[:, :, :, 30:].max() == 0   # the padding


def test_mnist_download_over_http_verifies_md5(tmp_path, http_dir):
    served, url = http_dir
    fake = fake_mnist(served, gz=True)
    checksums = {p.name: md5(p) for p in served.iterdir()}
    down = tmp_path / "downloads"
    # the first mirror answers 404: the download falls back to the second
    path = prepare_dataset(DataConfig(source="mnist", image_size=28, resize="none"), tmp_path / "out",
                           download_dir=down, mirrors=[url + "missing/", url], checksums=checksums)
    data = load_prepared(path)
    assert data.manifest["count"] == 20
    assert np.array_equal(data.images.numpy()[:12, 0], fake["train"][0])
    assert sorted(p.name for p in (down / "mnist").iterdir()) == sorted(checksums)


def test_download_checksum_mismatch_leaves_nothing(tmp_path, http_dir):
    served, url = http_dir
    fake_mnist(served, gz=True)
    down = tmp_path / "downloads"
    with pytest.raises(DataError, match=r"checksum mismatch for .*train-images-idx3-ubyte\.gz"):
        # no checksums injected: the published md5s apply, and the fake files do not match them
        prepare_dataset(DataConfig(source="mnist"), tmp_path / "out", download_dir=down, mirrors=[url])
    assert list((down / "mnist").iterdir()) == []   # no .part, no unverified file
    assert not (tmp_path / "out").exists()


def test_local_checksum_mismatch(tmp_path):
    folder = tmp_path / "mnist"
    fake_mnist(folder, splits=("t10k",), n=(6,))
    with pytest.raises(DataError, match=r"checksum mismatch for .*t10k-images-idx3-ubyte\.gz: md5 [0-9a-f]{32}, expected 0{32}"):
        prepare_dataset(DataConfig(source=f"mnist:{folder}"), tmp_path / "out",
                        checksums={"t10k-images-idx3-ubyte.gz": "0" * 32, "t10k-labels-idx1-ubyte.gz": "0" * 32})
    assert no_output(tmp_path / "out")


def test_a_folders_md5sums_never_overrides_a_published_checksum(tmp_path):
    """A replaced file with an MD5SUMS beside it that vouches for it was accepted: the published
    sum wins, and an MD5SUMS covers only files that have none."""
    from ddpm.data.sources.mnist import MNIST_MD5

    folder = tmp_path / "mnist"
    fake_mnist(folder, splits=("t10k",), n=(6,))
    (folder / "MD5SUMS").write_text("".join(f"{md5(p)}  {p.name}\n" for p in sorted(folder.iterdir())))
    name = "t10k-images-idx3-ubyte.gz"
    with pytest.raises(DataError, match=rf"checksum mismatch for .*{name}: md5 [0-9a-f]{{32}}, expected {MNIST_MD5[name]}"):
        prepare_dataset(DataConfig(source=f"mnist:{folder}"), tmp_path / "out")
    assert no_output(tmp_path / "out")


def test_cifar10_archive_local_and_downloaded(tmp_path, http_dir):
    served, url = http_dir
    archive = served / "cifar-10-python.tar.gz"
    x, y = fake_cifar_archive(archive)
    checksums = {archive.name: md5(archive)}
    config = DataConfig(source=f"cifar10:{archive}", image_size=32, channels=3, resize="none")
    local = load_prepared(prepare_dataset(config, tmp_path / "out", checksums=checksums))
    assert np.array_equal(local.images.numpy(), x) and local.labels.tolist() == y.tolist()
    assert local.manifest["class_names"] == [f"class{i}" for i in range(10)]
    assert local.manifest["source_details"]["batches"] == {"data_batch_1": 10, "test_batch": 6}
    official = load_prepared(prepare_dataset(config.model_copy(update={"split": "official"}), tmp_path / "out",
                                             checksums=checksums))
    assert official.holdout_indices.tolist() == list(range(10, 16))   # test_batch is the holdout

    downloaded = load_prepared(prepare_dataset(config.model_copy(update={"source": "cifar10"}),
                                               tmp_path / "out2", mirrors=[url], checksums=checksums))
    assert downloaded.fingerprint == local.fingerprint
    assert (tmp_path / "out2" / "downloads" / "cifar10" / archive.name).is_file()

    with pytest.raises(DataError, match="checksum mismatch"):   # published md5 vs the fake
        prepare_dataset(config, tmp_path / "out3")
    assert no_output(tmp_path / "out3")

    # gray 16x16: luma then antialiased bilinear
    gray = load_prepared(prepare_dataset(config.model_copy(update={"channels": 1, "image_size": 16,
                                                                   "resize": "resize"}),
                                         tmp_path / "out4", checksums=checksums))
    assert gray.images.shape == (16, 1, 16, 16)


class RunsCode:
    """What a crafted pickle carries: unpickling it calls os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_cifar10_extracted_batches_are_verified_and_never_run_code(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    x, y = fake_cifar_archive(archive, names=("data_batch_1", "test_batch"))
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    folder = tmp_path / "extracted" / "cifar-10-batches-py"
    # protocol 2, as the published (Python 2) batches: arrays load
    batch = pickle.loads((folder / "data_batch_1").read_bytes())
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    config = DataConfig(source=f"cifar10:{folder}", image_size=32, channels=3, resize="none")
    sums = {name: md5(folder / name) for name in ("data_batch_1", "test_batch", "batches.meta")}
    prepared = load_prepared(prepare_dataset(config, tmp_path / "out", checksums=sums))
    assert np.array_equal(prepared.images.numpy(), x)

    marker = tmp_path / "ran"
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": RunsCode(f"touch {marker}"), b"labels": []}))
    with pytest.raises(DataError, match="checksum mismatch for .*data_batch_1"):   # the published sums
        prepare_dataset(config, tmp_path / "out2")
    sums["data_batch_1"] = md5(folder / "data_batch_1")   # even when the user vouches for the file
    with pytest.raises(DataError, match=r"cannot unpickle CIFAR-10 batch data_batch_1 .*refusing to load posix\.system"):
        prepare_dataset(config, tmp_path / "out3", checksums=sums)
    assert not marker.exists()
    assert no_output(tmp_path / "out2") and no_output(tmp_path / "out3")


def test_cifar10_preparation_holds_one_copy_of_the_images(tmp_path):
    import tracemalloc

    from ddpm.data.sources.cifar10 import CIFAR10_BATCHES
    archive = tmp_path / "cifar-10-python.tar.gz"
    x, _ = fake_cifar_archive(archive, sizes=(500,) * 6, names=CIFAR10_BATCHES)
    config = DataConfig(source=f"cifar10:{archive}", image_size=32, channels=3, resize="none")
    checksums = {archive.name: md5(archive)}
    del x
    tracemalloc.start()
    try:
        path = prepare_dataset(config, tmp_path / "out", checksums=checksums)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_copy = 3000 * 3 * 32 * 32
    # the images once, plus one batch (1/6) held ~3 times while it is unpickled (about 1.5x
    # in all); a second copy of the images would make it >= 2x
    assert peak < 1.75 * one_copy, f"peak {peak / one_copy:.2f}x the image bytes"
    assert load_prepared(path).manifest["count"] == 3000


def test_folder_with_class_subfolders_sizes_and_policies(tmp_path):
    root = tmp_path / "imgs"
    write_png(root / "cats" / "a.png", (40, 20), (255, 0, 0))          # wide, red
    write_png(root / "cats" / "b.jpg", (24, 24), (0, 0, 255))          # JPEG, blue
    write_png(root / "dogs" / "c.png", (10, 30), (0, 255, 0), )        # tall, green
    img = Image.new("RGB", (20, 10), (0, 0, 0))                        # left black, right white
    img.paste((255, 255, 255), (10, 0, 20, 10))
    img.save(root / "dogs" / "d.png")
    (root / "notes.txt").parent.mkdir(exist_ok=True)
    config = DataConfig(source=f"folder:{root}", image_size=8, channels=3, resize="center_crop",
                        holdout_fraction=0.5)
    data = load_prepared(prepare_dataset(config, tmp_path / "out"))
    assert data.manifest["class_names"] == ["cats", "dogs"]
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert data.images.shape == (4, 3, 8, 8)
    assert data.images[0, :, 4, 4].tolist() == [255, 0, 0]
    assert data.images[2, :, 4, 4].tolist() == [0, 255, 0]
    # centre crop of the 20x10 half-black image keeps its middle 10x10: left half black, right white
    assert data.images[3, 0, 4, 0] == 0 and data.images[3, 0, 4, 7] == 255

    gray = load_prepared(prepare_dataset(config.model_copy(update={"channels": 1, "resize": "resize"}),
                                         tmp_path / "out"))
    assert gray.images[0, 0, 4, 4] == 76   # ITU-R 601-2 luma of pure red
    assert gray.manifest["fingerprint"] != data.manifest["fingerprint"]
    assert len([p for p in (tmp_path / "out").iterdir() if p.name != "versions"]) == 2   # two configs coexist


# ---------------------------------------------------------------------------- bad input

def write_truncated_png(path: Path) -> None:
    """A PNG cut in half: its header reads, its pixels do not."""
    full = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(full, format="PNG")
    path.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])


def _mixed(folder: Path) -> None:
    write_png(folder / "a.png", (16, 16), (0, 0, 0))
    write_png(folder / "b.png", (28, 28), (0, 0, 0))


def _no_images(folder: Path) -> None:
    (folder / "readme.txt").write_text("no pictures here")


def _nothing_usable(folder: Path) -> None:
    (folder / "garbage.jpg").write_bytes(b"not a jpeg at all")
    write_png(folder / "dot.png", (1, 1), (9, 9, 9))


def _loop(folder: Path) -> None:
    write_png(folder / "a" / "x.png", (8, 8), (1, 2, 3))
    (folder / "a" / "again").symlink_to(folder)


@pytest.mark.parametrize("make, resize, message", [
    (None, "center_crop", r"folder .*missing does not exist"),
    (lambda f: None, "center_crop", r"folder .* is empty"),
    (_no_images, "center_crop", r"no PNG/JPEG image files in .*\(1 other files, e\.g\. readme\.txt\)"),
    (_nothing_usable, "center_crop", r"none of the 2 image files in .* can be used, e\.g\. dot\.png is 1x1: "
                                     r"smaller than 4 px"),
    (_nothing_usable, "none", r"none of the 2 image files in .* can be used, e\.g\. dot\.png is 1x1"),
    (_mixed, "none", r"mixed sizes 16x16 \(e\.g\. a\.png\), 28x28 \(e\.g\. b\.png\) and resize='none'"),
    (_loop, "center_crop", r"a/again is a symbolic link to .*missing, a folder that contains it: following it "
                           r"would loop; remove the link"),
], ids=["missing", "empty", "no-images", "nothing-usable", "nothing-usable-none", "mixed-sizes", "link-loop"])
def test_bad_folders_raise_clear_errors_and_leave_nothing(tmp_path, make, resize, message):
    folder = tmp_path / "missing"
    if make is not None:
        folder.mkdir()
        make(folder)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        prepare_dataset(DataConfig(source=f"folder:{folder}", resize=resize), out)
    assert no_output(out)


@pytest.mark.parametrize("resize", ["center_crop", "none"])
def test_unusable_images_are_skipped_listed_in_the_manifest_and_warned_once(tmp_path, resize):
    """One bad file in a nightly folder must not fail the whole preparation: truncated, not an
    image, too small, a dangling link are each skipped with their reason; what is prepared is
    exactly the folder without them (same fingerprint)."""
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    write_digit_pngs(clean, range(40))
    write_digit_pngs(dirty, range(40))
    write_truncated_png(dirty / "broken.png")
    (dirty / "garbage.jpg").write_bytes(b"not a jpeg at all")
    write_png(dirty / "dot.png", (1, 1), (9, 9, 9))
    (dirty / "gone.png").symlink_to(tmp_path / "nowhere.png")
    config = DataConfig(source=f"folder:{dirty}", image_size=8, resize=resize)
    with pytest.warns(UserWarning) as caught:
        data = load_prepared(prepare_dataset(config, tmp_path / "out"))
    (warning,) = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert "\n" not in warning and warning.startswith(f"skipped 4 of 44 image files in {dirty}: broken.png ")
    assert "and 3 more (the prepared manifest's skipped_files lists them)" in warning
    skipped = {entry["file"]: entry["reason"] for entry in data.manifest["skipped_files"]}
    assert sorted(skipped) == ["broken.png", "dot.png", "garbage.jpg", "gone.png"]
    assert skipped["dot.png"] == "is 1x1: smaller than 4 px on a side, too small to train on"
    assert all(skipped[name].startswith("cannot be read: ") for name in ("broken.png", "garbage.jpg", "gone.png"))
    reference = load_prepared(prepare_dataset(config.model_copy(update={"source": f"folder:{clean}"}), tmp_path / "c"))
    assert data.manifest["count"] == 40 and data.fingerprint == reference.fingerprint
    assert reference.manifest["skipped_files"] == []
    # the identity (the preparation's cache key) is deterministic with unreadable entries in the listing
    from ddpm.data import source_identity
    assert source_identity(config.source, tmp_path) == source_identity(config.source, tmp_path)


def test_symlinked_class_folders_are_followed(tmp_path):
    """Path.rglob does not follow a link to a folder: class `b` (a link) would silently be missing."""
    root, elsewhere = tmp_path / "imgs", tmp_path / "elsewhere"
    for name, indices in (("a", range(0, 10)), ("c", range(20, 30))):
        write_digit_pngs(root / name, indices)
    write_digit_pngs(elsewhere / "bees", range(10, 20))
    (root / "b").symlink_to(elsewhere / "bees")
    data = load_prepared(prepare_dataset(DataConfig(source=f"folder:{root}", image_size=8, resize="none"),
                                         tmp_path / "out"))
    assert data.manifest["class_names"] == ["a", "b", "c"] and data.manifest["count"] == 30
    assert sorted(data.labels.tolist()) == [0] * 10 + [1] * 10 + [2] * 10
    # two links to one folder are two folders (as two copies would be), not a loop
    (root / "d").symlink_to(elsewhere / "bees")
    twice = load_prepared(prepare_dataset(DataConfig(source=f"folder:{root}", image_size=8, resize="none"),
                                          tmp_path / "out"))
    assert twice.manifest["class_names"] == ["a", "b", "c", "d"] and twice.manifest["count"] == 40


def test_an_image_replaced_with_the_same_size_and_mtime_is_seen_only_with_verify_content(tmp_path, monkeypatch):
    """The stat identity's trade-off, and DDPM_VERIFY_CONTENT=1, which hashes the files' bytes."""
    from sklearn.datasets import load_digits

    from ddpm.data import source_identity

    root = tmp_path / "imgs"
    write_digit_pngs(root, range(10))
    target = root / "digit-0003.png"
    stat = target.stat()
    for image in np.rint(load_digits().images[10:] * (255.0 / 16.0)).astype(np.uint8):   # another digit, same size
        encoded = io.BytesIO()
        Image.fromarray(image, mode="L").save(encoded, format="PNG")
        if len(encoded.getvalue()) == stat.st_size and encoded.getvalue() != target.read_bytes():
            break
    else:
        pytest.fail("no other digit's PNG has the same size")
    identity = {}
    for verify in ("0", "1"):
        monkeypatch.setenv("DDPM_VERIFY_CONTENT", verify)
        identity[verify] = source_identity(f"folder:{root}", tmp_path)
    target.write_bytes(encoded.getvalue())
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    monkeypatch.setenv("DDPM_VERIFY_CONTENT", "0")
    assert source_identity(f"folder:{root}", tmp_path) == identity["0"]   # invisible to a stat listing
    monkeypatch.setenv("DDPM_VERIFY_CONTENT", "1")
    after = source_identity(f"folder:{root}", tmp_path)
    assert after != identity["1"] and after["listing"] == "content" and identity["0"] != identity["1"]


def test_16_bit_png_keeps_its_gray_levels(tmp_path):
    """PIL's own conversion clips 16-bit values at 255: the image would become white."""
    from PIL import Image

    levels = np.array([[0, 257 * 64, 257 * 128, 65535]] * 4, dtype=np.uint16).repeat(4, axis=1)   # 4x16
    wide = np.tile(levels, (4, 1))   # 16x16
    (tmp_path / "f").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(wide).save(tmp_path / "f" / name)
    assert Image.open(tmp_path / "f" / "a.png").mode.startswith("I")
    for channels in (1, 3):
        # two identical images: a content split (a folder's default) would put both on one side
        prepared = load_prepared(prepare_dataset(DataConfig(source=f"folder:{tmp_path / 'f'}", resize="none",
                                                            channels=channels, split="random"),
                                                 tmp_path / f"out{channels}"))
        assert prepared.images.shape == (2, channels, 16, 16)
        assert prepared.images[0, 0, 0, ::4].tolist() == [0, 64, 128, 255]


def test_uniform_size_other_than_image_size_with_resize_none(tmp_path):
    write_png(tmp_path / "f" / "a.png", (28, 28), (0, 0, 0))
    write_png(tmp_path / "f" / "b.png", (28, 28), (9, 9, 9))
    with pytest.raises(DataError, match=r"images are 28x28 but image_size=16 and resize='none'"):
        prepare_dataset(DataConfig(source=f"folder:{tmp_path / 'f'}", resize="none"), tmp_path / "out")
    assert no_output(tmp_path / "out")


@pytest.mark.parametrize("field, value, message", [
    ("source", "imagenet", r"source\n.*unknown source 'imagenet'"),
    ("holdout_fraction", 0.0, r"holdout_fraction\n.*must be in \(0, 1\) exclusive, got 0\.0"),
    ("holdout_fraction", 1.0, r"holdout_fraction\n.*must be in \(0, 1\) exclusive, got 1\.0"),
    ("holdout_fraction", -0.1, r"holdout_fraction\n.*got -0\.1"),
    ("channels", 2, r"channels\n.*1 \(gray\) or 3 \(RGB\)"),
    ("resize", "stretch", r"resize\n"),
    ("colour", 1, r"colour\n.*Extra inputs are not permitted"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**{field: value})


def test_image_size_not_supported_by_the_model(tmp_path):
    data = load_prepared(prepare_dataset(DataConfig(max_images=20), tmp_path))
    validate_for_model(data, 16, 1)
    validate_for_model(data.manifest, 16, 1)
    with pytest.raises(DataError, match=r"prepared data is 16x16 with 1 channel\(s\) but the model expects 32x32 with 3"):
        validate_for_model(data, 32, 3)


def test_preparing_again_reuses_an_intact_folder_and_repairs_a_damaged_one(tmp_path):
    """`ddpm prepare` then `ddpm train`: the second preparation finds the first one's folder."""
    path = prepare_dataset(DataConfig(max_images=50), tmp_path)
    stamp = (path / "data.npz").stat().st_mtime_ns
    assert prepare_dataset(DataConfig(max_images=50), tmp_path) == path
    assert (path / "data.npz").stat().st_mtime_ns == stamp   # no work done
    fingerprint_before = load_prepared(path).fingerprint
    (path / "data.npz").write_bytes(b"damaged")
    assert prepare_dataset(DataConfig(max_images=50), tmp_path) == path
    assert load_prepared(path).fingerprint == fingerprint_before


def test_tampered_prepared_file_is_detected(tmp_path):
    path = prepare_dataset(DataConfig(max_images=50), tmp_path)
    with np.load(path / "data.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["images"][3, 0, 5, 5] ^= 0xFF
    np.savez(path / "data.npz", **arrays)
    with pytest.raises(DataError, match=r"content of .* no longer matches its manifest"):
        load_prepared(path)
    assert load_prepared(path, verify=False).images[3, 0, 5, 5] == arrays["images"][3, 0, 5, 5]
    (path / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest\.json is missing"):
        load_prepared(path)


# ---------------------------------------------------------------------------- content split, versions

def test_split_defaults_to_the_sources_kind():
    assert DataConfig().split == "random" and DataConfig().model_dump()["split"] == "random"
    assert DataConfig.model_validate({"split": None}).split == "random"
    assert DataConfig(source="folder:x").split == "content"
    assert DataConfig(source="folder:x", split="random").split == "random"   # given: kept
    assert DataConfig(source="mnist").split == DataConfig(source="cifar10").split == "random"
    assert DataConfig(split="content").split == "content"
    folder = DataConfig(source="folder:x")
    assert DataConfig.model_validate(folder.model_dump()) == folder


def write_digit_pngs(folder: Path, indices) -> None:
    """scikit-learn's 8x8 digits `indices` as gray PNGs, digit-<i>.png."""
    from sklearn.datasets import load_digits

    images = np.rint(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        Image.fromarray(images[i], mode="L").save(folder / f"digit-{i:04d}.png")


def split_hashes(data) -> tuple[list[bytes], list[bytes]]:
    """(content hashes of the train images, of the holdout images)"""
    rows = [bytes(row) for row in data.content_hashes.numpy()]
    return ([rows[i] for i in data.train_indices.tolist()], [rows[i] for i in data.holdout_indices.tolist()])


def test_content_split_keeps_train_in_train_as_a_folder_grows(tmp_path):
    root, out = tmp_path / "imgs", tmp_path / "out"
    write_digit_pngs(root, range(150))
    config = DataConfig(source=f"folder:{root}", image_size=8, resize="none")
    assert config.split == "content"
    first = load_prepared(prepare_dataset(config, out))
    assert first.manifest["config"]["split"] == "content"
    assert first.content_hashes.dtype == torch.uint8 and first.content_hashes.shape == (150, 16)
    # the bucket is a pure function of the image: sha256(seed as 8 little-endian bytes + the image's bytes)
    for i in range(150):
        digest = hashlib.sha256((0).to_bytes(8, "little") + first.images[i].numpy().tobytes()).digest()
        in_holdout = int.from_bytes(digest[:8], "little") / 2**64 < 0.2
        assert in_holdout == (i in set(first.holdout_indices.tolist()))
        assert bytes(first.content_hashes[i].numpy()) == hashlib.sha256(first.images[i].numpy().tobytes()).digest()[:16]
    assert 0 < len(first.holdout_indices) < 150
    train1, holdout1 = split_hashes(first)

    write_digit_pngs(root, range(150, 180))   # 20% more images
    grown = load_prepared(prepare_dataset(config, out))
    assert grown.path != first.path and grown.manifest["count"] == 180
    train2, holdout2 = split_hashes(grown)
    assert set(train1) <= set(train2)                  # every train image is still in train
    assert set(holdout1) <= set(holdout2)              # the holdout keeps its images ...
    new = {bytes(row) for row in grown.content_hashes.numpy()} - set(train1) - set(holdout1)
    assert set(holdout2) - set(holdout1) <= new        # ... and only gains new ones
    assert not set(train1) & set(holdout2)

    v1, v2 = lineage_history(config, out)
    assert (v1["number"], v1["previous"], v1["added"], v1["removed"]) == (1, None, 150, 0)
    assert v1["fingerprint"] == first.fingerprint and v1["path"] == first.path.name
    assert v2 == dataset_version(grown) == dataset_version(grown.path)
    assert v2["number"] == 2 and v2["previous"] == first.fingerprint and v2["fingerprint"] == grown.fingerprint
    assert (v2["added"], v2["removed"], v2["moved_to_holdout"]) == (30, 0, 0)
    assert v2["counts"] == grown.manifest["splits"] and v2["prepared_at"].endswith("+00:00")

    assert prepare_dataset(config, out) == grown.path   # nothing changed: nothing recorded
    assert len(lineage_history(config, out)) == 2

    for i in range(10):                                 # 10 images removed
        (root / f"digit-{i:04d}.png").unlink()
    shrunk = load_prepared(prepare_dataset(config, out))
    v3 = dataset_version(shrunk)
    assert (v3["number"], v3["previous"]) == (3, grown.fingerprint)
    assert (v3["added"], v3["removed"], v3["moved_to_holdout"]) == (0, 10, 0)
    train3, _ = split_hashes(shrunk)
    assert set(train3) <= set(train2)
    # another config is another lineage, beside this one in out_dir/versions
    other = DataConfig(source=f"folder:{root}", image_size=8, resize="none", split_seed=1)
    assert dataset_version(prepare_dataset(other, out))["number"] == 1
    assert len(lineage_history(config, out)) == 3


def test_a_random_split_that_grows_reports_the_images_it_moved_to_the_holdout(tmp_path):
    root, out = tmp_path / "imgs", tmp_path / "out"
    write_digit_pngs(root, range(100))
    config = DataConfig(source=f"folder:{root}", image_size=8, resize="none", split="random")
    train1, _ = split_hashes(load_prepared(prepare_dataset(config, out)))
    write_digit_pngs(root, range(100, 120))
    grown = load_prepared(prepare_dataset(config, out))
    _, holdout2 = split_hashes(grown)
    moved = sum(1 for h in holdout2 if h in set(train1))
    version = dataset_version(grown)
    assert version["moved_to_holdout"] == moved > 0
    assert (version["added"], version["removed"]) == (20, 0)


def test_a_deleted_previous_folder_leaves_the_changes_unknown(tmp_path):
    import shutil

    root, out = tmp_path / "imgs", tmp_path / "out"
    write_digit_pngs(root, range(40))
    config = DataConfig(source=f"folder:{root}", image_size=8, resize="none", holdout_fraction=0.3)
    shutil.rmtree(prepare_dataset(config, out))
    write_digit_pngs(root, range(40, 48))
    version = dataset_version(prepare_dataset(config, out))
    assert version["number"] == 2 and version["previous"] is not None
    assert (version["added"], version["removed"], version["moved_to_holdout"]) == (None, None, None)


def test_content_split_with_an_empty_side_is_refused(tmp_path):
    root = tmp_path / "imgs"
    write_digit_pngs(root, range(3))
    config = DataConfig(source=f"folder:{root}", image_size=8, resize="none", holdout_fraction=0.01)
    with pytest.raises(DataError, match=r"split='content' put all 3 images of .* in the train split") as error:
        prepare_dataset(config, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert no_output(tmp_path / "out")


def test_a_folder_prepared_before_content_hashes_loads_and_keeps_its_split(tmp_path):
    """Before versions: a folder source split "random" by default, and no content_hashes array."""
    import shutil

    root, out = tmp_path / "imgs", tmp_path / "out"
    write_digit_pngs(root, range(30))
    config = DataConfig(source=f"folder:{root}", image_size=8, resize="none", split="random")
    path = prepare_dataset(config, out)
    with np.load(path / "data.npz") as npz:
        arrays = {k: npz[k] for k in npz.files if k != "content_hashes"}
    np.savez(path / "data.npz", **arrays)
    shutil.rmtree(out / "versions")
    old = load_prepared(path)
    assert old.content_hashes is None and old.manifest["config"]["split"] == "random"
    assert dataset_version(old) is None   # no history lists it yet
    # prepared again, the folder is found as it is and recorded as its lineage's first version
    assert prepare_dataset(config, out) == path
    assert load_prepared(path).content_hashes is None
    version = dataset_version(path)
    assert (version["number"], version["added"], version["previous"]) == (1, 30, None)
    write_digit_pngs(root, range(30, 36))
    grown = dataset_version(prepare_dataset(config, out))
    assert (grown["number"], grown["previous"], grown["added"], grown["removed"]) == (2, old.fingerprint, 6, 0)


# ---------------------------------------------------------------------------- loader

@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_loader_range_shape_and_epoch_coverage(images):
    loader = BatchLoader(images, batch_size=16, seed=1)
    assert loader.steps_per_epoch == 6
    batch = loader.batch(0)
    assert batch.dtype == torch.float32 and batch.shape == (16, 3, 8, 8)
    assert batch.min() >= -1 and batch.max() <= 1
    # the values are exactly 2 * pixel / 255 - 1 of the selected images
    assert torch.allclose(batch, images[loader.indices(0)].float() * 2 / 255 - 1, atol=1e-6)
    seen = torch.cat([loader.indices(k) for k in range(6)])
    assert len(set(seen.tolist())) == 96   # no repeats within an epoch
    assert not torch.equal(loader.indices(0), loader.indices(6))   # a new permutation next epoch
    extremes = BatchLoader(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1), 2).batch(0)
    assert sorted(extremes.flatten().tolist()) == [-1.0, 1.0]


def test_loader_flip_flips_about_half(images):
    plain = BatchLoader(images, 64, seed=5)
    flipped = BatchLoader(images, 64, seed=5, hflip=True)
    a, b = plain.batch(2), flipped.batch(2)
    same = (a == b).flatten(1).all(1)
    mirrored = (a.flip(-1) == b).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 16 < int(mirrored.sum()) < 48   # random images are never symmetric
    assert not torch.equal(flipped.batch(2), flipped.batch(3))


def test_loader_resume_is_exact(images):
    first = BatchLoader(images, 16, seed=7, hflip=True)
    run = [first.batch(k) for k in range(15)]
    resumed = BatchLoader(images, 16, seed=7, hflip=True)   # a fresh process resuming at step 9
    for k in range(9, 15):
        assert torch.equal(resumed.batch(k), run[k])
    assert not torch.equal(BatchLoader(images, 16, seed=8, hflip=True).batch(9), run[9])


def test_loader_rank_slices_partition_the_global_batch(images):
    single = BatchLoader(images, 24, seed=3, hflip=True)
    ranks = [BatchLoader(images, 8, seed=3, hflip=True, rank=r, world_size=3) for r in range(3)]
    assert ranks[0].steps_per_epoch == single.steps_per_epoch == 4
    for step in (0, 5):
        parts = [loader.indices(step) for loader in ranks]
        assert all(len(set(p.tolist()) & set(q.tolist())) == 0 for i, p in enumerate(parts) for q in parts[i + 1:])
        assert torch.equal(torch.cat(parts), single.indices(step))
        assert torch.equal(torch.cat([loader.batch(step) for loader in ranks]), single.batch(step))


def test_loader_rejects_too_few_images(images):
    with pytest.raises(ValueError, match="cannot fill one global batch of 128"):
        BatchLoader(images, 64, world_size=2)
    assert BatchLoader(images, 64, drop_last=False).steps_per_epoch == 2


# ---------------------------------------------------------------------------- prefect task, mlflow

@pytest.mark.slow
def test_prepare_task_caches_across_runs(tmp_path, prefect_harness):
    from prefect import flow

    from tasks.data import prepare_data

    task = prepare_data.with_options(result_storage=tmp_path / "results")
    root = tmp_path / "imgs"
    for i in range(4):
        write_png(root / f"{i}.png", (12, 12), (i * 60, 0, 0))
    config = DataConfig(source=f"folder:{root}", image_size=8)

    @flow
    def run(config: DataConfig):
        return task(config, str(tmp_path / "out"), return_state=True)

    def prepare(config):
        state = run(config)
        return state.name, Path(state.result())

    name1, path1 = prepare(config)
    stamp = (path1 / "data.npz").stat().st_mtime_ns
    name2, path2 = prepare(config)
    assert (name1, name2) == ("Completed", "Cached") and path2 == path1
    assert (path1 / "data.npz").stat().st_mtime_ns == stamp   # no work done

    name3, path3 = prepare(config.model_copy(update={"split_seed": 1}))   # changed config
    assert name3 == "Completed" and path3 != path1

    write_png(root / "2.png", (12, 12), (0, 0, 255))   # changed source file
    os.utime(root / "2.png", ns=(stamp + 10**9, stamp + 10**9))
    name4, path4 = prepare(config)
    assert name4 == "Completed" and path4 != path1
    assert load_prepared(path4).fingerprint != load_prepared(path1).fingerprint

    import shutil
    shutil.rmtree(path4)   # output deleted: re-prepare instead of returning a dangling path
    name5, path5 = prepare(config)
    assert name5 == "Completed" and path5 == path4 and load_prepared(path5)
    assert prepare(config)[0] == "Cached"


def test_log_dataset_input_records_the_fingerprint_and_leaves_the_run_running(tmp_path, mlflow_store):
    import mlflow

    from tasks import contract, tracking

    from tasks.data import log_dataset_input

    mlflow.set_tracking_uri(mlflow_store)
    data = load_prepared(prepare_dataset(DataConfig(max_images=40), tmp_path / "out"))
    experiment = mlflow.create_experiment("data-test", artifact_location=(tmp_path / "art").as_uri())
    run = tracking.client().create_run(experiment)
    log_dataset_input(run.info.run_id, data)
    logged = mlflow.get_run(run.info.run_id)
    assert logged.info.status == "RUNNING"   # a run still training must not read FINISHED
    (inp,) = logged.inputs.dataset_inputs
    assert inp.dataset.digest == data.fingerprint[:32]
    assert inp.dataset.name == "digits-16x16x1"
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    assert logged.data.tags["dataset.fingerprint"] == data.fingerprint
    assert json.loads(inp.dataset.profile)["features_shape"] == [32, 1, 16, 16]
    version_tags = {contract.DATASET_VERSION_TAG: "1", contract.DATASET_PREVIOUS_FINGERPRINT_TAG: "none",
                    contract.DATASET_ADDED_TAG: "40", contract.DATASET_REMOVED_TAG: "0",
                    contract.DATASET_MOVED_TO_HOLDOUT_TAG: "0"}
    assert {k: logged.data.tags[k] for k in version_tags} == version_tags
    input_tags = {t.key: t.value for t in inp.tags}
    assert {k: input_tags[k.removeprefix("dataset.")] for k in version_tags} == version_tags

    # the second version of a folder that grew: its number, the one before it, what changed
    root = tmp_path / "imgs"
    write_digit_pngs(root, range(20))
    config = DataConfig(source=f"folder:{root}", image_size=8, resize="none")
    first = load_prepared(prepare_dataset(config, tmp_path / "out"))
    write_digit_pngs(root, range(20, 25))
    grown = load_prepared(prepare_dataset(config, tmp_path / "out"))
    run = tracking.client().create_run(experiment)
    log_dataset_input(run.info.run_id, grown)
    logged = mlflow.get_run(run.info.run_id)
    assert {k: logged.data.tags[k] for k in version_tags} == {
        contract.DATASET_VERSION_TAG: "2", contract.DATASET_PREVIOUS_FINGERPRINT_TAG: first.fingerprint,
        contract.DATASET_ADDED_TAG: "5", contract.DATASET_REMOVED_TAG: "0", contract.DATASET_MOVED_TO_HOLDOUT_TAG: "0"}
    (inp,) = logged.inputs.dataset_inputs
    assert {t.key: t.value for t in inp.tags}["version"] == "2"


def test_cifar10_fetches_from_its_mirror_when_the_folder_is_empty(tmp_path, monkeypatch):
    """The mirror list was lost in a refactor (a NameError instead of a download); the network is
    what cannot exist here, so the download itself is replaced."""
    from ddpm.data.sources import cifar10

    asked = {}

    def no_network(name, folder, mirrors, md5):
        asked.update(name=name, mirrors=mirrors)
        raise cifar10.DataError("offline")

    monkeypatch.setattr(cifar10, "download", no_network)
    with pytest.raises(cifar10.DataError, match="offline"):
        cifar10._cifar_location(tmp_path, None, None)
    assert asked == {"name": "cifar-10-python.tar.gz", "mirrors": ("https://www.cs.toronto.edu/~kriz/",)}
