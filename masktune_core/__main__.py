"""Local CLI: ``python -m masktune_core run --data ARCHIVE_OR_DIR --arch NAME --out DIR``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from jobspec import JobConfig
from .errors import MaskTuneError
from .metrics import comparison_table
from .models import architectures
from .pipeline import ProgressEvent, run_masktune


def build_config(args: argparse.Namespace) -> JobConfig:
    """--config FILE.json first, then the explicit flags on top of it."""
    raw = json.loads(Path(args.config).read_text()) if args.config else {}
    config = JobConfig.model_validate(raw)
    overrides = {
        ("model", "architecture"): args.arch,
        ("erm", "epochs"): args.epochs,
        ("erm", "lr"): args.lr,
        ("erm", "batch_size"): args.batch_size,
    }
    data = config.model_dump()
    for (section, key), value in overrides.items():
        if value is not None:
            data[section][key] = value
    if args.seed is not None:
        data["seed"] = args.seed
    return JobConfig.model_validate(data)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "masktune" / "datasets"


class ProgressBars:
    """One tqdm bar per stage, fed by the pipeline's events."""

    def __init__(self):
        self.bar: tqdm | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "stage":
            self.close()
            self.bar = tqdm(total=100, desc=f"{event.stage:<9}", unit="%", leave=True, file=sys.stderr,
                            bar_format="{desc} {bar} {n:.0f}% [{elapsed}] {postfix}")
        elif event.kind == "epoch" and self.bar is not None:
            self.bar.set_postfix_str(f"epoch {event.data['epoch']}/{event.data['epochs']} "
                                     f"loss {event.data['train_loss']:.3f} val_acc {event.data['val_accuracy']:.3f}")
        elif event.kind in ("warning", "info"):
            tqdm.write(event.message, file=sys.stderr)
        if self.bar is not None:
            self.bar.update(round(100 * event.stage_progress) - self.bar.n)  # tqdm throttles redraws

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m masktune_core", description="Run MaskTune locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="ERM, saliency masking, one-epoch finetune, evaluation")
    run.add_argument("--data", required=True, help="dataset .zip/.tar/.tar.gz or directory")
    run.add_argument("--arch", help=f"architecture: {', '.join(sorted(architectures()))} or timm/<name>")
    run.add_argument("--out", required=True, help="output directory (its work/ subfolder lets a re-run resume)")
    run.add_argument("--epochs", type=int, help="ERM epochs")
    run.add_argument("--lr", type=float)
    run.add_argument("--batch-size", type=int)
    run.add_argument("--seed", type=int)
    run.add_argument("--config", help="JSON file with the job config (same schema as POST /v1/jobs)")
    run.add_argument("--weights", help="start from these weights (.safetensors or state-dict .pt)")
    run.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    run.add_argument("--cache-dir", default=str(default_cache_dir()),
                     help="where datasets are unpacked and decoded once, for every later run on them (default: %(default)s)")
    args = parser.parse_args(argv)

    bars = ProgressBars()
    try:
        config = build_config(args)
        metrics = run_masktune(args.data, args.out, config, initial_weights=args.weights, device=args.device, on_event=bars,
                               cache_dir=args.cache_dir)
    except ValidationError as exc:
        print(f"error: invalid config:\n{exc}", file=sys.stderr)
        return 2
    except MaskTuneError as exc:
        bars.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bars.close()
    print(comparison_table(metrics))
    print(f"wrote {', '.join(sorted(p.name for p in Path(args.out).iterdir() if p.is_file()))} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
