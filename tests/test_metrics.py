import pytest
import torch

from masktune_core.metrics import comparison_table, group_shares, selective_classification, split_metrics, verdict


def _logits(predictions, classes=2):
    return torch.nn.functional.one_hot(torch.tensor(predictions), classes).float()


def test_group_metrics_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 3, 3])
    preds = [0, 0, 1, 1, 1, 0, 0, 0]
    names = ["a", "b", "c", "d"]
    share = {"a": 0.5, "b": 0.1, "c": 0.3, "d": 0.1}
    m = split_metrics(_logits(preds), labels, groups, ["zero", "one"], names, share)
    assert m["overall_accuracy"] == pytest.approx(4 / 8)
    assert m["per_group"] == {
        "a": {"accuracy": 1.0, "count": 2}, "b": {"accuracy": 0.0, "count": 1},
        "c": {"accuracy": pytest.approx(2 / 3), "count": 3}, "d": {"accuracy": 0.0, "count": 2},
    }
    assert m["worst_group_accuracy"] == 0.0 and m["worst_group"] in {"b", "d"}
    assert m["group_mean_accuracy"] == pytest.approx((1 + 0 + 2 / 3 + 0) / 4)
    assert m["train_weighted_accuracy"] == pytest.approx(0.5 * 1 + 0.3 * 2 / 3)
    assert m["per_class"] == {"zero": {"accuracy": pytest.approx(2 / 3), "count": 3}, "one": {"accuracy": pytest.approx(2 / 5), "count": 5}}
    assert "worst_class_accuracy" not in m


def test_without_groups_worst_class_is_reported():
    labels = torch.tensor([0, 0, 1, 1, 2])
    m = split_metrics(_logits([0, 0, 1, 0, 1], 3), labels, torch.full((5,), -1), ["x", "y", "z"], None, None)
    assert m["worst_class"] == "z" and m["worst_class_accuracy"] == 0.0
    assert "per_group" not in m and "worst_group_accuracy" not in m


def test_group_shares():
    assert group_shares(torch.tensor([0, 0, 0, 1]), ["g0", "g1"]) == {"g0": 0.75, "g1": 0.25}
    assert group_shares(torch.tensor([-1]), None) is None


def test_verdict_says_whether_masktune_helped():
    better = verdict({"worst_group_accuracy": 0.2}, {"worst_group_accuracy": 0.8}, "val", 0.05)
    assert better["improved"] and better["change"] == pytest.approx(0.6)
    assert "Warning" not in better["message"] and "0.200" in better["message"]
    worse = verdict({"worst_class_accuracy": 0.7}, {"worst_class_accuracy": 0.65}, "val", 0.03)
    assert not worse["improved"] and worse["metric"] == "worst_class_accuracy"
    assert worse["message"].startswith("Warning") and "global" in worse["message"] and "3.0%" in worse["message"]


def test_selective_classification_follows_validation_quantiles():
    # Validation confidences spread so that coverage 0.5 keeps the top half.
    erm_val = torch.tensor([[4.0, 0.0], [3.0, 0.0], [1.0, 0.0], [0.2, 0.0]])
    ft_val = erm_val.clone()
    val_labels = torch.tensor([0, 0, 0, 0])
    erm_test = torch.tensor([[5.0, 0.0], [0.0, 3.5], [0.25, 0.0], [0.0, 0.3]])
    test_labels = torch.tensor([0, 0, 0, 1])
    out = selective_classification(erm_val, ft_val, val_labels, erm_test, erm_test.clone(), test_labels, [0.5, 1.0])
    half, full = out["by_coverage"]
    assert half["coverage"] == 0.5 and half["selective_accuracy"] == 0.5  # the two confident test images, one right
    assert full["coverage"] == 1.0 and full["selective_accuracy"] == 0.75


def test_comparison_table_lists_every_split():
    m = {"overall_accuracy": 0.9, "worst_group_accuracy": 0.5, "group_mean_accuracy": 0.7}
    metrics = {"erm": {"val": m, "test": m}, "masktune": {"val": m, "test": m}, "verdict": {"message": "done"}}
    table = comparison_table(metrics)
    assert table.count("worst_group_accuracy") == 2 and table.endswith("done")


def test_selective_coverage_is_realised_not_promised():
    # Test images less confident than every validation image fall outside even coverage 1.0.
    val = torch.tensor([[4.0, 0.0], [3.0, 0.0]])
    test = torch.tensor([[5.0, 0.0], [0.1, 0.0]])
    out = selective_classification(val, val, torch.tensor([0, 0]), test, test, torch.tensor([0, 0]), [1.0])
    assert out["by_coverage"][0]["coverage"] == 0.5
