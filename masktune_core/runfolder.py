"""The run folder's names, in one place: inputs, work files, artifacts, and how files are written.

A run folder holds

    input/          what the run starts from: dataset<.zip|.tar|.tar.gz>, weights<.safetensors|.pt>
    out/            the artifacts a user downloads (ARTIFACTS, with their content types)
    work/           what the stages leave for later stages and for a resumed run:
      state.json      the finished steps (written last, after the files it names)
      index.json      the job's view of the dataset: classes, groups, splits as rows of the decoded images
      erm/best.pt, erm/last.pt, finetune_<i>.pt     checkpoints
      erm/epoch_<T>.pt                               ERM at epoch T, JTT's identification model (when JTT runs)
      saliency_<i>.pt, masks_<i>.npy                 per masking round: statistics and previews, packed masks
      jtt/identify.pt, jtt/error_set.json, jtt/last.pt   JTT: identification model, its error set, the retrained model
      dfr/model.safetensors, dfr/head.json           DFR: the ERM model with its retrained last layer, the tuning
      metrics.json

The dataset is not in the run folder: it is unpacked and decoded once into the dataset
cache (``decoded``), which every run on the same data shares.

Every file is written under a temporary name and renamed into place (``atomic_path``),
so a reader, a resumed run or the mirror to blob storage never sees half a file.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Each method's exported model (ERM's and those of JobConfig.methods); each loads strict into the plain library model.
MODEL_ARTIFACTS: dict[str, str] = {
    "masktune": "model.safetensors",
    "erm": "erm.safetensors",
    "jtt": "model_jtt.safetensors",
    "dfr": "model_dfr.safetensors",
}
REPORT = "report.png"

# Artifacts: name -> content type. The order is the order users see them listed; a run writes those its methods make.
ARTIFACTS: dict[str, str] = {
    "metrics.json": "application/json",
    **{name: "application/octet-stream" for name in MODEL_ARTIFACTS.values()},
    REPORT: "image/png",
    "previews.png": "image/png",
    "config.json": "application/json",
    "model_card.json": "application/json",
}

INPUT, OUT, WORK = "input", "out", "work"
STATE = "state.json"
INDEX = "index.json"
METRICS = "metrics.json"
MODEL_CARD = "model_card.json"
ERM_BEST = "erm/best.pt"
ERM_LAST = "erm/last.pt"
JTT_IDENTIFY = "jtt/identify.pt"  # trained here only when ERM has no checkpoint at epoch T
JTT_ERROR_SET = "jtt/error_set.json"
JTT_LAST = "jtt/last.pt"
DFR_MODEL = "dfr/model.safetensors"
DFR_SUMMARY = "dfr/head.json"
TEMPORARY_MARK = ".tmp"


def input_file(kind: str, filename: str | None) -> str:
    """input/dataset.zip for kind 'dataset' and an upload called data.zip (the suffix tells the readers
    the format); input/dataset for a folder (filename None)."""
    if filename is None:
        return f"{INPUT}/{kind}"
    return f"{INPUT}/{kind}{''.join(Path(filename).suffixes[-2:]) or '.bin'}"


def erm_epoch_checkpoint(epoch: int) -> str:
    return f"erm/epoch_{epoch}.pt"


def finetune_checkpoint(iteration: int) -> str:
    return f"finetune_{iteration}.pt"


def saliency_stats(iteration: int) -> str:
    return f"saliency_{iteration}.pt"


def masks_file(iteration: int) -> str:
    return f"masks_{iteration}.npy"


def is_temporary(name: str) -> bool:
    """A half-written file (ours, or the blob store's): never mirrored, never read."""
    return TEMPORARY_MARK in name


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TEMPORARY_MARK)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj, *, compact: bool = False) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=2) + "\n")
