"""Training and inference loops over a split's uint8 images on disk, and checkpoints.

Batches are read (and masked) by a background thread a couple of batches ahead, so
memory holds a few batches whatever the dataset's size, and the model does not wait
on the disk. Shuffling and augmentation draw from a generator seeded per epoch, so
an epoch replayed after a resume sees the same batches as the uninterrupted run.

On a GPU the uint8 batch travels pinned and asynchronously and becomes floats on the
device; the forward pass runs under autocast (``runtime.precision``), channels-last;
loss and accuracy add up on the device, so no batch waits for the host. On the CPU
the same code performs exactly the fp32 operations it always did: same seed, same result.
"""

from __future__ import annotations

import queue
import threading
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from jobspec import ErmConfig
from .data import SplitRows, augment, normalize, to_float
from .errors import ConfigError, JobCancelled
from .masking import apply_masks, unpack_masks
from .rowfile import RowFile

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``runtime.precision`` on ``device``; None runs in fp32."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    if precision == "fp16" and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"runtime.precision=fp16 needs a CUDA device or the CPU, not {device}")
    return _AUTOCAST[precision]


@dataclass
class LoopSettings:
    device: torch.device
    normalization: str = "none"
    augmentation: str = "none"
    should_cancel: Callable[[], bool] = lambda: False
    on_batch: Callable[[int, int], None] = lambda done, total: None
    precision: torch.dtype | None = None  # autocast dtype; None: fp32
    scaler: torch.amp.GradScaler | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        if self.precision == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.precision, enabled=self.precision is not None)


def place_model(model: nn.Module, loop: LoopSettings) -> nn.Module:
    """The model on the loop's device; channels-last on a GPU, where convolutions run fastest that way."""
    if loop.on_gpu:
        return model.to(loop.device, memory_format=torch.channels_last)
    return model.to(loop.device)


def make_optimizer(model: nn.Module, erm: ErmConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=erm.lr, momentum=erm.momentum, weight_decay=erm.weight_decay)


def epoch_generator(seed: int, phase: str, epoch: int) -> torch.Generator:
    """A generator that depends only on (seed, phase, epoch)."""
    phase_code = {"erm": 1, "finetune": 2, "preview": 3, "jtt": 4, "dfr": 5}[phase]
    return torch.Generator().manual_seed(seed * 1_000_003 + phase_code * 10_007 + epoch)


def read_ahead(split: SplitRows, batches: Sequence[torch.Tensor], masks: RowFile | None = None,
               depth: int = 2, pin: bool = False) -> Iterator[torch.Tensor]:
    """uint8 [n, 3, S, S] images of each batch of split positions, in order; masked when ``masks``
    (packed, one row per position) is given. A thread reads ``depth`` batches ahead, in pinned
    memory and channels-last when ``pin`` (a GPU then copies them while it computes, in the layout
    it computes in)."""
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
                images = split.pixels(idx, channels_last=pin)
                if masks is not None:
                    images = apply_masks(images, unpack_masks(masks.read(idx), images.shape[-1]))
                if pin:
                    images = images.pin_memory()
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


def batch_input(images_u8: torch.Tensor, loop: LoopSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """The network's view of a raw uint8 batch: moved to the device as uint8 (a quarter of the bytes
    of floats), then 0..1 floats, augmented when ``generator`` is given, normalised."""
    x = to_float(images_u8.to(loop.device, non_blocking=True))
    if generator is not None:
        x = augment(x, loop.augmentation, generator)
    x = normalize(x, loop.normalization)
    return x.contiguous(memory_format=torch.channels_last) if loop.on_gpu else x


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
    # Running sums stay on the device: reading them per batch would make the host wait for every step.
    total_loss = torch.zeros((), dtype=torch.float64, device=loop.device)
    correct = torch.zeros((), dtype=torch.int64, device=loop.device)
    with closing(read_ahead(data, batches, masks, pin=loop.on_gpu)) as batch_images:
        for step, (idx, images_u8) in enumerate(zip(batches, batch_images)):
            if loop.should_cancel():
                raise JobCancelled()
            x = batch_input(images_u8, loop, generator)
            y = data.labels[idx].to(loop.device, non_blocking=True)
            with loop.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            if loop.scaler is not None:
                loop.scaler.scale(loss).backward()
                loop.scaler.step(optimizer)
                loop.scaler.update()
            else:
                loss.backward()
                optimizer.step()
            total_loss += loss.detach().double() * len(idx)
            correct += (logits.argmax(1) == y).sum()
            loop.on_batch(step + 1, len(batches))
    n = max(len(data), 1)
    return {"loss": total_loss.item() / n, "accuracy": correct.item() / n}


def model_input(images_u8: torch.Tensor, loop: LoopSettings) -> torch.Tensor:
    """The network's view of raw images (no augmentation): 0..1 floats, normalised, on the device."""
    return batch_input(images_u8, loop)


def in_order(count: int, batch_size: int) -> list[torch.Tensor]:
    return list(torch.arange(count).split(batch_size))


@torch.no_grad()
def eval_outputs(model: nn.Module, data: SplitRows, batch_size: int, loop: LoopSettings) -> Iterator[torch.Tensor]:
    """The model's eval-mode outputs, batch by batch in row order, on the device; its mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with closing(read_ahead(data, in_order(len(data), batch_size), pin=loop.on_gpu)) as batch_images:
            for images_u8 in batch_images:
                if loop.should_cancel():
                    raise JobCancelled()
                with loop.autocast():
                    yield model(model_input(images_u8, loop))
    finally:
        model.train(was_training)


def predict_logits(model: nn.Module, data: SplitRows, batch_size: int, loop: LoopSettings) -> torch.Tensor:
    """Eval-mode logits on the CPU, float32 [N, classes]; gathered on the device and copied back once."""
    out = [logits.float() for logits in eval_outputs(model, data, batch_size, loop)]
    return torch.cat(out).cpu() if out else torch.empty(0)


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
