"""The job configuration contract, shared by masktune_core (CLI), api and worker.

Pure pydantic, so the API can validate job bodies without importing torch.

Defaults follow the official MaskTune code (github.com/aliasgharkhani/Masktune);
every deviation from it is a named field whose description says so.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


# Architecture names of masktune_core's model registry, the part of it the contract needs:
# the API checks uploads and job bodies against these without importing torch
# (tests/test_config.py keeps them equal to the registry).
# torchvision's classification CNNs, by family, in torchvision's own names; resnet*_small are
# torchvision ResNets with a 3x3 stem and no max-pool for inputs <= 64 px.
TORCHVISION_ARCHITECTURES: tuple[str, ...] = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnet18_small", "resnet34_small", "resnet50_small",
    "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "densenet121", "densenet161", "densenet169", "densenet201",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_s", "efficientnet_v2_m",
    "efficientnet_v2_l",
    "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
    "mobilenet_v3_small", "mobilenet_v3_large",
    "regnet_x_400mf", "regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf", "regnet_x_8gf", "regnet_x_16gf",
    "regnet_x_32gf", "regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf", "regnet_y_8gf",
    "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf",
)
ARCHITECTURES: tuple[str, ...] = ("small_cnn", *TORCHVISION_ARCHITECTURES)
# Any timm model by its timm name; whether it exists (and is a CNN) is for the workers' timm to say.
TIMM_PREFIX = "timm/"
_TIMM_NAME = re.compile(r"timm/[a-z0-9_]+(\.[a-z0-9_]+)?")


def is_architecture_name(name: str) -> bool:
    """A registered name or a well-formed timm/<name> (which the workers check against timm)."""
    return name in ARCHITECTURES or _TIMM_NAME.fullmatch(name) is not None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    architecture: str = Field(
        "small_cnn",
        description="small_cnn (official), a torchvision classification CNN by its torchvision name "
        "(resnet50, densenet121, efficientnet_b0, convnext_tiny, ...; resnet18_small/34_small/50_small: "
        "3x3 stem, no max-pool, for inputs <= 64 px) or a timm CNN as timm/<name>. GET /v1/architectures lists them.",
        max_length=120,
    )
    weights_id: str | None = Field(
        None, description="An uploaded model (mdl_...) to start from instead of random weights."
    )
    pretrained: bool = Field(
        False,
        description="Start from the architecture's ImageNet weights, read from the workers' local caches "
        "(torchvision: $TORCH_HOME/hub/checkpoints, timm: the Hugging Face hub cache), never downloaded; "
        "the head is replaced for the dataset's classes. The paper's Waterbirds and CelebA results start "
        "from ImageNet weights (presets waterbirds, celeba); biased MNIST does not.",
    )
    head: Literal["keep", "replace"] = Field(
        "keep",
        description="For uploaded weights whose classifier head has another class count (an ImageNet "
        "checkpoint): 'keep' refuses the mismatch, 'replace' loads the backbone and puts a fresh head "
        "for the dataset's classes on it.",
    )

    @model_validator(mode="after")
    def _one_start(self) -> ModelConfig:
        if self.pretrained and self.weights_id:
            raise ValueError("pretrained and weights_id both choose the starting weights; give one")
        return self


class DataConfig(_Strict):
    input_size: int | None = Field(
        None,
        ge=8,
        le=512,
        description="Side of the square network input; images are resized whole (no crop). "
        "Default: the architecture's own (small_cnn 28, resnet*_small 32, resnet* 224).",
    )
    augmentation: Literal["none", "flip_crop"] = Field(
        "none",
        description="Training augmentation, applied after masking. 'none' is the official "
        "biased-MNIST recipe; 'flip_crop' = horizontal flip + random crop with padding.",
    )
    normalization: Literal["none", "imagenet"] = Field(
        "none",
        description="Pixel normalisation after masking. 'none' (pixels in 0..1) as the official "
        "biased-MNIST recipe; 'imagenet' mean/std for ImageNet-pretrained ResNets.",
    )
    val_fraction: float = Field(
        0.15, gt=0, lt=0.5, description="Share carved (seeded, stratified) from training data when the dataset has no validation split."
    )
    test_fraction: float = Field(
        0.15, ge=0, lt=0.5, description="Share carved for testing when the dataset has no split at all."
    )
    label_attribute: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="CelebA layout only, and required there: the attribute that is the label "
        "(classes not_<attribute> and <attribute>); the paper's CelebA setting is Blond_Hair.",
    )
    group_attribute: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="CelebA layout only: an attribute whose value, with the label, makes the group "
        "('<class>/<attribute>' or '<class>/not_<attribute>'), for evaluation; the paper's is Male.",
    )


class ErmConfig(_Strict):
    epochs: int = Field(
        20, ge=0, le=1000, description="ERM epochs; 0 skips ERM and needs uploaded weights (official MNIST recipe: 100)."
    )
    lr: float = Field(0.01, gt=0, le=10, description="SGD learning rate, constant (official).")
    batch_size: int = Field(128, ge=1, le=4096, description="ERM batch size (official: 128).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (official: 0.9).")
    weight_decay: float = Field(1e-4, ge=0, le=1, description="SGD weight decay (official: 1e-4).")


class MaskingConfig(_Strict):
    method: Literal["xgradcam", "gradcam", "gradcam++"] = Field(
        "xgradcam", description="Saliency method; xgradcam is the paper's."
    )
    threshold_std: float = Field(
        2.0, ge=0, le=10, description="Mask pixels whose saliency exceeds mean + k*std of the image's positive saliency values."
    )
    checkpoint: Literal["best", "last"] = Field(
        "best", description="ERM checkpoint whose saliency is used; 'best' (by validation accuracy) is official."
    )
    batch_size: int = Field(128, ge=1, le=4096, description="Images per saliency batch (a memory setting, not a method one).")


class FinetuneConfig(_Strict):
    epochs: int = Field(
        1, ge=1, le=100, description="Epochs on the masked data; the method is exactly one (anything else is a deviation)."
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Finetune batch size; default: erm.batch_size (official). Smaller batches give the "
        "single epoch more SGD steps, which helps short ERM runs.",
    )


class SelectiveConfig(_Strict):
    enabled: bool = Field(False, description="Report selective classification (confidence = max softmax(p_erm * p_masktune)).")
    coverages: list[float] = Field(
        [0.80, 0.85, 0.90, 0.95, 1.00], min_length=1, max_length=20,
        description="Target coverages in (0, 1]; thresholds come from validation confidence quantiles.",
    )

    @model_validator(mode="after")
    def _coverages_in_range(self) -> SelectiveConfig:
        if any(not 0 < c <= 1 for c in self.coverages):
            raise ValueError("coverages must lie in (0, 1]")
        return self


METHODS = ("masktune", "jtt", "dfr")


class JttConfig(_Strict):
    """Just Train Twice (Liu et al., ICML 2021, "Just Train Twice: Improving Group Robustness without Training
    Group Information"; github.com/anniesch/jtt): an identification model trained for T epochs marks the training
    images it gets wrong (the error set); a second model is trained from scratch on the training set with the
    error set repeated ``upweight`` times. No group labels are read."""

    epochs_identify: int | None = Field(
        None, ge=1, le=1000,
        description="T, the identification model's epochs. The paper's Waterbirds recipe is T=60 of 300 epochs "
        "(lr 1e-5, weight decay 1.0; CelebA: T=1 of 50), tuned on group-labelled validation data. Default: a fifth "
        "of erm.epochs (Waterbirds' ratio), at least 1, because absolute epoch counts do not carry over from "
        "ResNet-50 on Waterbirds to other models and datasets. The identification model is the ERM run itself "
        "(same start, optimizer and batches) stopped at epoch T, so when T <= erm.epochs its checkpoint is taken "
        "from ERM; otherwise (or with erm.epochs = 0) it is trained for T epochs from ERM's starting weights.",
    )
    upweight: int = Field(
        100, ge=1, le=10000,
        description="lambda_up: each error-set image appears this many times in the retraining set, the paper's "
        "objective (lambda_up times the loss of an error-set example); the reference code upsamples, adding lambda_up "
        "copies to the training set. The paper's Waterbirds value is 100 (CelebA 50, MultiNLI and CivilComments 6), "
        "kept as the default: it is about the majority-to-minority ratio of a 99%-biased set such as biased MNIST.",
    )
    lr: float | None = Field(
        None, gt=0, le=10,
        description="Retraining SGD learning rate. Default: erm.lr. The paper's Waterbirds value, 1e-5 with weight "
        "decay 1.0 on an ImageNet ResNet-50, barely moves a small network trained from scratch, so the ERM settings "
        "(tuned for this model and data) are inherited instead.",
    )
    weight_decay: float | None = Field(
        None, ge=0, le=10, description="Retraining SGD weight decay. Default: erm.weight_decay (paper, Waterbirds: 1.0)."
    )
    epochs: int | None = Field(
        None, ge=1, le=1000,
        description="Retraining epochs over the upsampled set. Default: erm.epochs (the paper retrains for as long as "
        "ERM, 300 epochs on Waterbirds). Model selection by validation worst-group accuracy, as in the paper, would "
        "read group labels: the last epoch's model is kept.",
    )


class DfrConfig(_Strict):
    """Deep Feature Reweighting (Kirichenko, Izmailov, Wilson, ICLR 2023, "Last Layer Re-Training is Sufficient
    for Robustness to Spurious Correlations"; github.com/PolinaKirichenko/deep_feature_reweighting): the ERM
    model's last layer is retrained on group-balanced validation data. Needs group labels on the validation split."""

    c_grid: list[float] = Field(
        [1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01], min_length=1, max_length=20,
        description="Inverse L1 strengths C tried for the logistic regression (the reference code's Waterbirds grid); "
        "the one with the best worst-group accuracy on one half of the validation split, trained on the other "
        "half, is kept.",
    )
    resamples: int = Field(
        20, ge=1, le=200,
        description="Group-balanced subsamples of the whole validation split the final head is trained on; their "
        "coefficients are averaged (reference: 20).",
    )

    @model_validator(mode="after")
    def _positive_c(self) -> DfrConfig:
        if any(not 0 < c <= 1e6 for c in self.c_grid):
            raise ValueError("c_grid values must lie in (0, 1e6]")
        return self


class RuntimeConfig(_Strict):
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Arithmetic of training, inference and saliency: auto = bf16 autocast on a CUDA device that supports "
        "it, else fp32 (so a CPU run gives the same result for the same seed); fp16 trains with a gradient scaler. "
        "Saliency maps are always combined in fp32.",
    )
    compile: bool = Field(
        False, description="torch.compile the model for training and inference: minutes of compilation per stage first, "
        "worth it for long GPU runs only.",
    )


# The official recipes (github.com/aliasgharkhani/Masktune, bash_files/*_masktune.sh and
# src/methods/*_train.py; the README cites each value). Explicit fields override them.
PRESETS: dict[str, dict[str, Any]] = {
    "biased_mnist": {
        "model": {"architecture": "small_cnn", "pretrained": False},
        "data": {"input_size": 28, "normalization": "none", "augmentation": "none"},
        "erm": {"epochs": 100, "lr": 0.01, "batch_size": 128},
        "masking": {"batch_size": 128},
    },
    "waterbirds": {
        "model": {"architecture": "resnet50", "pretrained": True},
        "data": {"input_size": 224, "normalization": "imagenet", "augmentation": "flip_crop"},
        "erm": {"epochs": 100, "lr": 0.0001, "batch_size": 128},
        "masking": {"batch_size": 128},
    },
    "celeba": {
        "model": {"architecture": "resnet50", "pretrained": True},
        "data": {"input_size": 224, "normalization": "imagenet", "augmentation": "flip_crop"},
        "erm": {"epochs": 20, "lr": 0.0001, "batch_size": 512, "weight_decay": 0.0001},
        "masking": {"batch_size": 512},
    },
}


def _under(preset: dict, explicit: dict) -> dict:
    """The preset with the explicit values laid over it, section by section."""
    merged = dict(preset)
    for key, value in explicit.items():
        merged[key] = _under(preset[key], value) if isinstance(value, dict) and isinstance(preset.get(key), dict) else value
    return merged


class JobConfig(_Strict):
    preset: Literal["biased_mnist", "waterbirds", "celeba"] | None = Field(
        None,
        description="Fill the official recipe for a paper dataset (architecture, pretrained, input size, "
        "learning rate, epochs, batch size, normalisation, augmentation); explicit fields override it. "
        "Deviations: the official ResNet-50 is timm's (this preset uses torchvision's resnet50; set "
        "model.architecture='timm/resnet50' for timm's), its RandomResizedCrop(scale 0.7-1) is 'flip_crop' here, "
        "and its Waterbirds script omits --use_pretrained_weights although the paper starts from ImageNet weights.",
    )
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    erm: ErmConfig = ErmConfig()
    masking: MaskingConfig = MaskingConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    masktune_iterations: int = Field(
        1, ge=1, le=10, description="Rounds of mask-then-finetune; later rounds mask with the previous round's model (official option)."
    )
    accumulative_masking: bool = Field(
        False, description="With several rounds, compute later masks on the already-masked images and keep earlier masks (official option)."
    )
    methods: list[Literal[METHODS]] = Field(  # type: ignore[valid-type]
        ["masktune"], min_length=1, max_length=len(METHODS),
        description="Methods run beside ERM (which always runs: every method starts from its model or its run) and "
        "compared with it: masktune; jtt (Just Train Twice, Liu et al. 2021); dfr (Deep Feature Reweighting, "
        "Kirichenko et al. 2023; needs group labels on the validation split). Group labels are read only by dfr and "
        "by the evaluation.",
    )
    jtt: JttConfig = JttConfig()
    dfr: DfrConfig = DfrConfig()
    selective: SelectiveConfig = SelectiveConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    preview_count: int = Field(8, ge=0, le=64, description="Training images shown in previews.png.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds weights, splits, shuffling and augmentation: same seed, same result on CPU.")

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("preset") in PRESETS:
            preset = PRESETS[values["preset"]]
            if isinstance(values.get("model"), dict) and values["model"].get("weights_id"):
                # Uploaded weights are the starting point: the preset's ImageNet start gives way.
                preset = {**preset, "model": {**preset["model"], "pretrained": False}}
            return _under(preset, values)
        return values

    @model_validator(mode="after")
    def _methods_once(self) -> JobConfig:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods lists a method twice")
        if "jtt" in self.methods and self.jtt.epochs is None and self.erm.epochs == 0:
            raise ValueError("jtt.epochs defaults to erm.epochs, which is 0 here: set jtt.epochs")
        return self

    def jtt_identify_epochs(self) -> int:
        """T: jtt.epochs_identify, else a fifth of erm.epochs (at least 1)."""
        return self.jtt.epochs_identify or max(1, round(self.erm.epochs / 5))
