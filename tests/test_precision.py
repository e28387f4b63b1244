"""runtime.precision: low-precision autocast is real arithmetic, not a label, and the CPU default stays fp32.

CUDA is not on the CI machine; the CPU supports bf16 and fp16 autocast too, so the
same code paths (autocast, fp16's gradient scaler, fp32 CAM arithmetic) run here.
The pinned, non-blocking, channels-last transfer only exists on a GPU: bench/gpu_check.sh.
"""

import json

import pytest
import torch

from masktune_core import JobConfig, run_masktune
from masktune_core.data import decode_dataset, index_dataset
from masktune_core.masking import threshold_masks
from masktune_core.models import create_model, saliency_target_layer
from masktune_core.saliency import xgradcam
from masktune_core.training import (
    LoopSettings, autocast_dtype, epoch_generator, make_optimizer, predict_logits, train_one_epoch,
)
from test_pipeline import fast_config
from test_saliency import _trained_ish

CPU = torch.device("cpu")


def test_auto_is_fp32_on_the_cpu_and_explicit_choices_are_kept():
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert autocast_dtype("fp16", CPU) is torch.float16
    assert JobConfig().runtime.precision == "auto" and JobConfig().runtime.compile is False


@pytest.fixture(scope="module")
def digits_train_val(tiny_digits, tmp_path_factory):
    decoded = decode_dataset(index_dataset(tiny_digits), 28, tmp_path_factory.mktemp("cache"))
    return decoded.splits["train"], decoded.splits["val"]


def _train(precision, train, epochs=3):
    torch.manual_seed(0)
    model = create_model("small_cnn", 2)
    loop = LoopSettings(device=CPU, precision=precision)
    optimizer = make_optimizer(model, fast_config().erm)
    history = [train_one_epoch(model, optimizer, train, 32, epoch_generator(0, "erm", epoch), loop) for epoch in range(epochs)]
    return model, loop, history


@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float16])
def test_low_precision_training_learns_and_differs_from_fp32(precision, digits_train_val):
    train, val = digits_train_val
    reference, _, _ = _train(None, train)
    model, loop, history = _train(precision, train)
    assert (loop.scaler is not None) == (precision == torch.float16)  # fp16 only: gradients need scaling
    assert history[-1]["loss"] < 0.5 * history[0]["loss"] and history[-1]["accuracy"] > 0.9
    # Autocast really ran: the weights left the fp32 trajectory, and stayed fp32 (master weights).
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Inference under autocast predicts what the same weights predict in fp32.
    low = predict_logits(model, val, 64, loop).argmax(1)
    full = predict_logits(model, val, 64, LoopSettings(device=CPU)).argmax(1)
    assert (low == full).float().mean() >= 0.95


def test_bf16_saliency_is_fp32_maps_close_to_the_fp32_ones():
    model = _trained_ish("resnet18", 64)
    inputs = torch.rand(8, 3, 64, 64)
    target = saliency_target_layer(model, "resnet18", 64)
    fp32, predicted = xgradcam(model, target, inputs)
    bf16, predicted_bf16 = xgradcam(model, target, inputs, torch.bfloat16)
    assert bf16.dtype == torch.float32 and bf16.min() >= 0 and bf16.max() <= 1 + 1e-6
    assert torch.equal(predicted, predicted_bf16)
    assert not torch.equal(fp32, bf16)
    assert (fp32 - bf16).abs().mean() < 0.05
    a, b = threshold_masks(fp32), threshold_masks(bf16)
    assert (a & b).sum() / (a | b).sum() > 0.6  # the masked pixels largely agree


def test_a_bf16_job_records_its_precision_and_trains(tiny_digits, tmp_path):
    metrics = run_masktune(tiny_digits, tmp_path / "out", fast_config(runtime={"precision": "bf16"}), device="cpu")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["precision"] == "bfloat16" and config["config"]["runtime"]["precision"] == "bf16"
    assert metrics["masktune"]["test"]["count"] == 80
