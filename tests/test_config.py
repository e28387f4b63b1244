import pytest
from pydantic import ValidationError

from jobspec import JobConfig


def test_defaults_are_the_official_recipe():
    c = JobConfig()
    assert (c.erm.lr, c.erm.momentum, c.erm.weight_decay, c.erm.batch_size) == (0.01, 0.9, 1e-4, 128)
    assert c.masking.method == "xgradcam" and c.masking.threshold_std == 2.0 and c.masking.checkpoint == "best"
    assert c.finetune.epochs == 1 and c.finetune.batch_size is None
    assert c.masktune_iterations == 1 and not c.accumulative_masking
    assert c.data.augmentation == "none"
    assert c.selective.coverages == [0.80, 0.85, 0.90, 0.95, 1.00]


def test_baselines_default_to_off_and_jtt_scales_with_erm():
    c = JobConfig()
    assert c.methods == ["masktune"] and c.jtt.upweight == 100 and c.dfr.resamples == 20
    assert c.dfr.c_grid == [1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01]
    assert c.jtt_identify_epochs() == 4  # a fifth of 20 ERM epochs
    assert JobConfig.model_validate({"erm": {"epochs": 2}}).jtt_identify_epochs() == 1
    assert JobConfig.model_validate({"jtt": {"epochs_identify": 7}}).jtt_identify_epochs() == 7


def test_the_design_body_parses():
    body = {"model": {"architecture": "small_cnn", "weights_id": None}, "erm": {"epochs": 20, "lr": 0.01, "batch_size": 128},
            "masking": {"method": "xgradcam", "threshold_std": 2.0}, "finetune": {"epochs": 1}, "seed": 0}
    assert JobConfig.model_validate(body).erm.epochs == 20


@pytest.mark.parametrize("body", [
    {"unknown": 1},
    {"erm": {"epochs": -1}},
    {"erm": {"lr": 0}},
    {"erm": {"batch_size": 0}},
    {"erm": {"momentum": 1.0}},
    {"masking": {"method": "scorecam"}},
    {"masking": {"threshold_std": -1}},
    {"masking": {"color": "red"}},
    {"finetune": {"epochs": 0}},
    {"data": {"input_size": 4}},
    {"data": {"augmentation": "mixup"}},
    {"selective": {"coverages": [0.5, 1.5]}},
    {"runtime": {"precision": "fp8"}},
    {"runtime": {"device": "cuda"}},  # the device is the worker's, not the job's
    {"seed": -1},
    {"methods": []},
    {"methods": ["jtt", "jtt"]},
    {"methods": ["lff"]},
    {"dfr": {"c_grid": [0.0]}},
    {"jtt": {"upweight": 0}},
    {"methods": ["jtt"], "erm": {"epochs": 0}},  # jtt.epochs would inherit 0
])
def test_out_of_range_and_unknown_fields_are_rejected(body):
    with pytest.raises(ValidationError):
        JobConfig.model_validate(body)


def test_the_contract_lists_exactly_the_registered_architectures():
    from jobspec import ARCHITECTURES
    from masktune_core import architectures

    assert set(ARCHITECTURES) == set(architectures())
