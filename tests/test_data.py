"""masktune_core.data: layouts, splits, manifests, decoding, summary, hashing, transforms."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import (CELEBA_ATTRIBUTES, COLOURS, names, random_image, write_celeba, write_class_folder, write_image, write_manifest,
                     write_manifest_dataset)
from masktune_core import decoded
from masktune_core.data import (LabelAttributeRequired, augment, dataset_sha256, decode_dataset, index_dataset, inspect_images,
                                normalize, summarize)
from masktune_core.errors import DatasetError

# ---------------------------------------------------------------- ImageFolder


def test_image_folder_with_all_splits(tmp_path):
    counts = {"10": 3, "2": 4, "1": 2}
    write_class_folder(tmp_path / "train", counts)
    write_class_folder(tmp_path / "val", {"10": 1, "2": 2, "1": 1})
    write_class_folder(tmp_path / "test", {"10": 2, "2": 1, "1": 1})
    idx = index_dataset(tmp_path)
    assert idx.layout == "image_folder"
    assert idx.classes == ["1", "2", "10"]  # numeric, not lexicographic ("10" < "2")
    s = summarize(idx)
    assert s["splits"]["train"]["per_class"] == {"1": 2, "2": 4, "10": 3}
    assert s["splits"]["val"]["per_class"] == {"1": 1, "2": 2, "10": 1}
    assert s["splits"]["test"]["per_class"] == {"1": 1, "2": 1, "10": 2}
    assert idx.split_origin == {"train": "dataset", "val": "dataset", "test": "dataset"}
    # labels index into classes
    for sample in idx.splits["train"]:
        assert sample.name.split("/")[1] == idx.classes[sample.label]


def test_non_numeric_classes_sorted_alphabetically(tmp_path):
    write_class_folder(tmp_path / "train", {"dog": 2, "cat": 2, "bird": 2})
    write_class_folder(tmp_path / "val", {"dog": 1, "cat": 1, "bird": 1})
    assert index_dataset(tmp_path).classes == ["bird", "cat", "dog"]


def test_train_only_carves_stratified_seeded_val(tmp_path):
    write_class_folder(tmp_path / "train", {"a": 40, "b": 20})
    idx = index_dataset(tmp_path, val_fraction=0.25, seed=1)
    assert set(idx.splits) == {"train", "val"}  # no test split is invented
    assert idx.split_origin["val"].startswith("carved")
    assert idx.split_origin["train"] == "dataset"
    val = Counter(idx.classes[s.label] for s in idx.splits["val"])
    assert val == {"a": 10, "b": 5}  # stratified: 25 % of each class
    assert len(idx.splits["train"]) == 45
    assert not names(idx.splits["train"]) & names(idx.splits["val"])

    again = index_dataset(tmp_path, val_fraction=0.25, seed=1)
    assert names(again.splits["val"]) == names(idx.splits["val"])
    other = index_dataset(tmp_path, val_fraction=0.25, seed=2)
    assert names(other.splits["val"]) != names(idx.splits["val"])


def test_no_split_folders_carves_val_and_test(tmp_path):
    files = write_class_folder(tmp_path, {"a": 20, "b": 20})
    idx = index_dataset(tmp_path, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert idx.classes == ["a", "b"]
    assert set(idx.splits) == {"train", "val", "test"}
    assert idx.split_origin["val"].startswith("carved") and idx.split_origin["test"].startswith("carved")
    tr, va, te = (names(idx.splits[s]) for s in ("train", "val", "test"))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert tr | va | te == {str(p.relative_to(tmp_path)) for p in files}
    assert len(te) == 8 and len(va) > 0
    for split in ("val", "test"):
        assert {s.label for s in idx.splits[split]} == {0, 1}


def test_lone_wrapping_folder_and_junk_are_ignored(tmp_path):
    root = tmp_path / "mydata"
    write_class_folder(root / "train", {"a": 3, "b": 3})
    write_class_folder(root / "val", {"a": 1, "b": 1})
    # macOS zip junk next to the wrapper and inside the class folders
    write_image(tmp_path / "__MACOSX" / "mydata" / "train" / "a" / "._a_000.png")
    write_image(root / "train" / "a" / ".hidden.png")
    write_image(root / "train" / "a" / "._a_001.png")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    (root / "train" / ".DS_Store").write_bytes(b"junk")
    idx = index_dataset(tmp_path)
    assert idx.root.resolve() == root.resolve()
    assert idx.classes == ["a", "b"]
    assert len(idx.splits["train"]) == 6
    assert not any("/." in "/" + s.name or "MACOSX" in s.name for s in idx.splits["train"])


# ---------------------------------------------------------------- manifests


def _manifest_rows():
    rows = []
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for label in ("cat", "dog"):
            for i in range(n):
                group = f"{label}_{'indoor' if i % 2 else 'outdoor'}"
                rows.append((f"img/{split}/{label}_{i}.png", label, split, group))
    return rows


def test_manifest_with_groups(tmp_path):
    write_manifest_dataset(tmp_path, _manifest_rows())
    idx = index_dataset(tmp_path)
    assert idx.layout == "manifest"
    assert idx.classes == ["cat", "dog"]
    assert idx.groups == ["cat_indoor", "cat_outdoor", "dog_indoor", "dog_outdoor"]
    assert idx.split_origin == {"train": "dataset", "val": "dataset", "test": "dataset"}
    s = summarize(idx)
    assert s["groups"] == idx.groups
    assert s["splits"]["train"]["per_group"] == {"cat_indoor": 2, "cat_outdoor": 2, "dog_indoor": 2, "dog_outdoor": 2}
    assert s["splits"]["val"]["per_group"] == {"cat_indoor": 1, "cat_outdoor": 1, "dog_indoor": 1, "dog_outdoor": 1}
    sample = next(x for x in idx.splits["train"] if x.name == "img/train/dog_1.png")
    assert idx.classes[sample.label] == "dog" and idx.groups[sample.group] == "dog_indoor"


def test_manifest_without_split_column_is_carved(tmp_path):
    rows = [(f"im/{lab}{i}.png", lab) for lab in ("x", "y") for i in range(10)]
    write_manifest_dataset(tmp_path, rows, header=("filename", "label"))
    idx = index_dataset(tmp_path, val_fraction=0.2, test_fraction=0.2)
    assert idx.groups is None
    assert set(idx.splits) == {"train", "val", "test"}
    assert idx.split_origin["test"].startswith("carved") and idx.split_origin["val"].startswith("carved")
    assert sum(len(v) for v in idx.splits.values()) == 20
    assert "per_group" not in summarize(idx)["splits"]["train"]


def test_waterbirds_style_manifest(tmp_path):
    rows = []
    for split, n in (("0", 2), ("1", 1), ("2", 1)):
        for y in (0, 1):
            for place in (0, 1):
                for i in range(n):
                    rows.append((i, f"birds/{split}_{y}_{place}_{i}.jpg", y, split, place, "x.jpg"))
    for r in rows:
        write_image(tmp_path / r[1], COLOURS[r[2]], fmt="JPEG")
    write_manifest(tmp_path, ["img_id", "img_filename", "y", "split", "place", "place_filename"], rows)
    idx = index_dataset(tmp_path)
    assert idx.classes == ["0", "1"]
    assert idx.groups is not None and len(idx.groups) == 4
    # group names come from (y, place): both numbers are visible in every name
    for y in (0, 1):
        for place in (0, 1):
            assert sum(f"{y}" in g and f"{place}" in g for g in idx.groups) >= 1
    assert {len(idx.splits[s]) for s in ("train", "val", "test")} == {8, 4}
    assert len(idx.splits["train"]) == 8
    assert idx.split_origin["val"] == "dataset"
    # a sample's group is its own (y, place)
    sample = next(x for x in idx.splits["train"] if x.name == "birds/0_1_0_1.jpg")
    g = idx.groups[sample.group]
    other = next(x for x in idx.splits["train"] if x.name == "birds/0_0_1_1.jpg")
    assert g != idx.groups[other.group]
    assert summarize(idx)["splits"]["train"]["per_group"] == {g: 2 for g in idx.groups}


def test_subpopbench_metadata_groups_by_label_and_a(tmp_path):
    rows = [(f"imgs/{split}_{y}_{a}_{i}.png", y, split, a, i)
            for split in (0, 1, 2) for y in (0, 1) for a in (0, 1) for i in range(2)]
    for name, y, *_ in rows:
        write_image(tmp_path / name, COLOURS[y])
    write_manifest(tmp_path, ["filename", "y", "split", "a", "id"], rows)
    idx = index_dataset(tmp_path)
    assert idx.layout == "manifest" and idx.classes == ["0", "1"]
    assert idx.groups == ["y=0/a=0", "y=0/a=1", "y=1/a=0", "y=1/a=1"]
    assert {s: len(v) for s, v in idx.splits.items()} == {"train": 8, "val": 8, "test": 8}
    sample = next(x for x in idx.splits["test"] if x.name == "imgs/2_1_0_1.png")
    assert (idx.classes[sample.label], idx.groups[sample.group]) == ("1", "y=1/a=0")


# ---------------------------------------------------------------- CelebA


@pytest.mark.parametrize("fmt", ["txt", "csv"])
def test_celeba_layout_label_and_group_attributes(tmp_path, fmt):
    write_celeba(tmp_path / "celeba", n=24, fmt=fmt)
    idx = index_dataset(tmp_path, label_attribute="Blond_Hair", group_attribute="Male")
    assert idx.layout == "celeba"
    assert idx.classes == ["not_Blond_Hair", "Blond_Hair"]
    assert idx.groups == ["not_Blond_Hair/Male", "not_Blond_Hair/not_Male", "Blond_Hair/Male", "Blond_Hair/not_Male"]
    assert idx.split_origin == {"train": "dataset", "val": "dataset", "test": "dataset"}
    assert {s: len(v) for s, v in idx.splits.items()} == {"train": 12, "val": 6, "test": 6}
    blond_male = next(x for x in idx.splits["train"] if x.name == "img_align_celeba/000010.jpg")  # i = 9
    assert (idx.classes[blond_male.label], idx.groups[blond_male.group]) == ("Blond_Hair", "Blond_Hair/Male")
    assert blond_male.path.is_file()
    split = decode_dataset(idx, 8, tmp_path / "cache").splits["train"]
    assert split.labels.tolist() == [s.label for s in idx.splits["train"]]


def test_celeba_without_group_and_kaggle_nesting(tmp_path):
    write_celeba(tmp_path, n=16, fmt="csv")
    (tmp_path / "img_align_celeba").rename(tmp_path / "inner")
    (tmp_path / "img_align_celeba").mkdir()
    (tmp_path / "inner").rename(tmp_path / "img_align_celeba" / "img_align_celeba")
    idx = index_dataset(tmp_path, label_attribute="Smiling")
    assert idx.classes == ["not_Smiling", "Smiling"] and idx.groups is None
    assert sum(len(v) for v in idx.splits.values()) == 16
    assert next(iter(idx.splits["train"])).name.startswith("img_align_celeba/img_align_celeba/")


def test_celeba_needs_a_known_label_attribute(tmp_path):
    write_celeba(tmp_path, n=12)
    with pytest.raises(LabelAttributeRequired) as info:
        index_dataset(tmp_path)
    assert "data.label_attribute" in str(info.value) and "Blond_Hair" in str(info.value)
    overview = info.value.overview
    assert overview["layout"] == "celeba" and overview["attributes"] == CELEBA_ATTRIBUTES and overview["images"] == 12
    assert overview["partitions"] == {"train": 8, "val": 2, "test": 2} and "data.label_attribute" in overview["note"]
    with pytest.raises(DatasetError, match="'Red_Hair' is not an attribute.*Blond_Hair"):
        index_dataset(tmp_path, label_attribute="Red_Hair")
    with pytest.raises(DatasetError, match="group_attribute 'Bald'"):
        index_dataset(tmp_path, label_attribute="Male", group_attribute="Bald")
    with pytest.raises(DatasetError, match="must differ"):
        index_dataset(tmp_path, label_attribute="Male", group_attribute="Male")


def test_label_attribute_on_another_layout_is_refused(tmp_path):
    write_manifest_dataset(tmp_path, _manifest_rows())
    with pytest.raises(DatasetError, match="CelebA layout only"):
        index_dataset(tmp_path, label_attribute="Blond_Hair")


def test_celeba_rows_without_images_or_partition_are_skipped(tmp_path):
    write_celeba(tmp_path, n=16)
    (tmp_path / "img_align_celeba" / "000003.jpg").unlink()
    attr = tmp_path / "list_attr_celeba.txt"
    attr.write_text(attr.read_text() + "999999.jpg -1 1 1\n000004.jpg 1\n")
    idx = index_dataset(tmp_path, label_attribute="Blond_Hair")
    reasons = {s["file"]: s["reason"] for s in idx.skipped}
    assert "no such file" in reasons["000003.jpg"] and "no such file" in reasons["999999.jpg"]
    assert sum(len(v) for v in idx.splits.values()) == 15


def test_celeba_and_subpopbench_archives_unpack_and_index(tmp_path):
    import zipfile

    from masktune_core.archive import extract_archive

    write_celeba(tmp_path / "celeba" / "celeba", n=16, fmt="csv")
    subpop = tmp_path / "subpop" / "waterbirds"
    rows = [(f"images/{split}_{y}_{a}.jpg", split, y, a) for split in (0, 1, 2) for y in (0, 1) for a in (0, 1)]
    for name, _, y, _ in rows:
        write_image(subpop / name, COLOURS[y], fmt="JPEG")
    write_manifest(subpop, ["filename", "split", "y", "a"], rows)
    for name in ("celeba", "subpop"):
        with zipfile.ZipFile(tmp_path / f"{name}.zip", "w") as zf:
            for path in sorted((tmp_path / name).rglob("*")):
                zf.write(path, path.relative_to(tmp_path / name))
    celeba = index_dataset(extract_archive(tmp_path / "celeba.zip", tmp_path / "out-celeba"), label_attribute="Blond_Hair")
    assert celeba.layout == "celeba" and sum(len(v) for v in celeba.splits.values()) == 16
    subpop_index = index_dataset(extract_archive(tmp_path / "subpop.zip", tmp_path / "out-subpop"))
    assert subpop_index.groups == ["y=0/a=0", "y=0/a=1", "y=1/a=0", "y=1/a=1"]
    assert {s: len(v) for s, v in subpop_index.splits.items()} == {"train": 4, "val": 4, "test": 4}


def test_celeba_index_of_200k_rows_is_fast(tmp_path):
    """CelebA's attribute file has 202,599 lines: indexing reads it once and lists the folder once."""
    import time

    n = 202_599
    images = tmp_path / "img_align_celeba"
    images.mkdir()
    names_ = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name in names_[:2000]:  # the rest are listed but absent: the row loop still runs for all
        (images / name).touch()
    (tmp_path / "list_eval_partition.txt").write_text("".join(f"{m} {i % 3}\n" for i, m in enumerate(names_)))
    rows = [" ".join(["-1", "1"] * 20), " ".join(["1", "-1"] * 20)]
    (tmp_path / "list_attr_celeba.txt").write_text(
        f"{n}\n" + " ".join(f"A{j}" for j in range(40)) + "\n" + "".join(f"{m} {rows[i % 2]}\n" for i, m in enumerate(names_)))
    start = time.perf_counter()
    idx = index_dataset(tmp_path, label_attribute="A1", group_attribute="A0")
    elapsed = time.perf_counter() - start
    assert idx.skipped and sum(len(v) for v in idx.splits.values()) + len(idx.skipped) == n
    assert elapsed < 5, elapsed


def test_metadata_csv_preferred_among_several_csvs(tmp_path):
    write_manifest_dataset(tmp_path, _manifest_rows())
    write_manifest(tmp_path, ["foo", "bar"], [[1, 2]], name="notes.csv")
    idx = index_dataset(tmp_path)
    assert idx.layout == "manifest" and idx.classes == ["cat", "dog"]


def test_several_csvs_without_metadata_csv(tmp_path):
    write_manifest_dataset(tmp_path, _manifest_rows(), name="labels.csv")
    write_manifest(tmp_path, ["filename", "label"], [["img/train/cat_0.png", "cat"]], name="other.csv")
    with pytest.raises(DatasetError, match="metadata.csv"):
        index_dataset(tmp_path)


def test_manifest_bad_rows_are_skipped_with_reasons(tmp_path):
    root = tmp_path / "ds"
    rows = _manifest_rows()
    write_manifest_dataset(root, rows)
    outside = write_image(tmp_path / "outside.png", (1, 2, 3))
    bad = [
        ("img/train/missing.png", "cat", "train", "cat_indoor"),
        ("../outside.png", "cat", "train", "cat_indoor"),
        (str(outside), "dog", "train", "dog_indoor"),
        ("img/train/cat_0.png", "", "train", "cat_indoor"),
    ]
    write_manifest(root, ["filename", "label", "split", "group"], [list(r) for r in rows + bad])
    idx = index_dataset(root)
    every = [s for split in idx.splits.values() for s in split]
    assert len(every) == len(rows)
    assert all(s.path.resolve() != outside.resolve() for s in every)
    assert all(s.path.resolve().is_relative_to(root.resolve()) for s in every)
    skipped = {d["file"]: d["reason"] for d in idx.skipped}
    for name in ("img/train/missing.png", "../outside.png", str(outside)):
        assert name in skipped and skipped[name]
    assert any("label" in d["reason"] for d in idx.skipped)
    assert len(idx.skipped) == 4
    assert summarize(idx)["skipped_count"] == 4


def test_manifest_unknown_split_value(tmp_path):
    rows = _manifest_rows() + [("img/train/cat_0.png", "cat", "holdout", "cat_indoor")]
    write_manifest_dataset(tmp_path, rows)
    with pytest.raises(DatasetError, match="holdout"):
        index_dataset(tmp_path)


def test_manifest_missing_columns(tmp_path):
    write_manifest_dataset(tmp_path, [(f"a{i}.png", "x" if i % 2 else "y") for i in range(8)], header=("path", "class"))
    with pytest.raises(DatasetError, match="filename"):
        index_dataset(tmp_path)


def test_manifest_not_utf8(tmp_path):
    rows = [(f"caf\u00e9{i}.png", "x" if i % 2 else "y") for i in range(8)]
    for r in rows:
        write_image(tmp_path / r[0])
    text = "filename,label\n" + "".join(f"{a},{b}\n" for a, b in rows)
    (tmp_path / "metadata.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(DatasetError, match="UTF-8"):
        index_dataset(tmp_path)


# ---------------------------------------------------------------- index errors


def test_no_images(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir(parents=True)
    (tmp_path / "train" / "a" / "readme.txt").write_text("not an image")
    with pytest.raises(DatasetError):
        index_dataset(tmp_path)


def test_empty_directory(tmp_path):
    with pytest.raises(DatasetError):
        index_dataset(tmp_path)


def test_one_class(tmp_path):
    write_class_folder(tmp_path / "train", {"only": 6})
    with pytest.raises(DatasetError, match="one class"):
        index_dataset(tmp_path)


def test_val_class_unknown_to_train(tmp_path):
    write_class_folder(tmp_path / "train", {"a": 3, "b": 3})
    write_class_folder(tmp_path / "val", {"a": 1, "b": 1, "zebra": 1})
    with pytest.raises(DatasetError, match="zebra"):
        index_dataset(tmp_path)


@pytest.mark.parametrize("split", ["val", "test"])
def test_split_folder_without_train(tmp_path, split):
    write_class_folder(tmp_path / split, {"a": 3, "b": 3})
    write_class_folder(tmp_path / "other", {"a": 1})
    with pytest.raises(DatasetError, match="train"):
        index_dataset(tmp_path)


# ---------------------------------------------------------------- decoding


def _save(path, img, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def test_decode_many_modes_to_uint8_rgb(tmp_path):
    t = tmp_path / "train"
    _save(t / "a" / "l.png", Image.new("L", (10, 12), 200))
    _save(t / "a" / "la.png", Image.new("LA", (9, 9), (100, 50)))
    _save(t / "a" / "rgba.png", Image.new("RGBA", (16, 8), (10, 20, 30, 0)))
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    _save(t / "a" / "p.png", pal, transparency=0)
    _save(t / "b" / "i16.png", Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)))
    _save(t / "b" / "cmyk.jpg", Image.new("CMYK", (12, 12), (0, 255, 255, 0)))
    _save(t / "b" / "rgb_big.jpg", Image.new("RGB", (30, 20), (0, 0, 255)))
    _save(t / "b" / "rgb.jpg", Image.new("RGB", (7, 11), (0, 255, 0)))
    write_class_folder(tmp_path / "val", {"a": 1, "b": 1})
    idx = index_dataset(tmp_path)
    dec = decode_dataset(idx, 16, tmp_path / "cache", workers=1)
    tr = dec.splits["train"]
    images = tr.pixels()
    assert images.dtype == torch.uint8
    assert tuple(images.shape) == (8, 3, 16, 16)
    assert tuple(dec.splits["val"].pixels().shape) == (2, 3, 16, 16)
    assert tr.labels.dtype == torch.int64 and sorted(tr.labels.tolist()) == [0] * 4 + [1] * 4
    px = {n.split("/")[-1]: images[i, :, 8, 8].tolist() for i, n in enumerate(tr.names)}
    assert px["l.png"] == [200, 200, 200]
    assert px["p.png"] == [255, 0, 0]
    assert px["rgb.jpg"][1] > 200 and px["rgb.jpg"][0] < 40
    assert px["cmyk.jpg"][0] > 200 and px["cmyk.jpg"][1] < 40  # CMYK red stays red
    assert not idx.skipped


def test_16bit_grey_decodes_to_matching_brightness(tmp_path):
    arr = np.zeros((8, 8), dtype=np.uint16)
    arr[:, :4] = 60000  # bright: ~233 of 255
    arr[:, 4:] = 20000  # ~78
    _save(tmp_path / "train" / "a" / "x.png", Image.fromarray(arr))
    write_class_folder(tmp_path / "train", {"b": 1})
    write_class_folder(tmp_path / "val", {"a": 1, "b": 1})
    idx = index_dataset(tmp_path)
    dec = decode_dataset(idx, 8, tmp_path / "cache", workers=1)
    i = dec.splits["train"].names.index("train/a/x.png")
    img = dec.splits["train"].pixels([i])[0]
    assert abs(int(img[0, 4, 0]) - round(60000 / 65535 * 255)) <= 2
    assert abs(int(img[0, 4, 7]) - round(20000 / 65535 * 255)) <= 2
    assert int(img[0, 4, 0]) == int(img[1, 4, 0]) == int(img[2, 4, 0])


def test_broken_images_skipped_and_reported(tmp_path):
    write_class_folder(tmp_path / "train", {"a": 3, "b": 3})
    write_class_folder(tmp_path / "val", {"a": 1, "b": 1})
    good = random_image(tmp_path / "scratch.png", size=(16, 16)).read_bytes()
    (tmp_path / "train" / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "scratch.png").unlink()
    (tmp_path / "train" / "b" / "notimage.png").write_bytes(b"this is text, not a PNG\n" * 4)
    idx = index_dataset(tmp_path)
    assert len(idx.splits["train"]) == 8
    dec = decode_dataset(idx, 8, tmp_path / "cache", workers=2)
    assert len(dec.splits["train"]) == 6
    assert "train/a/truncated.png" not in dec.splits["train"].names
    skipped = {d["file"] for d in idx.skipped}
    assert skipped == {"train/a/truncated.png", "train/b/notimage.png"}
    s = summarize(idx, dec.image_stats)
    assert {d["file"] for d in s["skipped"]} == skipped and s["skipped_count"] == 2
    assert s["splits"]["train"]["images"] == 6
    assert all(d["reason"] for d in s["skipped"])


def test_skipping_every_training_image_of_a_class(tmp_path):
    write_class_folder(tmp_path / "train", {"a": 3})
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "x.png").write_bytes(b"garbage")
    (tmp_path / "train" / "b" / "y.png").write_bytes(b"garbage")
    write_class_folder(tmp_path / "val", {"a": 1, "b": 1})
    idx = index_dataset(tmp_path)
    with pytest.raises(DatasetError, match="b"):
        decode_dataset(idx, 8, tmp_path / "cache", workers=1)


def test_pixel_limit_from_header(tmp_path, monkeypatch):
    write_class_folder(tmp_path / "train", {"a": 2, "b": 2}, size=(8, 8))
    write_class_folder(tmp_path / "val", {"a": 1, "b": 1}, size=(8, 8))
    write_image(tmp_path / "train" / "a" / "huge.png", size=(20, 20))
    monkeypatch.setattr(decoded, "MAX_IMAGE_PIXELS", 300)
    idx = index_dataset(tmp_path)
    dec = decode_dataset(idx, 8, tmp_path / "cache", workers=1)
    assert "train/a/huge.png" not in dec.splits["train"].names
    assert len(dec.splits["train"]) == 4
    (entry,) = [d for d in idx.skipped if d["file"] == "train/a/huge.png"]
    assert "300" in entry["reason"] and "limit" in entry["reason"]


def test_resize_is_whole_image_not_crop(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    _save(tmp_path / "train" / "a" / "wide.png", Image.fromarray(arr))
    write_class_folder(tmp_path / "train", {"b": 1})
    write_class_folder(tmp_path / "val", {"a": 1, "b": 1})
    idx = index_dataset(tmp_path)
    dec = decode_dataset(idx, 16, tmp_path / "cache", workers=1)
    img = dec.splits["train"].pixels([dec.splits["train"].names.index("train/a/wide.png")])[0]
    assert img[:, :, :6].tolist() == [[[255] * 6] * 16, [[0] * 6] * 16, [[0] * 6] * 16]
    assert img[:, :, -6:].tolist() == [[[0] * 6] * 16, [[0] * 6] * 16, [[255] * 6] * 16]


def test_summary_sizes_modes_and_counts(tmp_path):
    _save(tmp_path / "train" / "a" / "1.png", Image.new("RGB", (10, 30)))
    _save(tmp_path / "train" / "a" / "2.png", Image.new("L", (25, 12)))
    _save(tmp_path / "train" / "b" / "3.png", Image.new("RGB", (8, 8)))
    _save(tmp_path / "val" / "a" / "4.png", Image.new("RGBA", (14, 9)))
    _save(tmp_path / "val" / "b" / "5.png", Image.new("RGB", (9, 40)))
    idx = index_dataset(tmp_path)
    dec = decode_dataset(idx, 8, tmp_path / "cache", workers=1)
    s = summarize(idx, dec.image_stats)
    sizes = s["image_sizes"]
    assert (sizes["min_width"], sizes["max_width"]) == (8, 25)
    assert (sizes["min_height"], sizes["max_height"]) == (8, 40)
    assert sizes["modes"] == {"RGB": 3, "L": 1, "RGBA": 1}
    assert s["splits"]["train"]["per_class"] == {"a": 2, "b": 1}
    assert s["splits"]["train"]["images"] == 3
    assert s["classes"] == ["a", "b"] and s["layout"] == "image_folder"


# ---------------------------------------------------------------- hashing


def test_dataset_sha256_file_and_directory(tmp_path):
    d = tmp_path / "d"
    write_class_folder(d / "train", {"a": 2, "b": 2})
    h1 = dataset_sha256(d)
    assert len(h1) == 64 and h1 == dataset_sha256(d)
    copy = tmp_path / "copy"
    write_class_folder(copy / "train", {"a": 2, "b": 2})
    assert dataset_sha256(copy) == h1  # same bytes, another place
    random_image(d / "train" / "a" / "a_000.png", seed=3)
    h2 = dataset_sha256(d)
    assert h2 != h1
    (d / "train" / "a" / "a_000.png").rename(d / "train" / "a" / "renamed.png")
    assert dataset_sha256(d) != h2

    f = tmp_path / "blob.zip"
    f.write_bytes(b"abc" * 1000)
    hf = dataset_sha256(f)
    assert hf == dataset_sha256(f)
    f.write_bytes(b"abc" * 999 + b"abd")
    assert dataset_sha256(f) != hf


def test_dataset_sha256_directory_is_unambiguous(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "a").write_bytes(b"")
    (one / "b").write_bytes(b"X")
    (two / "a").write_bytes(b"b\0X")
    assert dataset_sha256(one) != dataset_sha256(two)


# ---------------------------------------------------------------- transforms


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(6, 3, 16, 16, generator=g)


def test_augment_none_is_identity():
    x = _batch()
    out = augment(x.clone(), "none", torch.Generator().manual_seed(0))
    assert torch.equal(out, x)


def test_augment_flip_crop():
    x = _batch()
    a = augment(x, "flip_crop", torch.Generator().manual_seed(5))
    b = augment(x, "flip_crop", torch.Generator().manual_seed(5))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    outs = [augment(x, "flip_crop", torch.Generator().manual_seed(s)) for s in range(4)]
    assert any(not torch.equal(o, x) for o in outs)  # it does something
    assert any(not torch.equal(o, outs[0]) for o in outs[1:])  # and depends on the generator
    # only original pixel values or zero padding appear; no value is invented
    allowed = set(x.flatten().tolist()) | {0.0}
    assert set(a.flatten().tolist()) <= allowed


def test_normalize_imagenet():
    x = _batch()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(x, "imagenet"), (x - mean) / std)
    assert torch.equal(normalize(x, "none"), x)


def test_inspection_reads_every_header_and_decodes_a_sample(tmp_path):
    write_class_folder(tmp_path / "train", {"a": 40, "b": 40})
    write_class_folder(tmp_path / "val", {"a": 2, "b": 2})
    good = random_image(tmp_path / "scratch.png", size=(16, 16)).read_bytes()
    (tmp_path / "scratch.png").unlink()
    (tmp_path / "train" / "a" / "cut.png").write_bytes(good[:60])  # a whole header, then nothing
    (tmp_path / "train" / "b" / "text.png").write_bytes(b"not an image at all")
    idx = index_dataset(tmp_path)
    stats = inspect_images(idx, sample_size=5, seed=0)
    # Headers: the text file is refused at once; the cut PNG has a valid header and is left to the decode pass.
    assert [d["file"] for d in idx.skipped] == ["train/b/text.png"]
    assert stats["modes"] == {"RGB": 85} and (stats["min_width"], stats["max_width"]) == (8, 16)
    later = decode_dataset(idx, 8, tmp_path / "cache")
    assert [d["file"] for d in idx.skipped] == ["train/b/text.png", "train/a/cut.png"]
    assert len(later.splits["train"]) == 80
