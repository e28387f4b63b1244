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


CELEBA_ATTRIBUTES = ["Blond_Hair", "Male", "Smiling"]


def write_celeba(root: Path, n: int = 24, fmt: str = "txt", size=(8, 8)) -> Path:
    """CelebA's own layout in miniature: img_align_celeba/ and the two list files (txt or csv).

    Image i is blond when i is odd (red, else blue), male when (i // 8) is odd; pairs of images
    share a partition (0 train, 1 val, 2 test), so every split holds both classes."""
    root = Path(root)
    partition, attrs = [], []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        blond, male, smiling = i % 2, (i // 8) % 2, (i // 3) % 2
        write_image(root / "img_align_celeba" / name, COLOURS[blond], size=size, fmt="JPEG")
        partition.append((name, {0: 0, 1: 0, 2: 1, 3: 2}[(i // 2) % 4]))
        attrs.append((name, [1 if v else -1 for v in (blond, male, smiling)]))
    sep = "," if fmt == "csv" else " "
    lines = ["image_id,partition"] if fmt == "csv" else []
    (root / f"list_eval_partition.{fmt}").write_text("\n".join(lines + [f"{a}{sep}{b}" for a, b in partition]) + "\n")
    head = ["image_id," + ",".join(CELEBA_ATTRIBUTES)] if fmt == "csv" else [str(n), " ".join(CELEBA_ATTRIBUTES) + " "]
    # The original txt pads the values with two spaces where a value is positive.
    body = [sep.join([name] + [str(v) if fmt == "csv" else f"{v:2d}" for v in values]) for name, values in attrs]
    (root / f"list_attr_celeba.{fmt}").write_text("\n".join(head + body) + "\n")
    return root
