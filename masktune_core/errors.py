"""Errors a caller can tell apart: bad input versus a cancelled run."""


class MaskTuneError(Exception):
    """Base class; the message is written for the person who sent the input."""

    code = "masktune_error"


class DatasetError(MaskTuneError):
    code = "invalid_dataset"


class ModelError(MaskTuneError):
    code = "invalid_model"


class PretrainedWeightsMissing(ModelError):
    """model.pretrained asked for ImageNet weights that are not in this machine's library caches."""

    code = "pretrained_weights_missing"


class ConfigError(MaskTuneError):
    code = "invalid_config"


class JobCancelled(Exception):
    """Raised between batches when the caller's cancellation check says stop."""
