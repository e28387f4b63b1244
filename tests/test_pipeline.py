import json

import numpy as np
import pytest
import torch

from masktune_core import JobConfig, JobCancelled, MaskTuneRun, create_model, load_weights, run_masktune
from masktune_core.data import decode_dataset, index_dataset
from masktune_core.errors import ConfigError, DatasetError
from masktune_core import pipeline as pipeline_module
from masktune_core.masking import unpack_masks
from masktune_core.training import LoopSettings, accuracy, in_order, predict_logits, read_ahead

FAST = {"erm": {"epochs": 3, "batch_size": 64}, "masking": {"batch_size": 64}, "preview_count": 3, "selective": {"enabled": True}}


def fast_config(**overrides) -> JobConfig:
    raw = json.loads(json.dumps(FAST))
    for key, value in overrides.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return JobConfig.model_validate(raw)


def stored_masks(path) -> torch.Tensor:
    packed = np.load(path)
    return unpack_masks(packed, 28)


class Recorder:
    def __init__(self, cancel_after: tuple[str, int] | None = None):
        self.events = []
        self.cancel_after = cancel_after
        self.batches = 0

    def __call__(self, event):
        self.events.append(event)

    def should_cancel(self) -> bool:
        if self.cancel_after and self.events and self.events[-1].stage == self.cancel_after[0]:
            self.batches += 1
            return self.batches > self.cancel_after[1]
        return False

    def epochs(self, phase):
        return [e.data["epoch"] for e in self.events if e.kind == "epoch" and e.data.get("phase") == phase]


@pytest.fixture(scope="module")
def reference_run(tiny_digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    rec = Recorder()
    metrics = run_masktune(tiny_digits, out, fast_config(), device="cpu", on_event=rec)
    return out, metrics, rec


def test_run_writes_every_artifact_with_the_documented_shape(reference_run):
    out, metrics, _ = reference_run
    for name in ("metrics.json", "model.safetensors", "erm.safetensors", "previews.png", "config.json"):
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    for model in ("erm", "masktune"):
        assert set(metrics[model]) == {"train", "val", "test"}
        m = metrics[model]["test"]
        for key in ("overall_accuracy", "worst_group_accuracy", "worst_group", "group_mean_accuracy",
                    "train_weighted_accuracy", "per_group", "per_class"):
            assert key in m, key
        assert set(m["per_group"]) == {"0_no_square", "0_square", "1_no_square", "1_square"}
        assert all(0 <= g["accuracy"] <= 1 and g["count"] == 20 for g in m["per_group"].values())
    assert set(metrics["verdict"]) >= {"call", "improved", "change", "change_interval", "erm_interval", "masktune_interval",
                                       "smallest_count", "erm", "masktune", "message", "metric"}
    assert [r["target_coverage"] for r in metrics["selective"]["by_coverage"]] == [0.8, 0.85, 0.9, 0.95, 1.0]
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["data"]["input_size"] == 28 and config["seed"] == 0
    assert len(config["dataset_sha256"]) == 64
    assert {"torch", "torchvision", "grad-cam", "python"} <= set(config["versions"])
    assert config["dataset_summary"]["splits"]["train"]["images"] == 300


def test_exported_model_reproduces_the_reported_accuracy(reference_run, tiny_digits, tmp_path):
    out, metrics, _ = reference_run
    index = index_dataset(tiny_digits)
    test = decode_dataset(index, 28, tmp_path / "cache").splits["test"]
    loop = LoopSettings(device=torch.device("cpu"))
    for artifact, name in (("model.safetensors", "masktune"), ("erm.safetensors", "erm")):
        model = create_model("small_cnn", 2)
        load_weights(model, out / artifact)
        got = accuracy(predict_logits(model, test, 64, loop), test.labels)
        assert got == pytest.approx(metrics[name]["test"]["overall_accuracy"])


def test_events_walk_through_every_stage_with_monotone_progress(reference_run):
    _, _, rec = reference_run
    stages = [e.stage for e in rec.events if e.kind == "stage"]
    assert stages == ["prepare", "erm", "saliency", "finetune", "evaluate", "export"]
    progress = [e.progress for e in rec.events]
    assert all(b >= a - 1e-9 for a, b in zip(progress, progress[1:]))
    assert rec.events[-1].kind == "done" and rec.events[-1].progress == 1.0
    assert rec.epochs("erm") == [1, 2, 3] and rec.epochs("finetune") == [1]
    assert all(0 <= e.stage_progress <= 1 for e in rec.events)


def test_the_verdict_is_the_final_message_and_a_warning_unless_improved(reference_run):
    _, metrics, rec = reference_run
    v = metrics["verdict"]
    assert v["metric"] == "worst_group_accuracy" and v["smallest_count"] == min(g["count"] for g in v["per_group"].values())
    assert v["erm"] == metrics["erm"]["val"]["worst_group_accuracy"] and v["masktune"] == metrics["masktune"]["val"]["worst_group_accuracy"]
    warnings = [e.message for e in rec.events if e.kind == "warning"]
    assert warnings == ([] if v["call"] == "improved" else [v["message"]])
    assert rec.events[-1].kind == "done" and rec.events[-1].message == v["message"]


def test_same_seed_same_metrics_and_other_seed_differs(reference_run, tiny_digits, tmp_path):
    _, metrics, _ = reference_run
    assert run_masktune(tiny_digits, tmp_path / "again", fast_config(), device="cpu") == metrics
    other = run_masktune(tiny_digits, tmp_path / "other", fast_config(seed=1), device="cpu")
    assert other["erm"]["val"] != metrics["erm"]["val"]


@pytest.mark.parametrize("stage,batches", [("erm", 8), ("saliency", 2)])
def test_resume_after_interruption_reproduces_the_uninterrupted_run(reference_run, tiny_digits, tmp_path, stage, batches):
    _, metrics, _ = reference_run
    first = Recorder(cancel_after=(stage, batches))
    with pytest.raises(JobCancelled):
        run_masktune(tiny_digits, tmp_path, fast_config(), device="cpu", on_event=first, should_cancel=first.should_cancel)
    assert not (tmp_path / "metrics.json").exists()
    second = Recorder()
    resumed = run_masktune(tiny_digits, tmp_path, fast_config(), device="cpu", on_event=second)
    assert resumed == metrics
    stages = [e.stage for e in second.events if e.kind == "stage"]
    if stage == "erm":
        # 8 batches of 5 per epoch: epoch 1 finished, the run resumes at epoch 2.
        assert first.epochs("erm") == [1]
        assert second.epochs("erm") == [2, 3]
        assert any(e.data.get("resumed_from_epoch") == 1 for e in second.events)
        assert stages[0] == "erm"
    else:
        assert stages[0] == "saliency" and second.epochs("erm") == []


def test_finetune_starts_from_last_checkpoint_with_its_optimizer_state(tiny_digits, tmp_path, monkeypatch):
    seen = {}
    real_train, real_saliency = pipeline_module.train_one_epoch, pipeline_module.saliency_maps

    def spy_train(model, optimizer, data, batch_size, generator, loop, masks=None):
        if "erm" in seen and "finetune" not in seen and seen.get("saliency"):
            seen["finetune"] = ({k: v.clone() for k, v in model.state_dict().items()},
                                [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()],
                                torch.cat(list(read_ahead(data, in_order(len(data), 64), masks))))
        seen["erm"] = True
        return real_train(model, optimizer, data, batch_size, generator, loop, masks)

    def spy_saliency(method, model, target, inputs, autocast=None):
        seen.setdefault("saliency", {k: v.clone() for k, v in model.state_dict().items()})
        return real_saliency(method, model, target, inputs, autocast)

    monkeypatch.setattr(pipeline_module, "train_one_epoch", spy_train)
    monkeypatch.setattr(pipeline_module, "saliency_maps", spy_saliency)
    run = MaskTuneRun(tiny_digits, tmp_path, fast_config(erm={"epochs": 4}), device="cpu")
    run.run()
    last = torch.load(tmp_path / "work/erm/last.pt", weights_only=True)
    best = torch.load(tmp_path / "work/erm/best.pt", weights_only=True)
    assert best["epoch"] < last["epoch"]  # the two checkpoints differ, so the checks below tell them apart
    model_state, momentum, images = seen["finetune"]
    for k, v in last["model"].items():
        assert torch.equal(model_state[k], v), k
    saved_momentum = [s["momentum_buffer"] for s in last["optimizer"]["state"].values()]
    assert len(saved_momentum) == len(momentum) and all(torch.equal(a, b) for a, b in zip(momentum, saved_momentum))
    for k, v in best["model"].items():  # saliency came from the best checkpoint
        assert torch.equal(seen["saliency"][k], v), k
    masks = stored_masks(tmp_path / "work/masks_1.npy")
    train = run.split("train")
    assert masks.any()
    assert torch.equal(images, train.pixels() * (~masks).unsqueeze(1))  # finetuned on masked images only


def test_erm_can_be_skipped_with_uploaded_weights(reference_run, tiny_digits, tmp_path):
    out, metrics, _ = reference_run
    run = run_masktune(tiny_digits, tmp_path, fast_config(erm={"epochs": 0}), device="cpu", initial_weights=out / "erm.safetensors")
    assert run["erm"]["test"] == metrics["erm"]["test"]  # best = the upload
    with pytest.raises(ConfigError):
        MaskTuneRun(tiny_digits, tmp_path / "x", fast_config(erm={"epochs": 0}))


def test_several_accumulative_masking_rounds(tiny_digits, tmp_path):
    rec = Recorder()
    run_masktune(tiny_digits, tmp_path, fast_config(masktune_iterations=2, accumulative_masking=True), device="cpu", on_event=rec)
    first = stored_masks(tmp_path / "work/masks_1.npy")
    second = stored_masks(tmp_path / "work/masks_2.npy")
    assert (second | first).equal(second) and second.sum() > first.sum()
    assert [e.stage for e in rec.events if e.kind == "stage"].count("finetune") == 2


def test_changed_config_starts_over(reference_run, tiny_digits, tmp_path):
    run_masktune(tiny_digits, tmp_path, fast_config(), device="cpu")
    rec = Recorder()
    run_masktune(tiny_digits, tmp_path, fast_config(erm={"lr": 0.02}), device="cpu", on_event=rec)
    assert rec.epochs("erm") == [1, 2, 3]


def test_broken_dataset_fails_with_a_clear_error(tmp_path):
    (tmp_path / "data/train/only").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no training images"):
        run_masktune(tmp_path / "data", tmp_path / "out", fast_config(), device="cpu")
