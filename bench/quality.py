"""MaskTune, JTT and DFR against ERM on biased digits, over seeds; and how far the verdict can be trusted.

    PYTHONPATH=. .venv/bin/python bench/quality.py [--seeds 0 1 2 3 4] [--methods masktune jtt dfr]
        [--epochs 10] [--n-train 6000] [--official] [--deviation '{"masking": {"checkpoint": "last"}}']

Data: ``masktune_core.sample_data.write_biased_digits`` -- digits 0-4 vs 5-9, a 4x4 red square
top-left on 99% of class-0 and 1% of class-1 train/val images, test balanced over the four
(label, square) groups; one dataset per seed, generated with that seed.

Recipe: ``JobConfig(erm={"epochs": EPOCHS}, methods=METHODS, seed=SEED)``, every other field at its
default (small_cnn, SGD lr 0.01 momentum 0.9 wd 1e-4, batch 128; MaskTune: masks from the best ERM
checkpoint, one finetune epoch from the last; JTT: error set of ERM at epoch EPOCHS/5, upweighted
100x, retrained EPOCHS epochs; DFR: the best ERM model's last layer refitted on group-balanced
validation data). The default, 10 ERM epochs, keeps 5 seeds x 3 methods within about half an hour
on a shared 2-core CPU; ``--official`` is the paper's biased-MNIST recipe (100 ERM epochs on
6,000/1,000/2,000 images), several times slower.

What it reports, from each run's metrics.json (test split) and a verdict recomputed on val:

* per model: test worst-group accuracy mean +- std and min over seeds, group-mean accuracy;
* the verdict on **val** (the service's own ``verdict`` and ``recommend``, on the val images, as
  it judges a job without DFR; with DFR in ``methods`` the service judges on test, also listed)
  against what test shows: a change in test worst-group accuracy of >= +0.05 is "improved",
  <= -0.05 "worse", anything between "no change";
* the target "the verdict never says ``worse`` or advises keeping ERM when test worst-group
  accuracy rose by >= 0.10", with each violation;
* whether DFR reaches MaskTune's test worst-group accuracy, seed by seed.

``--deviation JSON`` (repeatable) adds MaskTune-only rows with a documented config deviation; they
reuse each seed's prepare and ERM outputs (and masks when masking is unchanged).
Writes the tables to bench/results/quality.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from masktune_core import JobConfig, MaskTuneRun
from masktune_core import runfolder as rf
from masktune_core.masking import unpack_masks
from masktune_core.metrics import LABELS, MIN_GROUP_IMAGES, recommend, verdict
from masktune_core.sample_data import SQUARE, write_biased_digits
from masktune_core.training import predict_logits

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("masktune", "jtt", "dfr")
CHEAP = {"epochs": 10, "n_train": 6000, "n_val": 1000, "n_test": 2000}
OFFICIAL = {"epochs": 100, "n_train": 6000, "n_val": 1000, "n_test": 2000}
CHANGE = 0.05  # a test worst-group change at least this large counts as improved (or, negative, worse)
CLEAR_RISE = 0.10  # a rise this large must never meet "worse" or "keep ERM"


def dataset(root: Path, seed: int, n_train: int, n_val: int, n_test: int) -> Path:
    path = root / f"data_seed{seed}_{n_train}_{n_val}_{n_test}"
    if not (path / "metadata.csv").exists():
        shutil.rmtree(path, ignore_errors=True)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_biased_digits(tmp, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)
        tmp.rename(path)
    return path


def progress_printer(label: str):
    t0 = time.perf_counter()

    def on_event(event) -> None:
        d = event.data
        if event.kind == "epoch":
            if d["epoch"] % 10 == 0 or d["epoch"] == d["epochs"] or d.get("phase") == "finetune":
                print(f"[{label} {time.perf_counter() - t0:6.0f}s] {event.stage} {d['epoch']}/{d['epochs']} "
                      f"loss {d['train_loss']:.4f} val {d['val_accuracy']:.4f}", file=sys.stderr, flush=True)
        elif event.kind in ("stage", "warning", "info"):
            print(f"[{label} {time.perf_counter() - t0:6.0f}s] {event.stage}: {event.message[:160]}",
                  file=sys.stderr, flush=True)

    return on_event


def seed_from_official(official: MaskTuneRun, deviation: MaskTuneRun) -> None:
    """Start the deviation's work dir from the official run's prepare/ERM (and saliency) outputs.

    Those stages depend only on the data, model, ERM (and masking) settings; when
    the two configs share them, copying is the same as recomputing.
    """
    if (deviation.workdir / rf.STATE).exists():
        deviation.dataset_sha256 = official.dataset_sha256
        state = json.loads((deviation.workdir / rf.STATE).read_text())
        if state.get("fingerprint") == deviation._fingerprint():
            return  # already seeded (or finished): let the pipeline resume
    shutil.rmtree(deviation.workdir, ignore_errors=True)
    deviation.workdir.mkdir(parents=True)
    shutil.copytree(official.workdir / "erm", deviation.workdir / "erm")
    shutil.copy2(official.workdir / rf.INDEX, deviation.workdir / rf.INDEX)  # both share one dataset cache
    finished = ["prepare", "erm"]
    if deviation.config.masking == official.config.masking:
        for name in (rf.saliency_stats(1), rf.masks_file(1)):
            shutil.copy2(official.workdir / name, deviation.workdir / name)
        finished.append("saliency:1")
    deviation.dataset_sha256 = official.dataset_sha256
    state = {"fingerprint": deviation._fingerprint(), "finished": finished}
    (deviation.workdir / rf.STATE).write_text(json.dumps(state, indent=2) + "\n")


def square_masking(run: MaskTuneRun) -> dict:
    """How much of the red square the masks cover, over the square-carrying training images."""
    masks = unpack_masks(np.load(run.workdir / rf.masks_file(1)), 28)  # bool [N, H, W], training split order
    groups = run.split("train").groups
    names = run.index["groups"]
    square_ids = [i for i, g in enumerate(names) if g.endswith("_square") and not g.endswith("no_square")]
    carrying = torch.isin(groups, torch.tensor(square_ids))
    frac = masks[carrying][:, :SQUARE, :SQUARE].flatten(1).float().mean(1)
    by_group = {}
    for gid in square_ids:
        sel = groups[carrying] == gid
        by_group[names[gid]] = (frac[sel] >= 0.5).float().mean().item() if sel.any() else float("nan")
    return {"square_masked": (frac >= 0.5).float().mean().item(), "square_masked_by_group": by_group}


def val_verdict(run: MaskTuneRun, metrics: dict) -> dict:
    """The service's verdict and recommendation computed on the val images, method by method (DFR, fitted on
    val, can be found worse there but never improved) -- what a job without a test split is told."""
    val = run.split("val")
    loop = run._loop()
    batch = run.config.masking.batch_size
    right = {name: predict_logits(run._trained(checkpoint), val, batch, loop).argmax(1) == val.labels
             for name, checkpoint in run._method_checkpoints().items()}
    masked = metrics.get("masking", {}).get("masked_pixel_fraction")
    by_method = {m: verdict(right["erm"], right[m], val.groups, run.index["groups"], "group", "val",
                            masked if m == "masktune" else None, seed=run.config.seed, method=m, fit_on_split=m == "dfr")
                 for m in run.config.methods}
    return {"by_method": by_method, "recommended": recommend(by_method)}


def run_one(data: Path, out: Path, config: JobConfig, device: str, label: str,
            official: MaskTuneRun | None = None) -> dict:
    run = MaskTuneRun(data, out, config, device=device, on_event=progress_printer(label), cache_dir=out.parent / "cache")
    if official is not None:
        seed_from_official(official, run)
    timing = out / "bench_seconds.json"  # wall time of the run that produced the outputs
    state = run.workdir / rf.STATE
    already_done = state.exists() and "export" in json.loads(state.read_text()).get("finished", []) and timing.exists()
    t0 = time.perf_counter()
    metrics = run.run()
    if already_done:
        seconds = json.loads(timing.read_text())["seconds"]
    else:
        seconds = time.perf_counter() - t0
        timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    best = torch.load(run.workdir / rf.ERM_BEST, weights_only=True)
    return {
        "run": run, "metrics": metrics, "seconds": seconds, "best_epoch": best["epoch"] + 1,
        "masking": square_masking(run) if "masktune" in config.methods else None,
        "val_verdict": val_verdict(run, metrics) if official is None else None,
    }


def deviation_label(deviation: dict, prefix: str = "") -> str:
    """{"masking": {"checkpoint": "last"}} -> masking.checkpoint=last"""
    parts = []
    for key, value in deviation.items():
        if isinstance(value, dict):
            parts.append(deviation_label(value, f"{prefix}{key}."))
        else:
            parts.append(f"{prefix}{key}={value}")
    return ",".join(parts)


def test_outcome(change: float) -> str:
    return "improved" if change >= CHANGE else "worse" if change <= -CHANGE else "no change"


AGREES = {("improved", "improved"), ("worse", "worse"), ("inconclusive", "no change")}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def render(per_seed: dict[int, dict], deviations: dict[str, dict[int, dict]], args, recipe: dict, command: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    methods = list(args.methods)
    models = ["erm", *methods]
    seeds = list(per_seed)
    run_s = sum(r["seconds"] for r in per_seed.values()) + sum(r["seconds"] for runs in deviations.values() for r in runs.values())
    official = all(recipe[k] == OFFICIAL[k] for k in OFFICIAL)
    deviation = "none: the paper's biased-MNIST recipe" if official else (
        f"{recipe['epochs']} ERM epochs on {recipe['n_train']:,} training images instead of the paper's "
        f"{OFFICIAL['epochs']} on {OFFICIAL['n_train']:,} (cheap enough for a shared 2-core CPU; `--official` runs the paper's)")
    lines = [
        "# Quality: MaskTune, JTT and DFR against ERM on biased digits",
        "",
        f"- command: `{command}`",
        f"- date: {now}; the runs took {run_s / 60:.1f} min for {len(seeds)} seeds, as they ran "
        f"(a rerun reuses finished runs; this machine: 2 cores shared with other work)",
        f"- torch {torch.__version__}, python {platform.python_version()}, device `{args.device}`, "
        f"torch threads {torch.get_num_threads()}",
        f"- data: `write_biased_digits(seed=SEED, n_train={recipe['n_train']}, n_val={recipe['n_val']}, "
        f"n_test={recipe['n_test']})`; a 4x4 red square top-left on 99% of class-0 and 1% of class-1 train+val images; "
        "test balanced over the 4 groups.",
        f"- recipe: `JobConfig(erm={{\"epochs\": {recipe['epochs']}}}, methods={methods}, seed=SEED)`, all else default "
        "(small_cnn, SGD lr 0.01 momentum 0.9 wd 1e-4, batch 128; MaskTune: masks from ERM best, 1 finetune epoch "
        f"from ERM last; JTT: error set of ERM at epoch {max(1, round(recipe['epochs'] / 5))}, x100, retrained "
        f"{recipe['epochs']} epochs; DFR: ERM best's last layer refitted on group-balanced val).",
        f"- deviation from the official recipe: {deviation}.",
        "- ERM is the best (val accuracy) ERM checkpoint, the model the service compares with.",
        "",
        "## Test accuracy over seeds",
        "",
        "| model | worst-group mean ± std | worst-group min | group-mean mean ± std | overall mean ± std |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in models:
        tests = [per_seed[s]["metrics"][m]["test"] for s in seeds]
        worst = [t["worst_group_accuracy"] for t in tests]
        lines.append(f"| {LABELS[m]} | {mean_std(worst)} | {min(worst):.3f} | "
                     f"{mean_std([t['group_mean_accuracy'] for t in tests])} | {mean_std([t['overall_accuracy'] for t in tests])} |")
    lines += [
        "",
        "## Per seed (test worst-group accuracy, its group; group-mean accuracy)",
        "",
        "| seed | " + " | ".join(LABELS[m] for m in models) + " | ERM best epoch | run time |",
        "|---:|" + "---|" * len(models) + "---:|---:|",
    ]
    for s in seeds:
        r = per_seed[s]
        cells = []
        for m in models:
            t = r["metrics"][m]["test"]
            cells.append(f"{t['worst_group_accuracy']:.3f} ({t['worst_group']}); {t['group_mean_accuracy']:.3f}")
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {r['best_epoch']} | {r['seconds']:.0f} s |")
    group_names = per_seed[seeds[0]]["run"].index["groups"]
    lines += [
        "",
        "## Per-group test accuracy",
        "",
        "| seed | model | " + " | ".join(group_names) + " |",
        "|---:|---|" + "---:|" * len(group_names),
    ]
    for s in seeds:
        for m in models:
            pg = per_seed[s]["metrics"][m]["test"]["per_group"]
            lines.append(f"| {s} | {LABELS[m]} | " + " | ".join(f"{pg[g]['accuracy']:.3f}" for g in group_names) + " |")

    lines += [
        "",
        "## The verdict against the test split",
        "",
        f"Test outcome: the method's test worst-group accuracy minus ERM's; >= +{CHANGE} improved, <= -{CHANGE} worse, "
        "else no change. **Val call**: the service's verdict (paired bootstrap, 95%) recomputed on the val images, "
        "as a job without DFR is judged (DFR is fitted on val, so there it is never called improved). **Service call**: "
        "what the job's metrics.json says" + (" (with DFR in the methods the service judges every method on test)" if "dfr" in methods else "")
        + ". Agreement: improved-improved, worse-worse, inconclusive-no change.",
        "",
        "| method | " + " | ".join(f"seed {s}: test change → outcome; val call; service call" for s in seeds) + " | val agrees | service agrees |",
        "|---|" + "---|" * len(seeds) + "---:|---:|",
    ]
    for m in methods:
        cells, val_agree, service_agree = [], 0, 0
        for s in seeds:
            r = per_seed[s]
            change = r["metrics"][m]["test"]["worst_group_accuracy"] - r["metrics"]["erm"]["test"]["worst_group_accuracy"]
            outcome = test_outcome(change)
            val_call = r["val_verdict"]["by_method"][m]["call"]
            service_call = r["metrics"]["verdict"]["by_method"][m]["call"]
            val_agree += (val_call, outcome) in AGREES
            service_agree += (service_call, outcome) in AGREES
            cells.append(f"{change:+.3f} → {outcome}; {val_call}; {service_call}")
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + f" | {val_agree}/{len(seeds)} | {service_agree}/{len(seeds)} |")
    rec_cells = []
    for s in seeds:
        r = per_seed[s]
        rec_cells.append(f"val: {LABELS[r['val_verdict']['recommended']['method']]}; "
                         f"service: {LABELS[r['metrics']['verdict']['recommended']['method']]}")
    lines.append("| recommended | " + " | ".join(rec_cells) + " | | |")

    violations = {"val": [], "service": []}
    for s in seeds:
        r = per_seed[s]
        for source, v in (("val", r["val_verdict"]), ("service", r["metrics"]["verdict"])):
            for m in methods:
                change = r["metrics"][m]["test"]["worst_group_accuracy"] - r["metrics"]["erm"]["test"]["worst_group_accuracy"]
                if change < CLEAR_RISE:
                    continue
                if v["by_method"][m]["call"] == "worse":
                    violations[source].append(f"seed {s}: {LABELS[m]} rose {change:+.3f} on test, called worse")
                if v["recommended"]["method"] == "erm":
                    violations[source].append(f"seed {s}: {LABELS[m]} rose {change:+.3f} on test, ERM recommended "
                                              f"({v['recommended']['call']})")
    lines += [
        "",
        f"Target: the verdict never calls a method worse, nor recommends ERM, when the method's test worst-group "
        f"accuracy rose by >= {CLEAR_RISE}.",
        "",
    ]
    for source in ("val", "service"):
        found = violations[source]
        worse = sum("called worse" in v for v in found)
        lines.append(f"- {source} verdicts: {'MET' if not found else 'NOT MET'} ({worse} called worse, "
                     f"{len(found) - worse} with ERM recommended)" + "".join(f"\n  - {v}" for v in found))
    smallest = "; ".join(f"seed {s}: {per_seed[s]['val_verdict']['by_method'][methods[0]]['smallest']} "
                         f"({per_seed[s]['val_verdict']['by_method'][methods[0]]['smallest_count']} images)" for s in seeds)
    lines += ["", f"Smallest val group (a call needs at least {MIN_GROUP_IMAGES} images in every group): {smallest}."]

    if "dfr" in methods and "masktune" in methods:
        lines += ["", "## DFR against MaskTune (test worst-group accuracy)", "",
                  "| seed | DFR | MaskTune | DFR − MaskTune | DFR >= MaskTune |", "|---:|---:|---:|---:|---|"]
        reached = 0
        for s in seeds:
            d = per_seed[s]["metrics"]["dfr"]["test"]["worst_group_accuracy"]
            mt = per_seed[s]["metrics"]["masktune"]["test"]["worst_group_accuracy"]
            reached += d >= mt
            lines.append(f"| {s} | {d:.3f} | {mt:.3f} | {d - mt:+.3f} | {'yes' if d >= mt else 'no'} |")
        lines += ["", f"DFR >= MaskTune on {reached} of {len(seeds)} seeds."]

    details = []
    for s in seeds:
        r, m = per_seed[s], per_seed[s]["metrics"]
        row = [str(s)]
        if "masktune" in methods:
            mk = r["masking"]
            row.append(f"{m['masking']['masked_pixel_fraction']:.4f}; square {mk['square_masked']:.3f} ("
                       + " / ".join(f"{v:.2f}" for v in mk["square_masked_by_group"].values()) + ")")
        if "jtt" in methods:
            e = m["jtt_error_set"]
            row.append(f"{e['error_set_size']} of {e['train_images']} (epoch {e['epochs_identify']})")
        if "dfr" in methods:
            row.append(f"C={m['dfr_head']['c']}, {m['dfr_head']['images_per_group']} per group")
        details.append("| " + " | ".join(row) + " |")
    header = ["seed"] + (["MaskTune: masked pixels; square masked (0_square / 1_square)"] if "masktune" in methods else []) \
        + (["JTT error set"] if "jtt" in methods else []) + (["DFR head"] if "dfr" in methods else [])
    lines += ["", "## What each method did", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *details]

    if deviations:
        lines += ["", "## MaskTune deviations (test worst-group accuracy; ERM's, then MaskTune's)", "",
                  "Each reuses the seed's ERM (and its masks when masking is unchanged); only MaskTune runs.", "",
                  "| recipe | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
        for label, runs in deviations.items():
            lines.append(f"| `{label}` | " + " | ".join(
                f"{runs[s]['metrics']['erm']['test']['worst_group_accuracy']:.3f} → "
                f"{runs[s]['metrics']['masktune']['test']['worst_group_accuracy']:.3f}" for s in seeds) + " |")
    lines += ["", "The run of 2026-11-29 (the official recipe, MaskTune only, 3 seeds) is kept in "
              "`quality_official_2026-11-29.md`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--official", action="store_true",
                    help=f"the paper's recipe: {OFFICIAL['epochs']} ERM epochs, {OFFICIAL['n_train']} training images")
    ap.add_argument("--epochs", type=int, help=f"ERM epochs (default {CHEAP['epochs']}; official {OFFICIAL['epochs']})")
    ap.add_argument("--n-train", type=int)
    ap.add_argument("--n-val", type=int)
    ap.add_argument("--n-test", type=int)
    ap.add_argument("--deviation", type=json.loads, action="append", default=[],
                    help='also report a MaskTune config deviation, e.g. \'{"masking": {"checkpoint": "last"}}\'')
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a busy 2-core machine two threads ran an ERM epoch "
                         "of small_cnn 8x slower than one)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "masktune_quality"),
                    help="datasets and run outputs (reruns with the same settings resume/reuse)")
    ap.add_argument("--out", default=str(RESULTS / "quality.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = dict(OFFICIAL if args.official else CHEAP)
    recipe.update({k: v for k, v in (("epochs", args.epochs), ("n_train", args.n_train), ("n_val", args.n_val),
                                     ("n_test", args.n_test)) if v is not None})
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    deviations = {deviation_label(d): d for d in args.deviation}
    per_seed: dict[int, dict] = {}
    deviation_runs: dict[str, dict[int, dict]] = {label: {} for label in deviations}
    for seed in args.seeds:
        data = dataset(root, seed, recipe["n_train"], recipe["n_val"], recipe["n_test"])
        tag = f"seed{seed}_e{recipe['epochs']}_n{recipe['n_train']}_{'-'.join(args.methods)}"
        cfg = JobConfig(erm={"epochs": recipe["epochs"]}, methods=args.methods, seed=seed)
        per_seed[seed] = run_one(data, root / f"run_{tag}", cfg, args.device, f"seed {seed}")
        for label, deviation in deviations.items():
            dcfg = JobConfig.model_validate({**deviation, "erm": {"epochs": recipe["epochs"], **deviation.get("erm", {})},
                                             "methods": ["masktune"], "seed": seed})
            deviation_runs[label][seed] = run_one(data, root / f"run_{tag}_{label.replace('=', '-')}", dcfg, args.device,
                                                  f"seed {seed} {label}", official=per_seed[seed]["run"])
    command = "PYTHONPATH=. .venv/bin/python " + shlex.join(["bench/quality.py", *(argv if argv is not None else sys.argv[1:])])
    text = render(per_seed, deviation_runs, args, recipe, command)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
