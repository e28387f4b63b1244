"""Model registry: ``create_model(name, num_classes, input_size)`` and weight I/O.

Each architecture knows the layer whose activations xGradCAM reads
(``saliency_target_layer``), as DESIGN.md section 3.2 fixes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ModelError


class SmallCNN(nn.Module):
    """The official MaskTune SmallCNN (src/models/simple_cnn.py): 512 features at 28 px."""

    def __init__(self, num_classes: int, input_size: int = 28):
        super().__init__()
        side = ((input_size - 4) // 2 - 4) // 2
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
        )
        self.linear = nn.Sequential(
            nn.Linear(32 * side * side, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, num_classes)
        )

    def saliency_target_layer(self) -> nn.Module:
        return self.backbone[-3]  # the ReLU after the fourth conv (8x8 at 28 px)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.backbone(x))


class ResNetClassifier(nn.Module):
    """A torchvision ResNet with a new head; ``small_stem`` swaps the ImageNet stem for a 3x3 conv."""

    def __init__(self, builder: Callable[..., torchvision.models.ResNet], num_classes: int, input_size: int, small_stem: bool):
        super().__init__()
        net = builder(weights=None, num_classes=num_classes)
        if small_stem:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.net = net
        # A name, not the module: a module attribute would register the block twice in state_dict().
        self._target_stage = self._deepest_stage_at_least_4x4(input_size)

    def _deepest_stage_at_least_4x4(self, input_size: int) -> str:
        sides = {}
        hooks = [
            stage.register_forward_hook(lambda m, i, o, name=name: sides.__setitem__(name, o.shape[-1]))
            for name, stage in self._stages()
        ]
        was_training = self.net.training
        self.net.eval()
        with torch.no_grad():
            self.net(torch.zeros(1, 3, input_size, input_size))
        self.net.train(was_training)
        for h in hooks:
            h.remove()
        for name, _ in reversed(self._stages()):
            if sides[name] >= 4:
                return name
        return "layer1"

    def _stages(self) -> list[tuple[str, nn.Sequential]]:
        return [(f"layer{i}", getattr(self.net, f"layer{i}")) for i in range(1, 5)]

    def saliency_target_layer(self) -> nn.Module:
        return getattr(self.net, self._target_stage)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[int, int], nn.Module]  # (num_classes, input_size) -> model
    default_input_size: int
    min_input_size: int
    description: str


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> None:
    _REGISTRY[arch.name] = arch


register(Architecture("small_cnn", lambda n, s: SmallCNN(n, s), 28, 16, "official MaskTune SmallCNN (biased MNIST)"))
for _depth, _builder in ((18, torchvision.models.resnet18), (34, torchvision.models.resnet34), (50, torchvision.models.resnet50)):
    register(Architecture(
        f"resnet{_depth}", lambda n, s, b=_builder: ResNetClassifier(b, n, s, small_stem=False), 224, 32,
        f"torchvision ResNet-{_depth}, ImageNet stem",
    ))
    register(Architecture(
        f"resnet{_depth}_small", lambda n, s, b=_builder: ResNetClassifier(b, n, s, small_stem=True), 32, 16,
        f"torchvision ResNet-{_depth}, 3x3 stem without max-pool for inputs <= 64 px",
    ))


def architectures() -> dict[str, Architecture]:
    return dict(_REGISTRY)


def get_architecture(name: str) -> Architecture:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown architecture {name!r}; known: {sorted(_REGISTRY)}") from None


def resolve_input_size(name: str, input_size: int | None) -> int:
    arch = get_architecture(name)
    size = input_size or arch.default_input_size
    if size < arch.min_input_size:
        raise ModelError(f"{name} needs inputs of at least {arch.min_input_size} px, got {size}")
    return size


def create_model(name: str, num_classes: int, input_size: int | None = None) -> nn.Module:
    if num_classes < 2:
        raise ModelError(f"num_classes must be at least 2, got {num_classes}")
    return get_architecture(name).build(num_classes, resolve_input_size(name, input_size))


# ---------------------------------------------------------------- weights


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the state dict as safetensors (contiguous CPU tensors, written atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from .safetensors, or from a state-dict .pt read without unpickling code."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            is_zip = fh.read(2) == b"PK"  # torch.save's format, whatever the file is called
        if is_zip or path.suffix in (".pt", ".pth"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state = load_file(str(path))
    except (SafetensorError, RuntimeError, ValueError, OSError, EOFError) as exc:
        raise ModelError(f"cannot read weights from {path.name}: {str(exc).splitlines()[0][:300]}") from exc
    except Exception as exc:  # weights_only unpickling refuses with pickle.UnpicklingError and others
        raise ModelError(f"{path.name} is not a plain state dict of tensors: {str(exc).splitlines()[0][:300]}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelError(f"{path.name} is not a state dict mapping names to tensors")
    if all(k.startswith("module.") for k in state):  # saved from nn.DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load weights, naming every missing, unexpected or mis-shaped tensor when they don't fit."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if mismatched:
        problems.append(f"wrong shape {mismatched[:10]}{' ...' if len(mismatched) > 10 else ''}")
    if problems:
        raise ModelError("the weights do not fit the architecture: " + "; ".join(problems))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelError(f"the weights contain NaN or Inf values in {bad[:10]}")
    model.load_state_dict(state)
