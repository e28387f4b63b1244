import pytest
import torch

from masktune_core.metrics import (MIN_GROUP_IMAGES, comparison_table, group_shares, selective_classification, split_metrics,
                                   verdict, wilson_interval)


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


def _outcomes(*groups):
    """(erm right, masktune right, group index) per image from (count, erm right, masktune right[, the first
    image MaskTune gets right]) per group: ERM is right on the first images, MaskTune from that one on."""
    erm, mt, keys = [], [], []
    for index, (count, erm_right, mt_right, *mt_from) in enumerate(groups):
        start = mt_from[0] if mt_from else 0
        erm += [i < erm_right for i in range(count)]
        mt += [start <= i < start + mt_right for i in range(count)]
        keys += [index] * count
    return torch.tensor(erm), torch.tensor(mt), torch.tensor(keys)


NAMES = ["0_square", "1_square", "0_plain", "1_plain"]


def test_a_clear_gain_on_enough_images_is_improved_with_its_intervals():
    v = verdict(*_outcomes((200, 190, 185), (150, 30, 120), (150, 140, 138), (200, 195, 190)), NAMES, "group", "val", 0.05)
    assert v["call"] == "improved" and v["improved"] and v["metric"] == "worst_group_accuracy"
    assert v["erm"] == pytest.approx(0.2) and v["erm_worst"] == "1_square" and v["change"] == pytest.approx(0.6)
    assert v["erm_interval"][0] < 0.2 < v["erm_interval"][1] and 0.4 < v["change_interval"][0] < 0.6 < v["change_interval"][1]
    assert "Warning" not in v["message"] and "Inconclusive" not in v["message"] and "0.200" in v["message"]


def test_a_clear_loss_is_worse_and_warns():
    v = verdict(*_outcomes((100, 90, 50), (100, 85, 88)), ["a", "b"], "class", "val", 0.03)
    assert v["call"] == "worse" and not v["improved"] and v["metric"] == "worst_class_accuracy"
    assert v["change_interval"][1] < 0 and v["message"].startswith("Warning") and "3.0%" in v["message"]


def test_the_seven_image_tie_is_inconclusive_and_never_says_keep_erm():
    """The case a user met: 4 of 7 right before and after in the smallest group (not the same 4), another
    group 0.875 -> 1.0."""
    v = verdict(*_outcomes((300, 290, 280), (7, 4, 4, 3), (8, 7, 8), (300, 280, 290)), NAMES, "group", "val", 0.02)
    assert v["call"] == "inconclusive" and not v["improved"]
    assert v["smallest"] == "1_square" and v["smallest_count"] == 7
    low, high = v["change_interval"]
    assert low < -0.2 and high > 0.2
    assert "has 7 images" in v["message"] and f"{low:+.2f} to {high:+.2f}" in v["message"]
    assert "0.875->1.000 (8)" in v["message"]  # the other groups' changes are the evidence left
    assert "Keep the ERM model" not in v["message"] and "Warning" not in v["message"]


@pytest.mark.parametrize("smallest,call", [(MIN_GROUP_IMAGES - 1, None), (MIN_GROUP_IMAGES, "made")])
@pytest.mark.parametrize("direction", ["improved", "worse"])
def test_a_call_needs_enough_images_in_the_smallest_group(smallest, call, direction):
    """All of the smallest group wrong -> all right (or the reverse): the interval excludes zero either way,
    so only the group's size decides between a call and inconclusive."""
    before, after = (0, smallest) if direction == "improved" else (smallest, 0)
    v = verdict(*_outcomes((smallest, before, after), (100, 95, 95)), ["a", "b"], "group", "val", 0.05)
    low, high = v["change_interval"]
    assert v["smallest_count"] == smallest and (low > 0 if direction == "improved" else high < 0)
    assert v["call"] == (direction if call else "inconclusive")
    if not call:
        assert "too few to decide on" in v["message"] and "Warning" not in v["message"]


def test_no_change_on_plenty_of_images_is_inconclusive():
    v = verdict(*_outcomes((100, 60, 60), (100, 80, 80)), ["a", "b"], "group", "val", 0.05)
    assert v["call"] == "inconclusive" and v["change"] == 0
    assert v["change_interval"][0] <= 0 <= v["change_interval"][1] and "includes zero" in v["message"]


def test_masking_nothing_is_inconclusive_whatever_the_numbers():
    v = verdict(*_outcomes((100, 20, 70), (100, 90, 90)), ["a", "b"], "group", "val", 0.0)
    assert v["call"] == "inconclusive" and "masked none of the training pixels" in v["message"]


def test_the_verdict_is_reproducible_and_subsets_without_images_are_left_out():
    outcomes = _outcomes((50, 30, 40), (0, 0, 0), (60, 50, 52))
    first = verdict(*outcomes, ["a", "empty", "c"], "group", "val", 0.1)
    assert first == verdict(*outcomes, ["a", "empty", "c"], "group", "val", 0.1)
    assert set(first["per_group"]) == {"a", "c"}


def test_wilson_interval_is_sound_at_the_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 7)
    assert low == 0.0 and 0.3 < high < 0.45  # 0 of 7 does not mean the accuracy is 0
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.404, abs=1e-3) and high == pytest.approx(0.596, abs=1e-3)


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
