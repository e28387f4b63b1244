"""The numbers of DESIGN.md section 3.6-3.7, named plainly.

Per split ``M = {overall_accuracy, per_class, [per_group, worst_group_accuracy,
worst_group, group_mean_accuracy, train_weighted_accuracy] | [worst_class_accuracy,
worst_class]}``, accuracies in 0..1.
"""

from __future__ import annotations

import torch


def _table(correct: torch.Tensor, keys: torch.Tensor, names: list[str]) -> dict[str, dict]:
    table = {}
    for i, name in enumerate(names):
        hit = keys == i
        count = int(hit.sum())
        if count:
            table[name] = {"accuracy": correct[hit].float().mean().item(), "count": count}
    return table


def split_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    classes: list[str],
    group_names: list[str] | None,
    train_group_share: dict[str, float] | None,
) -> dict:
    correct = logits.argmax(1) == labels
    m: dict = {"overall_accuracy": correct.float().mean().item(), "count": len(labels)}
    m["per_class"] = _table(correct, labels, classes)
    if group_names:
        per_group = _table(correct, groups, group_names)
        worst = min(per_group, key=lambda g: per_group[g]["accuracy"])
        m["per_group"] = per_group
        m["worst_group"] = worst
        m["worst_group_accuracy"] = per_group[worst]["accuracy"]
        m["group_mean_accuracy"] = sum(g["accuracy"] for g in per_group.values()) / len(per_group)
        share = {g: (train_group_share or {}).get(g, 0.0) for g in per_group}
        total = sum(share.values())
        m["train_weighted_accuracy"] = (
            sum(share[g] * per_group[g]["accuracy"] for g in per_group) / total if total else None
        )
    else:
        worst = min(m["per_class"], key=lambda c: m["per_class"][c]["accuracy"])
        m["worst_class"] = worst
        m["worst_class_accuracy"] = m["per_class"][worst]["accuracy"]
    return m


def group_shares(groups: torch.Tensor, group_names: list[str] | None) -> dict[str, float] | None:
    if not group_names:
        return None
    counts = torch.bincount(groups[groups >= 0], minlength=len(group_names)).float()
    return {name: (counts[i] / counts.sum()).item() for i, name in enumerate(group_names)}


_GLOBAL_SHORTCUT_HINT = (
    "MaskTune helps when the model leans on a small, localized shortcut (a patch, a watermark) "
    "that saliency masking can cover; it can fail when the shortcut is global (a background, a "
    "colour cast) or when the model has no strong shortcut to unlearn. Keep the ERM model "
    "(erm.safetensors), or try masking.checkpoint='last', more ERM epochs, a smaller "
    "finetune.batch_size or several masktune_iterations."
)


def verdict(erm: dict, masktune: dict, split: str, masked_fraction: float | None) -> dict:
    """Did MaskTune improve the worst group (else worst class) on ``split``, and by how much."""
    key = "worst_group_accuracy" if "worst_group_accuracy" in erm else "worst_class_accuracy"
    what = "worst-group" if key == "worst_group_accuracy" else "worst-class"
    before, after = erm[key], masktune[key]
    change = after - before
    out = {
        "split": split,
        "metric": key,
        "erm": before,
        "masktune": after,
        "change": change,
        "improved": change > 0,
    }
    if change > 0:
        out["message"] = f"MaskTune raised {split} {what} accuracy from {before:.3f} to {after:.3f} (+{change:.3f})."
    else:
        masked = f" It masked {masked_fraction:.1%} of the training pixels." if masked_fraction is not None else ""
        out["message"] = (
            f"Warning: MaskTune did not improve {split} {what} accuracy ({before:.3f} -> {after:.3f}, "
            f"{change:+.3f}).{masked} {_GLOBAL_SHORTCUT_HINT}"
        )
    return out


def selective_classification(
    erm_val: torch.Tensor, ft_val: torch.Tensor, val_labels: torch.Tensor,
    erm_test: torch.Tensor, ft_test: torch.Tensor, test_labels: torch.Tensor,
    coverages: list[float],
) -> dict:
    """Official recipe: confidence = max softmax(p_erm * p_ft); thresholds from validation quantiles."""

    def combine(erm_logits, ft_logits):
        probs = torch.softmax(torch.softmax(erm_logits, 1) * torch.softmax(ft_logits, 1), dim=1)
        return probs.max(1)

    val_conf, _ = combine(erm_val, ft_val)
    val_sorted = val_conf.sort(descending=True).values
    test_conf, test_pred = combine(erm_test, ft_test)
    test_correct = test_pred == test_labels
    rows = []
    for coverage in coverages:
        threshold = val_sorted[min(round(coverage * len(val_sorted)), len(val_sorted) - 1)].item()
        chosen = test_conf >= threshold
        n = int(chosen.sum())
        rows.append({
            "target_coverage": coverage,
            "threshold": threshold,
            "coverage": n / max(len(test_labels), 1),
            "selective_accuracy": test_correct[chosen].float().mean().item() if n else None,
        })
    return {"split": "test", "confidence": "max softmax(p_erm * p_masktune)", "by_coverage": rows}


def comparison_table(metrics: dict) -> str:
    """ERM vs MaskTune, one row per split, for the terminal."""
    lines = [f"{'split':<6} {'metric':<26} {'ERM':>7} {'MaskTune':>9}"]
    for split, erm in metrics["erm"].items():
        mt = metrics["masktune"][split]
        keys = ["overall_accuracy"]
        keys += ["worst_group_accuracy", "group_mean_accuracy"] if "worst_group_accuracy" in erm else ["worst_class_accuracy"]
        for key in keys:
            lines.append(f"{split:<6} {key:<26} {erm[key]:>7.3f} {mt[key]:>9.3f}")
    lines.append(metrics["verdict"]["message"])
    return "\n".join(lines)


def headline(metrics: dict) -> dict:
    """The few numbers a job listing shows (the verdict, overall and worst group or class per split)."""
    keys = ("overall_accuracy", "worst_group_accuracy", "worst_group", "worst_class_accuracy", "worst_class")

    def pick(m: dict) -> dict:
        return {k: m[k] for k in keys if k in m}

    return {
        "verdict": metrics["verdict"],
        "erm": {split: pick(m) for split, m in metrics["erm"].items()},
        "masktune": {split: pick(m) for split, m in metrics["masktune"].items()},
    }
