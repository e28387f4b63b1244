"""Small helpers for tests that need tiny image datasets on disk."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

# One distinct colour per class index, so a decoded pixel tells which class it came from.
COLOURS = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


def write_image(path: Path, colour=(128, 128, 128), size=(8, 8), mode="RGB", fmt=None) -> Path:
    """A flat-colour image at ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format=fmt)
    return path


def write_class_folder(directory: Path, classes: dict[str, int], size=(8, 8), suffix=".png") -> list[Path]:
    """``directory/<class>/<i>.png`` with ``classes[name]`` images per class."""
    paths = []
    for c, (name, n) in enumerate(classes.items()):
        for i in range(n):
            paths.append(write_image(Path(directory) / name / f"{name}_{i:03d}{suffix}", COLOURS[c % len(COLOURS)], size))
    return paths


def write_manifest(root: Path, header: list[str], rows: list[list], name="metadata.csv") -> Path:
    path = Path(root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_manifest_dataset(root: Path, rows: list[tuple], header=("filename", "label", "split", "group"), name="metadata.csv") -> Path:
    """Write an image for every row (the first column is the path), then the CSV."""
    labels = sorted({str(r[1]) for r in rows})
    for r in rows:
        write_image(Path(root) / r[0], COLOURS[labels.index(str(r[1])) % len(COLOURS)])
    write_manifest(root, list(header), [list(r) for r in rows], name)
    return Path(root)


def names(samples) -> set[str]:
    return {s.name for s in samples}


def random_image(path: Path, size=(8, 8), seed=0) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path)
    return path
