"""MaskTune (Asgari Taghanaki et al., NeurIPS 2022) as a plain PyTorch library.

    from masktune_core import JobConfig, run_masktune
    metrics = run_masktune("data.zip", "out/", JobConfig())

Names are imported on first use, so a process that needs only the image decoder
(the decode workers) does not pay for importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "JobConfig": "jobspec",
    "ConfigError": ".errors", "DatasetError": ".errors", "JobCancelled": ".errors",
    "MaskTuneError": ".errors", "ModelError": ".errors",
    "architectures": ".models", "create_model": ".models", "load_weights": ".models", "save_weights": ".models",
    "ARTIFACTS": ".runfolder",
    "STAGES": ".pipeline", "MaskTuneRun": ".pipeline", "ProgressEvent": ".pipeline", "run_masktune": ".pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
