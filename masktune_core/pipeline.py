"""The MaskTune run: prepare -> erm -> saliency -> finetune -> evaluate -> export, and the baselines
``config.methods`` asks for beside it: jtt_identify -> jtt (Just Train Twice), dfr (Deep Feature Reweighting).

Every stage leaves its output in the work directory (names in ``runfolder``) and
is recorded in ``state.json`` when it finishes; ERM also keeps a checkpoint per
epoch. Running again with the same inputs skips finished stages and continues ERM
after its last finished epoch, so an interrupted run resumes instead of starting over.

The dataset itself is not in the work directory: ``prepare`` unpacks and decodes it
once into the dataset cache (``decoded``), shared by every run on the same data and
input size, and records the run's splits as rows of that cache in ``index.json``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from contextlib import closing
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import runfolder as rf
from .archive import ExtractionLimits
from jobspec import JobConfig
from .data import SplitRows, dataset_sha256, decode_dataset, index_dataset, summarize
from .decoded import DecodedImages, bad_chunks, entry_dir, unpack_once
from .errors import ConfigError, DatasetError, DfrNeedsValGroups, JobCancelled, PretrainedWeightsMissing
from .masking import pack_masks, threshold_masks, unpack_masks
from .memory import map_large_buffers
from .baselines import fit_dfr_head, misclassified, penultimate_features, set_head, upsampled, without_groups
from .metrics import (
    LABELS, MIN_GROUP_IMAGES, group_shares, recommend, selective_classification, split_metrics, verdict,
)
from .model_card import write_model_card
from .models import (
    create_model, load_state, load_weights, pretrained_location, pretrained_state_dict, resolve_input_size,
    saliency_target_layer, saliency_target_name, save_weights,
)
from .previews import render_previews
from .report import render_report
from .rowfile import RowFile
from .saliency import saliency_maps
from .training import (
    LoopSettings, accuracy, autocast_dtype, epoch_generator, in_order, load_checkpoint, make_optimizer,
    model_input, place_model, predict_logits, read_ahead, save_checkpoint, train_one_epoch,
)

STAGES = ("prepare", "erm", "saliency", "finetune", "jtt_identify", "jtt", "dfr", "evaluate", "export")
# Shares of the run's progress; a run's steps are those of its methods, their weights scaled to sum to 1.
_STAGE_WEIGHT = {"prepare": 0.05, "erm": 0.60, "saliency": 0.10, "finetune": 0.15, "jtt_identify": 0.03, "jtt": 0.55,
                 "dfr": 0.05, "evaluate": 0.08, "export": 0.02}


@dataclass
class ProgressEvent:
    """kind: 'stage' (a stage starts), 'progress', 'info' (a milestone worth keeping), 'epoch' (per-epoch metrics),
    'warning', 'done'."""

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
        cache_dir: str | Path | None = None,
        dataset_sha256: str | None = None,
        extraction_limits: ExtractionLimits | None = None,
    ):
        """``cache_dir`` holds unpacked and decoded datasets for every run that names it (default:
        ``out_dir/cache``); ``dataset_sha256`` spares hashing the data when the caller knows it."""
        self.data = Path(data)
        self.out_dir = Path(out_dir)
        self.config = config or JobConfig()
        self.workdir = Path(workdir) if workdir else self.out_dir / rf.WORK
        self.initial_weights = Path(initial_weights) if initial_weights else None
        self.device = pick_device(device)
        self.precision = autocast_dtype(self.config.runtime.precision, self.device)
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
        self.cache_dir = Path(cache_dir) if cache_dir else self.out_dir / "cache"
        self.dataset_sha256 = dataset_sha256
        self.extraction_limits = extraction_limits or ExtractionLimits()
        self._index: dict | None = None
        self._images: DecodedImages | None = None
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
        path = self.workdir / rf.STATE
        state = json.loads(path.read_text()) if path.exists() else None
        if state is None or state.get("fingerprint") != self._fingerprint():
            # Another config or dataset: nothing here can be reused.
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir.mkdir(parents=True)
            state = {"fingerprint": self._fingerprint(), "finished": []}
            rf.write_json(path, state)
        return state

    def _finish(self, state: dict, step: str) -> None:
        state["finished"].append(step)
        rf.write_json(self.workdir / rf.STATE, state)

    def _steps(self) -> list[tuple[str, str, float]]:
        """(step key, stage name, weight in the overall progress)."""
        rounds = self.config.masktune_iterations
        methods = self.config.methods
        steps = [("prepare", "prepare", _STAGE_WEIGHT["prepare"]), ("erm", "erm", _STAGE_WEIGHT["erm"])]
        if "masktune" in methods:
            for i in range(1, rounds + 1):
                steps += [(f"saliency:{i}", "saliency", _STAGE_WEIGHT["saliency"] / rounds),
                          (f"finetune:{i}", "finetune", _STAGE_WEIGHT["finetune"] / rounds)]
        if "jtt" in methods:
            steps += [(s, s, _STAGE_WEIGHT[s]) for s in ("jtt_identify", "jtt")]
        if "dfr" in methods:
            steps.append(("dfr", "dfr", _STAGE_WEIGHT["dfr"]))
        steps += [(s, s, _STAGE_WEIGHT[s]) for s in ("evaluate", "export")]
        total = sum(weight for _, _, weight in steps)
        return [(key, stage, weight / total) for key, stage, weight in steps]

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
            precision=self.precision,
        )

    def _placed(self, model: torch.nn.Module, loop: LoopSettings) -> torch.nn.Module:
        """The model on the device, ready to train or predict: compiled when ``runtime.compile``
        (the compiled module shares the parameters; checkpoints are taken from the original)."""
        model = place_model(model, loop)
        return torch.compile(model) if self.config.runtime.compile else model

    # ------------------------------------------------------------ the run

    def run(self) -> dict:
        """Run the unfinished stages; returns metrics.json's content."""
        if not self.data.exists():
            raise DatasetError(f"no dataset at {self.data}")
        map_large_buffers()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels once
        self.dataset_sha256 = self.dataset_sha256 or dataset_sha256(self.data)
        self.workdir.mkdir(parents=True, exist_ok=True)
        state = self._load_state()
        for step, stage, weight in self._steps():
            self._stage, self._weight = stage, weight
            # The decoded dataset lives outside the work area: gone (another machine) or damaged, prepare again.
            if step not in state["finished"] or (step == "prepare" and not self._decoded_intact()):
                iteration = int(step.split(":")[1]) if ":" in step else None
                self._emit("stage", 0.0, f"{stage} started", iteration=iteration)
                getattr(self, f"_stage_{stage}")(*([iteration] if iteration else []))
                if step not in state["finished"]:
                    self._finish(state, step)
            self._done_weight += weight
        self._stage, self._weight, self._done_weight = "export", 0.0, 1.0  # not a sum of float shares
        metrics = json.loads((self.out_dir / rf.METRICS).read_text())
        self._emit("done", 1.0, metrics["verdict"]["message"])
        return metrics

    def _decoded_folder(self) -> Path:
        return entry_dir(self.cache_dir, self.dataset_sha256, self.input_size)

    def _decoded_intact(self) -> bool:
        folder = self._decoded_folder()
        try:
            return (self.workdir / rf.INDEX).exists() and not bad_chunks(folder)
        except (OSError, ValueError, KeyError):
            return False

    @property
    def index(self) -> dict:
        """index.json: classes, groups, the dataset summary, and each split as rows, labels and groups."""
        if self._index is None:
            self._index = json.loads((self.workdir / rf.INDEX).read_text())
        return self._index

    def split(self, name: str) -> SplitRows:
        if self._images is None:
            self._images = DecodedImages(self._decoded_folder())
        s = self.index["splits"][name]
        return SplitRows(self._images, np.array(s["rows"], dtype=np.int64),
                         torch.tensor(s["labels"], dtype=torch.long), torch.tensor(s["groups"], dtype=torch.long))

    def _stage_prepare(self) -> None:
        root = self.data
        if self.data.is_file():
            self._emit("progress", 0.0, "unpacking the dataset")
            root = unpack_once(self.data, self.cache_dir, self.dataset_sha256, self.extraction_limits)
        cfg = self.config.data
        index = index_dataset(root, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=self.config.seed,
                              label_attribute=cfg.label_attribute, group_attribute=cfg.group_attribute)
        count = sum(len(s) for s in index.splits.values())
        self._emit("progress", 0.1, f"decoding {count} images at {self.input_size} px (or reusing them)")
        decoded = decode_dataset(index, self.input_size, self._decoded_folder(), should_cancel=self.should_cancel,
                                 on_progress=lambda done, total: self._emit("progress", 0.1 + 0.85 * done / max(total, 1)))
        summary = summarize(index, decoded.image_stats)
        if index.skipped:
            self._emit("warning", 0.95, f"Warning: {len(index.skipped)} files skipped; see the dataset summary", skipped=index.skipped[:20])
        rf.write_json(self.workdir / rf.INDEX, compact=True, obj={
            "classes": index.classes,
            "groups": index.groups,
            "summary": summary,
            "splits": {name: {"rows": s.rows.tolist(), "labels": s.labels.tolist(), "groups": s.groups.tolist()}
                       for name, s in decoded.splits.items()},
        })
        self._index, self._images = None, None
        if "dfr" in self.config.methods and not index.groups:
            raise DfrNeedsValGroups("methods includes dfr, which retrains the last layer on group-balanced validation "
                                    "images, but the dataset has no group labels (a group column in the manifest, or "
                                    "data.group_attribute for CelebA)")
        reused = "reused the decoded images" if decoded.decoded_count == 0 else f"decoded {decoded.decoded_count} images"
        self._emit("info", 1.0, f"dataset ready ({reused})", decoded_images=decoded.decoded_count,
                   summary={k: summary[k] for k in ("classes", "groups", "splits")})

    def new_model(self) -> torch.nn.Module:
        return create_model(self.config.model.architecture, len(self.index["classes"]), self.input_size)

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
        classes = len(self.index["classes"])
        if replaced:  # a warning, so the job's events always keep it: the head starts untrained
            self._emit("warning", 0.0, f"started from {source} with a fresh {classes}-class head "
                       "(the file's head had another class count)", head_replaced=True)
        else:
            self._emit("progress", 0.0, f"started from {source}", head_replaced=False)

    def _stage_erm(self) -> None:
        cfg = self.config.erm
        best_path, last_path = self.workdir / rf.ERM_BEST, self.workdir / rf.ERM_LAST
        best_path.parent.mkdir(exist_ok=True)
        torch.manual_seed(self.config.seed)
        model = self.new_model()
        # Refuses models xGradCAM cannot read (vision transformers) before ERM, not after it.
        saliency_target_name(model, self.config.model.architecture, self.input_size)
        if not last_path.exists():
            self._load_start(model)
        loop = self._loop()
        net = self._placed(model, loop)
        optimizer = make_optimizer(model, cfg)
        train, val = self.split("train"), self.split("val")
        if cfg.epochs == 0:
            val_acc = accuracy(predict_logits(net, val, cfg.batch_size, loop), val.labels)
            for path in (best_path, last_path):
                save_checkpoint(path, model, optimizer, epoch=-1, val_accuracy=val_acc, best_val_accuracy=val_acc)
            self._emit("progress", 1.0, "ERM skipped: the uploaded weights are the ERM model", val_accuracy=val_acc)
            return
        start, best = 0, float("-inf")
        if last_path.exists():
            extra = load_checkpoint(last_path, model, optimizer)
            start, best = extra["epoch"] + 1, extra["best_val_accuracy"]
            self._emit("progress", start / cfg.epochs, f"resuming ERM after epoch {start}", resumed_from_epoch=start)
        for epoch in range(start, cfg.epochs):
            loop.on_batch = lambda done, total, e=epoch: self._emit("progress", (e + done / total) / cfg.epochs)
            stats = train_one_epoch(net, optimizer, train, cfg.batch_size, epoch_generator(self.config.seed, "erm", epoch), loop)
            val_acc = accuracy(predict_logits(net, val, cfg.batch_size, loop), val.labels)
            if val_acc > best:
                best = val_acc
                save_checkpoint(best_path, model, optimizer, epoch=epoch, val_accuracy=val_acc, best_val_accuracy=best)
            save_checkpoint(last_path, model, optimizer, epoch=epoch, val_accuracy=val_acc, best_val_accuracy=best)
            if "jtt" in self.config.methods and epoch + 1 == self.config.jtt_identify_epochs():
                save_checkpoint(self.workdir / rf.erm_epoch_checkpoint(epoch + 1), model, optimizer, epoch=epoch)
            self._emit("epoch", (epoch + 1) / cfg.epochs, f"ERM epoch {epoch + 1}/{cfg.epochs}",
                       phase="erm", epoch=epoch + 1, epochs=cfg.epochs, train_loss=stats["loss"],
                       train_accuracy=stats["accuracy"], val_accuracy=val_acc, best_val_accuracy=best)

    def _masking_source(self, iteration: int) -> Path:
        if iteration > 1:
            return self.workdir / rf.finetune_checkpoint(iteration - 1)
        return self.workdir / {"best": rf.ERM_BEST, "last": rf.ERM_LAST}[self.config.masking.checkpoint]

    def _stage_saliency(self, iteration: int) -> None:
        cfg = self.config.masking
        model = self.new_model()
        load_checkpoint(self._masking_source(iteration), model)
        loop = self._loop()
        place_model(model, loop)  # not compiled: saliency hooks into a layer of the module itself
        target = saliency_target_layer(model, self.config.model.architecture, self.input_size)
        train = self.split("train")
        side = self.input_size
        previous = None
        if iteration > 1 and self.config.accumulative_masking:
            previous = RowFile(self.workdir / rf.masks_file(iteration - 1))
        preview_idx = torch.randperm(len(train), generator=epoch_generator(self.config.seed, "preview", 0))[: self.config.preview_count]
        preview_maps: dict[int, torch.Tensor] = {}
        masked_pixels = images_with_mask = 0
        batches = in_order(len(train), cfg.batch_size)
        with rf.atomic_path(self.workdir / rf.masks_file(iteration)) as tmp, \
                RowFile.create(tmp, (len(train), (side * side + 7) // 8), np.uint8) as masks_out, \
                closing(read_ahead(train, batches, previous, pin=loop.on_gpu)) as batch_images:
            for idx, images in zip(batches, batch_images):
                if self.should_cancel():
                    raise JobCancelled()
                maps, _ = saliency_maps(cfg.method, model, target, model_input(images, loop), loop.precision)
                # Thresholded where the maps are: only the masks (a bit per pixel, soon) cross to the host.
                masks = threshold_masks(maps, cfg.threshold_std).cpu()
                if previous is not None:
                    masks |= unpack_masks(previous.read(idx), side)
                masks_out.write(int(idx[0]), pack_masks(masks))
                masked_pixels += int(masks.sum())
                images_with_mask += int(masks.flatten(1).any(1).sum())
                for i in preview_idx.tolist():
                    if idx[0] <= i <= idx[-1]:
                        preview_maps[i] = maps[i - int(idx[0])].cpu()
                self._emit("progress", min(1.0, (int(idx[-1]) + 1) / len(train)))
        masked_fraction = masked_pixels / max(len(train) * side * side, 1)
        with rf.atomic_path(self.workdir / rf.saliency_stats(iteration)) as tmp:
            torch.save({
                "preview_index": preview_idx,
                "preview_maps": torch.stack([preview_maps[i] for i in preview_idx.tolist()]) if len(preview_idx) else torch.empty(0),
                "masked_pixel_fraction": masked_fraction,
                "images_with_mask_fraction": images_with_mask / max(len(train), 1),
            }, tmp)
        self._emit("progress", 1.0, f"masked {masked_fraction:.2%} of the training pixels", masked_pixel_fraction=masked_fraction)

    def _stage_finetune(self, iteration: int) -> None:
        model = self.new_model()
        loop = self._loop()
        net = self._placed(model, loop)
        optimizer = make_optimizer(model, self.config.erm)
        start = self.workdir / (rf.ERM_LAST if iteration == 1 else rf.finetune_checkpoint(iteration - 1))
        load_checkpoint(start, model, optimizer)
        train, val = self.split("train"), self.split("val")
        masks = RowFile(self.workdir / rf.masks_file(iteration))
        batch_size = self.config.finetune.batch_size or self.config.erm.batch_size
        epochs = self.config.finetune.epochs
        for epoch in range(epochs):
            loop.on_batch = lambda done, total, e=epoch: self._emit("progress", (e + done / total) / epochs)
            stats = train_one_epoch(net, optimizer, train, batch_size,
                                    epoch_generator(self.config.seed, "finetune", iteration * 1000 + epoch), loop, masks)
            val_acc = accuracy(predict_logits(net, val, batch_size, loop), val.labels)
            self._emit("epoch", (epoch + 1) / epochs, f"finetune epoch {epoch + 1}/{epochs}", phase="finetune",
                       iteration=iteration, epoch=epoch + 1, epochs=epochs, train_loss=stats["loss"],
                       train_accuracy=stats["accuracy"], val_accuracy=val_acc)
        masks.close()
        save_checkpoint(self.workdir / rf.finetune_checkpoint(iteration), model, optimizer, iteration=iteration)

    # ------------------------------------------------------------ baselines

    def _train_epochs(self, phase: str, checkpoint: str, first: str | None, model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer, train: SplitRows, epochs: int, label: str) -> None:
        """Train ``model`` up to ``epochs`` (``phase``'s batches), keeping ``checkpoint`` after every epoch and
        resuming after the one it holds; a fresh run starts from ``first`` (a checkpoint) when given."""
        path = self.workdir / checkpoint
        start = 0
        if path.exists() or first:
            start = load_checkpoint(path if path.exists() else self.workdir / first, model, optimizer)["epoch"] + 1
        loop = self._loop()
        net = self._placed(model, loop)
        val = without_groups(self.split("val"))
        batch_size = self.config.erm.batch_size
        for epoch in range(start, epochs):
            loop.on_batch = lambda done, total, e=epoch: self._emit("progress", (e + done / total) / epochs)
            stats = train_one_epoch(net, optimizer, train, batch_size, epoch_generator(self.config.seed, phase, epoch), loop)
            val_acc = accuracy(predict_logits(net, val, batch_size, loop), val.labels)
            path.parent.mkdir(exist_ok=True)
            save_checkpoint(path, model, optimizer, epoch=epoch, val_accuracy=val_acc)
            self._emit("epoch", (epoch + 1) / epochs, f"{label} epoch {epoch + 1}/{epochs}", phase=self._stage,
                       epoch=epoch + 1, epochs=epochs, train_loss=stats["loss"], train_accuracy=stats["accuracy"],
                       val_accuracy=val_acc)

    def _stage_jtt_identify(self) -> None:
        """JTT's error set: the training images the ERM run gets wrong after T epochs. ERM kept its checkpoint
        of epoch T; past ERM's last epoch, the ERM run is continued to epoch T (same batches)."""
        epochs = self.config.jtt_identify_epochs()
        model = self.new_model()
        if epochs <= self.config.erm.epochs:
            source = rf.erm_epoch_checkpoint(epochs)
            load_checkpoint(self.workdir / source, model)
        else:
            source = rf.JTT_IDENTIFY
            self._train_epochs("erm", source, rf.ERM_LAST, model, make_optimizer(model, self.config.erm),
                               without_groups(self.split("train")), epochs, "JTT identification (ERM continued)")
        loop = self._loop()
        train = without_groups(self.split("train"))
        errors = misclassified(place_model(model, loop), train, self.config.masking.batch_size, loop)
        upweight = self.config.jtt.upweight
        summary = {"epochs_identify": epochs, "identification_model": source, "error_set_size": len(errors),
                   "train_images": len(train), "upweight": upweight,
                   "upsampled_train_images": len(train) + (upweight - 1) * len(errors), "note": None}
        if not errors:
            summary["note"] = (f"JTT's identification model (ERM after {epochs} epochs) classifies every training image "
                               "correctly: the error set is empty, so the JTT model is just a second ERM run. Set a "
                               "smaller jtt.epochs_identify or a lower erm.lr, so that the identification model has not "
                               "yet fitted the minority images.")
            self._emit("warning", 1.0, f"Warning: {summary['note']}", error_set_size=0)
        else:
            self._emit("info", 1.0, f"JTT error set: {len(errors)} of {len(train)} training images, each seen "
                       f"{upweight} times in the retraining set", error_set_size=len(errors))
        rf.write_json(self.workdir / rf.JTT_ERROR_SET, {**summary, "positions": errors})

    def _stage_jtt(self) -> None:
        """JTT's second model: trained from ERM's starting point on the upsampled training set."""
        cfg = self.config.jtt
        found = json.loads((self.workdir / rf.JTT_ERROR_SET).read_text())
        train = upsampled(self.split("train"), np.array(found["positions"], dtype=np.int64), cfg.upweight)
        torch.manual_seed(self.config.seed)
        model = self.new_model()
        if not (self.workdir / rf.JTT_LAST).exists():
            self._load_start(model)
        erm = self.config.erm
        settings = erm.model_copy(update={"lr": cfg.lr or erm.lr,
                                          "weight_decay": erm.weight_decay if cfg.weight_decay is None else cfg.weight_decay})
        self._train_epochs("jtt", rf.JTT_LAST, None, model, make_optimizer(model, settings), train,
                           cfg.epochs or erm.epochs, "JTT")

    def _stage_dfr(self) -> None:
        """DFR: the ERM model's last layer retrained on group-balanced validation features."""
        cfg = self.config.dfr
        model = self._trained(rf.ERM_BEST)
        val = self.split("val")
        features = penultimate_features(model, val, self.config.masking.batch_size, self._loop())
        self._emit("progress", 0.5, f"fitting DFR's last layer on {len(val)} validation images")
        weight, bias, found = fit_dfr_head(features, val.labels.numpy(), val.groups.numpy(), len(self.index["classes"]),
                                           cfg.c_grid, cfg.resamples, self.config.seed)
        set_head(model, weight, bias)
        (self.workdir / rf.DFR_MODEL).parent.mkdir(exist_ok=True)
        save_weights(model, self.workdir / rf.DFR_MODEL)
        rf.write_json(self.workdir / rf.DFR_SUMMARY, found)
        message = (f"DFR: C={found['c']}, {found['images_per_group']} validation images per group in each of "
                   f"{cfg.resamples} balanced fits")
        if found["images_per_group"] < MIN_GROUP_IMAGES:  # a last layer fitted on a handful of images per group
            self._emit("warning", 1.0, f"Warning: {message}; with so few, DFR's last layer may fit those images rather "
                       "than the groups: a larger validation split with more minority images helps", **found)
        else:
            self._emit("info", 1.0, message, **found)

    # ------------------------------------------------------------ evaluation and export

    def _trained(self, checkpoint: str) -> torch.nn.Module:
        model = self.new_model()
        if checkpoint.endswith(".safetensors"):
            load_weights(model, self.workdir / checkpoint)
        else:
            load_checkpoint(self.workdir / checkpoint, model)
        return place_model(model, self._loop())

    def _method_checkpoints(self) -> dict[str, str]:
        """Each method's final model in the work directory, ERM's (best) first."""
        found = {"erm": rf.ERM_BEST, "masktune": rf.finetune_checkpoint(self.config.masktune_iterations),
                 "jtt": rf.JTT_LAST, "dfr": rf.DFR_MODEL}
        return {name: found[name] for name in ["erm", *self.config.methods]}

    def _stage_evaluate(self) -> None:
        p = self.index
        methods = self.config.methods
        models = {name: self._trained(path) for name, path in self._method_checkpoints().items()}
        models["erm_last"] = self._trained(rf.ERM_LAST)
        shares = group_shares(self.split("train").groups, p["groups"])
        loop = self._loop()
        batch = self.config.masking.batch_size
        metrics: dict = {"methods": list(methods), **{name: {} for name in models}}
        logits: dict = {}
        splits = list(p["splits"])
        for n, split_name in enumerate(splits):
            s = self.split(split_name)
            for name, model in models.items():
                logits[name, split_name] = predict_logits(model, s, batch, loop)
                metrics[name][split_name] = split_metrics(logits[name, split_name], s.labels, s.groups, p["classes"], p["groups"], shares)
            self._emit("progress", (n + 1) / len(splits))
        masked_fraction = None
        if "masktune" in methods:
            saliency = torch.load(self.workdir / rf.saliency_stats(self.config.masktune_iterations), weights_only=True)
            masked_fraction = saliency["masked_pixel_fraction"]
            metrics["masking"] = {
                "masked_pixel_fraction": masked_fraction,
                "images_with_mask_fraction": saliency["images_with_mask_fraction"],
            }
        if "jtt" in methods:
            found = json.loads((self.workdir / rf.JTT_ERROR_SET).read_text())
            metrics["jtt_error_set"] = {k: v for k, v in found.items() if k != "positions"}
        if "dfr" in methods:
            metrics["dfr_head"] = json.loads((self.workdir / rf.DFR_SUMMARY).read_text())
        metrics["verdict"] = self._verdict(logits, masked_fraction)
        if self.config.selective.enabled:
            if "masktune" not in methods:
                metrics["selective"] = {"skipped": "selective classification combines ERM and MaskTune, which did not run"}
            elif "test" in p["splits"]:
                val, test = self.split("val"), self.split("test")
                metrics["selective"] = selective_classification(
                    logits["erm", "val"], logits["masktune", "val"], val.labels,
                    logits["erm", "test"], logits["masktune", "test"], test.labels, self.config.selective.coverages)
            else:
                metrics["selective"] = {"skipped": "the dataset has no test split"}
        if not metrics["verdict"]["improved"]:
            self._emit("warning", 1.0, metrics["verdict"]["message"])
        rf.write_json(self.workdir / rf.METRICS, metrics)

    def _verdict(self, logits: dict, masked_fraction: float | None) -> dict:
        """Each method against ERM on one split: val, or test when DFR ran (DFR fits its last layer on val, so
        val cannot judge it; every method is then judged on the same test images). The top-level fields are
        MaskTune's (else the first method's), with ``by_method`` and the ``recommended`` model beside them."""
        p, methods = self.index, self.config.methods
        judge = "test" if "dfr" in methods and "test" in p["splits"] else "val"
        s = self.split(judge)
        keys, names, subset = (s.groups, p["groups"], "group") if p["groups"] else (s.labels, p["classes"], "class")
        erm_right = logits["erm", judge].argmax(1) == s.labels
        by_method = {
            m: verdict(erm_right, logits[m, judge].argmax(1) == s.labels, keys, names, subset, judge,
                       masked_fraction if m == "masktune" else None, seed=self.config.seed, method=m,
                       fit_on_split=m == "dfr" and judge == "val")
            for m in methods}
        top = dict(by_method["masktune" if "masktune" in methods else methods[0]])
        top["recommended"] = recommend(by_method)
        top["by_method"] = by_method
        if len(methods) > 1:
            chosen = top["recommended"]
            top["message"] = (f"{top['message']} Recommended of {', '.join(LABELS[m] for m in ['erm', *methods])}: "
                              f"{LABELS[chosen['method']]} ({chosen['artifact']}). {chosen['why']}")
        return top

    def _stage_export(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, checkpoint in self._method_checkpoints().items():
            save_weights(self._trained(checkpoint), self.out_dir / rf.MODEL_ARTIFACTS[name])
        if "masktune" in self.config.methods:
            saliency = torch.load(self.workdir / rf.saliency_stats(1), weights_only=True)
            idx = saliency["preview_index"]
            train = self.split("train")
            if len(idx):
                names = train.names
                captions = [f"{names[i]} (class {self.index['classes'][train.labels[i]]})" for i in idx.tolist()]
                with RowFile(self.workdir / rf.masks_file(1)) as masks:
                    preview_masks = unpack_masks(masks.read(idx), self.input_size)
                render_previews(train.pixels(idx), saliency["preview_maps"], preview_masks, captions, self.out_dir / "previews.png")
        metrics = json.loads((self.workdir / rf.METRICS).read_text())
        render_report(metrics, self.out_dir / rf.REPORT)
        resolved = self.config.model_copy(deep=True)
        resolved.data.input_size = self.input_size
        rf.write_json(self.out_dir / "config.json", {
            "config": resolved.model_dump(mode="json"),
            "seed": self.config.seed,
            "dataset_sha256": self.dataset_sha256,
            "initial_weights_sha256": dataset_sha256(self.initial_weights) if self.initial_weights else None,
            "device": str(self.device),
            "precision": str(self.precision or torch.float32).removeprefix("torch."),
            "classes": self.index["classes"],
            "groups": self.index["groups"],
            "dataset_summary": self.index["summary"],
            "versions": library_versions(),
        })
        write_model_card(self.out_dir / rf.MODEL_CARD, self.config.model.architecture, self.index["classes"],
                         self.input_size, self.config.data.normalization, ["erm", *self.config.methods])
        with rf.atomic_path(self.out_dir / rf.METRICS) as tmp:
            shutil.copyfile(self.workdir / rf.METRICS, tmp)


def run_masktune(data: str | Path, out_dir: str | Path, config: JobConfig | None = None, **kwargs) -> dict:
    """Run (or resume) MaskTune on a dataset archive or directory; returns the metrics."""
    return MaskTuneRun(data, out_dir, config, **kwargs).run()
