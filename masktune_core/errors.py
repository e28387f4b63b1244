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


class DfrNeedsValGroups(ConfigError):
    """methods includes dfr, which balances the validation split by group, on a dataset without group labels."""

    code = "dfr_needs_val_groups"


class JobCancelled(Exception):
    """Raised between batches when the caller's cancellation check says stop."""
