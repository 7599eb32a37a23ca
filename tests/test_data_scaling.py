"""Data at scale: incremental preparation of a growing folder, a re-stamped folder is the same
version, parallel decoding, memory-mapped loads verified once per file version, the train split read
in place, the classifier trained from uint8 batches, searches without a cap."""
from __future__ import annotations

import filecmp
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import BatchLoader, DataConfig, DataError, lineage_history, load_prepared, prepare_dataset
from ddpm.data import prepare as prepare_module
from ddpm.data.sources import folder as folder_module

PREPARED_FILES = ("data.npz", "manifest.json", "files.npz")


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target


def write_class_pngs(root: Path, indices, size: int = 12) -> None:
    """Digits `indices` as gray PNGs upscaled to size x size (so that fitting resamples), in class folders."""
    images, labels = digits_uint8()
    for i in indices:
        folder = root / f"class-{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").resize((size, size), Image.NEAREST).save(folder / f"d{i:04d}.png")


def identical_folders(a: Path, b: Path) -> bool:
    return all(filecmp.cmp(a / name, b / name, shallow=False) for name in PREPARED_FILES)


class DecodeCounter:
    """Counts the image files the folder source decodes (the real decoder does the work)."""

    def __init__(self, monkeypatch):
        self.names: list[str] = []
        real = folder_module._decode

        def counting(path, channels, data=None):
            self.names.append(Path(path).name)
            return real(path, channels, data)

        monkeypatch.setattr(folder_module, "_decode", counting)

    def take(self) -> list[str]:
        names, self.names = sorted(self.names), []
        return names


# ---------------------------------------------------------------------------- incremental preparation

def test_a_grown_folder_decodes_only_what_changed_and_equals_a_preparation_from_nothing(tmp_path, monkeypatch):
    root, out = tmp_path / "imgs", tmp_path / "out"
    write_class_pngs(root, range(120))
    config = DataConfig(source=f"folder:{root}", image_size=8)
    decoded = DecodeCounter(monkeypatch)
    first = prepare_dataset(config, out)
    assert len(decoded.take()) == 120 and (first / "files.npz").is_file()

    write_class_pngs(root, range(120, 130))                              # 10 new images
    (root / "class-0" / "d0000.png").unlink()                            # one removed
    shutil.copy(root / "class-1" / "d0001.png", root / "class-2" / "again.png")   # a copy of a known image
    changed = root / "class-3" / "d0003.png"                             # one edited (new pixels, new stat)
    edited = np.array(Image.open(changed))
    edited[0, 0] ^= 0xFF
    Image.fromarray(edited).save(changed)
    (root / "class-4" / "broken.png").write_bytes(b"not an image")      # one unusable
    os.utime(root / "class-5" / "d0005.png", ns=(1, 1))                   # one re-stamped, same bytes
    with pytest.warns(UserWarning, match="skipped 1 of"):
        grown = prepare_dataset(config, out)
    # decoded: the 10 new, the edited one and the broken one; the copy, the re-stamped one and the
    # 107 unchanged were reused from the first version
    assert decoded.take() == sorted([f"d{i:04d}.png" for i in range(120, 130)] + ["d0003.png", "broken.png"])
    assert grown != first

    with pytest.warns(UserWarning, match="skipped 1 of"):
        scratch = prepare_dataset(config, tmp_path / "scratch")
    assert len(decoded.take()) == 131
    assert identical_folders(grown, scratch)   # byte for byte: images, labels, split, hashes, manifest, index
    data = load_prepared(grown)
    assert data.manifest["count"] == 130 and data.manifest["skipped_files"][0]["file"] == "class-4/broken.png"
    version = lineage_history(config, out)[-1]
    # added: the 10 new, the copy, the edited pixels; removed: the deleted image, the pixels before the edit
    assert (version["number"], version["added"], version["removed"]) == (2, 12, 2)


def test_a_restamped_folder_is_the_same_version_with_no_new_copy(tmp_path, monkeypatch):
    root, out = tmp_path / "imgs", tmp_path / "out"
    write_class_pngs(root, range(60))
    config = DataConfig(source=f"folder:{root}", image_size=8)
    first = prepare_dataset(config, out)
    fingerprint = load_prepared(first).fingerprint
    # a copy without -p: every mtime is new, every byte the same
    shutil.copytree(root, tmp_path / "copy", copy_function=shutil.copy)
    shutil.rmtree(root)
    os.rename(tmp_path / "copy", root)
    decoded = DecodeCounter(monkeypatch)
    assert prepare_dataset(config, out) == first
    assert decoded.take() == []                                   # hashed, not decoded
    assert sorted(p.name for p in out.iterdir()) == sorted([first.name, "versions"])   # no new copy
    assert [v["fingerprint"] for v in lineage_history(config, out)] == [fingerprint]   # no new version
    from ddpm.data import prepared_path
    assert prepared_path(config, out) == first                    # the alias: the cached task finds it
    stamp = (first / "data.npz").stat().st_mtime_ns
    assert prepare_dataset(config, out) == first and (first / "data.npz").stat().st_mtime_ns == stamp
    assert load_prepared(first).fingerprint == fingerprint        # to the last digit


def test_verify_content_sees_a_replaced_file_that_kept_its_stat(tmp_path, monkeypatch):
    """The stat blind spot does not carry over into reuse when DDPM_VERIFY_CONTENT=1."""
    root, out = tmp_path / "imgs", tmp_path / "out"
    write_class_pngs(root, range(40))
    monkeypatch.setenv("DDPM_VERIFY_CONTENT", "1")
    config = DataConfig(source=f"folder:{root}", image_size=8)
    first = prepare_dataset(config, out)
    target = root / "class-0" / "d0000.png"
    stat = target.stat()
    for image in digits_uint8()[0][40:]:   # another digit whose PNG has the same number of bytes
        encoded = io.BytesIO()
        Image.fromarray(image, mode="L").resize((12, 12), Image.NEAREST).save(encoded, format="PNG")
        if len(encoded.getvalue()) == stat.st_size and encoded.getvalue() != target.read_bytes():
            break
    else:
        pytest.fail("no other digit's PNG has the same size")
    target.write_bytes(encoded.getvalue())
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    decoded = DecodeCounter(monkeypatch)
    second = prepare_dataset(config, out)
    assert second != first and decoded.take() == ["d0000.png"]
    assert identical_folders(second, prepare_dataset(config, tmp_path / "scratch"))


def test_parallel_decoding_equals_one_process(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    write_class_pngs(root, range(80), size=20)
    (root / "class-1" / "broken.png").write_bytes(b"not an image")
    config = DataConfig(source=f"folder:{root}", image_size=8)
    with pytest.warns(UserWarning):
        serial = folder_module.read_folder(root, config, workers=1)
    monkeypatch.setattr(folder_module, "PARALLEL_MIN_FILES", 1)
    monkeypatch.setattr(folder_module, "CHUNK_FILES", 7)
    with pytest.warns(UserWarning):
        parallel = folder_module.read_folder(root, config, workers=2)
    assert np.array_equal(serial.images, parallel.images) and np.array_equal(serial.labels, parallel.labels)
    assert serial.skipped == parallel.skipped and serial.skipped[0]["file"] == "class-1/broken.png"
    with pytest.raises(Exception) as opened:   # the reason names the file as PIL does when opening it by path
        Image.open(root / "class-1" / "broken.png")
    assert serial.skipped[0]["reason"] == f"cannot be read: {opened.value}"
    for key in folder_module.FILE_INDEX_KEYS:
        assert np.array_equal(serial.file_index[key], parallel.file_index[key])
    # and both equal fitting one image at a time, as the preparation always did
    from ddpm.data.images import fit_images
    one_by_one = [fit_images(folder_module._decode(p, 1)[None], 8, 1, "center_crop")[0]
                  for p in folder_module.list_folder_images(root)[0] if p.name != "broken.png"]
    assert np.array_equal(np.stack(one_by_one), serial.images)


def test_a_folder_is_fitted_a_run_at_a_time_to_the_same_bytes(tmp_path, monkeypatch):
    """Decoded images are fitted as they arrive, at most FIT_RUN_BYTES of them at once (a folder of
    large photos never holds every decode in memory), with a mix of shapes and a broken file: the
    bytes and file index of runs as large as the folder (reuse from a previous version: the grown
    folder test above)."""
    root = tmp_path / "imgs"
    write_class_pngs(root, range(0, 40), size=20)
    write_class_pngs(root, range(40, 60), size=24)   # a second shape: a run ends where the shape changes
    (root / "class-1" / "broken.png").write_bytes(b"not an image")
    config = DataConfig(source=f"folder:{root}", image_size=8)
    with pytest.warns(UserWarning):
        whole = folder_module.read_folder(root, config, workers=1)
    runs: list[int] = []
    real = folder_module._fit_into

    def recording(out, decoded, config):
        runs.append(len(decoded))
        return real(out, decoded, config)

    monkeypatch.setattr(folder_module, "_fit_into", recording)
    monkeypatch.setattr(folder_module, "FIT_RUN_BYTES", 3 * 20 * 20)   # three 20x20 gray decodes
    with pytest.warns(UserWarning):
        streamed = folder_module.read_folder(root, config, workers=1)
    assert max(runs) == 3 and sum(runs) == len(whole.images) == 60
    assert np.array_equal(whole.images, streamed.images) and np.array_equal(whole.labels, streamed.labels)
    for key in folder_module.FILE_INDEX_KEYS:
        assert np.array_equal(whole.file_index[key], streamed.file_index[key])


def test_a_bad_worker_count_is_one_line(monkeypatch):
    monkeypatch.setenv("DDPM_PREPARE_WORKERS", "many")
    with pytest.raises(DataError, match=r"^DDPM_PREPARE_WORKERS='many' is not a whole number of processes$"):
        folder_module.decode_workers()


# ---------------------------------------------------------------------------- loads: one mapping, verified once

def test_loads_share_one_mapping_and_hash_once_per_file_version(tmp_path, monkeypatch):
    path = prepare_dataset(DataConfig(max_images=300), tmp_path)
    hashed = []
    real = prepare_module.fingerprint
    monkeypatch.setattr(prepare_module, "fingerprint", lambda *a: hashed.append(1) or real(*a))
    prepare_module._VERIFIED.clear()
    first = load_prepared(path)          # the stamp written at preparation: no hashing
    second = load_prepared(path)
    assert hashed == [] and first.images.data_ptr() == second.images.data_ptr()   # one mapping
    assert (path / ".verified.json").is_file()
    # another process (no memory of it): the stamp says this file version was checked
    prepare_module._VERIFIED.clear()
    load_prepared(path)
    assert hashed == []
    # a rewrite of the same bytes is a new file version: checked again, once
    data = (path / "data.npz").read_bytes()
    (path / "data.npz").unlink()
    (path / "data.npz").write_bytes(data)
    third = load_prepared(path)
    load_prepared(path)
    assert hashed == [1] and torch.equal(third.images, first.images)
    # a stamp that does not match (copied from elsewhere, edited) is no pass
    prepare_module._VERIFIED.clear()
    (path / ".verified.json").write_text('{"data": [0, 0, 0, 0], "fingerprint": "x"}')
    load_prepared(path)
    assert hashed == [1, 1]


def mapping_flags(address: int) -> set[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps): 'rr' is
    madvise(MADV_RANDOM), 'sr' MADV_SEQUENTIAL."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only (/proc/self/smaps)")
def test_images_beyond_memory_are_read_at_random_and_others_with_readahead(tmp_path, monkeypatch):
    """A dataset larger than half the memory left is mapped for random access once verified (the
    kernel's readahead would read ~10x what a batch needs and evict the next one's: an epoch 16x
    slower in benchmarks/beyond_memory.py); a smaller one keeps readahead, also when the same file
    was mapped for random access before."""
    small = load_prepared(prepare_dataset(DataConfig(max_images=300), tmp_path / "small"))
    assert "rr" not in mapping_flags(small.images.data_ptr())
    monkeypatch.setattr(prepare_module, "memory_available", lambda: 1000)   # a tiny memory budget
    big_path = prepare_dataset(DataConfig(max_images=400), tmp_path / "big")
    (big_path / ".verified.json").unlink()   # verified at this load: sequential, then random
    prepare_module._VERIFIED.clear()
    big = load_prepared(big_path)
    assert "rr" in mapping_flags(big.images.data_ptr())
    monkeypatch.undo()   # memory to spare again: the same mapping back to readahead
    assert "rr" not in mapping_flags(load_prepared(big_path).images.data_ptr())


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="Linux only (/proc/meminfo)")
def test_memory_available_is_at_most_the_system_s():
    available = prepare_module.memory_available()
    system = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemAvailable:"))
    assert 0 < available <= system * 1.05


def test_mapped_images_are_private_to_the_process(tmp_path):
    path = prepare_dataset(DataConfig(max_images=50), tmp_path)
    data = load_prepared(path)
    before = (path / "data.npz").read_bytes()
    data.images[0].fill_(7)                # copy on write: the file never changes
    assert (path / "data.npz").read_bytes() == before


# ---------------------------------------------------------------------------- the train split in place

@pytest.mark.parametrize("world_size, hflip", [(1, True), (2, False)])
def test_a_loader_over_the_split_rows_gives_the_batches_of_a_copy_of_the_split(world_size, hflip):
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (90, 1, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (90,), generator=generator)
    rows = torch.sort(torch.randperm(90, generator=generator)[:70]).values
    for rank in range(world_size):
        copy = BatchLoader(images[rows], 8, seed=5, hflip=hflip, rank=rank, world_size=world_size, labels=labels[rows])
        in_place = BatchLoader(images, 8, seed=5, hflip=hflip, rank=rank, world_size=world_size, labels=labels,
                               index=rows)
        assert len(copy) == len(in_place)
        for step in (0, 1, 3, 4, 5, 17):   # several epochs
            x, y = copy.labelled_batch(step)
            x2, y2 = in_place.labelled_batch(step)
            assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="index must be 1-D rows"):
        BatchLoader(images, 8, index=torch.tensor([0, 90]))


def test_dataset_trainer_reads_the_train_split_in_place(tmp_path):
    from ddpm.diffusion import DiffusionConfig
    from ddpm.training import TrainConfig, dataset_trainer
    from ddpm.unet import preset

    path = prepare_dataset(DataConfig(max_images=200), tmp_path)
    data = load_prepared(path)
    trainer = dataset_trainer(path, preset("tiny-16"), DiffusionConfig(), TrainConfig(batch_size=16, steps=2, seed=4),
                              None)
    loader = trainer.batch_fn.__self__
    assert loader.images.data_ptr() == data.images.data_ptr()    # the mapping itself, no copy of the split
    train_images, _ = data.split("train")
    copy = BatchLoader(train_images, 16, seed=4, hflip=TrainConfig().hflip)
    assert all(torch.equal(trainer.batch_fn(k), copy.batch(k)) for k in range(0, 40, 7))


# ---------------------------------------------------------------------------- the classifier from uint8 batches

def test_the_classifier_trains_from_uint8_batches_to_the_same_weights():
    """The same weights as the float32 copy of the split gave (the code before), to the bit."""
    import torch.nn.functional as F

    from ddpm.metrics.classifier import DigitClassifier, _random_shift, to_unit_range, train_classifier

    images, labels = digits_uint8()
    x = torch.from_numpy(images[:400, None].copy())
    y = torch.from_numpy(labels[:400]).long()
    model, _ = train_classifier(x, y, x[:50], y[:50], 10, seed=2, epochs=1, min_steps=12, batch_size=64)

    with torch.random.fork_rng(devices=[]):   # the loop as it was, over a float copy
        torch.manual_seed(2)
        reference = DigitClassifier(1, 8, 10)
    generator = torch.Generator().manual_seed(2)
    steps_per_epoch, epochs = 400 // 64, 2
    optimizer = torch.optim.AdamW(reference.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    x_all = to_unit_range(x)
    reference.train()
    for _ in range(epochs):
        order = torch.randperm(400, generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * 64:(step + 1) * 64]
            loss = F.cross_entropy(reference(_random_shift(x_all[idx], generator)), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_the_classifier_reads_the_train_split_in_place_to_the_same_weights():
    """train_rows over all images: the weights a copy of those rows gives, to the bit (evaluation
    trains the dataset's classifier on the mapped images, never on a copy of the split)."""
    from ddpm.metrics.classifier import train_classifier

    images, labels = digits_uint8()
    x = torch.from_numpy(images[:500, None].copy())
    y = torch.from_numpy(labels[:500]).long()
    rows = torch.arange(3, 500, 3)   # every third image, as a split's sorted rows are
    in_place, accuracy = train_classifier(x, y, x[:50], y[:50], 10, seed=5, epochs=1, min_steps=8, batch_size=32,
                                          train_rows=rows)
    copied, copied_accuracy = train_classifier(x[rows], y[rows], x[:50], y[:50], 10, seed=5, epochs=1, min_steps=8,
                                               batch_size=32)
    assert accuracy == copied_accuracy
    for key, value in copied.state_dict().items():
        assert torch.equal(value, in_place.state_dict()[key]), key


# ---------------------------------------------------------------------------- searches without a cap

def test_runs_with_fid_reads_every_page(mlflow_store):
    from mlflow.tracking import MlflowClient

    from tasks import contract
    from tasks.registry import runs_with_fid

    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("paged")
    ids = []
    for i in range(7):
        run = client.create_run(experiment, tags={contract.FID_METRIC_TAG: "fid_classifier"})
        client.log_metric(run.info.run_id, "fid_classifier", 10.0 + i)
        client.set_terminated(run.info.run_id, end_time=1_000_000 + i)
        ids.append(run.info.run_id)
    no_fid = client.create_run(experiment)
    client.set_terminated(no_fid.info.run_id)
    assert [r.info.run_id for r in runs_with_fid(["paged"], page_size=2)] == ids[::-1]
    assert [r.info.run_id for r in runs_with_fid(["paged"], page_size=2)] == \
           [r.info.run_id for r in runs_with_fid(["paged"])]
