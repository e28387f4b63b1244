"""report.png: each model's accuracy per group (else per class) on val and test with 95% Wilson intervals,
and the risk-coverage curve of selective classification when the run computed it."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import runfolder as rf
from .metrics import LABELS, wilson_interval

_SPLITS = ("val", "test")


def _subset_table(split_metrics: dict) -> tuple[str, dict]:
    return ("group", split_metrics["per_group"]) if "per_group" in split_metrics else ("class", split_metrics["per_class"])


def render_report(metrics: dict, path: Path) -> None:
    """Write report.png (atomically) from metrics.json's content."""
    models = ["erm", *metrics.get("methods", ["masktune"])]
    splits = [s for s in _SPLITS if s in metrics["erm"]]
    selective = [r for r in metrics.get("selective", {}).get("by_coverage", []) if r["selective_accuracy"] is not None]
    panels = len(splits) + bool(selective)
    subsets = max(len(_subset_table(metrics["erm"][s])[1]) for s in splits)
    figure = Figure(figsize=(max(6.0, 1.2 + subsets * (0.35 * len(models) + 0.5)), 3.4 * panels), dpi=100,
                    layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(panels, 1, squeeze=False)[:, 0]
    width = 0.8 / len(models)
    for ax, split in zip(axes, splits):
        kind, names = _subset_table(metrics["erm"][split])
        for i, model in enumerate(models):
            table = _subset_table(metrics[model][split])[1]
            accuracy = [table[n]["accuracy"] for n in names]
            bounds = [wilson_interval(round(table[n]["accuracy"] * table[n]["count"]), table[n]["count"]) for n in names]
            below = [max(0.0, a - low) for a, (low, _) in zip(accuracy, bounds)]  # 0, not -1e-17, at the edges
            above = [max(0.0, high - a) for a, (_, high) in zip(accuracy, bounds)]
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(names))]
            ax.bar(xs, accuracy, width, yerr=[below, above], capsize=3, label=LABELS[model])
        counts = [metrics["erm"][split][f"per_{kind}"][n]["count"] for n in names]
        ax.set_xticks(range(len(names)), [f"{n}\n({c} images)" for n, c in zip(names, counts)], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        fitted = " (DFR's last layer was fitted on these images)" if split == "val" and "dfr" in models else ""
        ax.set_title(f"{split}: accuracy per {kind}, 95% Wilson intervals{fitted}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    if selective:
        ax = axes[-1]
        risk = [1 - r["selective_accuracy"] for r in selective]
        ax.plot([r["coverage"] for r in selective], risk, marker="o")
        ax.set_ylim(0, max(risk) * 1.1 + 0.01)
        ax.set_xlabel("coverage (share of test images answered)")
        ax.set_ylabel("risk (error rate)")
        ax.set_title(f"selective classification on test: {metrics['selective']['confidence']}")
        ax.grid(alpha=0.3)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=len(models), fontsize=9)
    recommended = metrics["verdict"].get("recommended")
    if recommended:
        figure.suptitle(f"recommended: {LABELS[recommended['method']]} ({recommended['artifact']}), call "
                        f"'{recommended['call']}' on {metrics['verdict']['split']}", fontsize=10)
    with rf.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
