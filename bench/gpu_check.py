"""The GPU check: one script, one table, about 5 minutes on one H200. Run it through bench/gpu_check.sh.

    bash bench/gpu_check.sh            # CUDA: resnet50 @ 224 px, a Waterbirds-size job end to end
    bash bench/gpu_check.sh --smoke    # the same code on the CPU at toy sizes, in well under a minute (CI)

Rows (the same under --smoke; only the sizes, the device and the compile backend differ):

- ERM epoch, project vs bare loop (bf16, then fp32): ``train_one_epoch`` over decoded rows on disk
  against bench/speed.py's bare loop over the same uint8 images in memory, round-robin
  (goal: the project's throughput >= 0.9x the bare loop's); two variants of the project's bf16
  epoch timed in the same rounds (no normalisation; flip_crop augmentation), which show what the
  per-batch transforms cost on the device.
- ERM epoch bf16 vs fp32, saliency (xgradcam) vs an inference pass in bf16 and fp32, and the bf16
  maps' agreement with the fp32 ones (mean/max abs diff, IoU of the thresholded masks).
- runtime.compile on/off for the ERM epoch, in a child process bounded by the time left
  (``torch.compile`` as the pipeline calls it; spawned on CUDA, forked on the CPU; ``--smoke``
  uses the ``eager`` backend, which traces with dynamo but generates no code).
- A Waterbirds-size job end to end: 4,795 training images (+ 300 val, 300 test) of photo-like
  JPEGs (bench/scale.py's, 256-512 px) in the Waterbirds manifest layout, ``run_masktune`` with
  the ``waterbirds`` preset (resnet50 @ 224, batch 128, lr 1e-4, ImageNet normalisation, flip_crop)
  without ImageNet weights (nothing can be downloaded there), 10 ERM epochs, bf16, on ``cuda``;
  each stage timed from the run's "stage" events, and the total.

The table goes to stdout and, row by row, to ``$OUT/gpu_check.md`` (``--out``) with the raw
numbers in ``gpu_check.json`` beside it, so a run cut short still leaves what it measured.
Exits 1 if any row failed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from jobspec import JobConfig
from masktune_core.models import saliency_target_layer
from masktune_core.pipeline import run_masktune
from masktune_core.training import LoopSettings, model_input
from saliency_speed import make_model
from scale import _photo
from speed import (
    TrainSetting, bf16_agreement, decoded_train_split, log, model_copies, project_epoch, rate, round_robin,
    saliency_times, time_ratio, train_pair,
)

GOAL_OF_BARE = 0.9  # the project's ERM img/s / the bare loop's, bf16 on the GPU
GOAL_SALIENCY_OVER_INFERENCE = 1.5  # xgradcam time / inference time (the saliency bench's target)
STAGES = ("prepare", "erm", "saliency", "finetune", "evaluate", "export")
STARTED = time.monotonic()  # after the imports


@dataclass(frozen=True)
class Profile:
    device: str
    arch: str
    size: int
    batch: int  # micro rows' batch, and the job's
    batches: int  # batches per micro epoch
    train: int  # the job's images
    val: int
    test: int
    epochs: int  # the job's ERM epochs
    repeats: int
    threads: int | None  # torch.set_num_threads; None: torch's own
    compile_backend: str
    budget_s: float | None  # the whole script; the compile row gets what is left (None: no limit)

    @property
    def setting(self) -> TrainSetting:
        return TrainSetting(self.arch, self.size, self.batch, self.batches, "imagenet")


# The budget counts from after the imports (~10-20 s), so that the whole script stays within 5 minutes.
FULL = Profile("cuda", "resnet50", 224, 128, 20, 4795, 300, 300, 10, 3, None, "inductor", 270)
# One thread: two intra-op threads on a loaded 2-core CI box stall at every op (10x slower here).
# No time budget: the smoke run checks code paths, and its outcome must not depend on how busy the box is.
SMOKE = Profile("cpu", "resnet18", 32, 8, 2, 32, 8, 8, 1, 1, 1, "eager", None)

ROWS = (  # every row of the table, in order (tests/test_gpu_check_smoke.py expects each)
    "ERM epoch bf16: project vs bare loop",
    "ERM epoch bf16: project without normalisation",
    "ERM epoch bf16: project with flip_crop",
    "ERM epoch fp32: project vs bare loop",
    "ERM epoch: bf16 vs fp32",
    "saliency bf16: xgradcam vs inference",
    "saliency fp32: xgradcam vs inference",
    "saliency: bf16 maps vs fp32 maps",
    "ERM epoch bf16: runtime.compile on vs off",
    *(f"job: {stage}" for stage in STAGES),
    "job: total",
)


class Table:
    """Rows in the order of ROWS, written out after each one."""

    def __init__(self, header: list[str], out: Path | None):
        self.header, self.out, self.rows, self.raw, self.failed = header, out, {}, {}, False

    def add(self, check: str, setting: str, result: str, goal: str = "–", verdict: str = "–", **raw) -> None:
        assert check in ROWS, check
        self.rows[check] = (check, setting, result, goal, verdict)
        self.raw[check] = raw
        log(f"[{time.monotonic() - STARTED:.0f} s] {check} | {setting} | {result} | {goal} | {verdict}")
        self.write()

    def fail(self, check: str, exc: BaseException) -> None:
        self.failed = True
        if exc.__traceback__ is not None:
            traceback.print_exception(exc)
        self.add(check, "", f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                 verdict="FAILED")

    def markdown(self) -> str:
        lines = [*self.header, "", "| check | setting | result | goal | verdict |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(self.rows[c]) + " |" for c in ROWS if c in self.rows]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(self.markdown())
            self.out.with_suffix(".json").write_text(json.dumps(self.raw, indent=1, default=str))


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


# ---------------------------------------------------------------- data


def write_waterbirds_like(root: Path, train: int, val: int, test: int, seed: int = 0) -> Path:
    """Photo-like JPEGs (bench/scale.py's) in the Waterbirds manifest layout (img_filename,y,split,place);
    ``place`` agrees with ``y`` on 95% of the train and val images and on half of the test images."""
    rng = np.random.default_rng(seed)
    lines, jobs = ["img_filename,y,split,place"], []
    for code, count, agree_share in ((0, train, 0.95), (1, val, 0.95), (2, test, 0.5)):
        y = rng.integers(0, 2, count)
        place = np.where(rng.random(count) < agree_share, y, 1 - y)
        for i in range(count):
            name = f"images/{code}/{len(jobs):06d}.jpg"
            lines.append(f"{name},{y[i]},{code},{place[i]}")
            jobs.append((root / name, seed * 1_000_000 + len(jobs)))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_photo, jobs, chunksize=32))
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


# ---------------------------------------------------------------- rows


def erm_rows(table: Table, p: Profile, split, device: torch.device) -> None:
    s = p.setting
    where = f"{p.arch} @ {p.size} px, {p.batches} x {p.batch} images, ImageNet norm."
    rows = {}
    try:
        variants = {
            "no_norm": LoopSettings(device=device, normalization="none", precision=torch.bfloat16),
            "flip_crop": LoopSettings(device=device, normalization="imagenet", augmentation="flip_crop",
                                      precision=torch.bfloat16),
        }
        rows["bf16"] = bf16 = train_pair(s, split, device, torch.bfloat16, p.repeats, 1, extra=variants)
        of_bare = 1 / bf16["over_bare"].median
        table.add(ROWS[0], where, f"project {bf16['ips']['ours']:.1f} img/s, bare {bf16['ips']['bare']:.1f} img/s: "
                  f"{of_bare:.2f}x (time ratio {bf16['over_bare']})", f">= {GOAL_OF_BARE:g}x",
                  verdict(of_bare >= GOAL_OF_BARE), times=bf16["times"])
        for row, name in ((ROWS[1], "no_norm"), (ROWS[2], "flip_crop")):
            ratio = time_ratio(bf16["times"], name, "ours")
            table.add(row, "the row above's epoch, one change", f"{bf16['ips'][name]:.1f} img/s; "
                      f"time vs the project's epoch {ratio}")
    except Exception as exc:  # noqa: BLE001 - a row fails, the check goes on
        table.fail(ROWS[0], exc)
    try:
        rows["fp32"] = fp32 = train_pair(s, split, device, None, p.repeats, 1)
        of_bare = 1 / fp32["over_bare"].median
        table.add(ROWS[3], where, f"project {fp32['ips']['ours']:.1f} img/s, bare {fp32['ips']['bare']:.1f} img/s: "
                  f"{of_bare:.2f}x (time ratio {fp32['over_bare']})", f">= {GOAL_OF_BARE:g}x",
                  verdict(of_bare >= GOAL_OF_BARE), times=fp32["times"])
    except Exception as exc:  # noqa: BLE001
        table.fail(ROWS[3], exc)
    if len(rows) == 2:
        a, b = rows["fp32"]["ips"]["ours"], rows["bf16"]["ips"]["ours"]
        table.add(ROWS[4], "the two rows above", f"fp32 {a:.1f} img/s, bf16 {b:.1f} img/s: bf16 {b / a:.2f}x")


def saliency_rows(table: Table, p: Profile, split, device: torch.device) -> None:
    where = f"{p.arch} @ {p.size} px, batch {p.batch} of the job's images, random weights"
    try:
        model = make_model(p.arch, p.size, device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        layer = saliency_target_layer(model, p.arch, p.size)
        x = model_input(split.pixels(np.arange(p.batch)), LoopSettings(device=device, normalization="imagenet"))
    except Exception as exc:  # noqa: BLE001
        table.fail(ROWS[5], exc)
        return
    for row, precision in ((ROWS[5], torch.bfloat16), (ROWS[6], None)):
        try:
            r = saliency_times(model, layer, x, precision, p.repeats + 2, 1, with_gradcam=False)
            ratio = r["over_inference"]
            goal = f"<= {GOAL_SALIENCY_OVER_INFERENCE:g}x" if precision is not None else "–"
            table.add(row, where, f"xgradcam {r['ips']['ours']:.1f} img/s, inference {r['ips']['inference']:.1f} img/s; "
                      f"time ratio {ratio}", goal,
                      verdict(ratio.median <= GOAL_SALIENCY_OVER_INFERENCE) if precision is not None else "–",
                      times=r["times"])
        except Exception as exc:  # noqa: BLE001
            table.fail(row, exc)
    try:
        a = bf16_agreement(model, layer, x)
        table.add(ROWS[7], where, f"mean abs diff {a['mean_abs']:.1e}, max {a['max_abs']:.1e}, mask IoU {a['iou']:.3f}, "
                  f"same class {a['same_class']:.0%} (fp32 masks {a['masked_fp32']:.1%} of pixels)", **a)
    except Exception as exc:  # noqa: BLE001
        table.fail(ROWS[7], exc)


def compile_child(p: Profile, data: Path, cache: Path) -> dict:
    """In the child process: the ERM epoch with and without torch.compile (as the pipeline compiles)."""
    device = torch.device(p.device)
    if p.threads:
        torch.set_num_threads(p.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    split = decoded_train_split(data, p.size, cache, p.batch * p.batches)
    loop = LoopSettings(device=device, normalization="imagenet", precision=torch.bfloat16)
    (eager, eager_opt), (model, opt) = model_copies(p.arch, p.size, loop, 2, len(split.labels.unique()))
    compiled = torch.compile(model, backend=p.compile_backend)
    start = time.perf_counter()
    project_epoch(compiled, opt, split, p.batch, loop, 2000)  # compiles (forward and backward), then runs
    first = time.perf_counter() - start
    project_epoch(eager, eager_opt, split, p.batch, loop, 2000)
    times = round_robin({"compiled": lambda r: project_epoch(compiled, opt, split, p.batch, loop, r),
                         "eager": lambda r: project_epoch(eager, eager_opt, split, p.batch, loop, r)},
                        p.repeats, 0, device)
    return {"first_epoch_s": first, "ips": {k: rate(times, k, len(split)) for k in times},
            "over_eager": str(time_ratio(times, "compiled", "eager")), "times": times}


def _compile_child_main(smoke: bool, data: str, cache: str, conn) -> None:
    os.setsid()  # its own process group: a timeout ends it together with its compile workers
    try:
        p = SMOKE if smoke else FULL
        conn.send(json.dumps(compile_child(p, Path(data), Path(cache)), default=str))
    except BaseException as exc:
        traceback.print_exc()
        conn.send(json.dumps({"error": f"{type(exc).__name__}: {str(exc)[:300]}"}))
    finally:
        conn.close()


def compile_row(table: Table, p: Profile, data: Path, cache: Path, deadline: float | None, smoke: bool) -> None:
    """``compile_child`` in a child process bounded by the time left. On CUDA the child is spawned (a fresh
    interpreter: CUDA does not survive a fork); on the CPU it is forked (no second import of torch)."""
    where = (f"{p.arch} @ {p.size} px, {p.batches} x {p.batch} images, backend {p.compile_backend}"
             + (" (smoke: traces, no code generation)" if smoke else ""))
    left = None if deadline is None else deadline - time.monotonic()
    if left is not None and left < 60:
        table.add(ROWS[8], where, f"skipped: {max(left, 0):.0f} s left of the time budget")
        return
    ctx = multiprocessing.get_context("spawn" if p.device == "cuda" else "fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_compile_child_main, args=(smoke, str(data), str(cache), send), name="compile-row")
    child.start()
    send.close()
    try:
        if not receive.poll(None if left is None else left - 5):
            raise TimeoutError
        r = json.loads(receive.recv())
    except TimeoutError:
        table.add(ROWS[8], where, f"skipped: not done within the {left - 5:.0f} s left (compilation included)")
        return
    except EOFError:
        r = {"error": f"the child process ended without an answer (exit code {child.exitcode})"}
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # the child and any compile workers it left
        except (ProcessLookupError, PermissionError):
            pass
        child.join()
    if "error" in r:
        table.fail(ROWS[8], RuntimeError(r["error"]))
        return
    table.add(ROWS[8], where, f"compiled {r['ips']['compiled']:.1f} img/s, eager {r['ips']['eager']:.1f} img/s "
              f"(time ratio {r['over_eager']}); first compiled epoch {r['first_epoch_s']:.1f} s", **r)


def job_rows(table: Table, p: Profile, data: Path, workdir: Path, smoke: bool) -> None:
    explicit = {"preset": "waterbirds", "model": {"pretrained": False}, "erm": {"epochs": p.epochs},
                "runtime": {"precision": "bf16"}}
    if smoke:
        explicit["model"]["architecture"] = p.arch
        explicit["data"] = {"input_size": p.size}
        explicit["erm"]["batch_size"] = p.batch
        explicit["masking"] = {"batch_size": p.batch}
    config = JobConfig.model_validate(explicit)
    starts: list[tuple[str, float]] = []
    epochs: list[dict] = []

    def on_event(event) -> None:
        if event.kind == "stage":
            starts.append((event.stage, time.perf_counter()))
        elif event.kind == "epoch":
            epochs.append(event.data)

    all_images = p.train + p.val + p.test
    table.header.append(f"- job: {config.model.architecture} @ {config.data.input_size} px, {p.train} train / {p.val} val / "
                        f"{p.test} test photo-like images, preset waterbirds without ImageNet weights, {p.epochs} ERM "
                        f"epochs, batch {config.erm.batch_size}, bf16, device {p.device}; stages timed from its events")
    work = {"prepare": (all_images, f"index + decode {all_images} images at {config.data.input_size} px"),
            "erm": (p.epochs * p.train, f"{p.epochs} epochs x {p.train} images, validation, checkpoints"),
            "saliency": (p.train, f"{p.train} images, masks packed"),
            "finetune": (p.train, f"1 epoch x {p.train} masked images, validation"),
            "evaluate": (3 * all_images, f"3 models x {all_images} images"),
            "export": (None, "weights, previews, model card")}
    for folder in ("job", "job-cache"):  # a kept --workdir: run from scratch, not resume
        shutil.rmtree(workdir / folder, ignore_errors=True)
    start = time.perf_counter()
    try:
        metrics = run_masktune(data, workdir / "job", config, device=p.device, on_event=on_event,
                               cache_dir=workdir / "job-cache")
    except Exception as exc:  # noqa: BLE001
        table.fail(ROWS[-1], exc)
        return
    end = time.perf_counter()
    marks = starts + [("end", end)]
    stage_s = {name: marks[i + 1][1] - t for i, (name, t) in enumerate(starts)}
    for stage in STAGES:
        images, what = work[stage]
        if stage not in stage_s:
            table.add(f"job: {stage}", what, "not run", verdict="FAILED")
            table.failed = True
            continue
        speed = f", {images / stage_s[stage]:.0f} img/s" if images else ""
        table.add(f"job: {stage}", what, f"{stage_s[stage]:.1f} s{speed}", seconds=stage_s[stage])
    erm_epochs = len([e for e in epochs if e.get("phase") == "erm"])
    before = starts[0][1] - start if starts else 0.0
    worst = [metrics[m]["val"].get("worst_group_accuracy", float("nan")) for m in ("erm", "masktune")]
    table.add(ROWS[-1], f"{erm_epochs} ERM epochs run", f"{end - start:.1f} s, of it {before:.1f} s hashing the dataset "
              f"before the first stage (val worst group {worst[0]:.3f} -> {worst[1]:.3f}: random labels)",
              seconds=end - start, stages=stage_s, masktune_verdict=metrics["verdict"])


# ---------------------------------------------------------------- the run


def environment(p: Profile) -> list[str]:
    device = torch.device(p.device)
    lines = [f"- torch {torch.__version__}, CUDA runtime {torch.version.cuda}, cuDNN "
             f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'n/a'}, "
             f"python {platform.python_version()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"- device {props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2**30:.0f} GiB, bf16 supported: {torch.cuda.is_bf16_supported()}, "
                     f"TF32 for convolutions {torch.backends.cudnn.allow_tf32}, for matmul {torch.backends.cuda.matmul.allow_tf32}")
    else:
        lines.append(f"- device cpu (CUDA available: {torch.cuda.is_available()})")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the same code on the CPU at toy sizes")
    ap.add_argument("--out", type=Path, default=None, help="the table's file (default: $OUT/gpu_check.md when OUT is set)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the data and the job here (default: a temp dir)")
    args = ap.parse_args(argv)
    p = SMOKE if args.smoke else FULL
    if p.threads:
        torch.set_num_threads(p.threads)
    start = time.monotonic()
    deadline = None if p.budget_s is None else start + p.budget_s
    if p.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available to this torch (run with --smoke for the CPU check)", file=sys.stderr)
        return 2
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check.md" if os.environ.get("OUT") else None)
    command = shlex.join(["bash", "bench/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])])
    header = ["# GPU check" + (" (smoke: CPU, toy sizes)" if args.smoke else ""), "", f"- command: `{command}`",
              *environment(p), f"- profile: {asdict(p)}"]
    print("\n".join(header), flush=True)
    printed = len(header)
    table = Table(header, out)
    device = torch.device(p.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the pipeline does
    with tempfile.TemporaryDirectory(prefix="masktune-gpu-check-") as tmp:
        workdir = args.workdir or Path(tmp)
        data = workdir / "waterbirds-like"
        t0 = time.perf_counter()
        if not (data / "metadata.csv").exists():
            write_waterbirds_like(data, p.train, p.val, p.test)
        log(f"[{time.monotonic() - STARTED:.0f} s] dataset written in {time.perf_counter() - t0:.1f} s")
        micro_cache = workdir / "micro-cache"
        split = decoded_train_split(data, p.size, micro_cache, p.batch * p.batches)
        log(f"[{time.monotonic() - STARTED:.0f} s] decoded")
        erm_rows(table, p, split, device)
        saliency_rows(table, p, split, device)
        job_rows(table, p, data, workdir, args.smoke)
        compile_row(table, p, data, micro_cache, deadline, args.smoke)
    budget = "no budget" if p.budget_s is None else f"budget {p.budget_s:.0f} s"
    table.header.append(f"- {time.monotonic() - start:.0f} s in all ({budget})")
    table.write()
    print("\n".join(table.header[printed:]))  # the rest of the header went out first
    print(table.markdown().split("\n", len(table.header))[-1])
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
