"""The metrics and the verdict of docs/method.md (evaluate), named plainly.

Per split ``M = {overall_accuracy, per_class, [per_group, worst_group_accuracy,
worst_group, group_mean_accuracy, train_weighted_accuracy] | [worst_class_accuracy,
worst_class]}``, accuracies in 0..1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import runfolder as rf


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


LABELS = {"erm": "ERM", "masktune": "MaskTune", "jtt": "JTT", "dfr": "DFR"}

_GLOBAL_SHORTCUT_HINT = (
    "MaskTune helps when the model leans on a small, localized shortcut (a patch, a watermark) "
    "that saliency masking can cover; it can fail when the shortcut is global (a background, a "
    "colour cast) or when the model has no strong shortcut to unlearn. Keep the ERM model "
    "(erm.safetensors), or try masking.checkpoint='last', more ERM epochs, a smaller "
    "finetune.batch_size or several masktune_iterations."
)
_WORSE_HINT = {
    "masktune": _GLOBAL_SHORTCUT_HINT,
    "jtt": "JTT helps when the images an early-stopped model gets wrong are mostly the minority groups; keep the ERM "
           "model (erm.safetensors), or try another jtt.epochs_identify (earlier: fewer memorised errors) or jtt.upweight.",
    "dfr": "DFR retrains the last layer on group-balanced validation images: with few images in the smallest validation "
           "group it overfits them; keep the ERM model (erm.safetensors), or give the dataset a larger validation split.",
}

MIN_GROUP_IMAGES = 20  # fewer images in a group than this, and no call is made on it
_Z95 = 1.959964
BOOTSTRAP_RESAMPLES = 2000


def wilson_interval(correct: int, count: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound for small counts and for 0 or 1)."""
    if count == 0:
        return 0.0, 1.0
    p, z2 = correct / count, _Z95 ** 2
    centre = (p + z2 / (2 * count)) / (1 + z2 / count)
    half = _Z95 * math.sqrt(p * (1 - p) / count + z2 / (4 * count ** 2)) / (1 + z2 / count)
    return max(0.0, centre - half), min(1.0, centre + half)


def _paired_bootstrap(before: list[np.ndarray], after: list[np.ndarray], seed: int) -> tuple[float, float]:
    """95% interval of (worst subset accuracy after) - (worst before), resampling images with replacement
    within each subset, the same images for both models. A subset's resample is a multinomial draw
    over its four (before right?, after right?) outcomes, so the cost does not grow with its size."""
    rng = np.random.default_rng(seed)
    worst_before = np.full(BOOTSTRAP_RESAMPLES, np.inf)
    worst_after = np.full(BOOTSTRAP_RESAMPLES, np.inf)
    for b, a in zip(before, after):
        outcomes = np.bincount(b.astype(int) * 2 + a.astype(int), minlength=4) / len(b)
        counts = rng.multinomial(len(b), outcomes, size=BOOTSTRAP_RESAMPLES)
        worst_before = np.minimum(worst_before, (counts[:, 2] + counts[:, 3]) / len(b))
        worst_after = np.minimum(worst_after, (counts[:, 1] + counts[:, 3]) / len(b))
    low, high = np.percentile(worst_after - worst_before, [2.5, 97.5])
    return float(low), float(high)


def verdict(erm_correct: torch.Tensor, method_correct: torch.Tensor, keys: torch.Tensor, names: list[str],
            subset: str, split: str, masked_fraction: float | None = None, seed: int = 0, method: str = "masktune",
            fit_on_split: bool = False) -> dict:
    """Did ``method`` change the worst ``subset`` ("group", else "class") accuracy on ``split`` compared with ERM,
    and does the data say so? ``*_correct``: bool per image; ``keys``: each image's group (or class) index into
    ``names``. The method's own fields are named after it (``masktune``, ``masktune_worst``, ...).

    ``call`` is ``improved`` or ``worse`` only when every subset has at least MIN_GROUP_IMAGES images and
    the 95% paired-bootstrap interval of the change excludes zero; otherwise ``inconclusive``, and the
    message rests on what the data supports (the mean over subsets, each subset's change), never on a tie.
    ``fit_on_split``: the method was fitted on these very images (DFR on val), so they can show it worse but
    never improved. ``masked_fraction`` (MaskTune): masking nothing leaves nothing to judge.
    """
    label, artifact = LABELS[method], rf.MODEL_ARTIFACTS[method]
    before, after, table = [], [], {}
    for i, name in enumerate(names):
        hit = keys == i
        if int(hit.sum()):
            b, a = erm_correct[hit].numpy(), method_correct[hit].numpy()
            before.append(b)
            after.append(a)
            table[name] = {"count": len(b), "erm": float(b.mean()), method: float(a.mean())}
    if not table:
        raise ValueError(f"no {split} images to judge")
    erm_worst = min(table, key=lambda g: table[g]["erm"])
    new_worst = min(table, key=lambda g: table[g][method])
    smallest = min(table, key=lambda g: table[g]["count"])
    change = table[new_worst][method] - table[erm_worst]["erm"]
    low, high = _paired_bootstrap(before, after, seed)
    enough = table[smallest]["count"] >= MIN_GROUP_IMAGES
    masked_nothing = masked_fraction == 0
    call = "inconclusive" if not enough or masked_nothing or low <= 0 <= high else ("improved" if low > 0 else "worse")
    if call == "improved" and fit_on_split:
        call = "inconclusive"

    def interval(model: str, name: str) -> list[float]:
        return list(wilson_interval(round(table[name][model] * table[name]["count"]), table[name]["count"]))

    mean_before = sum(t["erm"] for t in table.values()) / len(table)
    mean_after = sum(t[method] for t in table.values()) / len(table)
    out = {
        "method": method, "split": split, "metric": f"worst_{subset}_accuracy", "call": call, "fitted_on_split": fit_on_split,
        "improved": call == "improved", "erm": table[erm_worst]["erm"], method: table[new_worst][method],
        "change": change, "erm_worst": erm_worst, f"{method}_worst": new_worst,
        "erm_interval": interval("erm", erm_worst), f"{method}_interval": interval(method, new_worst),
        "change_interval": [low, high], "interval_method": f"95%: Wilson per {subset}; change: paired bootstrap "
        f"over {split} images within each {subset}, {BOOTSTRAP_RESAMPLES} resamples",
        "smallest": smallest, "smallest_count": table[smallest]["count"], "min_count_for_a_call": MIN_GROUP_IMAGES,
        f"{subset}_mean": {"erm": mean_before, method: mean_after},
        f"per_{subset}": table,
    }
    if method == "masktune":
        out["masked_pixel_fraction"] = masked_fraction
    what = f"{split} worst-{subset} accuracy"
    figures = (f"{table[erm_worst]['erm']:.3f} [{out['erm_interval'][0]:.2f}, {out['erm_interval'][1]:.2f}] -> "
               f"{table[new_worst][method]:.3f} [{out[f'{method}_interval'][0]:.2f}, {out[f'{method}_interval'][1]:.2f}], "
               f"change {change:+.3f}")
    spread = f"(95% interval {low:+.2f} to {high:+.2f})"
    masked = f" It masked {masked_fraction:.1%} of the training pixels." if masked_fraction is not None else ""
    if call == "improved":
        out["message"] = f"{label} raised {what}: {figures} {spread}."
    elif call == "worse":
        out["message"] = f"Warning: {label} lowered {what}: {figures} {spread}.{masked} {_WORSE_HINT[method]}"
    else:
        if masked_nothing:
            why = "MaskTune masked none of the training pixels, so it had no shortcut to remove"
        elif not enough:
            why = (f"the smallest {split} {subset} ({smallest}) has {table[smallest]['count']} images, too few to "
                   f"decide on (at least {MIN_GROUP_IMAGES} per {subset} are needed)")
        elif fit_on_split and low > 0:
            why = (f"{label} was fitted on these {split} images, so its gain on them is no evidence; a test split "
                   "would show whether it holds")
        else:
            why = "the interval of the change includes zero"
        others = ", ".join(f"{name} {t['erm']:.3f}->{t[method]:.3f} ({t['count']})" for name, t in table.items())
        out["message"] = (
            f"Inconclusive: {why}. {what[0].upper() + what[1:]} {figures}; the difference could be anywhere from "
            f"{low:+.2f} to {high:+.2f}. What the data does show: mean {subset} accuracy {mean_before:.3f} -> "
            f"{mean_after:.3f}; per {subset} (images): {others}.{masked} Both models are in the artifacts "
            f"({artifact}: {label}, erm.safetensors: ERM); a larger validation split "
            f"(data.val_fraction) would settle it.")
    return out


def recommend(by_method: dict[str, dict]) -> dict:
    """Which model to use, from the verdicts of each method against ERM (same split and metric).

    A method whose call is ``improved`` is recommended (the highest worst-subset accuracy among them), with
    ``call: improved``. When every method is ``worse``, ERM is, with ``call: worse``. Otherwise nothing is
    established (``call: inconclusive``) and the advice rests on what the data shows: the method not called
    worse whose worst-subset point estimate is highest, if it is above ERM's (the better bet, said as one),
    else ERM -- never ERM against a method that looks better on a tie the data cannot decide."""
    improved = {m: v for m, v in by_method.items() if v["call"] == "improved"}
    first = next(iter(by_method.values()))
    subset = first["metric"].split("_")[1]
    what = f"{first['split']} worst-{subset} accuracy"

    def figures(m: str) -> str:
        v = by_method[m]
        low, high = v["change_interval"]
        return f"{LABELS[m]} {v['erm']:.3f} -> {v[m]:.3f} (change 95% interval {low:+.2f} to {high:+.2f})"

    def chosen(method: str, call: str, why: str) -> dict:
        return {"method": method, "artifact": rf.MODEL_ARTIFACTS[method], "call": call, "why": why}

    if improved:
        best = max(improved, key=lambda m: improved[m][m])
        others = [m for m in improved if m != best]
        return chosen(best, "improved", f"{LABELS[best]} raised {what} over ERM: {figures(best)}"
                      + (f"; the highest of the improved methods ({', '.join(figures(m) for m in others)})" if others else "")
                      + ".")
    calls = ", ".join(f"{figures(m)}: {v['call']}" for m, v in by_method.items())
    if all(v["call"] == "worse" for v in by_method.values()):
        return chosen("erm", "worse", f"Every method lowered {what} ({calls}): ERM is the best model here.")
    # A method fitted on the judged images (DFR on val) looks better there than it is: not a bet on them.
    undecided = [m for m, v in by_method.items() if v["call"] != "worse" and not v.get("fitted_on_split")]
    leader = max(undecided, key=lambda m: by_method[m][m], default=None)
    v = by_method.get(leader)
    if v is not None and v[leader] > v["erm"]:
        means = v[f"{subset}_mean"]
        return chosen(leader, "inconclusive", (
            f"Inconclusive: no method is shown to raise {what} over ERM ({calls}). On what the data shows, "
            f"{LABELS[leader]} is the better bet: its worst-{subset} estimate is {v[leader]:.3f} vs ERM's {v['erm']:.3f}, "
            f"and its mean {subset} accuracy {means[leader]:.3f} vs {means['erm']:.3f}; a likely gain, not a proven one "
            "(ERM's model is erm.safetensors). A larger validation split (data.val_fraction) would settle it."))
    return chosen("erm", "inconclusive", (
        f"Inconclusive: no method is shown to change {what} ({calls}), and none has a point estimate above ERM's "
        "on images it was not fitted on: ERM stays the default, on the estimates, not on a proven difference. A "
        "larger validation split (data.val_fraction), or a test split, would settle it."))


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
    """ERM beside each method, one row per split and metric, for the terminal."""
    methods = metrics.get("methods", ["masktune"])
    lines = [f"{'split':<6} {'metric':<26} {'ERM':>7}" + "".join(f" {LABELS[m]:>9}" for m in methods)]
    for split, erm in metrics["erm"].items():
        keys = ["overall_accuracy"]
        keys += ["worst_group_accuracy", "group_mean_accuracy"] if "worst_group_accuracy" in erm else ["worst_class_accuracy"]
        for key in keys:
            lines.append(f"{split:<6} {key:<26} {erm[key]:>7.3f}" + "".join(f" {metrics[m][split][key]:>9.3f}" for m in methods))
    lines.append(metrics["verdict"]["message"])
    return "\n".join(lines)


def headline(metrics: dict) -> dict:
    """The few numbers a job listing shows (the verdict, overall and worst group or class per split, per model)."""
    keys = ("overall_accuracy", "worst_group_accuracy", "worst_group", "worst_class_accuracy", "worst_class")
    methods = metrics.get("methods", ["masktune"])

    def pick(m: dict) -> dict:
        return {k: m[k] for k in keys if k in m}

    return {
        "verdict": metrics["verdict"],
        "methods": methods,
        **{name: {split: pick(m) for split, m in metrics[name].items()} for name in ["erm", *methods]},
    }
