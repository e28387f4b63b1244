"""JTT and DFR beside MaskTune in one run, on a small digits set with a red-square shortcut (90% biased)."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from masktune_core import ARTIFACTS, JobCancelled, JobConfig, MaskTuneRun, create_model, load_weights, run_masktune
from masktune_core import pipeline as pipeline_module
from masktune_core.baselines import upsampled
from masktune_core.data import SplitRows, dataset_sha256
from masktune_core.errors import DfrNeedsValGroups
from masktune_core.metrics import recommend, verdict
from masktune_core.models import read_state_dict
from masktune_core.sample_data import write_biased_digits
from masktune_core.training import LoopSettings, accuracy, load_checkpoint, predict_logits
from test_metrics import _outcomes
from test_pipeline import Recorder

ALL = ["masktune", "jtt", "dfr"]
SMALL = {"data": {"input_size": 16}, "erm": {"epochs": 2, "batch_size": 32, "lr": 0.05}, "masking": {"batch_size": 100},
         "preview_count": 2, "selective": {"enabled": True}, "jtt": {"epochs": 2, "upweight": 4}, "dfr": {"resamples": 5}}
METRIC_NAMES = {"overall_accuracy", "count", "per_class", "per_group", "worst_group", "worst_group_accuracy",
                "group_mean_accuracy", "train_weighted_accuracy"}


def config(**fields) -> JobConfig:
    return JobConfig.model_validate({**SMALL, **fields})


@pytest.fixture(scope="module")
def shortcut(tmp_path_factory):
    """Train and val 90% biased, so validation has minority groups for DFR; test balanced."""
    return write_biased_digits(tmp_path_factory.mktemp("shortcut") / "digits", seed=0, n_train=200, n_val=160,
                               n_test=80, bias_ratio=0.9)


@pytest.fixture(scope="module")
def groupless(shortcut, tmp_path_factory):
    """The same images and labels, the group column dropped from metadata.csv."""
    copy = tmp_path_factory.mktemp("groupless") / "digits"
    shutil.copytree(shortcut, copy)
    with open(copy / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(copy / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["filename", "label", "split"], extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return copy


@pytest.fixture(scope="module")
def full_run(shortcut, tmp_path_factory):
    out = tmp_path_factory.mktemp("all_methods")
    rec = Recorder()
    metrics = run_masktune(shortcut, out, config(methods=ALL), device="cpu", on_event=rec)
    return out, metrics, rec


def test_every_method_is_reported_per_split_with_the_same_metric_names(full_run):
    out, metrics, rec = full_run
    assert metrics["methods"] == ALL
    for model in ["erm", *ALL]:
        assert set(metrics[model]) == {"train", "val", "test"}, model
        for split, m in metrics[model].items():
            assert set(m) == METRIC_NAMES and set(m["per_group"]) == set(metrics["erm"][split]["per_group"]), (model, split)
    assert set(metrics["verdict"]["by_method"]) == set(ALL)
    # DFR's last layer is fitted on val: every method is judged on test, the same images for all.
    assert {v["split"] for v in metrics["verdict"]["by_method"].values()} == {"test"}
    for name in ("model.safetensors", "erm.safetensors", "model_jtt.safetensors", "model_dfr.safetensors", "report.png"):
        assert name in ARTIFACTS and (out / name).stat().st_size > 0, name
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "model_card.json").read_text())["weights"].keys() == {
        "model.safetensors", "erm.safetensors", "model_jtt.safetensors", "model_dfr.safetensors"}
    stages = [e.stage for e in rec.events if e.kind == "stage"]
    assert stages == ["prepare", "erm", "saliency", "finetune", "jtt_identify", "jtt", "dfr", "evaluate", "export"]
    progress = [e.progress for e in rec.events]
    assert all(b >= a - 1e-9 for a, b in zip(progress, progress[1:]))
    assert rec.events[-1].kind == "done" and rec.events[-1].progress == 1.0
    assert rec.epochs("jtt") == [1, 2]
    # 8 validation images in each minority group: DFR's fit is flagged as resting on few images.
    assert metrics["dfr_head"]["images_per_group"] == 8
    assert [e.data["images_per_group"] for e in rec.events if e.kind == "warning" and e.stage == "dfr"] == [8]
    # The final message names the recommended model.
    chosen = metrics["verdict"]["recommended"]
    assert f"({chosen['artifact']})" in rec.events[-1].message and rec.events[-1].message == metrics["verdict"]["message"]
    picked = metrics["verdict"]["by_method"].get(chosen["method"])
    assert chosen["method"] == "erm" or picked["call"] == "improved" or (  # or, on a tie, the better-looking bet
        chosen["call"] == "inconclusive" and not picked["fitted_on_split"] and picked[chosen["method"]] > picked["erm"])


def test_the_error_set_is_what_erm_at_epoch_t_gets_wrong_and_each_is_seen_upweight_times(full_run, shortcut):
    out, metrics, _ = full_run
    found = metrics["jtt_error_set"]
    run = MaskTuneRun(shortcut, out, config(methods=ALL), device="cpu", dataset_sha256=dataset_sha256(shortcut))
    model = run.new_model()
    load_checkpoint(out / "work/erm/epoch_1.pt", model)  # T = a fifth of 2 ERM epochs, at least 1
    train = run.split("train")
    wrong = predict_logits(model, train, 64, LoopSettings(device=torch.device("cpu"))).argmax(1) != train.labels
    assert found["epochs_identify"] == 1 and found["identification_model"] == "erm/epoch_1.pt"
    assert 0 < found["error_set_size"] == int(wrong.sum()) < len(train)
    assert found["upsampled_train_images"] == len(train) + 3 * found["error_set_size"]

    labels = torch.arange(10) % 2
    split = SplitRows(None, np.arange(100, 110), labels, labels + 5)
    bigger = upsampled(split, np.array([2, 7]), 4)
    assert len(bigger) == 10 + 2 * 3
    assert np.bincount(bigger.rows - 100).tolist() == [1, 1, 4, 1, 1, 1, 1, 4, 1, 1]
    assert torch.equal(bigger.labels, labels[torch.from_numpy(bigger.rows - 100)])
    assert (bigger.groups == -1).all()  # JTT trains without group labels


def test_dfr_head_loads_strict_into_the_plain_model_and_raises_val_worst_group(full_run, shortcut):
    out, metrics, _ = full_run
    model = create_model("small_cnn", 2, 16)
    load_weights(model, out / "model_dfr.safetensors")  # strict: every key, every shape
    run = MaskTuneRun(shortcut, out, config(methods=ALL), device="cpu", dataset_sha256=dataset_sha256(shortcut))
    test = run.split("test")
    got = accuracy(predict_logits(model, test, 64, LoopSettings(device=torch.device("cpu"))), test.labels)
    assert got == pytest.approx(metrics["dfr"]["test"]["overall_accuracy"])
    dfr, erm = read_state_dict(out / "model_dfr.safetensors"), read_state_dict(out / "erm.safetensors")
    changed = {k for k in erm if not torch.equal(dfr[k], erm[k])}
    assert changed == {"linear.3.weight", "linear.3.bias"}  # the last layer only, on ERM's backbone
    assert metrics["dfr_head"]["c"] in SMALL.get("dfr", {}).get("c_grid", [1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01])
    assert metrics["dfr"]["val"]["worst_group_accuracy"] >= metrics["erm"]["val"]["worst_group_accuracy"]
    assert metrics["dfr"]["val"]["worst_group_accuracy"] > 0.5 > metrics["erm"]["val"]["worst_group_accuracy"]


def test_masktune_and_jtt_never_read_group_labels_and_jtt_resumes(full_run, groupless, tmp_path):
    out, full, _ = full_run
    cfg = config(methods=["masktune", "jtt"])
    # A cancellation check per training batch and per validation batch: stopped in JTT's second epoch.
    per_epoch = -(-full["jtt_error_set"]["upsampled_train_images"] // 32) + 160 // 32
    first = Recorder(cancel_after=("jtt", per_epoch + 3))
    with pytest.raises(JobCancelled):
        run_masktune(groupless, tmp_path, cfg, device="cpu", on_event=first, should_cancel=first.should_cancel)
    assert first.epochs("jtt") == [1]
    second = Recorder()
    metrics = run_masktune(groupless, tmp_path, cfg, device="cpu", on_event=second)
    assert second.epochs("jtt") == [2] and second.epochs("erm") == []
    assert "worst_class_accuracy" in metrics["jtt"]["test"] and "per_group" not in metrics["jtt"]["test"]
    for name in ("erm.safetensors", "model.safetensors", "model_jtt.safetensors"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_an_empty_error_set_is_reported_and_jtt_is_then_a_second_erm(shortcut, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline_module, "misclassified", lambda *args: [])  # an identification model that fits train
    rec = Recorder()
    metrics = run_masktune(shortcut, tmp_path, config(methods=["jtt"], erm={"epochs": 1, "batch_size": 32, "lr": 0.05},
                                                      jtt={"epochs": 1}), device="cpu", on_event=rec)
    found = metrics["jtt_error_set"]
    assert found["error_set_size"] == 0 and found["upsampled_train_images"] == found["train_images"]
    assert "second ERM" in found["note"] and "jtt.epochs_identify" in found["note"]
    assert [e.message for e in rec.events if e.kind == "warning" and e.stage == "jtt_identify"] == [f"Warning: {found['note']}"]
    assert (tmp_path / "model_jtt.safetensors").exists() and not (tmp_path / "model.safetensors").exists()


def test_dfr_without_group_labels_is_refused_before_training(groupless, tmp_path):
    rec = Recorder()
    with pytest.raises(DfrNeedsValGroups, match="no group labels") as refused:
        run_masktune(groupless, tmp_path, config(methods=["masktune", "dfr"]), device="cpu", on_event=rec)
    assert refused.value.code == "dfr_needs_val_groups"
    assert [e.stage for e in rec.events if e.kind == "stage"] == ["prepare"]


def test_the_recommendation_follows_the_calls_and_never_keeps_erm_over_a_better_looking_tie():
    names = ["a", "b"]

    def judged(method, *groups):
        return verdict(*_outcomes(*groups), names, "group", "val", method=method)

    improved = judged("jtt", (100, 40, 80), (100, 90, 90))
    better = judged("dfr", (100, 40, 90), (100, 90, 95))
    worse = judged("masktune", (100, 60, 20), (100, 90, 90))
    unsure = judged("dfr", (100, 60, 62), (100, 90, 90))
    assert (improved["call"], better["call"], worse["call"], unsure["call"]) == ("improved", "improved", "worse", "inconclusive")

    assert recommend({"masktune": worse, "jtt": improved})["method"] == "jtt"
    chosen = recommend({"jtt": improved, "dfr": better})
    assert (chosen["method"], chosen["artifact"], chosen["call"]) == ("dfr", "model_dfr.safetensors", "improved")
    # A tie the data cannot decide: the method that looks better is the advice, said as a bet; never ERM over it.
    tie = recommend({"masktune": worse, "dfr": unsure})
    assert (tie["method"], tie["artifact"], tie["call"]) == ("dfr", "model_dfr.safetensors", "inconclusive")
    assert "better bet" in tie["why"] and "not a proven one" in tie["why"] and "Keep" not in tie["why"]
    behind = judged("jtt", (100, 60, 58), (100, 90, 90))  # within the noise, below ERM
    assert behind["call"] == "inconclusive"
    assert (recommend({"jtt": behind})["method"], recommend({"jtt": behind})["call"]) == ("erm", "inconclusive")
    assert recommend({"masktune": worse})["call"] == "worse"
    fitted = verdict(*_outcomes((100, 60, 62), (100, 90, 90)), names, "group", "val", method="dfr", fit_on_split=True)
    assert recommend({"dfr": fitted})["method"] == "erm"  # its estimate on the images it was fitted on is no bet
