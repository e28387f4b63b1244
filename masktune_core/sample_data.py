"""Offline "biased digits" benchmark in the style of MaskTune's biased MNIST.

Design (after Asgari et al., "MaskTune", NeurIPS 2022, Sec. 4.1):

* Binary task: digits 0-4 -> label 0, digits 5-9 -> label 1.
* Spurious feature: a 4x4 pure red square in the top-left corner.  In train and
  val it is almost perfectly predictive: ``bias_ratio`` (99%) of label-0 images
  carry it and only ``1 - bias_ratio`` (1%) of label-1 images do, so an ERM
  model can reach high validation accuracy by looking only at the corner.
* Test is balanced over the four (label, square) groups, so shortcut reliance
  shows up as poor worst-group accuracy on ``0_no_square`` / ``1_square``.

Source: scikit-learn's bundled ``load_digits`` (1,797 8x8 digits shipped inside
the package), so nothing is downloaded.  The base images are first split into
disjoint train/val/test pools (stratified by digit), and only then expanded to
the requested sizes with seeded small affine variants, so no base digit is
shared between splits.  All randomness comes from ``numpy.random.default_rng``
and PIL ops are deterministic, so a seed reproduces identical bytes.

Output ("CSV manifest" layout)::

    out_dir/metadata.csv            filename,label,split,group
    out_dir/images/<split>/NNNNNN.png   RGB, image_size x image_size
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import time
import zipfile

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

SPLITS = ("train", "val", "test")
POOL_FRACTIONS = {"val": 0.15, "test": 0.20}  # the rest (~65%) is train
SQUARE = 4  # side of the red square, pixels [0:4, 0:4]
RED = np.array([255, 0, 0], dtype=np.uint8)


def group_name(label: int, square: bool) -> str:
    return f"{label}_{'square' if square else 'no_square'}"


def split_base_pools(seed: int = 0) -> dict[str, np.ndarray]:
    """Disjoint indices into ``load_digits`` per split, stratified by digit."""
    rng = np.random.default_rng([seed, 0])  # own stream: pools don't depend on sizes
    digits = load_digits().target
    pools = {s: [] for s in SPLITS}
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(digits == d))
        n_val = round(POOL_FRACTIONS["val"] * len(idx))
        n_test = round(POOL_FRACTIONS["test"] * len(idx))
        pools["test"].append(idx[:n_test])
        pools["val"].append(idx[n_test:n_test + n_val])
        pools["train"].append(idx[n_test + n_val:])
    return {s: np.sort(np.concatenate(p)) for s, p in pools.items()}


def _labels_and_squares(rng, split: str, n: int, bias_ratio: float):
    """Per-image (label, square) with exact counts; order is shuffled."""
    if split == "test":
        # Balanced groups; any remainder goes to the first groups in order.
        combos = [(0, True), (0, False), (1, True), (1, False)]
        counts = [n // 4 + (i < n % 4) for i in range(4)]
        labels = np.concatenate([np.full(c, lab) for (lab, _), c in zip(combos, counts)])
        squares = np.concatenate([np.full(c, sq) for (_, sq), c in zip(combos, counts)])
    else:
        labels = np.repeat([0, 1], [n // 2, n - n // 2])
        squares = np.zeros(n, dtype=bool)
        for lab, frac in ((0, bias_ratio), (1, 1.0 - bias_ratio)):
            members = np.flatnonzero(labels == lab)
            k = round(frac * len(members))
            squares[rng.choice(members, size=k, replace=False)] = True
    order = rng.permutation(n)
    return labels[order].astype(int), squares[order].astype(bool)


def make_plan(seed: int = 0, n_train: int = 6000, n_val: int = 1000,
              n_test: int = 2000, bias_ratio: float = 0.99) -> list[dict]:
    """Everything random about the dataset, decided up front (no pixels yet).

    Returns one dict per image: split, index, base (load_digits index),
    label, square, and affine params (rot deg, scale, shear, tx, ty).
    """
    rng = np.random.default_rng([seed, 1])
    digits = load_digits().target
    pools = split_base_pools(seed)
    plan = []
    for split, n in zip(SPLITS, (n_train, n_val, n_test)):
        labels, squares = _labels_and_squares(rng, split, n, bias_ratio)
        base = np.empty(n, dtype=int)
        for lab in (0, 1):
            slots = np.flatnonzero(labels == lab)
            cands = pools[split][(digits[pools[split]] >= 5) == bool(lab)]
            # Cycle through a shuffled pool so every base digit is used ~equally.
            reps = -(-len(slots) // len(cands))
            base[slots] = np.concatenate([rng.permutation(cands) for _ in range(reps)])[:len(slots)]
        rot = rng.uniform(-12, 12, n)
        scale = rng.uniform(0.9, 1.1, n)
        shear = rng.uniform(-0.15, 0.15, n)
        shift = rng.uniform(-2, 2, (n, 2))
        for i in range(n):
            plan.append(dict(split=split, index=i, base=int(base[i]), label=int(labels[i]),
                             square=bool(squares[i]), rot=rot[i], scale=scale[i],
                             shear=shear[i], tx=shift[i, 0], ty=shift[i, 1]))
    return plan


def _render(digit8: np.ndarray, p: dict, size: int) -> Image.Image:
    """White-on-black digit, ~20/28 of the canvas, with a small affine jitter."""
    glyph = Image.fromarray(np.round(digit8 * (255 / 16)).astype(np.uint8), "L")
    d = round(size * 20 / 28)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(glyph.resize((d, d), Image.BILINEAR), ((size - d) // 2, (size - d) // 2))
    # Forward map about the centre: shift . rotate . shear . scale; PIL wants the inverse.
    c = (size - 1) / 2
    t = np.deg2rad(p["rot"])
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    fwd = rot @ np.array([[1.0, p["shear"]], [0.0, 1.0]]) * p["scale"]
    inv = np.linalg.inv(fwd)
    off = np.array([c, c]) - inv @ np.array([c + p["tx"], c + p["ty"]])
    coeffs = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
    return canvas.transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=0)


def write_biased_digits(out_dir: str | os.PathLike, *, seed: int = 0, n_train: int = 6000,
                        n_val: int = 1000, n_test: int = 2000, image_size: int = 28,
                        bias_ratio: float = 0.99) -> pathlib.Path:
    """Write the biased-digits dataset to ``out_dir``; return its path."""
    out = pathlib.Path(out_dir)
    images = load_digits().images
    rows = []
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    for p in make_plan(seed, n_train, n_val, n_test, bias_ratio):
        arr = np.array(_render(images[p["base"]], p, image_size).convert("RGB"))
        if p["square"]:
            arr[:SQUARE, :SQUARE] = RED
        rel = f"images/{p['split']}/{p['index']:06d}.png"
        Image.fromarray(arr, "RGB").save(out / rel)
        rows.append((rel, p["label"], p["split"], group_name(p["label"], p["square"])))
    with open(out / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("filename", "label", "split", "group"))
        w.writerows(rows)
    return out


def zip_dataset(out_dir: str | os.PathLike) -> pathlib.Path:
    """Zip metadata.csv + the images it lists (paths relative to out_dir).

    Only listed files go in (stale files from older runs are skipped), with a
    fixed timestamp so the archive is byte-reproducible too.
    """
    out = pathlib.Path(out_dir)
    with open(out / "metadata.csv", newline="") as f:
        names = ["metadata.csv"] + [r["filename"] for r in csv.DictReader(f)]
    zpath = out.with_name(out.name + ".zip")
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in names:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, (out / name).read_bytes())
    return zpath


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the offline biased-digits dataset.")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=6000)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--zip", action="store_true", help="also write OUT_DIR.zip")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = write_biased_digits(a.out_dir, seed=a.seed, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    if a.zip:
        print(f"wrote {zip_dataset(out)}")


if __name__ == "__main__":
    main()
