"""The results table: test accuracy per stage with the quantization settings and the dataset, as Markdown.

One row per run, from the content of its ``data/metrics.json``. The plot stage writes it to
``data/results.md``; ``python -m orchestration.report`` prints it for metrics files, git revisions
and DVC experiments.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

# No torch or matplotlib here: `python -m orchestration.report` prints a table in well under a second.

# The accuracy stages of metrics.json, in pipeline order. The keys name what ran, never a width, so that
# `dvc metrics diff` lines up runs of different bits key by key; the labels people read name the widths.
STAGES = ("fp32", "weights_only", "integer")
# metrics.json of revisions from before the keys lost their width: read under today's keys.
LEGACY_STAGE_KEYS = {"weights_int8": "weights_only", "full_int8": "integer"}
DELTA = "delta"  # the row's integer - fp32, in points (the accuracy table's "drop" has the other sign)
TEXT_COLUMNS = ("run", "dataset", "weights", "activations")


def _widths(bits: int | Mapping[str, int]) -> str:
    """'8' for one width, '2-8' for the range of widths per layer (mixed precision), '4' when they are equal."""
    if not isinstance(bits, Mapping):
        return str(bits)
    low, high = min(bits.values()), max(bits.values())
    return str(low) if low == high else f"{low}-{high}"


def bits_label(bits: int | Mapping[str, int]) -> str:
    """'int8' for one width, 'int2-8 per layer' for widths per layer (mixed precision)."""
    return f"int{_widths(bits)}" + (" per layer" if isinstance(bits, Mapping) else "")


def stage_labels(quantization: Mapping[str, Any]) -> dict[str, str]:
    """Each stage's label with the widths metrics.json's ``quantization`` records: 'fp32', 'W2 weights only',
    'W2A4 integer' (weights at 2 bits, activations at 4; 'W2-8' for widths per layer; revisions from before
    activation_bits: A8)."""
    weights = f"W{_widths(quantization['weight_bits'])}"
    return {"fp32": "fp32", "weights_only": f"{weights} weights only",
            "integer": f"{weights}A{quantization.get('activation_bits', 8)} integer"}


def stage_accuracies(accuracy: Mapping[str, float]) -> dict[str, float]:
    """metrics.json's accuracy of each of ``STAGES``, by stage (older revisions' keys renamed); a ValueError
    names the stages it lacks."""
    renamed = {LEGACY_STAGE_KEYS.get(key, key): value for key, value in accuracy.items()}
    missing = [stage for stage in STAGES if stage not in renamed]
    if missing:
        raise ValueError(f"metrics accuracy lacks stages {missing}; it has {sorted(accuracy)}")
    return {stage: renamed[stage] for stage in STAGES}


def weight_methods(quantization: Mapping[str, Any]) -> list[str]:
    """The weight methods beyond round-to-nearest that metrics.json's ``quantization`` records, in the order they ran.

    Metrics of revisions from before these keys existed were unequalized, round-to-nearest, uncorrected.
    """
    return (["equalized"] if quantization.get("equalize") else []) + (
        ["adaround"] if quantization.get("weight_rounding") == "adaround" else []) + (
        ["bias-corrected"] if quantization.get("bias_correction") else [])


def activations_label(quantization: Mapping[str, Any]) -> str:
    """'int8', or 'int4/uint4' when non-negative tensors use the unsigned range (revisions from before: int8)."""
    bits = quantization.get("activation_bits", 8)
    return f"int{bits}/uint{bits}" if quantization.get("unsigned_activations") else f"int{bits}"


def dataset_label(dataset: Mapping[str, str]) -> str:
    """The dataset source in a few words: 'official archive' or the local file name, with its format."""
    source = dataset["source"]
    name = "official archive" if source == "official" else Path(source).name
    return f"{name} ({dataset['format']})"


def results_row(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One run's row: dataset, quantization settings, accuracy per stage (%) and integer - fp32 (points), by key."""
    q, accuracy = metrics["quantization"], stage_accuracies(metrics["accuracy"])
    return {
        "dataset": dataset_label(metrics["dataset"]),
        "weights": " ".join([bits_label(q["weight_bits"]), q["weight_calibrator"], q["granularity"], *weight_methods(q)]),
        "activations": f"{activations_label(q)} {q['activation_calibrator']} ({q['calibration_images']} images)",
        **accuracy,
        DELTA: round(accuracy["integer"] - accuracy["fp32"], 2),
    }


def column_titles(quantizations: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The accuracy columns' titles: a stage's label with its widths when every run has the same ('W2A4
    integer (%)'), else the stage alone ('integer (%)'; each row's weights and activations columns say them)."""
    labels = [stage_labels(q) for q in quantizations]
    shared = {stage: labels[0][stage] if all(label[stage] == labels[0][stage] for label in labels)
              else stage.replace("_", " ") for stage in STAGES}
    return {stage: f"{shared[stage]} (%)" for stage in STAGES} | {DELTA: f"{shared['integer']} - fp32 (pts)"}


def results_table(runs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per run (label -> metrics.json content), in the given order."""
    rows = pd.DataFrame([{"run": label, **results_row(metrics)} for label, metrics in runs.items()])
    return rows.rename(columns=column_titles([metrics["quantization"] for metrics in runs.values()]))


def results_markdown(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """``results_table`` as a Markdown table (needs ``tabulate``), accuracies to 2 decimals, the delta signed."""
    table = results_table(runs)
    formats = ["" if name in TEXT_COLUMNS else "+.2f" if name.endswith("(pts)") else ".2f" for name in table.columns]
    return table.to_markdown(index=False, floatfmt=formats)
