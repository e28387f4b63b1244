"""The method learns: ERM beats chance, and MaskTune's masks undo a shortcut.

A run can finish every stage, write every artifact and still have learnt nothing (an optimizer
that never steps, masks that cover nothing); the other tests would not notice. These runs do,
on a tiny purpose-made dataset, in seconds on a CPU:

* class 0 is a faint ring, class 1 a faint plus, both in noise (the task: learnable, but slowly);
* with the shortcut, a 4x4 red square sits on every class-0 training and validation image (and
  on no class-1 one), so ERM classifies by the square; the test split has class-0 images with and
  without it, and class-1 images without it.

ERM stops at "square or not", so it calls every plain ring a plus (worst group 0_no_square).
The square is what xGradCAM finds, so the masks cover it, and the finetune epoch on masked
images must learn the ring. A class-1 image with the square is left out of the test split:
training never shows one, and a single finetune epoch has nothing to unlearn the square with.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from masktune_core import JobConfig, run_masktune
from masktune_core import pipeline as pipeline_module

SIZE, SQUARE = 28, 4
RECIPE = {"erm": {"epochs": 5, "batch_size": 32}, "finetune": {"batch_size": 16}, "masking": {"batch_size": 256},
          "preview_count": 0, "seed": 0}
CLEAR_RAISE = 0.15


def write_shapes(root: Path, *, shortcut: bool, groups: bool = True, seed: int = 0,
                 n_train: int = 300, n_val: int = 60, n_test: int = 240) -> Path:
    """Rings (class 0) and pluses (class 1) at grey level 50 in noise of std 40; see the module docstring."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        (root / split).mkdir(parents=True)
        labels = np.arange(n) % 2
        squares = (labels == 0) & (np.arange(n) % 4 == 0 if split == "test" else shortcut)
        for i, (label, square) in enumerate(zip(labels, squares)):
            image = Image.new("L", (SIZE, SIZE))
            draw = ImageDraw.Draw(image)
            r, (cx, cy) = rng.uniform(6, 9), rng.uniform(11, 17, 2)
            if label == 0:
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=50, width=2)
            else:
                draw.line((cx - r, cy, cx + r, cy), fill=50, width=2)
                draw.line((cx, cy - r, cx, cy + r), fill=50, width=2)
            grey = np.clip(np.asarray(image, dtype=float) + rng.normal(0, 40, (SIZE, SIZE)), 0, 255).astype(np.uint8)
            pixels = np.repeat(grey[..., None], 3, axis=2)
            if square:
                pixels[:SQUARE, :SQUARE] = (255, 0, 0)
            name = f"{split}/{i:04d}.png"
            Image.fromarray(pixels).save(root / name)
            rows.append([name, label, split] + ([f"{label}_{'square' if square else 'no_square'}"] if groups else []))
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label", "split"] + (["group"] if groups else []))
        writer.writerows(rows)
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    # Batches of 32 images of 28 px gain nothing from a second intra-op thread; on a busy 2-core
    # machine it spun: ERM took 8.7 CPU seconds on two threads, 2.2 on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shortcut_data(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shortcut"), shortcut=True)


def test_erm_learns_a_task_without_a_shortcut(tmp_path):
    """Chance is 0.5. Without group labels the verdict judges the worst class."""
    data = write_shapes(tmp_path / "data", shortcut=False, groups=False)
    metrics = run_masktune(data, tmp_path / "out", JobConfig.model_validate(RECIPE), device="cpu")
    assert metrics["erm"]["test"]["overall_accuracy"] >= 0.8
    assert metrics["erm"]["test"]["worst_class_accuracy"] >= 0.7
    assert "worst_group_accuracy" not in metrics["erm"]["test"]
    assert metrics["verdict"]["metric"] == "worst_class_accuracy" and set(metrics["verdict"]["per_class"]) == {"0", "1"}


def test_masktune_raises_the_worst_group_that_erm_left_behind(shortcut_data, tmp_path):
    metrics = run_masktune(shortcut_data, tmp_path, JobConfig.model_validate(RECIPE), device="cpu")
    erm, masktune = metrics["erm"]["test"], metrics["masktune"]["test"]
    assert set(erm["per_group"]) == {"0_square", "0_no_square", "1_no_square"}
    # ERM learnt (the square), and leant on it: the comparison below starts from a shortcut-bound model.
    assert erm["per_group"]["0_square"]["accuracy"] >= 0.9 and erm["per_group"]["1_no_square"]["accuracy"] >= 0.9
    assert erm["worst_group"] == "0_no_square" and erm["worst_group_accuracy"] <= 0.5
    assert masktune["worst_group_accuracy"] >= erm["worst_group_accuracy"] + CLEAR_RAISE
    assert masktune["overall_accuracy"] > erm["overall_accuracy"]
    assert metrics["masking"]["masked_pixel_fraction"] > 0


def test_without_masks_the_finetune_epoch_raises_nothing(shortcut_data, tmp_path, monkeypatch):
    """The raise comes from the masks, not from one more epoch; and the verdict says nothing was masked."""
    monkeypatch.setattr(pipeline_module, "threshold_masks", lambda maps, threshold_std: torch.zeros_like(maps, dtype=torch.bool))
    metrics = run_masktune(shortcut_data, tmp_path, JobConfig.model_validate(RECIPE), device="cpu")
    assert metrics["masking"]["masked_pixel_fraction"] == 0
    assert metrics["masktune"]["test"]["worst_group_accuracy"] < metrics["erm"]["test"]["worst_group_accuracy"] + CLEAR_RAISE
    assert metrics["verdict"]["call"] == "inconclusive" and "masked none of the training pixels" in metrics["verdict"]["message"]
