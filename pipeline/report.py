"""The results table: test accuracy per stage with the quantization settings and the dataset, as Markdown.

    python -m pipeline.report data/metrics.json [more metrics files, git revisions or DVC experiment names ...]

prints one row per argument. An argument that is not a file is read as a
revision: data/metrics.json at that git commit, branch, tag or DVC experiment.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

# No torch or matplotlib here: the command line prints a table in well under a second.

METRICS_PATH = "data/metrics.json"  # the evaluate stage's output, read at a revision
STAGES = ("fp32", "weights_int8", "full_int8")  # the accuracy stages of metrics.json, in pipeline order
TEXT_COLUMNS = ("run", "dataset", "weights", "activations")
DELTA_COLUMN = "full_int8 - fp32 (pts)"


def bits_label(bits: int | Mapping[str, int]) -> str:
    """'int8' for one width, 'int2-8 per layer' for widths per layer (mixed precision)."""
    if not isinstance(bits, Mapping):
        return f"int{bits}"
    low, high = min(bits.values()), max(bits.values())
    return f"int{low} per layer" if low == high else f"int{low}-{high} per layer"


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
    """One run's row: dataset, quantization settings, accuracy per stage (%) and the full-int8 drop (points)."""
    q, accuracy = metrics["quantization"], metrics["accuracy"]
    missing = [stage for stage in STAGES if stage not in accuracy]
    if missing:
        raise ValueError(f"metrics accuracy lacks stages {missing}; it has {sorted(accuracy)}")
    return {
        "dataset": dataset_label(metrics["dataset"]),
        "weights": " ".join([bits_label(q["weight_bits"]), q["weight_calibrator"], q["granularity"], *weight_methods(q)]),
        "activations": f"{activations_label(q)} {q['activation_calibrator']} ({q['calibration_images']} images)",
        **{f"{stage} (%)": accuracy[stage] for stage in STAGES},
        DELTA_COLUMN: round(accuracy["full_int8"] - accuracy["fp32"], 2),
    }


def results_table(runs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per run (label -> metrics.json content), in the given order."""
    return pd.DataFrame([{"run": label, **results_row(metrics)} for label, metrics in runs.items()])


def results_markdown(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """``results_table`` as a Markdown table (needs ``tabulate``), accuracies to 2 decimals, the drop signed."""
    table = results_table(runs)
    formats = ["" if name in TEXT_COLUMNS else "+.2f" if name == DELTA_COLUMN else ".2f" for name in table.columns]
    return table.to_markdown(index=False, floatfmt=formats)


def load_metrics(source: str) -> dict[str, Any]:
    """metrics.json from a file path, or data/metrics.json at a git revision or DVC experiment name."""
    if Path(source).is_file():
        return json.loads(Path(source).read_text())
    import dvc.api  # imported here: it takes about a second, and files need none of it
    from dvc.exceptions import DvcException

    try:
        metrics = dvc.api.metrics_show(METRICS_PATH, rev=source)
    except DvcException as error:
        raise ValueError(f"{source!r} is neither a file nor a git revision or DVC experiment: {error}") from None
    if not metrics:
        raise ValueError(f"{source!r} is a revision without {METRICS_PATH}")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    sources = list(sys.argv[1:] if argv is None else argv)
    if not sources:
        print(f"usage: python -m pipeline.report {METRICS_PATH} [more files, revisions or experiments ...]",
              file=sys.stderr)
        return 2
    try:
        runs = {source: load_metrics(source) for source in sources}
    except ValueError as error:
        print(f"pipeline.report: {error}", file=sys.stderr)
        return 1
    print(results_markdown(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
