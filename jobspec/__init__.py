"""The job configuration contract, shared by masktune_core (CLI), api and worker.

Pure pydantic, so the API can validate job bodies without importing torch.

Defaults follow the official MaskTune code (github.com/aliasgharkhani/Masktune);
every deviation from it is a named field whose description says so.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


# Architecture names of masktune_core's model registry, the part of it the contract needs:
# the API checks uploads and job bodies against this list without importing torch.
# masktune_core.models registers exactly these (a test should keep the two equal).
ARCHITECTURES: tuple[str, ...] = (
    "small_cnn", "resnet18", "resnet34", "resnet50", "resnet18_small", "resnet34_small", "resnet50_small",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    architecture: str = Field(
        "small_cnn",
        description="Registered architecture: small_cnn, resnet18/34/50 (ImageNet stem) "
        "or resnet18_small/34_small/50_small (3x3 stem, no max-pool, for inputs <= 64 px).",
    )
    weights_id: str | None = Field(
        None, description="An uploaded model (mdl_...) to start from instead of random weights."
    )


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


class JobConfig(_Strict):
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
    selective: SelectiveConfig = SelectiveConfig()
    preview_count: int = Field(8, ge=0, le=64, description="Training images shown in previews.png.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds weights, splits, shuffling and augmentation: same seed, same result on CPU.")
