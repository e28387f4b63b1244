"""MaskTune (Asgari Taghanaki et al., NeurIPS 2022) as a plain PyTorch library.

    from masktune_core import JobConfig, run_masktune
    metrics = run_masktune("data.zip", "out/", JobConfig())
"""

from jobspec import JobConfig
from .errors import ConfigError, DatasetError, JobCancelled, MaskTuneError, ModelError
from .models import architectures, create_model, load_weights, save_weights
from .pipeline import STAGES, MaskTuneRun, ProgressEvent, run_masktune
from .runfolder import ARTIFACTS

__all__ = [
    "ARTIFACTS", "STAGES", "ConfigError", "DatasetError", "JobCancelled", "JobConfig", "MaskTuneError",
    "MaskTuneRun", "ModelError", "ProgressEvent", "architectures", "create_model", "load_weights",
    "run_masktune", "save_weights",
]
