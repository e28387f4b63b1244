"""Reading a user's dataset: the layouts, splits, decoding and transforms.

Layouts (README "Datasets"):
  ImageFolder  train/<class>/*.png [val/ test/]   or just <class>/*.png
  Manifest     a CSV at the root: filename,label[,split][,group]
               (Waterbirds' img_filename,y,split,place and SubpopBench's
               filename,split,y,a are accepted too)
  CelebA       img_align_celeba/ + list_eval_partition.(txt|csv) + list_attr_celeba.(txt|csv);
               the label is one attribute (data.label_attribute), the group optionally another

Images are decoded once per input size (``decoded``), resized whole (no crop) and
kept as uint8 on disk, so masks computed on that view line up with the pixels they
zero; a split is a list of rows of that array (``SplitRows``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
import torch

from .archive import safe_member_path
from .decoded import DecodedImages, decode_image, decode_once, read_header
from .errors import DatasetError


class LabelAttributeRequired(DatasetError):
    """A CelebA-layout dataset read without data.label_attribute; ``overview`` says what it holds."""

    def __init__(self, message: str, overview: dict):
        super().__init__(message)
        self.overview = overview

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train", "training": "train", "0": "train",
    "val": "val", "valid": "val", "validation": "val", "1": "val",
    "test": "test", "testing": "test", "2": "test",
}
_IGNORED_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Sample:
    path: Path
    name: str  # path relative to the dataset root, as shown to the user
    label: int
    group: int = -1


@dataclass
class DatasetIndex:
    """Every usable sample by split, plus what was skipped and why."""

    root: Path
    layout: str
    classes: list[str]
    groups: list[str] | None
    splits: dict[str, list[Sample]]
    split_origin: dict[str, str]  # split -> "dataset" or "carved (seeded)"
    skipped: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------- indexing


def _visible(path: Path) -> bool:
    return not (path.name.startswith(".") or path.name in _IGNORED_NAMES)


def _entries(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if _visible(p))


def _dataset_root(root: Path) -> Path:
    """Step into a lone wrapping folder (zipping a folder adds one)."""
    while True:
        entries = _entries(root)
        if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in SPLITS:
            root = entries[0]
        else:
            return root


def _sorted_names(names: set[str]) -> list[str]:
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _images_under(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        and all(_visible(Path(part)) for part in p.relative_to(directory).parts)
    )


def _index_image_folder(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, str]]]]:
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if split_dirs and "train" not in split_dirs:
        raise DatasetError("the dataset has val/ or test/ folders but no train/ folder")
    if not split_dirs:
        split_dirs = {"all": root}
    class_dirs = {s: [d for d in _entries(d) if d.is_dir()] for s, d in split_dirs.items()}
    first = "train" if "train" in class_dirs else "all"
    classes = _sorted_names({d.name for d in class_dirs[first]})
    rows: dict[str, list[tuple[Path, str]]] = {}
    for split, dirs in class_dirs.items():
        unknown = {d.name for d in dirs} - set(classes)
        if unknown:
            raise DatasetError(f"{split}/ has classes that train/ lacks: {sorted(unknown)}")
        rows[split] = [(p, d.name) for d in dirs for p in _images_under(d)]
    return classes, rows


def _find_manifest(root: Path) -> Path | None:
    csvs = [p for p in _entries(root) if p.is_file() and p.suffix.lower() == ".csv"]
    if len(csvs) <= 1:
        return csvs[0] if csvs else None
    for preferred in ("metadata.csv", "manifest.csv"):
        if (root / preferred) in csvs:
            return root / preferred
    raise DatasetError(f"several CSV files at the dataset root ({[p.name for p in csvs]}); name the manifest metadata.csv")


def _read_manifest(manifest: Path, skipped: list[dict]):
    try:
        text = manifest.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{manifest.name} is not UTF-8 text") from exc
    csv.field_size_limit(1 << 16)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = list(reader)
    except csv.Error as exc:
        raise DatasetError(f"{manifest.name} is not a readable CSV: {exc}") from exc
    file_col = next((c for c in ("filename", "img_filename") if c in header), None)
    label_col = next((c for c in ("label", "y") if c in header), None)
    if file_col is None or label_col is None:
        raise DatasetError(f"{manifest.name} needs the columns filename,label (or img_filename,y); it has {header}")
    out = []
    for line, row in enumerate(rows, start=2):
        name, label = (row.get(file_col) or "").strip(), (row.get(label_col) or "").strip()
        if not label:
            skipped.append({"file": name, "reason": f"{manifest.name} line {line}: empty label"})
            continue
        split = None
        if "split" in header:
            raw = (row.get("split") or "").strip().lower()
            split = _SPLIT_ALIASES.get(raw)
            if split is None:
                raise DatasetError(f"{manifest.name} line {line}: unknown split {raw!r} (use train, val or test)")
        if "group" in header:
            group = (row.get("group") or "").strip() or "unknown"
        elif "place" in header:  # Waterbirds: the group is (label, place)
            group = f"y={label}/place={(row.get('place') or '').strip()}"
        elif "a" in header:  # SubpopBench: the group is (label, attribute a)
            group = f"y={label}/a={(row.get('a') or '').strip()}"
        else:
            group = None
        out.append((line, name, label, split, group))
    return out


CELEBA_IMAGES = "img_align_celeba"
_CELEBA_SPLITS = {"0": "train", "1": "val", "2": "test"}


def _celeba_lists(root: Path) -> tuple[Path, Path] | None:
    """(partition file, attribute file) when ``root`` holds CelebA's own layout."""
    if not (root / CELEBA_IMAGES).is_dir():
        return None
    found = []
    for stem in ("list_eval_partition", "list_attr_celeba"):
        candidates = [root / f"{stem}{ext}" for ext in (".txt", ".csv") if (root / f"{stem}{ext}").is_file()]
        if not candidates:
            return None
        found.append(candidates[0])
    return found[0], found[1]


def _read_text(path: Path) -> list[str]:
    try:
        return path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path.name} is not UTF-8 text") from exc


def _separator(path: Path) -> str | None:
    """For str.split: commas in CelebA's csv copies, runs of spaces in its txt originals."""
    return "," if path.suffix == ".csv" else None


def _read_celeba_partition(path: Path) -> dict[str, str]:
    """image name -> train | val | test (0/1/2 in the file); a header line is skipped."""
    out, sep = {}, _separator(path)
    for number, line in enumerate(_read_text(path), start=1):
        fields = line.split(sep) if line.strip() else []
        if not fields or (number == 1 and fields[-1] not in _CELEBA_SPLITS):
            continue  # blank, or the csv header image_id,partition
        if len(fields) != 2 or fields[1] not in _CELEBA_SPLITS:
            raise DatasetError(f"{path.name} line {number}: expected 'image partition' with partition 0, 1 or 2")
        out[fields[0]] = _CELEBA_SPLITS[fields[1]]
    return out


def _read_celeba_attributes(path: Path) -> tuple[list[str], list[str]]:
    """(attribute names, data lines). txt: a count line, the names, then 'name v1 v2 ...';
    csv: a header image_id,attr... then 'name,v1,v2,...'."""
    lines = _read_text(path)
    if path.suffix == ".csv":
        header, rows = ([f.strip() for f in lines[0].split(",")[1:]] if lines else []), lines[1:]
    else:
        header, rows = (lines[1].split() if len(lines) > 1 else []), lines[2:]
    if not header:
        raise DatasetError(f"{path.name} has no attribute names")
    return header, rows


def _attribute_column(name: str | None, attributes: list[str], what: str) -> int:
    if name not in attributes:
        raise DatasetError(f"{what} {name!r} is not an attribute of this CelebA dataset; it has {attributes}")
    return attributes.index(name)


def _index_celeba(root: Path, partition_file: Path, attr_file: Path, label_attribute: str | None,
                  group_attribute: str | None, skipped: list[dict]):
    """Classes not_<label_attribute>, <label_attribute> (values -1, 1); groups '<class>/<group class>'."""
    images = root / CELEBA_IMAGES
    inner = images / CELEBA_IMAGES  # the Kaggle copy nests the folder twice
    if inner.is_dir():
        images = inner
    # One directory listing instead of a stat per row: CelebA has 202,599 images.
    present = {entry.name for entry in os.scandir(images) if entry.is_file()}
    partition = _read_celeba_partition(partition_file)
    attributes, rows = _read_celeba_attributes(attr_file)
    if label_attribute is None:
        found = Counter(split for name, split in partition.items() if name in present)
        overview = {"layout": "celeba", "attributes": attributes, "images": sum(found.values()),
                    "partitions": {s: found.get(s, 0) for s in SPLITS},
                    "note": "jobs on this dataset must set data.label_attribute (data.group_attribute is optional)"}
        raise LabelAttributeRequired(
            f"the CelebA layout needs data.label_attribute (and optionally data.group_attribute); "
            f"attributes: {attributes}", overview)
    label_col = _attribute_column(label_attribute, attributes, "data.label_attribute")
    group_col = None
    if group_attribute is not None:
        if group_attribute == label_attribute:
            raise DatasetError("data.group_attribute must differ from data.label_attribute")
        group_col = _attribute_column(group_attribute, attributes, "data.group_attribute")
    classes = [f"not_{label_attribute}", label_attribute]
    group_classes = [f"not_{group_attribute}", group_attribute]
    prefix = images.relative_to(root).as_posix()
    entries, sep = [], _separator(attr_file)
    for number, line in enumerate(rows, start=3 if attr_file.suffix == ".txt" else 2):
        fields = line.split(sep) if line.strip() else []
        if not fields:
            continue
        name = fields[0]
        where = f"{attr_file.name} line {number}"
        if len(fields) != len(attributes) + 1:
            skipped.append({"file": name, "reason": f"{where}: expected {len(attributes)} attribute values"})
        elif name not in present:
            skipped.append({"file": name, "reason": f"{where}: no such file in {prefix}/"})
        elif name not in partition:
            skipped.append({"file": name, "reason": f"{where}: not in {partition_file.name}"})
        else:
            values = [fields[1 + label_col]] + ([fields[1 + group_col]] if group_col is not None else [])
            if any(v not in ("-1", "0", "1") for v in values):
                skipped.append({"file": name, "reason": f"{where}: attribute values must be -1 (or 0) and 1"})
                continue
            label = int(values[0] == "1")
            group = f"{classes[label]}/{group_classes[int(values[1] == '1')]}" if group_col is not None else None
            entries.append((name, label, partition[name], group))
    groups = sorted({e[3] for e in entries}, key=lambda g: (classes.index(g.split("/")[0]), g)) if group_col is not None else None
    group_ids = {g: i for i, g in enumerate(groups or [])}
    by_split: dict[str, list[Sample]] = {}
    for name, label, split, group in entries:
        sample = Sample(images / name, f"{prefix}/{name}", label, group_ids[group] if groups else -1)
        by_split.setdefault(split, []).append(sample)
    return classes, groups, by_split


def index_dataset(root: str | Path, *, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
                  label_attribute: str | None = None, group_attribute: str | None = None) -> DatasetIndex:
    """Find the layout, classes, groups and splits of an unpacked dataset directory.

    ``label_attribute``/``group_attribute`` pick the label and group of a CelebA-layout
    dataset (LabelAttributeRequired without a label); other layouts refuse them."""
    root = _dataset_root(Path(root))
    skipped: list[dict] = []
    groups: list[str] | None = None
    celeba = _celeba_lists(root)
    if celeba is None and (label_attribute or group_attribute):
        raise DatasetError("data.label_attribute and data.group_attribute apply to the CelebA layout only "
                           f"({CELEBA_IMAGES}/, list_eval_partition, list_attr_celeba); this dataset is not in it")
    if celeba is not None:
        layout = "celeba"
        classes, groups, by_split = _index_celeba(root, *celeba, label_attribute, group_attribute, skipped)
        return _finish_splits(root, layout, classes, groups, by_split, skipped, val_fraction, test_fraction, seed)
    manifest = _find_manifest(root)
    if manifest is not None:
        layout = "manifest"
        entries = _read_manifest(manifest, skipped)
        classes = _sorted_names({e[2] for e in entries})
        group_names = {e[4] for e in entries if e[4] is not None}
        groups = sorted(group_names) if group_names else None
        by_split: dict[str, list[Sample]] = {}
        has_split = any(e[3] for e in entries)
        resolved_root = root.resolve()
        for line, name, label, split, group in entries:
            try:
                rel = safe_member_path(name)
            except DatasetError as exc:
                skipped.append({"file": name, "reason": f"{manifest.name} line {line}: {exc}"})
                continue
            path = root.joinpath(*rel.parts)
            if not rel.parts or not path.is_file() or not path.resolve().is_relative_to(resolved_root):
                skipped.append({"file": name, "reason": f"{manifest.name} line {line}: no such file in the dataset"})
                continue
            sample = Sample(path, str(rel), classes.index(label), groups.index(group) if groups else -1)
            by_split.setdefault(split if has_split else "all", []).append(sample)
    else:
        layout = "image_folder"
        classes, rows = _index_image_folder(root)
        by_split = {
            split: [Sample(p, str(PurePosixPath(*p.relative_to(root).parts)), classes.index(c)) for p, c in items]
            for split, items in rows.items()
        }
    return _finish_splits(root, layout, classes, groups, by_split, skipped, val_fraction, test_fraction, seed)


def _carve(samples: list[Sample], fraction: float, rng: np.random.Generator) -> tuple[list[Sample], list[Sample]]:
    """Stratified by class: (rest, carved)."""
    rest, carved = [], []
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    for label in sorted(by_class):
        items = by_class[label]
        order = rng.permutation(len(items))
        n = int(round(fraction * len(items))) if len(items) > 1 else 0
        carved += [items[i] for i in order[:n]]
        rest += [items[i] for i in order[n:]]
    return rest, carved


def _finish_splits(root, layout, classes, groups, by_split, skipped, val_fraction, test_fraction, seed) -> DatasetIndex:
    rng = np.random.default_rng(seed)
    origin = {}
    if "all" in by_split:
        rest = by_split.pop("all")
        if test_fraction > 0:
            rest, by_split["test"] = _carve(rest, test_fraction, rng)
            origin["test"] = "carved (seeded)"
        by_split["train"] = rest
    if not by_split.get("train"):
        raise DatasetError("the dataset has no training images" if not skipped else
                           f"the dataset has no usable training images ({len(skipped)} skipped)")
    if not by_split.get("val"):
        by_split["train"], by_split["val"] = _carve(by_split["train"], val_fraction, rng)
        origin["val"] = "carved (seeded)"
    for split in by_split:
        origin.setdefault(split, "dataset")
    index = DatasetIndex(root, layout, classes, groups, {s: by_split[s] for s in SPLITS if by_split.get(s)}, origin, skipped)
    check_trainable(index)
    return index


def check_trainable(index: DatasetIndex) -> None:
    if len(index.classes) < 2:
        raise DatasetError(f"the dataset has only one class ({index.classes}); MaskTune needs at least two")
    present = {s.label for s in index.splits.get("train", [])}
    missing = [c for i, c in enumerate(index.classes) if i not in present]
    if missing:
        raise DatasetError(f"classes with no usable training image: {missing}")
    if not index.splits.get("val"):
        raise DatasetError("the dataset is too small to hold out a validation split")


# ---------------------------------------------------------------- decoding


@dataclass
class SplitRows:
    """One split of a job: rows of the decoded images (on disk), with labels and groups in memory."""

    images: DecodedImages
    rows: np.ndarray  # int64 [N], rows of images.npy
    labels: torch.Tensor  # int64 [N]
    groups: torch.Tensor  # int64 [N], -1 without groups

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def names(self) -> list[str]:
        return [self.images.names[r] for r in self.rows.tolist()]

    def pixels(self, positions=None, *, channels_last: bool = False) -> torch.Tensor:
        """uint8 [n, 3, S, S] of the split's images at ``positions`` (default: all of them); with
        ``channels_last`` in the rows' own layout (the one a GPU computes in), without a copy."""
        rows = self.rows if positions is None else self.rows[np.asarray(positions, dtype=np.int64)]
        images = torch.from_numpy(self.images.read(rows)).permute(0, 3, 1, 2)
        return images if channels_last else images.contiguous()


@dataclass
class DecodedDataset:
    splits: dict[str, SplitRows]
    image_stats: dict
    decoded_count: int  # images decoded by this call; 0 when the cache entry was reused


def decode_dataset(
    index: DatasetIndex,
    size: int,
    folder: Path,
    *,
    workers: int | None = None,
    should_cancel: Callable[[], bool] = lambda: False,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> DecodedDataset:
    """Decode every sample at ``size`` into the cache entry ``folder`` (or reuse it); unreadable images are skipped and reported."""
    files = {s.name: s.path for samples in index.splits.values() for s in samples}
    images, decoded = decode_once(files, folder, size, workers=workers, should_cancel=should_cancel, on_progress=on_progress)
    used: list[int] = []
    splits: dict[str, SplitRows] = {}
    for split, samples in index.splits.items():
        kept = []
        for sample in samples:
            row = images.row_of(sample.name)
            if row in images.errors:
                index.skipped.append({"file": sample.name, "reason": images.errors[row]})
            else:
                kept.append((row, sample))
        index.splits[split] = [sample for _, sample in kept]
        rows = np.array([row for row, _ in kept], dtype=np.int64)
        used += rows.tolist()
        splits[split] = SplitRows(images, rows, torch.tensor([s.label for _, s in kept], dtype=torch.long),
                                  torch.tensor([s.group for _, s in kept], dtype=torch.long))
    check_trainable(index)
    stats = _image_stats([images.widths[r] for r in used], [images.heights[r] for r in used], [images.modes[r] for r in used])
    return DecodedDataset(splits, stats, decoded)


def inspect_images(index: DatasetIndex, sample_size: int = 64, seed: int = 0, workers: int = 8) -> dict:
    """Image statistics from every file's header, plus a full decode of a seeded sample.

    Enough to accept an upload without decoding it all (the job's decode pass reports any
    image that fails later). Unreadable files are moved to ``index.skipped``.
    """
    samples = [s for split in index.splits.values() for s in split]
    chosen = {samples[i].name for i in np.random.default_rng(seed).permutation(len(samples))[:sample_size].tolist()}

    def check(sample: Sample):
        try:
            header = read_header(sample.path)
            if sample.name in chosen:
                decode_image(sample.path, 32)
            return header, None
        except DatasetError as exc:
            return None, str(exc)
        except (OSError, ValueError, SyntaxError) as exc:
            return None, f"unreadable image: {exc}"

    with ThreadPoolExecutor(workers) as pool:
        results = dict(zip((s.name for s in samples), pool.map(check, samples)))
    headers = []
    for split, split_samples in index.splits.items():
        kept = []
        for sample in split_samples:
            header, error = results[sample.name]
            if error:
                index.skipped.append({"file": sample.name, "reason": error})
            else:
                kept.append(sample)
                headers.append(header)
        index.splits[split] = kept
    check_trainable(index)
    return _image_stats([h[0] for h in headers], [h[1] for h in headers], [h[2] for h in headers])


def _image_stats(widths: list[int], heights: list[int], modes: list[str]) -> dict:
    return {
        "min_width": min(widths), "max_width": max(widths),
        "min_height": min(heights), "max_height": max(heights),
        "modes": dict(Counter(modes)),
    }


def summarize(index: DatasetIndex, image_stats: dict | None = None, max_skipped_listed: int = 100) -> dict:
    """What a user sees about their dataset: classes, groups, counts, sizes, skips."""
    def counts(samples: list[Sample]) -> dict:
        per_class = Counter(index.classes[s.label] for s in samples)
        out = {"images": len(samples), "per_class": {c: per_class.get(c, 0) for c in index.classes}}
        if index.groups:
            per_group = Counter(index.groups[s.group] for s in samples)
            out["per_group"] = {g: per_group.get(g, 0) for g in index.groups}
        return out

    summary = {
        "layout": index.layout,
        "classes": index.classes,
        "groups": index.groups,
        "splits": {split: counts(samples) for split, samples in index.splits.items()},
        "split_origin": index.split_origin,
        "skipped_count": len(index.skipped),
        "skipped": index.skipped[:max_skipped_listed],
    }
    if image_stats is not None:
        summary["image_sizes"] = image_stats
    return summary


def dataset_sha256(path: str | Path) -> str:
    """sha256 of an archive's bytes, or of a directory's sorted (relative path, content sha256) lines."""
    path = Path(path)
    if path.is_file():
        return _file_sha256(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        # Names hold no NUL and the content hash has a fixed length: no two trees collide.
        digest.update(f"{f.relative_to(path)}\0{_file_sha256(f)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- transforms


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div_(255.0)


@lru_cache
def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: building them per batch would copy from the host, and wait for the GPU, every batch.
    return (torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(device), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).to(device))


def normalize(x: torch.Tensor, normalization: str) -> torch.Tensor:
    if normalization == "none":
        return x
    mean, std = _imagenet_stats(x.device)
    return (x - mean) / std


def augment(x: torch.Tensor, preset: str, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation on 0..1 pixels (after masking, before normalisation)."""
    if preset == "none":
        return x
    n, _, h, w = x.shape
    # The draws come from the CPU generator (same batches on any device); they reach the device
    # without blocking, so the host does not wait for the GPU's queue.
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.to(x.device, non_blocking=True).view(n, 1, 1, 1), x.flip(3), x)
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    # Every image's crop in one gather (one kernel on a GPU, not one per image).
    rows = (dy[:, None] + torch.arange(h)).to(x.device, non_blocking=True)[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)).to(x.device, non_blocking=True)[:, None, None, :]
    images = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[images, channels, rows, cols]
