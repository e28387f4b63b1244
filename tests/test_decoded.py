"""Decode once: the on-disk image cache, its reuse, its repair, and the batch path that reads it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import random_image, write_class_folder
from masktune_core import JobCancelled, run_masktune
from masktune_core.data import augment, decode_dataset, index_dataset, normalize, to_float
from masktune_core.decoded import DecodedImages, bad_chunks, decode_once, entry_dir
from masktune_core.masking import apply_masks, pack_masks
from masktune_core.models import create_model
from masktune_core.rowfile import RowFile
from masktune_core.training import LoopSettings, epoch_generator, make_optimizer, train_one_epoch
from test_pipeline import Recorder, fast_config

ROOT = Path(__file__).resolve().parent.parent


def photo_folder(root: Path, per_class: int, size=(40, 30)) -> dict[str, Path]:
    """name -> path of random RGB images in two classes."""
    files = {}
    for c in ("a", "b"):
        for i in range(per_class):
            path = random_image(root / "train" / c / f"{c}{i:04d}.png", size=size, seed=i + (1000 if c == "b" else 0))
            files[path.relative_to(root).as_posix()] = path
    return files


def prepare_events(recorder: Recorder) -> list:
    return [e for e in recorder.events if e.stage == "prepare" and "decoded_images" in e.data]


def test_second_run_decodes_nothing_and_reproduces_the_metrics(tiny_digits, tmp_path):
    cache = tmp_path / "cache"
    first, second = Recorder(), Recorder()
    metrics = run_masktune(tiny_digits, tmp_path / "one", fast_config(), device="cpu", cache_dir=cache, on_event=first)
    again = run_masktune(tiny_digits, tmp_path / "two", fast_config(), device="cpu", cache_dir=cache, on_event=second)
    assert prepare_events(first)[-1].data["decoded_images"] == 480
    assert prepare_events(second)[-1].data["decoded_images"] == 0
    assert again == metrics  # bit-identical on the CPU
    # The work area holds checkpoints, masks and the index, never the images.
    work = {p.name for p in (tmp_path / "two" / "work").rglob("*") if p.is_file()}
    assert work == {"state.json", "index.json", "best.pt", "last.pt", "saliency_1.pt", "masks_1.npy", "finetune_1.pt", "metrics.json"}


def test_cancel_in_the_middle_of_prepare_resumes_from_the_decoded_chunks(tiny_digits, tmp_path, monkeypatch):
    monkeypatch.setattr("masktune_core.decoded._MAX_CHUNK_ROWS", 16)  # 30 chunks for 480 images
    cache = tmp_path / "cache"
    reference = run_masktune(tiny_digits, tmp_path / "reference", fast_config(), device="cpu", cache_dir=tmp_path / "other")
    polls = {"n": 0}

    def cancel_after_some_chunks() -> bool:
        polls["n"] += 1
        return polls["n"] > 5

    with pytest.raises(JobCancelled):
        run_masktune(tiny_digits, tmp_path / "out", fast_config(), device="cpu", cache_dir=cache,
                     should_cancel=cancel_after_some_chunks)
    recorder = Recorder()
    resumed = run_masktune(tiny_digits, tmp_path / "out", fast_config(), device="cpu", cache_dir=cache, on_event=recorder)
    decoded_again = prepare_events(recorder)[-1].data["decoded_images"]
    assert 0 < decoded_again < 480
    assert resumed == reference


KILL_SCRIPT = """
import sys
from pathlib import Path
import time
import masktune_core.decoded as d
d._MAX_CHUNK_ROWS, d._PROGRESS_EVERY_S = 2, 0.0
decode_chunk = d._decode_chunk
d._decode_chunk = lambda *args: (time.sleep(0.05), decode_chunk(*args))[1]  # slow enough to be killed half-way
files = {p.relative_to(sys.argv[1]).as_posix(): p for p in sorted(Path(sys.argv[1]).rglob("*.png"))}
d.decode_once(files, Path(sys.argv[2]), 64, workers=1)
"""


def test_a_build_killed_with_sigkill_resumes_and_matches_a_clean_build(tmp_path, monkeypatch):
    monkeypatch.setattr("masktune_core.decoded._MAX_CHUNK_ROWS", 2)  # as in the killed build
    files = photo_folder(tmp_path / "data", 60)
    folder = tmp_path / "cache" / "entry"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "data"), str(folder)], cwd=ROOT)
    progress = folder / "progress.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if len(json.loads(progress.read_text())["done"]) >= 5:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (folder / "meta.json").exists()  # killed half-way: not an entry yet
    done_before = len(json.loads(progress.read_text())["done"])
    assert 5 <= done_before < 60

    entry, decoded = decode_once(files, folder, 64, workers=1)
    assert decoded == 120 - 2 * done_before
    clean, _ = decode_once(files, tmp_path / "clean" / "entry", 64, workers=2)
    assert np.array_equal(entry.read(range(120)), clean.read(range(120)))
    assert json.loads((folder / "meta.json").read_text())["chunk_sha256"] == \
        json.loads((tmp_path / "clean" / "entry" / "meta.json").read_text())["chunk_sha256"]


def test_corrupted_chunk_is_found_by_its_checksum_and_decoded_again(tmp_path, monkeypatch):
    monkeypatch.setattr("masktune_core.decoded._MAX_CHUNK_ROWS", 8)
    files = photo_folder(tmp_path / "data", 20)
    folder = tmp_path / "entry"
    entry, decoded = decode_once(files, folder, 32, workers=2)
    assert decoded == 40
    good = entry.read(range(40))
    with open(folder / "images.npy", "r+b") as fh:  # flip bytes inside row 17 (chunk 2)
        fh.seek(RowFile(folder / "images.npy").offset + 17 * 32 * 32 * 3 + 100)
        fh.write(b"\xff\x00\xff\x00")
    assert bad_chunks(folder) == [2]
    repaired, decoded = decode_once(files, folder, 32, workers=2)
    assert decoded == 8  # that chunk only
    assert np.array_equal(repaired.read(range(40)), good)
    assert bad_chunks(folder) == []


def test_half_written_or_truncated_entries_are_rebuilt(tmp_path):
    files = photo_folder(tmp_path / "data", 6)
    folder = tmp_path / "entry"
    entry, _ = decode_once(files, folder, 16, workers=1)
    good = entry.read(range(12))
    entry.file.close()
    with open(folder / "images.npy", "r+b") as fh:
        fh.truncate(os.path.getsize(folder / "images.npy") - 100)
    again, decoded = decode_once(files, folder, 16, workers=1)
    assert decoded == 12 and np.array_equal(again.read(range(12)), good)
    (folder / "meta.json").unlink()  # a copy that stopped before its last file
    (folder / "rows.json").write_text("{")
    again, decoded = decode_once(files, folder, 16, workers=1)
    assert decoded == 12 and np.array_equal(again.read(range(12)), good)


def test_unreadable_images_are_reported_by_the_decode_pass(tmp_path):
    write_class_folder(tmp_path / "train", {"a": 3, "b": 3})
    write_class_folder(tmp_path / "val", {"a": 1, "b": 1})
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    index = index_dataset(tmp_path)
    decoded = decode_dataset(index, 8, entry_dir(tmp_path / "cache", "x" * 64, 8))
    assert "train/a/broken.png" not in decoded.splits["train"].names
    assert [d["file"] for d in index.skipped] == ["train/a/broken.png"]
    # Reused, the entry still knows which file failed and why.
    again_index = index_dataset(tmp_path)
    again = decode_dataset(again_index, 8, entry_dir(tmp_path / "cache", "x" * 64, 8))
    assert again.decoded_count == 0 and [d["file"] for d in again_index.skipped] == ["train/a/broken.png"]


def test_batches_from_disk_train_exactly_as_in_memory_tensors(tiny_digits, tmp_path):
    """The disk path (rows read ahead by a thread, packed masks applied per batch) against the
    in-memory path it replaced: the same epoch gives the same weights, bit for bit."""
    train = decode_dataset(index_dataset(tiny_digits), 28, tmp_path / "cache").splits["train"]
    masks = torch.zeros(len(train), 28, 28, dtype=torch.bool)
    masks[::3, 5:12, 7:20] = True
    with RowFile.create(tmp_path / "masks.npy", (len(train), (28 * 28 + 7) // 8), np.uint8) as out:
        out.write(0, pack_masks(masks))
    loop = LoopSettings(device=torch.device("cpu"), augmentation="flip_crop", normalization="imagenet")

    torch.manual_seed(0)
    on_disk = create_model("small_cnn", 2)
    in_memory = create_model("small_cnn", 2)
    in_memory.load_state_dict(on_disk.state_dict())
    config = fast_config().erm
    with RowFile(tmp_path / "masks.npy") as stored:
        train_one_epoch(on_disk, make_optimizer(on_disk, config), train, 32, epoch_generator(0, "finetune", 1), loop, stored)

    images, labels = apply_masks(train.pixels(), masks), train.labels
    optimizer, generator = make_optimizer(in_memory, config), epoch_generator(0, "finetune", 1)
    in_memory.train()
    for idx in torch.randperm(len(labels), generator=generator).split(32):
        x = normalize(augment(to_float(images[idx]), "flip_crop", generator), "imagenet")
        loss = F.cross_entropy(in_memory(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for (name, a), b in zip(on_disk.state_dict().items(), in_memory.state_dict().values()):
        assert torch.equal(a, b), name


def test_entry_is_a_plain_npy_that_numpy_opens(tmp_path):
    files = photo_folder(tmp_path / "data", 3)
    entry, _ = decode_once(files, tmp_path / "entry", 24, workers=1)
    array = np.load(tmp_path / "entry" / "images.npy", mmap_mode="r")
    assert array.shape == (6, 24, 24, 3) and array.dtype == np.uint8
    assert np.array_equal(np.asarray(array[[4, 1]]), entry.read([4, 1]))
    assert DecodedImages(tmp_path / "entry").names == sorted(files)
