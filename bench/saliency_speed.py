"""Saliency throughput: our xGradCAM vs pytorch_grad_cam.XGradCAM vs a plain inference pass.

    .venv/bin/python bench/saliency_speed.py [--device cpu] [--repeats 7]

Settings: small_cnn at 28 px (batch 256), resnet18 at 224 px (batch 32), resnet50 and
convnext_tiny at 224 px (batch 16), each at its saliency target layer
(``masktune_core.models.saliency_target_layer``); ``--only NAME ...`` runs a subset.
Per setting the three methods run round-robin (ours, grad-cam, inference) once
per repeat, after warm-up, so the ratios come from the same run under the same
load; the table reports the median time of each. Issue targets (224 px): ours
>= 3x grad-cam, ours <= 1.5x inference. Also prints the max abs difference
between our maps and grad-cam's on the same batch (the agreement figure).

Writes the table to bench/results/saliency_speed.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tempfile

import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_grad_cam import XGradCAM

from masktune_core.models import create_model, saliency_target_layer
from masktune_core.sample_data import write_biased_digits
from masktune_core.saliency import xgradcam

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = (("small_cnn", 28, 256), ("resnet18", 224, 32), ("resnet50", 224, 16), ("convnext_tiny", 224, 16))
TARGET_SPEEDUP = 3.0  # ours vs grad-cam, at 224 px
TARGET_OVER_INFERENCE = 1.5  # ours time / inference time, at 224 px


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(arch: str, size: int, device: torch.device) -> torch.nn.Module:
    """A model in eval mode whose BatchNorm layers have seen some data (trained-ish running stats)."""
    torch.manual_seed(0)
    model = create_model(arch, 2, size).to(device)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.rand(16, 3, size, size, device=device))
    return model.eval()


def _load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [line.split(",") for line in (root / "metadata.csv").read_text().splitlines()[1:]]
    rows = [r for r in rows if r[2] == split]
    images = np.stack([np.array(Image.open(root / r[0]).convert("RGB")) for r in rows])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return x, torch.tensor([int(r[1]) for r in rows])


def digits_model_and_batch(batch: int, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    """small_cnn briefly trained (3 epochs, 1024 images) on biased digits, and a batch of test digits.

    A randomly initialised small_cnn gives all-zero xGradCAM maps (ReLU of a
    negative weighted sum), which would make the agreement figure vacuous.
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = write_biased_digits(tmp, seed=0, n_train=1024, n_val=4, n_test=batch)
        x_train, y_train = _load_split(root, "train")
        x_test, _ = _load_split(root, "test")
    torch.manual_seed(0)
    model = create_model("small_cnn", 2, 28).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for idx in torch.randperm(len(y_train), generator=gen).split(128):
            loss = F.cross_entropy(model(x_train[idx].to(device)), y_train[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval(), x_test.to(device)


def run_ours(model, layer, x):
    return xgradcam(model, layer, x)[0]


def run_gradcam(model, layer, x):
    # Direct use of the library, predicted class (targets=None -> argmax), as one would call it.
    with XGradCAM(model=model, target_layers=[layer]) as cam:
        maps = cam(input_tensor=x, targets=None)
    return torch.from_numpy(maps)


def run_inference(model, layer, x):
    with torch.no_grad():
        return model(x)


METHODS = {"ours": run_ours, "grad-cam": run_gradcam, "inference": run_inference}


def bench_setting(arch: str, size: int, batch: int, device: torch.device, repeats: int, warmup: int) -> dict:
    if arch == "small_cnn":
        model, x = digits_model_and_batch(batch, device)
    else:
        model = make_model(arch, size, device)
        gen = torch.Generator().manual_seed(1)
        x = torch.rand(batch, 3, size, size, generator=gen).to(device)
    layer = saliency_target_layer(model, arch, size)

    # Agreement on this batch (model state is restored by both paths; eval mode throughout).
    ours_maps = run_ours(model, layer, x).float().cpu()
    ref_maps = run_gradcam(model, layer, x).float().cpu()
    model.eval()
    max_diff = (ours_maps - ref_maps).abs().max().item()
    nontrivial = (ours_maps.flatten(1).amax(1) > 0).float().mean().item()

    times = {name: [] for name in METHODS}
    for _ in range(warmup):
        for fn in METHODS.values():
            fn(model, layer, x)
            model.eval()
    _sync(device)
    for _ in range(repeats):
        for name, fn in METHODS.items():
            _sync(device)
            t0 = time.perf_counter()
            fn(model, layer, x)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            model.eval()  # grad-cam leaves the model in eval anyway; keep it explicit
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "arch": arch, "size": size, "batch": batch, "median_s": med,
        "ips": {name: batch / t for name, t in med.items()},
        # Ratios per round (the three methods ran back to back under the same load), then the median.
        "speedup_vs_gradcam": statistics.median(g / o for g, o in zip(times["grad-cam"], times["ours"])),
        "ours_over_inference": statistics.median(o / i for o, i in zip(times["ours"], times["inference"])),
        "speedup_range": (min(g / o for g, o in zip(times["grad-cam"], times["ours"])),
                          max(g / o for g, o in zip(times["grad-cam"], times["ours"]))),
        "over_inference_range": (min(o / i for o, i in zip(times["ours"], times["inference"])),
                                 max(o / i for o, i in zip(times["ours"], times["inference"]))),
        "max_abs_diff": max_diff, "nontrivial_maps": nontrivial,
    }


def render(rows: list[dict], args, command: str, load: tuple[float, float]) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Saliency throughput",
        "",
        f"- command: `{command}`",
        f"- date: {now}",
        f"- torch {torch.__version__}, python {platform.python_version()}, device `{args.device}`, "
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; 1-min load average "
        f"{load[0]:.2f} at start, {load[1]:.2f} at end (shared machine: absolute img/s are noisy, ratios less so)",
        f"- {args.repeats} timed repeats after {args.warmup} warm-up rounds; methods run round-robin within "
        "each repeat; img/s from the median time per method; ratios = median over repeats of the per-repeat "
        "ratio (min-max in brackets). Model in eval mode. small_cnn: trained 3 epochs on 1024 "
        "biased-digits images (seed 0), batch = biased-digits test images. Others: random weights (seed 0), "
        "BatchNorm stats from 5 train-mode passes on random data, random inputs in 0..1.",
        "- ours = `masktune_core.saliency.xgradcam`; grad-cam = `pytorch_grad_cam.XGradCAM` "
        "(targets=None, i.e. predicted class); inference = eval-mode `torch.no_grad()` forward on the same batch.",
        f"- targets (issue, 224 px): ours >= {TARGET_SPEEDUP:g}x grad-cam, ours time <= {TARGET_OVER_INFERENCE:g}x inference time.",
        "",
        "| setting | batch | ours img/s | grad-cam img/s | inference img/s | ours / grad-cam speedup "
        "| ours time / inference time | max abs diff vs grad-cam | maps not all-zero |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ips = r["ips"]
        lines.append(
            f"| {r['arch']} @ {r['size']} px | {r['batch']} | {ips['ours']:.0f} | {ips['grad-cam']:.0f} | "
            f"{ips['inference']:.0f} | {r['speedup_vs_gradcam']:.2f}x ({r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}) | "
            f"{r['ours_over_inference']:.2f}x ({r['over_inference_range'][0]:.2f}-{r['over_inference_range'][1]:.2f}) | "
            f"{r['max_abs_diff']:.2e} | {r['nontrivial_maps']:.0%} |"
        )
    lines.append("")
    for r in rows:
        if r["size"] >= 224:
            ok1 = r["speedup_vs_gradcam"] >= TARGET_SPEEDUP
            ok2 = r["ours_over_inference"] <= TARGET_OVER_INFERENCE
            lines.append(
                f"Verdict ({r['arch']} @ {r['size']} px): speedup {r['speedup_vs_gradcam']:.2f}x vs target "
                f">= {TARGET_SPEEDUP:g}x -> {'MET' if ok1 else 'MISSED'}; ours/inference "
                f"{r['ours_over_inference']:.2f}x vs target <= {TARGET_OVER_INFERENCE:g}x -> {'MET' if ok2 else 'MISSED'}."
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--only", nargs="*", default=None, help="architectures to run (default: all settings)")
    ap.add_argument("--out", default=str(RESULTS / "saliency_speed.md"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = []
    for arch, size, batch in SETTINGS:
        if args.only and arch not in args.only:
            continue
        rows.append(bench_setting(arch, size, batch, device, args.repeats, args.warmup))
        print(f"done {arch} @ {size}px", file=sys.stderr)
    command = "python " + " ".join(["bench/saliency_speed.py", *(argv if argv is not None else sys.argv[1:])])
    text = render(rows, args, command, (load_before, os.getloadavg()[0]))
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
