"""model_card.json: what a user needs to load a job's weights and preprocess like the job did."""

from __future__ import annotations

import json
from pathlib import Path

from .data import IMAGENET_MEAN, IMAGENET_STD
from .models import get_architecture
from .runfolder import MODEL_ARTIFACTS


def _loader(architecture: str, num_classes: int) -> str:
    arch = get_architecture(architecture)
    load = 'model.load_state_dict(safetensors.torch.load_file("model.safetensors"))'
    if arch.library == "timm":
        return f'model = timm.create_model("{arch.library_name}", num_classes={num_classes}); {load}'
    if arch.name != arch.library_name:  # resnet*_small
        return (f"model = torchvision.models.{arch.library_name}(num_classes={num_classes}); "
                "model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); model.maxpool = torch.nn.Identity(); "
                + load)
    if arch.library == "torchvision":
        return f"model = torchvision.models.{arch.library_name}(num_classes={num_classes}); {load}"
    return f"model = masktune_core.create_model(\"{architecture}\", {num_classes}, input_size); {load}"


_DESCRIBED = {"masktune": "MaskTune (finetuned)", "erm": "ERM (best validation)", "jtt": "JTT (Just Train Twice, last epoch)",
              "dfr": "DFR (ERM with its last layer retrained on group-balanced validation data)"}


def model_card(architecture: str, classes: list[str], input_size: int, normalization: str,
               methods: list[str] = ("masktune", "erm")) -> dict:
    arch = get_architecture(architecture)
    return {
        "library": arch.library,
        "architecture": arch.library_name,
        "registry_name": architecture,
        "num_classes": len(classes),
        "class_names": list(classes),  # index i is logit i
        "input_size": [3, input_size, input_size],
        "resize": f"whole image to {input_size}x{input_size}, bilinear (PIL), no crop; RGB",
        "pixel_range": "0..1 (uint8 / 255)",
        "normalization": (
            {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)} if normalization == "imagenet" else None
        ),
        "load": _loader(architecture, len(classes)),
        "weights": {MODEL_ARTIFACTS[m]: _DESCRIBED[m] for m in MODEL_ARTIFACTS if m in methods},
    }


def write_model_card(path: str | Path, architecture: str, classes: list[str], input_size: int, normalization: str,
                     methods: list[str] = ("masktune", "erm")) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(model_card(architecture, classes, input_size, normalization, methods), indent=2) + "\n")
    tmp.replace(path)
