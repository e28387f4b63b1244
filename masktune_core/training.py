"""Training and inference loops over in-memory uint8 images, and checkpoints.

Shuffling and augmentation draw from a generator seeded per epoch, so an epoch
replayed after a resume sees the same batches as the uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from jobspec import ErmConfig
from .data import augment, normalize, to_float
from .errors import JobCancelled


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


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    loop: LoopSettings,
) -> dict[str, float]:
    """One pass in random order; returns the mean training loss and accuracy."""
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    batches = list(torch.split(order, batch_size))
    total_loss, correct = 0.0, 0
    for step, idx in enumerate(batches):
        if loop.should_cancel():
            raise JobCancelled()
        x = augment(to_float(images_u8[idx]), loop.augmentation, generator)
        x = normalize(x.to(loop.device, non_blocking=True), loop.normalization)
        y = labels[idx].to(loop.device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
        loop.on_batch(step + 1, len(batches))
    n = max(len(labels), 1)
    return {"loss": total_loss / n, "accuracy": correct / n}


def model_input(images_u8: torch.Tensor, loop: LoopSettings) -> torch.Tensor:
    """The network's view of raw images: 0..1 floats, normalised, on the device."""
    return normalize(to_float(images_u8).to(loop.device), loop.normalization)


@torch.no_grad()
def predict_logits(model: nn.Module, images_u8: torch.Tensor, batch_size: int, loop: LoopSettings) -> torch.Tensor:
    """Eval-mode logits on the CPU, float32 [N, classes]."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images_u8), batch_size):
            if loop.should_cancel():
                raise JobCancelled()
            x = model_input(images_u8[start:start + batch_size], loop)
            out.append(model(x).float().cpu())
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
