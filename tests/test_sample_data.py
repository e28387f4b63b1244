import csv
import zipfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from masktune_core import sample_data as sd

# n_val=200 -> 100 per class, so 99%/1% are whole numbers (no rounding ties).
SIZES = dict(n_train=400, n_val=200, n_test=80)


def _rows(root):
    with open(root / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return sd.write_biased_digits(tmp_path_factory.mktemp("a") / "ds", seed=0, **SIZES)


def test_header_and_group_counts(ds):
    assert (ds / "metadata.csv").read_text().splitlines()[0] == "filename,label,split,group"
    counts = Counter((r["split"], r["group"]) for r in _rows(ds))
    assert counts == {
        ("train", "0_square"): 198, ("train", "0_no_square"): 2,
        ("train", "1_square"): 2, ("train", "1_no_square"): 198,
        ("val", "0_square"): 99, ("val", "0_no_square"): 1,
        ("val", "1_square"): 1, ("val", "1_no_square"): 99,
        ("test", "0_square"): 20, ("test", "0_no_square"): 20,
        ("test", "1_square"): 20, ("test", "1_no_square"): 20,
    }
    for r in _rows(ds):
        assert r["group"].startswith(r["label"] + "_")
        assert r["filename"].startswith(f"images/{r['split']}/")


def test_square_pixels_match_group(ds):
    for r in _rows(ds):
        img = Image.open(ds / r["filename"])
        assert img.mode == "RGB" and img.size == (28, 28)
        a = np.asarray(img)
        corner = a[:4, :4].reshape(-1, 3)
        if r["group"].endswith("_no_square"):
            # Digit pixels are grey (R == G == B) and the corner is background.
            assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
            assert corner.max() < 64
        else:
            assert (corner == [255, 0, 0]).all()
            rest = a.copy()
            rest[:4, :4] = 0
            assert (rest[..., 0] == rest[..., 1]).all()  # red appears nowhere else
        assert a[..., 1].max() > 128  # a visible digit was drawn


def test_deterministic_bytes_and_seed_changes_output(ds, tmp_path):
    again = sd.write_biased_digits(tmp_path / "again", seed=0, **SIZES)
    other = sd.write_biased_digits(tmp_path / "other", seed=1, **SIZES)
    assert (ds / "metadata.csv").read_bytes() == (again / "metadata.csv").read_bytes()
    files = [r["filename"] for r in _rows(ds)]
    assert all((ds / f).read_bytes() == (again / f).read_bytes() for f in files)
    differs = (ds / "metadata.csv").read_bytes() != (other / "metadata.csv").read_bytes()
    n_same = sum((ds / f).read_bytes() == (other / f).read_bytes() for f in files)
    assert differs and n_same < len(files) // 10


def test_no_base_leakage_and_labels_follow_digits():
    pools = sd.split_base_pools(seed=0)
    sets = {s: set(p.tolist()) for s, p in pools.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert sum(map(len, sets.values())) == 1797
    digits = load_digits().target
    plan = sd.make_plan(seed=0, **SIZES)
    for p in plan:
        assert p["base"] in sets[p["split"]]
        assert p["label"] == int(digits[p["base"]] >= 5)
    # Train is expanded beyond its pool from many distinct bases, not a few copies.
    train_bases = Counter(p["base"] for p in plan if p["split"] == "train")
    assert len(train_bases) == 400 and max(train_bases.values()) == 1


def test_cli_zip_has_metadata_at_root(tmp_path):
    out = tmp_path / "cli"
    sd.main([str(out), "--seed", "3", "--n-train", "20", "--n-val", "20", "--n-test", "8", "--zip"])
    with zipfile.ZipFile(tmp_path / "cli.zip") as zf:
        names = zf.namelist()
        assert names[0] == "metadata.csv" and len(names) == 49
        assert zf.read("metadata.csv") == (out / "metadata.csv").read_bytes()
