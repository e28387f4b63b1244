"""The MaskTune run: prepare -> erm -> saliency -> finetune -> evaluate -> export.

Every stage leaves its output in the work directory and is recorded in
``state.json`` when it finishes; ERM also keeps a checkpoint per epoch. Running
again with the same inputs skips finished stages and continues ERM after its
last finished epoch, so an interrupted run resumes instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from .archive import extract_archive
from jobspec import JobConfig
from .data import DecodedSplit, dataset_sha256, decode_dataset, index_dataset, summarize
from .errors import ConfigError, DatasetError, JobCancelled, PretrainedWeightsMissing
from .masking import apply_masks, threshold_masks
from .metrics import group_shares, selective_classification, split_metrics, verdict
from .model_card import write_model_card
from .models import (
    create_model, load_state, load_weights, pretrained_location, pretrained_state_dict, resolve_input_size,
    saliency_target_layer, saliency_target_name, save_weights,
)
from .previews import render_previews
from .saliency import saliency_maps
from .training import (
    LoopSettings, accuracy, epoch_generator, load_checkpoint, make_optimizer,
    model_input, predict_logits, save_checkpoint, train_one_epoch,
)

STAGES = ("prepare", "erm", "saliency", "finetune", "evaluate", "export")
_STAGE_WEIGHT = {"prepare": 0.05, "erm": 0.60, "saliency": 0.10, "finetune": 0.15, "evaluate": 0.08, "export": 0.02}
ARTIFACTS = ("metrics.json", "model.safetensors", "erm.safetensors", "previews.png", "config.json", "model_card.json")


@dataclass
class ProgressEvent:
    """kind: 'stage' (a stage starts), 'progress', 'epoch' (per-epoch metrics), 'warning', 'done'."""

    kind: str
    stage: str
    progress: float  # the whole run, 0..1
    stage_progress: float
    message: str = ""
    data: dict = field(default_factory=dict)


def pick_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def library_versions() -> dict[str, str]:
    names = ["torch", "torchvision", "timm", "grad-cam", "numpy", "pillow", "safetensors", "pydantic", "masktune-service"]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


class MaskTuneRun:
    """One run in one work directory. ``run()`` executes the unfinished stages."""

    def __init__(
        self,
        data: str | Path,
        out_dir: str | Path,
        config: JobConfig | None = None,
        *,
        workdir: str | Path | None = None,
        initial_weights: str | Path | None = None,
        device: str | None = None,
        on_event: Callable[[ProgressEvent], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ):
        self.data = Path(data)
        self.out_dir = Path(out_dir)
        self.config = config or JobConfig()
        self.workdir = Path(workdir) if workdir else self.out_dir / "work"
        self.initial_weights = Path(initial_weights) if initial_weights else None
        self.device = pick_device(device)
        self.on_event = on_event or (lambda event: None)
        self.should_cancel = should_cancel or (lambda: False)
        self.input_size = resolve_input_size(self.config.model.architecture, self.config.data.input_size)
        if self.config.erm.epochs == 0 and self.initial_weights is None:
            raise ConfigError("erm.epochs = 0 skips ERM, which needs uploaded weights to start from")
        if self.config.model.pretrained:  # fail before any work when the cache lacks them
            found, expected = pretrained_location(self.config.model.architecture)
            if found is None:
                raise PretrainedWeightsMissing(
                    f"pretrained weights for {self.config.model.architecture} are not on this machine: expected {expected}")
        self._prepared: dict | None = None
        self._stage = "prepare"
        self._done_weight = 0.0

    # ------------------------------------------------------------ bookkeeping

    def _fingerprint(self) -> str:
        digest = hashlib.sha256(self.config.model_dump_json().encode())
        digest.update(self.dataset_sha256.encode())
        if self.initial_weights:
            digest.update(dataset_sha256(self.initial_weights).encode())
        return digest.hexdigest()

    def _load_state(self) -> dict:
        path = self.workdir / "state.json"
        state = json.loads(path.read_text()) if path.exists() else None
        if state is None or state.get("fingerprint") != self._fingerprint():
            # Another config or dataset: nothing here can be reused.
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir.mkdir(parents=True)
            state = {"fingerprint": self._fingerprint(), "finished": []}
            _write_json(path, state)
        return state

    def _finish(self, state: dict, step: str) -> None:
        state["finished"].append(step)
        _write_json(self.workdir / "state.json", state)

    def _steps(self) -> list[tuple[str, str, float]]:
        """(step key, stage name, weight in the overall progress)."""
        rounds = self.config.masktune_iterations
        steps = [("prepare", "prepare", _STAGE_WEIGHT["prepare"]), ("erm", "erm", _STAGE_WEIGHT["erm"])]
        for i in range(1, rounds + 1):
            steps += [(f"saliency:{i}", "saliency", _STAGE_WEIGHT["saliency"] / rounds),
                      (f"finetune:{i}", "finetune", _STAGE_WEIGHT["finetune"] / rounds)]
        steps += [(s, s, _STAGE_WEIGHT[s]) for s in ("evaluate", "export")]
        return steps

    def _emit(self, kind: str, fraction: float = 0.0, message: str = "", **data) -> None:
        overall = min(1.0, self._done_weight + self._weight * fraction)
        self.on_event(ProgressEvent(kind, self._stage, overall, fraction, message, data))

    def _loop(self) -> LoopSettings:
        cfg = self.config.data
        return LoopSettings(
            device=self.device,
            normalization=cfg.normalization,
            augmentation=cfg.augmentation,
            should_cancel=self.should_cancel,
            on_batch=lambda done, total: self._emit("progress", done / total),
        )

    # ------------------------------------------------------------ the run

    def run(self) -> dict:
        """Run the unfinished stages; returns metrics.json's content."""
        self.dataset_sha256 = dataset_sha256(self.data)
        self.workdir.mkdir(parents=True, exist_ok=True)
        state = self._load_state()
        for step, stage, weight in self._steps():
            self._stage, self._weight = stage, weight
            if step not in state["finished"]:
                iteration = int(step.split(":")[1]) if ":" in step else None
                self._emit("stage", 0.0, f"{stage} started", iteration=iteration)
                getattr(self, f"_stage_{stage}")(*([iteration] if iteration else []))
                self._finish(state, step)
            self._done_weight += weight
        self._stage, self._weight = "export", 0.0
        metrics = json.loads((self.out_dir / "metrics.json").read_text())
        self._emit("done", 1.0, metrics["verdict"]["message"])
        return metrics

    @property
    def prepared(self) -> dict:
        if self._prepared is None:
            self._prepared = torch.load(self.workdir / "prepared.pt", weights_only=True)
        return self._prepared

    def split(self, name: str) -> DecodedSplit:
        s = self.prepared["splits"][name]
        return DecodedSplit(s["images"], s["labels"], s["groups"], s["names"])

    def _stage_prepare(self) -> None:
        if self.data.is_file():
            root = self.workdir / "dataset"
            shutil.rmtree(root, ignore_errors=True)
            extract_archive(self.data, root)
        elif self.data.is_dir():
            root = self.data
        else:
            raise DatasetError(f"no dataset at {self.data}")
        cfg = self.config.data
        index = index_dataset(root, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=self.config.seed)
        self._emit("progress", 0.3, f"decoding {sum(len(s) for s in index.splits.values())} images")
        decoded = decode_dataset(index, self.input_size)
        summary = summarize(index, decoded)
        if index.skipped:
            self._emit("warning", 0.9, f"Warning: {len(index.skipped)} files skipped; see the dataset summary", skipped=index.skipped[:20])
        prepared = {
            "classes": index.classes,
            "groups": index.groups,
            "summary": summary,
            "splits": {
                name: {"images": s.images, "labels": s.labels, "groups": s.groups, "names": s.names}
                for name, s in decoded.splits.items()
            },
        }
        tmp = self.workdir / "prepared.pt.tmp"
        torch.save(prepared, tmp)
        tmp.replace(self.workdir / "prepared.pt")
        self._prepared = prepared
        self._emit("progress", 1.0, "dataset ready", summary={k: summary[k] for k in ("classes", "groups", "splits")})

    def new_model(self) -> torch.nn.Module:
        return create_model(self.config.model.architecture, len(self.prepared["classes"]), self.input_size)

    def _load_start(self, model: torch.nn.Module) -> None:
        """Uploaded weights or the cached ImageNet weights, if the config asks for either."""
        cfg = self.config.model
        if self.initial_weights:
            replaced = load_weights(model, self.initial_weights, head=cfg.head, architecture=cfg.architecture)
            source = "the uploaded weights"
        elif cfg.pretrained:
            replaced = load_state(model, pretrained_state_dict(cfg.architecture), head="replace", architecture=cfg.architecture)
            source = f"the ImageNet weights of {cfg.architecture}"
        else:
            return
        classes = len(self.prepared["classes"])
        if replaced:  # a warning, so the job's events always keep it: the head starts untrained
            self._emit("warning", 0.0, f"started from {source} with a fresh {classes}-class head "
                       "(the file's head had another class count)", head_replaced=True)
        else:
            self._emit("progress", 0.0, f"started from {source}", head_replaced=False)

    def _stage_erm(self) -> None:
        cfg = self.config.erm
        erm_dir = self.workdir / "erm"
        erm_dir.mkdir(exist_ok=True)
        torch.manual_seed(self.config.seed)
        model = self.new_model()
        # Refuses models xGradCAM cannot read (vision transformers) before ERM, not after it.
        saliency_target_name(model, self.config.model.architecture, self.input_size)
        if not (erm_dir / "last.pt").exists():
            self._load_start(model)
        model.to(self.device)
        optimizer = make_optimizer(model, cfg)
        train, val = self.split("train"), self.split("val")
        loop = self._loop()
        if cfg.epochs == 0:
            val_acc = accuracy(predict_logits(model, val.images, cfg.batch_size, loop), val.labels)
            for name in ("best.pt", "last.pt"):
                save_checkpoint(erm_dir / name, model, optimizer, epoch=-1, val_accuracy=val_acc, best_val_accuracy=val_acc)
            self._emit("progress", 1.0, "ERM skipped: the uploaded weights are the ERM model", val_accuracy=val_acc)
            return
        start, best = 0, float("-inf")
        if (erm_dir / "last.pt").exists():
            extra = load_checkpoint(erm_dir / "last.pt", model, optimizer)
            start, best = extra["epoch"] + 1, extra["best_val_accuracy"]
            self._emit("progress", start / cfg.epochs, f"resuming ERM after epoch {start}", resumed_from_epoch=start)
        for epoch in range(start, cfg.epochs):
            loop.on_batch = lambda done, total, e=epoch: self._emit("progress", (e + done / total) / cfg.epochs)
            stats = train_one_epoch(model, optimizer, train.images, train.labels, cfg.batch_size,
                                    epoch_generator(self.config.seed, "erm", epoch), loop)
            val_acc = accuracy(predict_logits(model, val.images, cfg.batch_size, loop), val.labels)
            if val_acc > best:
                best = val_acc
                save_checkpoint(erm_dir / "best.pt", model, optimizer, epoch=epoch, val_accuracy=val_acc, best_val_accuracy=best)
            save_checkpoint(erm_dir / "last.pt", model, optimizer, epoch=epoch, val_accuracy=val_acc, best_val_accuracy=best)
            self._emit("epoch", (epoch + 1) / cfg.epochs, f"ERM epoch {epoch + 1}/{cfg.epochs}",
                       phase="erm", epoch=epoch + 1, epochs=cfg.epochs, train_loss=stats["loss"],
                       train_accuracy=stats["accuracy"], val_accuracy=val_acc, best_val_accuracy=best)

    def _masking_source(self, iteration: int) -> Path:
        if iteration > 1:
            return self.workdir / f"finetune_{iteration - 1}.pt"
        return self.workdir / "erm" / f"{self.config.masking.checkpoint}.pt"

    def _stage_saliency(self, iteration: int) -> None:
        cfg = self.config.masking
        model = self.new_model()
        load_checkpoint(self._masking_source(iteration), model)
        model.to(self.device)
        target = saliency_target_layer(model, self.config.model.architecture, self.input_size)
        train = self.split("train")
        images = train.images
        previous = None
        if iteration > 1 and self.config.accumulative_masking:
            previous = torch.load(self.workdir / f"saliency_{iteration - 1}.pt", weights_only=True)["masks"]
            images = apply_masks(images, previous)
        preview_idx = torch.randperm(len(train), generator=epoch_generator(self.config.seed, "preview", 0))[: self.config.preview_count]
        masks, preview_maps = [], {}
        loop = self._loop()
        for start in range(0, len(images), cfg.batch_size):
            if self.should_cancel():
                raise JobCancelled()
            batch = images[start:start + cfg.batch_size]
            maps, _ = saliency_maps(cfg.method, model, target, model_input(batch, loop))
            maps = maps.cpu()
            masks.append(threshold_masks(maps, cfg.threshold_std))
            for i in preview_idx.tolist():
                if start <= i < start + len(batch):
                    preview_maps[i] = maps[i - start]
            self._emit("progress", min(1.0, (start + len(batch)) / len(images)))
        masks = torch.cat(masks)
        if previous is not None:
            masks |= previous
        masked_fraction = masks.float().mean().item()
        torch.save({
            "masks": masks,
            "preview_index": preview_idx,
            "preview_maps": torch.stack([preview_maps[i] for i in preview_idx.tolist()]) if len(preview_idx) else torch.empty(0),
            "masked_pixel_fraction": masked_fraction,
            "images_with_mask_fraction": masks.flatten(1).any(1).float().mean().item(),
        }, self.workdir / f"saliency_{iteration}.pt")
        self._emit("progress", 1.0, f"masked {masked_fraction:.2%} of the training pixels", masked_pixel_fraction=masked_fraction)

    def _stage_finetune(self, iteration: int) -> None:
        model = self.new_model()
        model.to(self.device)
        optimizer = make_optimizer(model, self.config.erm)
        start = self.workdir / ("erm/last.pt" if iteration == 1 else f"finetune_{iteration - 1}.pt")
        load_checkpoint(start, model, optimizer)
        train = self.split("train")
        masks = torch.load(self.workdir / f"saliency_{iteration}.pt", weights_only=True)["masks"]
        masked = apply_masks(train.images, masks)
        batch_size = self.config.finetune.batch_size or self.config.erm.batch_size
        epochs = self.config.finetune.epochs
        loop = self._loop()
        for epoch in range(epochs):
            loop.on_batch = lambda done, total, e=epoch: self._emit("progress", (e + done / total) / epochs)
            stats = train_one_epoch(model, optimizer, masked, train.labels, batch_size,
                                    epoch_generator(self.config.seed, "finetune", iteration * 1000 + epoch), loop)
            val = self.split("val")
            val_acc = accuracy(predict_logits(model, val.images, batch_size, loop), val.labels)
            self._emit("epoch", (epoch + 1) / epochs, f"finetune epoch {epoch + 1}/{epochs}", phase="finetune",
                       iteration=iteration, epoch=epoch + 1, epochs=epochs, train_loss=stats["loss"],
                       train_accuracy=stats["accuracy"], val_accuracy=val_acc)
        save_checkpoint(self.workdir / f"finetune_{iteration}.pt", model, optimizer, iteration=iteration)

    def _trained(self, checkpoint: str) -> torch.nn.Module:
        model = self.new_model()
        load_checkpoint(self.workdir / checkpoint, model)
        return model.to(self.device)

    def _stage_evaluate(self) -> None:
        p = self.prepared
        rounds = self.config.masktune_iterations
        models = {"erm": self._trained("erm/best.pt"), "masktune": self._trained(f"finetune_{rounds}.pt"),
                  "erm_last": self._trained("erm/last.pt")}
        shares = group_shares(self.split("train").groups, p["groups"])
        loop = self._loop()
        batch = self.config.masking.batch_size
        metrics: dict = {name: {} for name in models}
        logits: dict = {}
        splits = list(p["splits"])
        for n, split_name in enumerate(splits):
            s = self.split(split_name)
            for name, model in models.items():
                logits[name, split_name] = predict_logits(model, s.images, batch, loop)
                metrics[name][split_name] = split_metrics(logits[name, split_name], s.labels, s.groups, p["classes"], p["groups"], shares)
            self._emit("progress", (n + 1) / len(splits))
        saliency = torch.load(self.workdir / f"saliency_{rounds}.pt", weights_only=True)
        metrics["masking"] = {
            "masked_pixel_fraction": saliency["masked_pixel_fraction"],
            "images_with_mask_fraction": saliency["images_with_mask_fraction"],
        }
        metrics["verdict"] = verdict(metrics["erm"]["val"], metrics["masktune"]["val"], "val", saliency["masked_pixel_fraction"])
        if self.config.selective.enabled:
            if "test" in p["splits"]:
                val, test = self.split("val"), self.split("test")
                metrics["selective"] = selective_classification(
                    logits["erm", "val"], logits["masktune", "val"], val.labels,
                    logits["erm", "test"], logits["masktune", "test"], test.labels, self.config.selective.coverages)
            else:
                metrics["selective"] = {"skipped": "the dataset has no test split"}
        if not metrics["verdict"]["improved"]:
            self._emit("warning", 1.0, metrics["verdict"]["message"])
        _write_json(self.workdir / "metrics.json", metrics)

    def _stage_export(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rounds = self.config.masktune_iterations
        save_weights(self._trained(f"finetune_{rounds}.pt"), self.out_dir / "model.safetensors")
        save_weights(self._trained("erm/best.pt"), self.out_dir / "erm.safetensors")
        saliency = torch.load(self.workdir / "saliency_1.pt", weights_only=True)
        idx = saliency["preview_index"]
        train = self.split("train")
        if len(idx):
            captions = [f"{train.names[i]} (class {self.prepared['classes'][train.labels[i]]})" for i in idx.tolist()]
            render_previews(train.images[idx], saliency["preview_maps"], saliency["masks"][idx], captions, self.out_dir / "previews.png")
        resolved = self.config.model_copy(deep=True)
        resolved.data.input_size = self.input_size
        _write_json(self.out_dir / "config.json", {
            "config": resolved.model_dump(mode="json"),
            "seed": self.config.seed,
            "dataset_sha256": self.dataset_sha256,
            "initial_weights_sha256": dataset_sha256(self.initial_weights) if self.initial_weights else None,
            "device": str(self.device),
            "classes": self.prepared["classes"],
            "groups": self.prepared["groups"],
            "dataset_summary": self.prepared["summary"],
            "versions": library_versions(),
        })
        write_model_card(self.out_dir / "model_card.json", self.config.model.architecture, self.prepared["classes"],
                         self.input_size, self.config.data.normalization)
        shutil.copyfile(self.workdir / "metrics.json", self.out_dir / "metrics.json.tmp")
        (self.out_dir / "metrics.json.tmp").replace(self.out_dir / "metrics.json")


def run_masktune(data: str | Path, out_dir: str | Path, config: JobConfig | None = None, **kwargs) -> dict:
    """Run (or resume) MaskTune on a dataset archive or directory; returns the metrics."""
    return MaskTuneRun(data, out_dir, config, **kwargs).run()
