"""Data at scale: decoding speed, a whole CLI job's peak memory, and the second job's prepare.

For each size N (default 2k, 10k, 50k) the script makes a photo-like JPEG dataset (two
classes, sizes 256-512 px, not square; zipped as a user would upload it), then in one run:

1. **decode**: ``masktune_core.decoded.decode_once`` into a fresh cache entry at 224 px on all
   cores, against a plain PIL loop (open, convert to RGB, resize to 224x224) over the same
   files in a process pool of the same size; img/s of both and their ratio.
2. **job**: the CLI (``python -m masktune_core run``) on the zip, 1 ERM epoch at 224 px, with
   a fresh dataset cache: the job process's peak RSS (and what importing torch alone took of
   it), and the time of its prepare stage (unpack + index + decode).
3. **again**: the same CLI job on the same dataset and cache, other output folder: peak RSS and
   the prepare stage's time against the first job's.

The model is a deliberately tiny CNN registered by the launcher (a strided 8x8 conv, a 3x3
conv, a linear head): what the table measures is the data path (decoding, reading batches,
masks), which is the same for every architecture; a real model adds its weights and
activations, which depend on the batch size, not on N.

    python bench/scale.py [--sizes 2000 10000 50000] [--workdir /tmp/masktune-scale]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SIZE = 224

# The CLI job, run in a child process that reports its own peak RSS: the tiny model is
# registered first, then masktune_core's CLI runs as `python -m masktune_core run` would.
LAUNCHER = r"""
import json, resource, sys, time
from torch import nn
from masktune_core import models
from masktune_core.__main__ import main


def tiny(num_classes, input_size):  # saliency reads the last ReLU's 28x28 map (found generically)
    return nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


models.register(models.Architecture("bench_tiny", "masktune", "bench_tiny", tiny, 224, 16, "bench only: a tiny CNN"))
baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch and friends, imported
events = []
import masktune_core.pipeline as pipeline
real_emit = pipeline.MaskTuneRun._emit
def timed_emit(self, kind, fraction=0.0, message="", **data):
    if kind == "stage":
        events.append((self._stage, time.monotonic()))
    return real_emit(self, kind, fraction, message, **data)
pipeline.MaskTuneRun._emit = timed_emit
code = main(sys.argv[1:])
stages = {name: round(events[i + 1][1] - t, 2) for i, (name, t) in enumerate(events[:-1])}
print(json.dumps({"rc": code, "stages": stages, "baseline_mb": baseline_mb,
                  "self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _photo(args: tuple[Path, int]) -> None:
    """A photo-like JPEG: smooth colour gradients, a few blobs, sensor noise; 256-512 px, not square."""
    path, seed = args
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(256, 513, 2))
    if w == h:
        w += 1
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 60 * np.sin(a * x / 40 + b * y / 55 + p * 6)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(15, 80)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_dataset(workdir: Path, n: int) -> tuple[Path, list[Path]]:
    folder = workdir / f"photos_{n}"
    archive = workdir / f"photos_{n}.zip"
    files = [folder / "train" / ("a" if i % 2 else "b") / f"{i:06d}.jpg" for i in range(n)]
    if not archive.exists():
        todo = [(p, i) for i, p in enumerate(files) if not p.exists()]
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_photo, todo, chunksize=64))
        partial = archive.with_suffix(".zip.tmp")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as zf:  # JPEGs do not compress further
            for p in files:
                zf.write(p, p.relative_to(folder).as_posix())
        partial.replace(archive)
    return archive, files


def _plain_pil(paths: list[Path]) -> int:
    for p in paths:
        with Image.open(p) as img:
            np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    return len(paths)


def plain_pil_rate(files: list[Path], workers: int) -> float:
    chunks = [files[i:i + 64] for i in range(0, len(files), 64)]
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        done = sum(pool.map(_plain_pil, chunks))
    return done / (time.perf_counter() - start)


def decode_rate(files: list[Path], root: Path, entry: Path) -> float:
    from masktune_core.decoded import decode_once

    named = {p.relative_to(root).as_posix(): p for p in files}
    start = time.perf_counter()
    _, decoded = decode_once(named, entry, SIZE)
    assert decoded == len(files)
    return decoded / (time.perf_counter() - start)


def cli_job(archive: Path, out: Path, cache: Path) -> dict:
    args = ["run", "--data", str(archive), "--arch", "bench_tiny", "--out", str(out), "--epochs", "1",
            "--batch-size", "128", "--cache-dir", str(cache), "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 50000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/masktune-scale"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    workers = os.cpu_count() or 1
    rows = []
    for n in args.sizes:
        archive, files = make_dataset(args.workdir, n)
        run_dir = args.workdir / f"run_{n}"
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        ours = decode_rate(files, args.workdir / f"photos_{n}", run_dir / "entry")
        plain = plain_pil_rate(files, workers)
        first = cli_job(archive, run_dir / "first", run_dir / "cache")
        again = cli_job(archive, run_dir / "again", run_dir / "cache")
        rows.append((n, ours, plain, first, again))
        print(f"N={n}: decode {ours:.0f} img/s, plain PIL {plain:.0f} img/s, first job {first}, again {again}", flush=True)

    print(f"\ncommand: `python bench/scale.py --sizes {' '.join(map(str, args.sizes))}` "
          f"({platform.processor() or platform.machine()}, {workers} cores, python {platform.python_version()})\n")
    print("| images | decoded array | decode img/s (ours) | plain PIL img/s | ratio | job peak RSS (after imports) "
          "| prepare, 1st job | prepare, 2nd job | 2nd / 1st | 2nd job peak RSS | 1st job, whole |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, ours, plain, first, again in rows:
        p1, p2 = first["stages"]["prepare"], again["stages"]["prepare"]
        print(f"| {n:,} | {n * SIZE * SIZE * 3 / 2**30:.2f} GiB | {ours:.0f} | {plain:.0f} | {ours / plain:.2f}x "
              f"| {first['self_mb']:.0f} MB ({first['baseline_mb']:.0f} MB) | {p1:.1f} s | {p2:.2f} s | {p2 / p1:.1%} "
              f"| {again['self_mb']:.0f} MB | {sum(first['stages'].values()):.0f} s |")
    if len(rows) >= 2:
        growth = rows[-1][3]["self_mb"] - rows[-2][3]["self_mb"]
        print(f"\npeak RSS growth from {rows[-2][0]:,} to {rows[-1][0]:,} images: {growth:+.0f} MB")
    print(f"\n{shlex.join(sys.argv)}")


if __name__ == "__main__":
    main()
