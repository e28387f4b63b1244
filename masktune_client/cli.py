"""The ``masktune`` command: the MaskTune Service from a terminal or a script.

Results go to stdout (``-o json``: one JSON document); progress and messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import httpx
from pydantic import BaseModel
from tqdm import tqdm


from .client import DEFAULT_URL, MaskTuneClient
from .errors import ApiError, TransferError
from .models import Dataset, Event, Job
from .statuses import TERMINAL, JobStatus, UploadStatus

# Exit codes (documented in --help and the README).
OK, FAILED, USAGE, API_ERROR, UNREACHABLE = 0, 1, 2, 3, 4

EXIT_CODES = f"""exit codes:
  {OK}  success
  {FAILED}  the job failed or was cancelled, or the dataset (model) is invalid
  {USAGE}  usage error: bad arguments, an unreadable config or input file
  {API_ERROR}  the API answered with an error (its problem's code and detail are printed)
  {UNREACHABLE}  the API could not be reached, the connection broke, a download arrived corrupted, or --timeout passed

environment:
  MASKTUNE_URL      the API (default {DEFAULT_URL}); --url overrides it
  MASKTUNE_API_KEY  the API key; --api-key overrides it
"""


class UsageError(Exception):
    """Bad input found after parsing (a config file that is not JSON, say): exit 2."""


# ---------------------------------------------------------------------- output

def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _emit_json(value: Any) -> None:
    json.dump(_plain(value), sys.stdout, indent=2)
    sys.stdout.write("\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _table(rows: list[BaseModel], columns: list[str]) -> None:
    cells = [[_cell(getattr(row, c, None)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    for line in [[c.upper() for c in columns]] + cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def _record(obj: BaseModel) -> None:
    fields = obj.model_dump()
    width = max(map(len, fields))
    for name, value in fields.items():
        print(f"{name.ljust(width)}  {_cell(getattr(obj, name, value))}")


def _show(args: argparse.Namespace, value: Any, columns: list[str] | None = None) -> None:
    if args.output == "json":
        _emit_json(value)
    elif columns is not None:
        _table(value, columns)
    else:
        _record(value)


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        tqdm.write(message, file=sys.stderr)


DATASET_COLUMNS = ["id", "status", "filename", "size_bytes", "created_at"]
MODEL_COLUMNS = ["id", "status", "architecture", "num_classes", "filename", "created_at"]
JOB_COLUMNS = ["id", "status", "stage", "progress", "dataset_id", "created_at"]


# ---------------------------------------------------------------------- progress

class _UploadBar:
    def __init__(self, name: str, quiet: bool):
        self.bar = None if quiet else tqdm(desc=f"upload {name}", unit="B", unit_scale=True, unit_divisor=1024,
                                           file=sys.stderr, leave=True)

    def __call__(self, sent: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(sent - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class JobProgress:
    """Renders a job's events on stderr: a bar per stage (counting epochs in erm and finetune), a
    metrics line per epoch, infos, warnings and the final status."""

    def __init__(self, job: Job, quiet: bool = False):
        self.config = job.config
        self.quiet = quiet
        self.bar: tqdm | None = None
        self.last_message = ""

    def _write(self, line: str, message: str) -> None:
        tqdm.write(line, file=sys.stderr)
        self.last_message = message

    def _end_stage(self, done: bool) -> None:
        if self.bar is not None:
            if done:
                self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
            self.bar = None

    def __call__(self, event: Event) -> None:
        if self.quiet:
            return
        data = event.data or {}
        if event.kind == "stage":
            self._end_stage(done=True)
            epochs = (self.config.get(event.stage or "") or {}).get("epochs") if event.stage in ("erm", "finetune") else None
            fmt = "{desc} {percentage:3.0f}%|{bar:30}| "
            if epochs:
                fmt += "{n_fmt}/{total_fmt} epochs [{elapsed}<{remaining}]"
            else:
                fmt += "[{elapsed}]"
            self.bar = tqdm(total=epochs or 1, desc=f"{event.stage:<9}", bar_format=fmt, file=sys.stderr)
        elif event.kind == "epoch":
            if self.bar is not None:
                if data.get("epochs") and self.bar.total != data["epochs"]:
                    self.bar.total = data["epochs"]
                self.bar.update(max(0, data.get("epoch", self.bar.n + 1) - self.bar.n))
            self._write(_epoch_line(data, event.message), event.message)
        elif event.kind == "status":
            status = data.get("status") or "status"
            if status in TERMINAL:
                self._end_stage(done=status == JobStatus.SUCCEEDED)
            # A succeeded job's status message is its verdict, often just shown as a warning.
            repeated = event.message == self.last_message
            self._write(f"job {status}" if repeated else f"job {status}: {event.message}", event.message)
        elif event.kind in ("warning", "info"):
            self._write(f"{event.kind}: {event.message}", event.message)

    def close(self) -> None:
        self._end_stage(done=False)


def _epoch_line(data: dict, fallback: str) -> str:
    if "epoch" not in data:
        return fallback
    parts = [f"{data.get('phase', 'epoch'):<8} epoch {data['epoch']}/{data.get('epochs', '?')}"]
    for key, label in (("train_loss", "loss"), ("train_accuracy", "acc"), ("val_accuracy", "val_acc")):
        if isinstance(data.get(key), (int, float)):
            parts.append(f"{label} {data[key]:.4f}")
    return "  ".join(parts)


# ---------------------------------------------------------------------- commands

def _read_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the config {path}: {exc.strerror}") from None
    if file.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UsageError("a YAML config needs PyYAML (pip install pyyaml); or write it as JSON") from None
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"the config {path} is not valid YAML: {exc}") from None
    else:
        try:
            config = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"the config {path} is not valid JSON: {exc}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UsageError(f"the config {path} must hold an object (a mapping of fields), not {type(config).__name__}")
    return config


def _existing_file(path: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"no such file: {path}")
    return file


def _upload(client: MaskTuneClient, args: argparse.Namespace, file: Path) -> Dataset:
    bar = _UploadBar(file.name, args.quiet)
    try:
        return client.upload_dataset(file, on_progress=bar)
    finally:
        bar.close()


def _wait_dataset(client: MaskTuneClient, args: argparse.Namespace, dataset: Dataset) -> Dataset:
    _say(args, f"dataset {dataset.id}: validating ...")
    dataset = client.wait_dataset(dataset.id, timeout=args.timeout)
    _say(args, f"dataset {dataset.id}: {dataset.status}" + (f" ({dataset.error})" if dataset.error else ""))
    return dataset


def _job_config(client: MaskTuneClient, args: argparse.Namespace) -> dict[str, Any]:
    config = _read_config(args.config)
    if args.model:
        # Starting weights: the job's architecture is theirs unless the config names one.
        model = client.get_model(args.model)
        section = dict(config.get("model") or {})
        section["weights_id"] = model.id
        section.setdefault("architecture", model.architecture)
        config["model"] = section
    return config


def _wait_job(client: MaskTuneClient, args: argparse.Namespace, job: Job) -> Job:
    progress = JobProgress(job, args.quiet)
    try:
        return client.wait(job.id, on_event=progress, timeout=args.timeout)
    finally:
        progress.close()


def _job_outcome(args: argparse.Namespace, job: Job) -> int:
    if job.status == JobStatus.SUCCEEDED:
        return OK
    if job.error is not None:
        _say(args, f"job {job.id} {job.status}: {job.error.code}: {job.error.message}")
    return FAILED


def _download(client: MaskTuneClient, args: argparse.Namespace, job_id: str, to: Path) -> list[dict[str, Any]]:
    files = []

    def announce(artifact):
        _say(args, f"download {artifact.name} ({artifact.size_bytes:,} bytes)")
        files.append({"name": artifact.name, "size_bytes": artifact.size_bytes, "sha256": artifact.sha256})

    paths = client.download_artifacts(job_id, to, on_file=announce)
    for entry, path in zip(files, paths):
        entry["path"] = str(path)
    return files


def cmd_datasets_upload(client, args):
    dataset = _upload(client, args, _existing_file(args.file))
    if args.wait:
        dataset = _wait_dataset(client, args, dataset)
    _show(args, dataset)
    return FAILED if dataset.status == UploadStatus.INVALID else OK


def cmd_datasets_list(client, args):
    page = client.list_datasets(limit=args.limit, after=args.after)
    _show(args, page if args.output == "json" else page.data, DATASET_COLUMNS)
    return OK


def cmd_datasets_get(client, args):
    _show(args, client.get_dataset(args.id))
    return OK


def cmd_datasets_delete(client, args):
    client.delete_dataset(args.id)
    _say(args, f"deleted {args.id}")
    return OK


def cmd_models_upload(client, args):
    file = _existing_file(args.file)
    bar = _UploadBar(file.name, args.quiet)
    try:
        model = client.upload_model(file, architecture=args.architecture, num_classes=args.num_classes, on_progress=bar)
    finally:
        bar.close()
    if args.wait:
        model = client.wait_model(model.id, timeout=args.timeout)
    _show(args, model)
    return FAILED if model.status == UploadStatus.INVALID else OK


def cmd_models_list(client, args):
    page = client.list_models(limit=args.limit, after=args.after)
    _show(args, page if args.output == "json" else page.data, MODEL_COLUMNS)
    return OK


def cmd_models_get(client, args):
    _show(args, client.get_model(args.id))
    return OK


def cmd_models_delete(client, args):
    client.delete_model(args.id)
    _say(args, f"deleted {args.id}")
    return OK


def cmd_jobs_create(client, args):
    job = client.create_job(args.dataset, _job_config(client, args), idempotency_key=args.idempotency_key)
    _show(args, job)
    return OK


def cmd_jobs_list(client, args):
    page = client.list_jobs(status=args.status, limit=args.limit, after=args.after)
    _show(args, page if args.output == "json" else page.data, JOB_COLUMNS)
    return OK


def cmd_jobs_get(client, args):
    _show(args, client.get_job(args.id))
    return OK


def cmd_jobs_cancel(client, args):
    _show(args, client.cancel_job(args.id))
    return OK


def cmd_jobs_delete(client, args):
    client.delete_job(args.id)
    _say(args, f"deleted {args.id}")
    return OK


def cmd_jobs_wait(client, args):
    job = _wait_job(client, args, client.get_job(args.id))
    _show(args, job)
    return _job_outcome(args, job)


def cmd_jobs_download(client, args):
    to = Path(args.to or args.id)
    files = _download(client, args, args.id, to)
    if args.output == "json":
        _emit_json(files)
    else:
        for entry in files:
            print(entry["path"])
    return OK


def cmd_architectures(client, args):
    listing = client.architectures()
    _show(args, listing if args.output == "json" else listing.data,
          ["name", "library", "default_input_size", "pretrained_available"])
    return OK


def cmd_run(client, args):
    file = _existing_file(args.dataset_file)
    config = _job_config(client, args)
    dataset = _wait_dataset(client, args, _upload(client, args, file))
    result: dict[str, Any] = {"dataset": _plain(dataset), "job": None, "artifacts": []}
    if dataset.status != UploadStatus.READY:
        if args.output == "json":
            _emit_json(result)
        return FAILED
    job = client.create_job(dataset.id, config)
    _say(args, f"job {job.id}: {job.status}")
    job = _wait_job(client, args, job)
    result["job"] = _plain(job)
    code = _job_outcome(args, job)
    if code == OK:
        to = Path(args.to or job.id)
        result["artifacts"] = _download(client, args, job.id, to)
    if args.output == "json":
        _emit_json(result)
    else:
        print(f"dataset   {dataset.id}  {dataset.status}")
        print(f"job       {job.id}  {job.status}")
        for entry in result["artifacts"]:
            print(f"artifact  {entry['path']}  ({entry['size_bytes']:,} bytes)")
    return code


# ---------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"the API (default: $MASKTUNE_URL, else {DEFAULT_URL})")
    common.add_argument("--api-key", help="the API key (default: $MASKTUNE_API_KEY)")
    common.add_argument("-o", "--output", choices=["table", "json"], default="table",
                        help="table for people, json (on stdout) for scripts (default: table)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress or messages on stderr")
    common.add_argument("--retries", type=int, default=4, metavar="N",
                        help="retries of a call on 429/503 and connection failures (default: 4)")
    common.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="give up waiting (for a dataset or job) after S seconds: exit 4")

    parser = argparse.ArgumentParser(
        prog="masktune", description="The MaskTune Service from the command line: upload datasets, run jobs, "
                                     "follow them and download their results.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    def command(subparsers, name: str, handler: Callable, help: str) -> argparse.ArgumentParser:
        sub = subparsers.add_parser(name, parents=[common], help=help, description=help, epilog=EXIT_CODES,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(handler=handler)
        return sub

    def paging(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--limit", type=int, default=20, help="how many, newest first (default: 20, at most 100)")
        sub.add_argument("--after", help="the next_cursor of the previous page")

    datasets = groups.add_parser("datasets", help="upload, list, get, delete datasets").add_subparsers(
        dest="command", required=True, metavar="ACTION")
    sub = command(datasets, "upload", cmd_datasets_upload, "upload a .zip/.tar/.tar.gz dataset archive")
    sub.add_argument("file")
    sub.add_argument("--wait", action="store_true", help="wait until it is validated (exit 1 if invalid)")
    paging(command(datasets, "list", cmd_datasets_list, "list datasets"))
    command(datasets, "get", cmd_datasets_get, "show a dataset").add_argument("id")
    command(datasets, "delete", cmd_datasets_delete, "delete a dataset").add_argument("id")

    models = groups.add_parser("models", help="upload, list, get, delete starting weights").add_subparsers(
        dest="command", required=True, metavar="ACTION")
    sub = command(models, "upload", cmd_models_upload, "upload weights (.safetensors, .pt, .pth)")
    sub.add_argument("file")
    sub.add_argument("--architecture", required=True, help="e.g. small_cnn, resnet18, timm/<name>")
    sub.add_argument("--num-classes", type=int, required=True, help="outputs of the weights' classifier head")
    sub.add_argument("--wait", action="store_true", help="wait until they are validated (exit 1 if invalid)")
    paging(command(models, "list", cmd_models_list, "list models"))
    command(models, "get", cmd_models_get, "show a model").add_argument("id")
    command(models, "delete", cmd_models_delete, "delete a model").add_argument("id")

    jobs = groups.add_parser("jobs", help="create, follow, cancel jobs and download their artifacts").add_subparsers(
        dest="command", required=True, metavar="ACTION")
    sub = command(jobs, "create", cmd_jobs_create, "queue a MaskTune job on a ready dataset")
    sub.add_argument("--dataset", required=True, metavar="ID")
    sub.add_argument("--config", metavar="FILE", help="the job configuration, JSON (or YAML with PyYAML)")
    sub.add_argument("--model", metavar="ID", help="start from these uploaded weights (model.weights_id)")
    sub.add_argument("--idempotency-key", metavar="KEY", help="the same key and config return the same job")
    sub = command(jobs, "list", cmd_jobs_list, "list jobs")
    sub.add_argument("--status", choices=[s.value for s in JobStatus])
    paging(sub)
    command(jobs, "get", cmd_jobs_get, "show a job").add_argument("id")
    command(jobs, "cancel", cmd_jobs_cancel, "cancel a job").add_argument("id")
    command(jobs, "delete", cmd_jobs_delete, "delete a finished job").add_argument("id")
    command(jobs, "wait", cmd_jobs_wait,
            "follow a job until it ends: a bar per stage, a line per epoch (exit 1 unless it succeeded)").add_argument("id")
    sub = command(jobs, "download", cmd_jobs_download, "download every artifact of a job")
    sub.add_argument("id")
    sub.add_argument("--to", metavar="DIR", help="where to put them (default: ./JOB_ID)")

    command(groups, "architectures", cmd_architectures, "list the architectures the workers can run")

    sub = command(groups, "run", cmd_run, "upload a dataset, wait until it is valid, run a job on it, follow it "
                                          "and download its artifacts")
    sub.add_argument("dataset_file", metavar="DATASET_FILE")
    sub.add_argument("--config", metavar="FILE", help="the job configuration, JSON (or YAML with PyYAML)")
    sub.add_argument("--model", metavar="ID", help="start from these uploaded weights (model.weights_id)")
    sub.add_argument("--to", metavar="DIR", help="where the artifacts go (default: ./JOB_ID)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = MaskTuneClient(args.url, args.api_key, max_retries=max(0, args.retries))
    try:
        return args.handler(client, args)
    except UsageError as exc:
        print(f"masktune: error: {exc}", file=sys.stderr)
        return USAGE
    except ApiError as exc:
        print(f"masktune: API error {exc.status} {exc.code}: {exc.detail}", file=sys.stderr)
        for error in exc.errors or []:
            where = ".".join(str(p) for p in error.get("loc", []))
            print(f"  {where}: {error.get('msg')}", file=sys.stderr)
        return API_ERROR
    except (httpx.TransportError, TimeoutError, TransferError) as exc:
        print(f"masktune: cannot complete the call to {client.base_url}: {exc or type(exc).__name__}", file=sys.stderr)
        return UNREACHABLE
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()
