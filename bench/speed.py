"""Training and saliency speed: the project's loops against bare PyTorch on the same data, side by side.

    .venv/bin/python bench/speed.py [--device cpu|cuda] [--precision fp32 bf16 ...] [--only NAME ...]
                                    [--repeats 3] [--warmup 1] [--threads N] [--out FILE]

Sections (``--only`` takes section names and/or architectures, e.g. ``--only erm resnet18``):

- **erm**: one epoch of ``masktune_core.training.train_one_epoch`` over a split of decoded images on
  disk (read ahead by a thread, pinned and converted on the device on a GPU) against a bare PyTorch
  loop over the same uint8 images held in memory as one tensor (per batch: index, to the device,
  float/255, normalise, forward, cross-entropy, backward, SGD step). Both train a copy of the same
  initial model, placed by ``place_model``, with the same SGD settings (``make_optimizer``), the same
  batches in the same order (``epoch_generator``) and the same autocast dtype.
- **finetune**: the same, the project's loop reading the packed masks (``masks=RowFile(...)``, as
  the pipeline's finetune stage does) and applying them per batch, against the bare loop over
  images masked once beforehand and held in memory.
- **saliency**: ``masktune_core.saliency.xgradcam`` (under the run's autocast) against
  ``pytorch_grad_cam.XGradCAM`` (always fp32: it goes through numpy) and an eval-mode
  ``torch.no_grad()`` inference pass (same autocast) on the same batch; models and batches are
  those of bench/saliency_speed.py (small_cnn trained briefly on biased digits, ResNets random).
- **agreement**: xgradcam under bf16 autocast against fp32 on the same batch: mean and max abs
  difference of the maps, IoU of the masks ``threshold_masks`` makes of them, share of images
  whose predicted class is the same. On the CPU this is CPU autocast.

Training data: biased digits (``write_biased_digits``, 28 px) decoded at each size with
``decode_dataset``; finetune masks: ``threshold_masks`` of smooth random maps, packed with
``pack_masks`` into a ``RowFile`` (what a mask holds does not change the work). The methods of a
row run round-robin once per repeat, after ``--warmup`` rounds, so they share the load; img/s
come from the median time; ratios are medians of the per-repeat ratios (min-max in brackets).
Goal (issue 9): the project's epoch within 1.1x of the bare loop's time.

Writes the tables to bench/results/speed.md (``--out``). bench/gpu_check.py reuses these pieces.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from jobspec import ErmConfig
from masktune_core.data import IMAGENET_MEAN, IMAGENET_STD, SplitRows, decode_dataset, index_dataset
from masktune_core.masking import apply_masks, pack_masks, threshold_masks, unpack_masks
from masktune_core.models import create_model, saliency_target_layer
from masktune_core.rowfile import RowFile
from masktune_core.sample_data import write_biased_digits
from masktune_core.saliency import xgradcam
from masktune_core.training import (
    LoopSettings, autocast_dtype, epoch_generator, make_optimizer, place_model, train_one_epoch,
)
from saliency_speed import _sync, digits_model_and_batch, make_model, run_gradcam

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("erm", "finetune", "saliency", "agreement")
GOAL_OVER_BARE = 1.1  # the project's epoch time / the bare loop's


@dataclass(frozen=True)
class TrainSetting:
    arch: str
    size: int
    batch: int
    batches: int
    normalization: str

    @property
    def images(self) -> int:
        return self.batch * self.batches


TRAIN = {
    "cpu": (TrainSetting("small_cnn", 28, 128, 6, "none"), TrainSetting("resnet18", 64, 32, 4, "imagenet"),
            TrainSetting("resnet50", 224, 8, 2, "imagenet")),
    "cuda": (TrainSetting("small_cnn", 28, 256, 20, "none"), TrainSetting("resnet18", 64, 256, 20, "imagenet"),
             TrainSetting("resnet50", 224, 128, 20, "imagenet")),
}
SALIENCY = {  # (arch, size, batch)
    "cpu": (("small_cnn", 28, 256), ("resnet18", 224, 32), ("resnet50", 224, 8)),
    "cuda": (("small_cnn", 28, 1024), ("resnet18", 224, 256), ("resnet50", 224, 128)),
}


# ---------------------------------------------------------------- timing


def round_robin(methods: dict[str, Callable[[int], object]], repeats: int, warmup: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each method; per round every method runs once, in turn (called with the
    round's number, warm-up rounds counting from 1000)."""
    for w in range(warmup):
        for fn in methods.values():
            fn(1000 + w)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(repeats):
        for name, fn in methods.items():
            _sync(device)
            start = time.perf_counter()
            fn(r)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


@dataclass
class Ratio:
    """``a`` time / ``b`` time: median over rounds, and its range."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f})"


def time_ratio(times: dict[str, list[float]], a: str, b: str) -> Ratio:
    ratios = [x / y for x, y in zip(times[a], times[b])]
    return Ratio(statistics.median(ratios), min(ratios), max(ratios))


def rate(times: dict[str, list[float]], name: str, images: int) -> float:
    """Images per second from the median time."""
    return images / statistics.median(times[name])


# ---------------------------------------------------------------- data


def decoded_train_split(root: Path, size: int, cache: Path, count: int | None = None) -> SplitRows:
    """The first ``count`` training images of the dataset at ``root``, decoded at ``size`` px into
    ``cache`` (or reused from it): rows on disk, as a job reads them."""
    train = decode_dataset(index_dataset(root), size, cache / f"{size}px").splits["train"]
    n = len(train) if count is None else count
    if n > len(train):
        raise ValueError(f"{root} has {len(train)} training images, {n} asked for")
    return SplitRows(train.images, train.rows[:n], train.labels[:n], train.groups[:n])


def packed_masks_file(path: Path, count: int, size: int, seed: int = 0) -> RowFile:
    """Packed masks of ``count`` images, one row per split position, as the saliency stage writes them
    (``threshold_masks`` of smooth random maps)."""
    gen = torch.Generator().manual_seed(seed)
    maps = F.interpolate(torch.rand(count, 1, 7, 7, generator=gen), size=(size, size), mode="bilinear",
                         align_corners=False).squeeze(1)
    with RowFile.create(path, (count, (size * size + 7) // 8), np.uint8) as out:
        out.write(0, pack_masks(threshold_masks(maps)))
    return RowFile(path)


# ---------------------------------------------------------------- the two training loops


def model_copies(arch: str, size: int, loop: LoopSettings, copies: int, num_classes: int = 2):
    """``copies`` (model, optimizer) pairs from the same initial weights, placed as the pipeline places them."""
    torch.manual_seed(0)
    base = create_model(arch, num_classes, size)
    out = []
    for _ in range(copies):
        model = place_model(copy.deepcopy(base), loop)
        out.append((model, make_optimizer(model, ErmConfig())))
    return out


def project_epoch(model, optimizer, split: SplitRows, batch: int, loop: LoopSettings, epoch: int,
                  masks: RowFile | None = None) -> None:
    train_one_epoch(model, optimizer, split, batch, epoch_generator(0, "erm", epoch), loop, masks)


class BareLoop:
    """A plain PyTorch training loop over uint8 images [N, 3, S, S] held in memory as one tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int, device: torch.device,
                 normalization: str, precision: torch.dtype | None):
        self.images, self.labels, self.batch, self.device = images, labels, batch, device
        self.precision = precision
        self.mean = self.std = None
        if normalization == "imagenet":
            self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
            self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)

    def epoch(self, model, optimizer, epoch: int) -> None:
        model.train()
        order = torch.randperm(len(self.labels), generator=epoch_generator(0, "erm", epoch))
        for idx in order.split(self.batch):
            x = self.images[idx].to(self.device, non_blocking=True)
            y = self.labels[idx].to(self.device, non_blocking=True)
            x = x.float() / 255
            if self.mean is not None:
                x = (x - self.mean) / self.std
            with torch.autocast(self.device.type, dtype=self.precision, enabled=self.precision is not None):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()


def train_pair(setting: TrainSetting, split: SplitRows, device: torch.device, precision: torch.dtype | None,
               repeats: int, warmup: int, masks: RowFile | None = None, extra: dict | None = None) -> dict:
    """The project's epoch vs the bare loop (over the masked images when ``masks``); ``extra``:
    more variants of the project's loop, name -> LoopSettings, timed in the same rounds."""
    loop = LoopSettings(device=device, normalization=setting.normalization, precision=precision)
    variants = {"ours": loop, **(extra or {})}
    pairs = model_copies(setting.arch, setting.size, loop, len(variants) + 1, len(split.labels.unique()))
    images = split.pixels()
    if masks is not None:
        images = apply_masks(images, unpack_masks(masks.read(np.arange(len(split))), setting.size))
    bare = BareLoop(images, split.labels, setting.batch, device, setting.normalization, precision)
    methods: dict[str, Callable[[int], object]] = {}
    for (name, settings), (model, optimizer) in zip(variants.items(), pairs):
        methods[name] = lambda r, m=model, o=optimizer, s=settings: project_epoch(m, o, split, setting.batch, s, r, masks)
    bare_model, bare_optimizer = pairs[-1]
    methods["bare"] = lambda r: bare.epoch(bare_model, bare_optimizer, r)
    times = round_robin(methods, repeats, warmup, device)
    return {"times": times, "ips": {name: rate(times, name, len(split)) for name in times},
            "over_bare": time_ratio(times, "ours", "bare")}


# ---------------------------------------------------------------- saliency


def saliency_model_and_batch(arch: str, size: int, batch: int, device: torch.device):
    """bench/saliency_speed.py's model and batch for a setting, with its target layer."""
    if arch == "small_cnn":
        model, x = digits_model_and_batch(batch, device)
    else:
        model = make_model(arch, size, device)
        x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    if device.type == "cuda":  # as the pipeline places it
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, saliency_target_layer(model, arch, size), x


def inference(model, x: torch.Tensor, precision: torch.dtype | None) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(x.device.type, dtype=precision, enabled=precision is not None):
        return model(x)


def saliency_times(model, layer, x: torch.Tensor, precision: torch.dtype | None, repeats: int, warmup: int,
                   with_gradcam: bool = True) -> dict:
    methods = {"ours": lambda r: xgradcam(model, layer, x, precision)}
    if with_gradcam:
        methods["grad-cam"] = lambda r: run_gradcam(model, layer, x)
    methods["inference"] = lambda r: inference(model, x, precision)
    times = round_robin(methods, repeats, warmup, x.device)
    model.eval()  # grad-cam leaves it in eval mode; xgradcam restores it
    out = {"times": times, "ips": {name: rate(times, name, len(x)) for name in times},
           "over_inference": time_ratio(times, "ours", "inference")}
    if with_gradcam:
        out["speedup_vs_gradcam"] = time_ratio(times, "grad-cam", "ours")
        maps = xgradcam(model, layer, x, precision)[0].float().cpu()
        out["max_abs_diff_vs_gradcam"] = (maps - run_gradcam(model, layer, x).float()).abs().max().item()
    return out


def bf16_agreement(model, layer, x: torch.Tensor, threshold_std: float = 2.0) -> dict:
    """xgradcam under bf16 autocast vs fp32 on the same batch."""
    full, predicted = xgradcam(model, layer, x)
    low, predicted_low = xgradcam(model, layer, x, torch.bfloat16)
    diff = (full - low).abs()
    a, b = threshold_masks(full.cpu(), threshold_std), threshold_masks(low.cpu(), threshold_std)
    union = int((a | b).sum())
    return {"mean_abs": diff.mean().item(), "max_abs": diff.max().item(),
            "iou": int((a & b).sum()) / union if union else 1.0,
            "same_class": (predicted == predicted_low).float().mean().item(),
            "masked_fp32": a.float().mean().item(), "maps_nonzero": (full.flatten(1).amax(1) > 0).float().mean().item()}


# ---------------------------------------------------------------- the run


def wanted(only: list[str] | None, section: str, arch: str) -> bool:
    if not only:
        return True
    sections = [o for o in only if o in SECTIONS]
    archs = [o for o in only if o not in SECTIONS]
    return (not sections or section in sections) and (not archs or arch in archs)


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the pipeline does
    kind = "cuda" if device.type == "cuda" else "cpu"
    precisions = list(dict.fromkeys(autocast_dtype(p, device) for p in args.precision))
    results: dict = {"erm": [], "finetune": [], "saliency": [], "agreement": []}
    with tempfile.TemporaryDirectory(prefix="masktune-speed-") as tmp:
        tmp = Path(tmp)
        settings = [s for s in TRAIN[kind] if wanted(args.only, "erm", s.arch) or wanted(args.only, "finetune", s.arch)]
        if settings:
            root = write_biased_digits(tmp / "digits", seed=0, n_train=max(s.images for s in settings), n_val=8, n_test=8)
        for s in settings:
            split = decoded_train_split(root, s.size, tmp / "cache", s.images)
            for dtype in precisions:
                if wanted(args.only, "erm", s.arch):
                    row = train_pair(s, split, device, dtype, args.repeats, args.warmup)
                    results["erm"].append({"setting": s, "precision": precision_name(dtype), **row})
                    log(f"erm {s.arch} @ {s.size} px {precision_name(dtype)}: ours/bare {row['over_bare']}")
                if wanted(args.only, "finetune", s.arch):
                    with packed_masks_file(tmp / f"masks_{s.arch}_{s.size}.npy", len(split), s.size) as masks:
                        row = train_pair(s, split, device, dtype, args.repeats, args.warmup, masks)
                    results["finetune"].append({"setting": s, "precision": precision_name(dtype), **row})
                    log(f"finetune {s.arch} @ {s.size} px {precision_name(dtype)}: ours/bare {row['over_bare']}")
    for arch, size, batch in SALIENCY[kind]:
        speed, agree = wanted(args.only, "saliency", arch), wanted(args.only, "agreement", arch)
        if not (speed or agree):
            continue
        model, layer, x = saliency_model_and_batch(arch, size, batch, device)
        for dtype in precisions if speed else []:
            row = saliency_times(model, layer, x, dtype, args.repeats, args.warmup)
            results["saliency"].append({"setting": (arch, size, batch), "precision": precision_name(dtype), **row})
            log(f"saliency {arch} @ {size} px {precision_name(dtype)}: ours/inference {row['over_inference']}")
        if agree:
            results["agreement"].append({"setting": (arch, size, batch), **bf16_agreement(model, layer, x)})
            log(f"agreement {arch} @ {size} px: {results['agreement'][-1]}")
    return results


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def render(results: dict, args, command: str, load: tuple[float, float], seconds: float) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPUs"
    lines = [
        "# Training and saliency speed: the project's loops vs bare PyTorch",
        "",
        f"- command: `{command}`",
        f"- date: {now}; {seconds:.0f} s in all",
        f"- torch {torch.__version__}, python {platform.python_version()}, device `{args.device}` ({where}), "
        f"torch threads {torch.get_num_threads()}; 1-min load average {load[0]:.2f} at start, {load[1]:.2f} at end "
        "(a shared machine: absolute img/s are noisy, the ratios less so)",
        f"- {args.repeats} timed rounds after {args.warmup} warm-up round(s); in each round the methods of a row run "
        "one after the other; img/s from the median time; ratios: median of the per-round ratios (min-max).",
        "",
    ]
    for section, title in (("erm", "ERM epoch"), ("finetune", "Finetune epoch (packed masks vs pre-masked images)")):
        if not results[section]:
            continue
        lines += [
            f"**{title}**: `train_one_epoch` on decoded rows on disk vs a bare loop on an in-memory uint8 tensor "
            f"(goal: ours time / bare time <= {GOAL_OVER_BARE:g}x)",
            "",
            "| setting | precision | batches x batch | ours img/s | bare img/s | ours time / bare time | goal |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for r in results[section]:
            s = r["setting"]
            lines.append(f"| {s.arch} @ {s.size} px ({s.normalization} norm.) | {r['precision']} | {s.batches} x {s.batch} | "
                         f"{r['ips']['ours']:.1f} | {r['ips']['bare']:.1f} | {r['over_bare']} | "
                         f"{'met' if r['over_bare'].median <= GOAL_OVER_BARE else 'missed'} |")
        lines.append("")
    if results["saliency"]:
        lines += [
            "**Saliency**: our xGradCAM (under the row's autocast) vs `pytorch_grad_cam.XGradCAM` (fp32 always) vs "
            "eval-mode inference (same autocast), same model and batch",
            "",
            "| setting | precision | ours img/s | grad-cam img/s | inference img/s | ours vs grad-cam | "
            "ours time / inference time | max abs diff vs grad-cam |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["saliency"]:
            arch, size, batch = r["setting"]
            ips = r["ips"]
            lines.append(f"| {arch} @ {size} px, batch {batch} | {r['precision']} | {ips['ours']:.1f} | {ips['grad-cam']:.1f} | "
                         f"{ips['inference']:.1f} | {r['speedup_vs_gradcam']} | {r['over_inference']} | "
                         f"{r['max_abs_diff_vs_gradcam']:.1e} |")
        lines.append("")
    by_precision = _precision_speedups(results)
    if by_precision:
        lines += ["**fp32 vs bf16** (the project's code, img/s)", "",
                  "| row | fp32 img/s | bf16 img/s | bf16 speedup |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x |" for name, a, b in by_precision]
        lines.append("")
    if results["agreement"]:
        label = "CUDA bf16 autocast" if device.type == "cuda" else "CPU bf16 autocast (the GPU's bf16 kernels differ)"
        lines += [
            f"**bf16 saliency agreement** ({label} vs fp32, same batch; masks: `threshold_masks`, mean + 2 std)",
            "",
            "| setting | mean abs diff | max abs diff | mask IoU | same predicted class | pixels masked (fp32) | maps not all-zero |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["agreement"]:
            arch, size, batch = r["setting"]
            lines.append(f"| {arch} @ {size} px, batch {batch} | {r['mean_abs']:.1e} | {r['max_abs']:.1e} | {r['iou']:.3f} | "
                         f"{r['same_class']:.0%} | {r['masked_fp32']:.1%} | {r['maps_nonzero']:.0%} |")
        lines.append("")
    return "\n".join(lines)


def _precision_speedups(results: dict) -> list[tuple[str, float, float]]:
    out = []
    for section in ("erm", "finetune", "saliency"):
        rows = {}
        for r in results[section]:
            s = r["setting"]
            key = f"{section} {s.arch} @ {s.size} px" if isinstance(s, TrainSetting) else f"{section} {s[0]} @ {s[1]} px"
            rows.setdefault(key, {})[r["precision"]] = r["ips"]["ours"]
        out += [(key, p["fp32"], p["bf16"]) for key, p in rows.items() if "fp32" in p and "bf16" in p]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", nargs="+", choices=["auto", "fp32", "bf16", "fp16"], default=None,
                    help="runtime.precision values to time (default: fp32 and bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--only", nargs="*", default=None, help=f"sections ({', '.join(SECTIONS)}) and/or architectures")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--out", default=str(RESULTS / "speed.md"))
    args = ap.parse_args(argv)
    args.precision = args.precision or (["fp32", "bf16"] if args.device == "cuda" else ["fp32"])
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    results = run(args)
    command = shlex.join(["python", "bench/speed.py", *(argv if argv is not None else sys.argv[1:])])
    text = render(results, args, command, (load_before, os.getloadavg()[0]), time.perf_counter() - start)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
