"""Training and inference loops over a split's uint8 images on disk, and checkpoints.

Batches are read (and masked) by a background thread a couple of batches ahead, so
memory holds a few batches whatever the dataset's size, and the model does not wait
on the disk. Shuffling and augmentation draw from a generator seeded per epoch, so
an epoch replayed after a resume sees the same batches as the uninterrupted run.
"""

from __future__ import annotations

import queue
import threading
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from jobspec import ErmConfig
from .data import SplitRows, augment, normalize, to_float
from .errors import JobCancelled
from .masking import apply_masks, unpack_masks
from .rowfile import RowFile


@dataclass
class LoopSettings:
    device: torch.device
    normalization: str = "none"
    augmentation: str = "none"
    should_cancel: Callable[[], bool] = lambda: False
    on_batch: Callable[[int, int], None] = lambda done, total: None


def make_optimizer(model: nn.Module, erm: ErmConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=erm.lr, momentum=erm.momentum, weight_decay=erm.weight_decay)


def epoch_generator(seed: int, phase: str, epoch: int) -> torch.Generator:
    """A generator that depends only on (seed, phase, epoch)."""
    phase_code = {"erm": 1, "finetune": 2, "preview": 3}[phase]
    return torch.Generator().manual_seed(seed * 1_000_003 + phase_code * 10_007 + epoch)


def read_ahead(split: SplitRows, batches: Sequence[torch.Tensor], masks: RowFile | None = None,
               depth: int = 2) -> Iterator[torch.Tensor]:
    """uint8 [n, 3, S, S] images of each batch of split positions, in order; masked when ``masks``
    (packed, one row per position) is given. A thread reads ``depth`` batches ahead."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer left early

    def produce() -> None:
        try:
            for idx in batches:
                images = split.pixels(idx)
                if masks is not None:
                    images = apply_masks(images, unpack_masks(masks.read(idx), images.shape[-1]))
                if not hand_over((images, None)):
                    return
        except BaseException as exc:  # raised in the consumer
            hand_over((None, exc))

    reader = threading.Thread(target=produce, name="read-ahead", daemon=True)
    reader.start()
    try:
        for _ in batches:
            images, error = ready.get()
            if error is not None:
                raise error
            yield images
    finally:
        stop.set()
        reader.join()


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: SplitRows,
    batch_size: int,
    generator: torch.Generator,
    loop: LoopSettings,
    masks: RowFile | None = None,
) -> dict[str, float]:
    """One pass in random order (over the masked images when ``masks`` is given); returns the mean training loss and accuracy."""
    model.train()
    order = torch.randperm(len(data), generator=generator)
    batches = list(torch.split(order, batch_size))
    total_loss, correct = 0.0, 0
    with closing(read_ahead(data, batches, masks)) as batch_images:
        for step, (idx, images_u8) in enumerate(zip(batches, batch_images)):
            if loop.should_cancel():
                raise JobCancelled()
            x = augment(to_float(images_u8), loop.augmentation, generator)
            x = normalize(x.to(loop.device, non_blocking=True), loop.normalization)
            y = data.labels[idx].to(loop.device, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            loop.on_batch(step + 1, len(batches))
    n = max(len(data), 1)
    return {"loss": total_loss / n, "accuracy": correct / n}


def model_input(images_u8: torch.Tensor, loop: LoopSettings) -> torch.Tensor:
    """The network's view of raw images: 0..1 floats, normalised, on the device."""
    return normalize(to_float(images_u8).to(loop.device), loop.normalization)


def in_order(count: int, batch_size: int) -> list[torch.Tensor]:
    return list(torch.arange(count).split(batch_size))


@torch.no_grad()
def predict_logits(model: nn.Module, data: SplitRows, batch_size: int, loop: LoopSettings) -> torch.Tensor:
    """Eval-mode logits on the CPU, float32 [N, classes]."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with closing(read_ahead(data, in_order(len(data), batch_size))) as batch_images:
            for images_u8 in batch_images:
                if loop.should_cancel():
                    raise JobCancelled()
                out.append(model(model_input(images_u8, loop)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item() if len(labels) else 0.0


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, **extra) -> None:
    """Model + optimizer state, written under a temporary name and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extra}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore in place; returns the extra fields. Our own files, still read without unpickling code."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state.pop("model"))
    optimizer_state = state.pop("optimizer")
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    return state
