"""Model registry: ``create_model(name, num_classes, input_size)``, weight I/O, saliency target layers.

Models are the libraries' own modules, so their ``state_dict()`` keys are the library's:
a torchvision ``resnet50(num_classes=K)`` or ``timm.create_model(name, num_classes=K)``
loads our weights as they are. ``small_cnn`` is the official MaskTune SmallCNN (its own
layout); ``resnet*_small`` are plain torchvision ResNets with a 3x3 stem and no max-pool.
The xGradCAM target layer is found from outside (``saliency_target_name``).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import timm
import torch
import torchvision
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from jobspec import TIMM_PREFIX, TORCHVISION_ARCHITECTURES

from .errors import ModelError, PretrainedWeightsMissing


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.backbone(x))


def small_stem_resnet(name: str, num_classes: int) -> torchvision.models.ResNet:
    """torchvision's ResNet with a 3x3 stride-1 conv1 and no max-pool, for inputs <= 64 px."""
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


@dataclass(frozen=True)
class Architecture:
    name: str  # the registry name: "small_cnn", "resnet50", "timm/convnext_tiny"
    library: str  # whose module it is: "masktune", "torchvision" or "timm"
    library_name: str  # the name in that library
    build: Callable[[int, int], nn.Module]  # (num_classes, input_size) -> model
    default_input_size: int
    min_input_size: int
    description: str


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> None:
    _REGISTRY[arch.name] = arch


def _torchvision_input_size(name: str) -> int:
    # The crop size the library's own ImageNet weights were evaluated at (224 for most, 240..600 for EfficientNets).
    return torchvision.models.get_model_weights(name).DEFAULT.transforms.keywords.get("crop_size", 224)


register(Architecture("small_cnn", "masktune", "small_cnn", lambda n, s: SmallCNN(n, s), 28, 16,
                      "official MaskTune SmallCNN (biased MNIST)"))
for _name in TORCHVISION_ARCHITECTURES:
    if _name.startswith("resnet") and _name.endswith("_small"):
        _base = _name.removesuffix("_small")
        register(Architecture(_name, "torchvision", _base, lambda n, s, b=_base: small_stem_resnet(b, n), 32, 16,
                              f"torchvision {_base}, 3x3 stem without max-pool for inputs <= 64 px"))
    else:
        register(Architecture(
            _name, "torchvision", _name,
            lambda n, s, b=_name: torchvision.models.get_model(b, weights=None, num_classes=n),
            _torchvision_input_size(_name), 32, f"torchvision {_name}",
        ))


def architectures() -> dict[str, Architecture]:
    """The fixed registry; timm models (``timm/<name>``) are resolved on demand by ``get_architecture``."""
    return dict(_REGISTRY)


@lru_cache(maxsize=None)
def _timm_architecture(name: str) -> Architecture:
    timm_name = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(timm_name):
        raise ModelError(f"timm has no model {timm_name!r} (timm {timm.__version__}); see timm.list_models()")
    cfg = timm.models.get_pretrained_cfg(timm_name)
    size = cfg.input_size[-1] if cfg else 224
    return Architecture(name, "timm", timm_name, lambda n, s: timm.create_model(timm_name, num_classes=n),
                        size, 32, f"timm {timm_name}")


def get_architecture(name: str) -> Architecture:
    if name.startswith(TIMM_PREFIX):
        return _timm_architecture(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown architecture {name!r}; known: {sorted(_REGISTRY)} "
                         f"and any timm CNN as {TIMM_PREFIX}<name>") from None


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


# ---------------------------------------------------------------- saliency target layer


@dataclass
class _Output:
    order: int  # when the module finished, in forward order
    shape: tuple[int, ...]
    calls: int


def _probe(model: nn.Module, input_size: int) -> dict[str, _Output]:
    """Every submodule's output shape on one zero image (eval mode, no graph; meta models stay on meta)."""
    outputs: dict[str, _Output] = {}
    finished = itertools.count()

    def record(name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                calls = outputs[name].calls + 1 if name in outputs else 1
                outputs[name] = _Output(next(finished), tuple(output.shape), calls)
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return outputs


def _resnet_target(model: torchvision.models.ResNet, outputs: dict[str, _Output]) -> str:
    # The last block of the deepest stage whose map is at least 4x4; at 224 px layer4, the official choice (docs/method.md).
    for stage in ("layer4", "layer3", "layer2"):
        if outputs[stage].shape[-1] >= 4:
            return f"{stage}.{len(getattr(model, stage)) - 1}"
    return f"layer1.{len(model.layer1) - 1}"


def _timm_target(model: nn.Module, outputs: dict[str, _Output], name: str) -> str:
    stages = [info["module"] for info in model.feature_info]
    for stage, info in zip(stages, model.feature_info):
        shape = outputs[stage].shape if stage in outputs else ()
        if len(shape) != 4 or shape[1] != info["num_chs"]:
            raise ModelError(f"{name} does not produce channels-first feature maps (a vision transformer or a "
                             "channels-last model): xGradCAM needs a reshape for it, which is not supported; "
                             "choose a CNN")
    for stage in reversed(stages):
        if outputs[stage].shape[-1] >= 4:
            return stage
    return stages[0]


_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _generic_target(model: nn.Module, outputs: dict[str, _Output], name: str) -> str:
    """The last feature map at least 4x4: of the modules producing the last such resolution, the
    outermost one that finishes last (a whole stage rather than a layer inside it). Modules called
    more than once (a shared ReLU) and the global pooling are not candidates."""
    modules = dict(model.named_modules())
    maps = {n: o for n, o in outputs.items()
            if len(o.shape) == 4 and o.calls == 1 and not isinstance(modules[n], _POOLS)}
    if not maps:
        raise ModelError(f"{name} produces no channels-first feature maps that xGradCAM can use; choose a CNN")
    large = [o for o in maps.values() if o.shape[-1] >= 4 and o.shape[-2] >= 4]
    side = max(large, key=lambda o: o.order).shape[-1] if large else max(maps.values(), key=lambda o: o.order).shape[-1]
    at_side = [n for n, o in maps.items() if o.shape[-1] == side]
    depth = min(n.count(".") for n in at_side)
    return max((n for n in at_side if n.count(".") == depth), key=lambda n: maps[n].order)


def saliency_target_name(model: nn.Module, name: str, input_size: int) -> str:
    """The submodule whose output xGradCAM reads, for architecture ``name`` at ``input_size``."""
    if name == "small_cnn":
        return f"backbone.{len(model.backbone) - 3}"  # the ReLU after the fourth conv (8x8 at 28 px)
    try:
        outputs = _probe(model, input_size)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ModelError(f"{name} cannot run on {input_size} px inputs: {str(exc).splitlines()[0][:200]}") from exc
    if isinstance(model, torchvision.models.ResNet):
        return _resnet_target(model, outputs)
    if get_architecture(name).library == "timm":
        return _timm_target(model, outputs, name)
    return _generic_target(model, outputs, name)


def saliency_target_layer(model: nn.Module, name: str, input_size: int) -> nn.Module:
    return model.get_submodule(saliency_target_name(model, name, input_size))


# ---------------------------------------------------------------- pretrained weights


def _hf_hub_cache() -> Path:
    # Read at call time (huggingface_hub reads its constants at import).
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def pretrained_location(name: str) -> tuple[Path | None, str]:
    """(the cached file if present, else None; where it is expected and how to get it)."""
    arch = get_architecture(name)
    if arch.library == "torchvision" and arch.name == arch.library_name:
        weights = torchvision.models.get_model_weights(arch.library_name).DEFAULT
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
        return (path if path.is_file() else None), f"{path} (download {weights.url} into $TORCH_HOME/hub/checkpoints/)"
    if arch.library == "timm":
        cfg = timm.models.get_pretrained_cfg(arch.library_name)
        if cfg is None or not cfg.hf_hub_id:
            raise ModelError(f"timm has no pretrained weights for {arch.library_name}")
        cache = _hf_hub_cache()
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=cache)
            if isinstance(found, str):
                return Path(found), found
        return None, (f"{cache}/models--{cfg.hf_hub_id.replace('/', '--')}/snapshots/<revision>/model.safetensors "
                      f"(on a connected machine, with HF_HOME pointing at the weights volume: python -c "
                      f"\"from huggingface_hub import snapshot_download; snapshot_download('{cfg.hf_hub_id}')\")")
    raise ModelError(f"{name} has no ImageNet weights (only torchvision's and timm's standard architectures do)")


def pretrained_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The architecture's ImageNet weights from the local cache, loaded by the library's own code; never downloads."""
    arch = get_architecture(name)
    path, expected = pretrained_location(name)
    if path is None:
        raise PretrainedWeightsMissing(f"pretrained weights for {name} are not on this worker: expected {expected}")
    if arch.library == "torchvision":
        # The builder with weights runs torchvision's own key fixes (DenseNet); the file is there, so no download.
        weights = torchvision.models.get_model_weights(arch.library_name).DEFAULT
        return torchvision.models.get_model(arch.library_name, weights=weights).state_dict()
    model = timm.create_model(arch.library_name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    return model.state_dict()


# ---------------------------------------------------------------- weights


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the state dict as safetensors (contiguous CPU tensors, written atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")  # Lightning, common training scripts
_SHARED_PREFIXES = ("module.", "model.", "net.", "backbone.")  # DataParallel/DDP, Lightning modules


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from .safetensors, or from a state-dict .pt read without unpickling code; wrappers undone."""
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
        raise ModelError(f"{path.name} carries pickled Python objects, which are never loaded "
                         f"({str(exc).splitlines()[0][:200]}); save only the tensors: "
                         "torch.save(model.state_dict(), path) or safetensors.torch.save_file") from exc
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelError(f"{path.name} is not a state dict mapping names to tensors; send model.state_dict()")
    while True:  # a prefix every key shares is a wrapper's (nested wrappers shed one at a time)
        prefix = next((p for p in _SHARED_PREFIXES if state and all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = {k[len(prefix):]: v for k, v in state.items()}


def head_name(model: nn.Module) -> str:
    """The classifier layer: timm's declared one, else the last Linear."""
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg and isinstance(cfg.get("classifier"), str):
        return cfg["classifier"]
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def _differences(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    return missing, unexpected, mismatched


def _clip(items: list) -> str:
    return f"{items[:10]}{' ...' if len(items) > 10 else ''}"


def _advice(state, expected, head: str, missing, unexpected, mismatched, architecture: str | None) -> str:
    """What the user can do about weights that do not fit."""
    head_keys = {k for k in expected if k.startswith(head + ".")}
    if not missing and not unexpected and mismatched and set(mismatched) <= head_keys:
        w = state[f"{head}.weight"]
        if w.ndim == expected[f"{head}.weight"].ndim and w.shape[1:] == expected[f"{head}.weight"].shape[1:]:
            return (f" The file's head ({head}) has {w.shape[0]} classes: upload it with num_classes={w.shape[0]} "
                    "and create the job with model.head='replace' to put a fresh head for your classes on it.")
        return (f" The file's head ({head}) fits neither this architecture ({tuple(w.shape)} vs "
                f"{tuple(expected[f'{head}.weight'].shape)}) nor any class count: it was trained for another model.")
    if architecture and get_architecture(architecture).library == "torchvision" and timm.is_model(architecture):
        with torch.device("meta"):
            timm_keys = set(timm.create_model(architecture).state_dict())
        if len(timm_keys & set(state)) > len(set(expected) & set(state)):
            return f" The keys are timm's layout: upload it with architecture={TIMM_PREFIX}{architecture}."
    return ""


def load_state(model: nn.Module, state: dict[str, torch.Tensor], head: str = "keep",
               architecture: str | None = None) -> bool:
    """Load strict, naming what does not fit; ``head='replace'`` keeps the model's fresh head where the
    file's head differs. Returns whether the head was replaced."""
    expected = model.state_dict()
    missing, unexpected, mismatched = _differences(state, expected)
    replaced = False
    name = head_name(model)
    file_head = state.get(f"{name}.weight")
    # Only a head that differs in its class count is replaced: another input width means another model.
    if (head == "replace" and (missing or unexpected or mismatched) and file_head is not None
            and file_head.shape[1:] == expected[f"{name}.weight"].shape[1:]):
        state = {k: v for k, v in state.items() if not k.startswith(name + ".")}
        state.update({k: v for k, v in expected.items() if k.startswith(name + ".")})
        missing, unexpected, mismatched = _differences(state, expected)
        replaced = True
    problems = []
    if missing:
        problems.append(f"missing {_clip(missing)}")
    if unexpected:
        problems.append(f"unexpected {_clip(unexpected)}")
    if mismatched:
        problems.append("wrong shape " + _clip([f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                                               for k in mismatched]))
    if problems:
        raise ModelError("the weights do not fit the architecture: " + "; ".join(problems) + "."
                         + _advice(state, expected, name, missing, unexpected, mismatched, architecture))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelError(f"the weights contain NaN or Inf values in {bad[:10]}")
    model.load_state_dict(state)
    return replaced


def load_weights(model: nn.Module, path: str | Path, head: str = "keep", architecture: str | None = None) -> bool:
    """Load a weights file (see ``read_state_dict`` and ``load_state``); returns whether the head was replaced."""
    return load_state(model, read_state_dict(path), head, architecture)



# ---------------------------------------------------------------- catalog


def _cached_timm_names() -> list[str]:
    """timm models whose weights are in the Hugging Face hub cache (models--timm--<name>)."""
    cache = _hf_hub_cache()
    names = set()
    for path in cache.glob("models--timm--*") if cache.is_dir() else []:
        full = path.name.removeprefix("models--timm--")
        base = full.split(".")[0]
        if not timm.is_model(base):
            continue
        names.add(TIMM_PREFIX + full)
        if getattr(timm.models.get_pretrained_cfg(base), "hf_hub_id", None) == f"timm/{full}":
            names.add(TIMM_PREFIX + base)  # the default weights of timm/<base>, which model.pretrained loads
    return sorted(names)


def describe_architecture(name: str) -> dict:
    """Default input size, target layer there, and whether ImageNet weights are in the local cache."""
    arch = get_architecture(name)
    size = arch.default_input_size
    try:
        with torch.device("meta"):  # shapes only: no weights are allocated
            target = saliency_target_name(arch.build(2, size), name, size)
    except (NotImplementedError, RuntimeError):  # builders that compute with tensors (RegNet's widths)
        target = None
    except ModelError as exc:
        target = f"unsupported: {exc}"
    try:
        pretrained = pretrained_location(name)[0] is not None
    except ModelError:
        pretrained = None  # the architecture has no ImageNet weights at all
    return {"name": name, "library": arch.library, "library_name": arch.library_name,
            "default_input_size": size, "min_input_size": arch.min_input_size, "target_layer": target,
            "pretrained_available": pretrained, "description": arch.description}


def architecture_catalog() -> dict:
    """The registry plus the timm models with cached weights, as the workers report it to the API."""
    names = [*_REGISTRY, *_cached_timm_names()]
    return {"architectures": [describe_architecture(n) for n in names],
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}}
