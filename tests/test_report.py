"""The results table: rows per run, Markdown rendering, the command line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from orchestration.report import main
from pipeline.report import (
    bits_label,
    results_markdown,
    results_table,
    stage_labels,
)
from tests.project_copy import PROJECT_ROOT, run


def metrics(fp32: float, weights_only: float, integer: float, granularity: str = "per_tensor",
            source: str = "official", fmt: str = "binary", weight_bits: int | dict[str, int] = 8) -> dict:
    return {
        "accuracy": {"fp32": fp32, "weights_only": weights_only, "integer": integer, "simulated": integer},
        "quantization": {"weight_bits": weight_bits, "weight_calibrator": "sigma", "granularity": granularity,
                         "weight_rounding": "nearest", "bias_correction": False,
                         "activation_calibrator": "seed", "calibration_images": 2000},
        "dataset": {"source": source, "format": fmt},
    }


def test_table_has_one_row_per_run_with_settings_accuracies_and_the_drop():
    table = results_table({
        "seed rule": metrics(52.77, 52.5, 52.4),
        "per channel": metrics(52.77, 52.7, 52.6, "per_channel", "/data/cifar10-jpeg.tar.gz", "image-folder"),
    })
    assert table["run"].tolist() == ["seed rule", "per channel"]
    assert table.loc[1, "dataset"] == "cifar10-jpeg.tar.gz (image-folder)"
    assert table.loc[0, "dataset"] == "official archive (binary)"
    assert table.loc[1, "weights"] == "int8 sigma per_channel"
    assert table.loc[0, "activations"] == "int8 seed (2000 images)"
    assert table[["fp32 (%)", "W8 weights only (%)", "W8A8 integer (%)"]].values.tolist() == [[52.77, 52.5, 52.4],
                                                                                             [52.77, 52.7, 52.6]]
    assert table["W8A8 integer - fp32 (pts)"].tolist() == [-0.37, -0.17]


def test_markdown_renders_the_expected_rows():
    lines = results_markdown({"workspace": metrics(52.77, 52.5, 52.4)}).splitlines()
    assert lines[0].split("|")[1:-1] == [
        " run       ", " dataset                   ", " weights               ", " activations             ",
        "   fp32 (%) ", "   W8 weights only (%) ", "   W8A8 integer (%) ", "   W8A8 integer - fp32 (pts) ",
    ]
    assert [cell.strip() for cell in lines[2].split("|")[1:-1]] == [
        "workspace", "official archive (binary)", "int8 sigma per_tensor", "int8 seed (2000 images)",
        "52.77", "52.50", "52.40", "-0.37",
    ]
    assert len(lines) == 3


def test_bits_label_is_one_width_or_the_range_of_widths_per_layer():
    assert bits_label(8) == "int8"
    assert bits_label({"conv1": 8, "fc1": 4, "fc2": 2}) == "int2-8 per layer"
    assert bits_label({"conv1": 4, "fc1": 4}) == "int4 per layer"


def test_a_run_without_every_stage_is_an_error_naming_what_is_missing():
    incomplete = metrics(52.77, 52.5, 52.4)
    del incomplete["accuracy"]["integer"]
    with pytest.raises(ValueError, match=r"lacks stages \['integer'\]"):
        results_table({"old": incomplete})


def test_command_line_prints_a_row_per_metrics_file(tmp_path, capsys):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(metrics(60.0, 59.0, 58.0)))
    second.write_text(json.dumps(metrics(60.0, 59.9, 59.8, "per_channel")))
    assert main([str(first), str(second)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == [str(first), str(second)]
    assert "+0.00" not in rows[0] and "-2.00" in rows[0] and "-0.20" in rows[1]


def test_command_line_without_arguments_prints_usage():
    result = subprocess.run([sys.executable, "-m", "orchestration.report"], cwd=PROJECT_ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 2 and "usage: python -m orchestration.report data/metrics.json" in result.stderr


def test_an_argument_that_is_not_a_file_is_read_at_that_git_revision(tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "metrics.json").write_text(json.dumps(metrics(60.0, 59.0, 58.0)))
    run(["git", "init", "--quiet", "--initial-branch=main"], tmp_path)
    run(["dvc", "init", "--quiet"], tmp_path)
    run(["git", "add", "--all"], tmp_path)
    run(["git", "commit", "--quiet", "-m", "first run"], tmp_path)
    (tmp_path / "data" / "metrics.json").write_text(json.dumps(metrics(60.0, 59.9, 59.8, "per_channel")))
    monkeypatch.chdir(tmp_path)
    assert main(["data/metrics.json", "HEAD"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["data/metrics.json", "HEAD"]
    assert "per_channel" in rows[0] and "per_tensor" in rows[1]
    assert main(["no-such-revision"]) == 1
    assert "'no-such-revision' is neither a file nor a git revision or DVC experiment" in capsys.readouterr().err


def test_equalization_and_narrow_unsigned_activations_are_named_in_the_row():
    run_metrics = metrics(60.0, 59.0, 58.0)
    run_metrics["quantization"] |= {"equalize": True, "weight_rounding": "adaround", "activation_bits": 4,
                                    "unsigned_activations": True}
    row = results_table({"w4a4": run_metrics}).loc[0]
    assert row["weights"] == "int8 sigma per_tensor equalized adaround"
    assert row["activations"] == "int4/uint4 seed (2000 images)"


def test_column_titles_name_the_widths_of_the_run():
    run_metrics = metrics(60.0, 41.5, 30.25, weight_bits=2)
    run_metrics["quantization"] |= {"activation_bits": 4, "unsigned_activations": True}
    table = results_table({"w2a4": run_metrics})
    assert list(table.columns) == ["run", "dataset", "weights", "activations", "fp32 (%)", "W2 weights only (%)",
                                   "W2A4 integer (%)", "W2A4 integer - fp32 (pts)"]
    assert table.loc[0, "weights"] == "int2 sigma per_tensor"
    assert table.loc[0, "activations"] == "int4/uint4 seed (2000 images)"
    assert table.loc[0, "W2A4 integer - fp32 (pts)"] == -29.75


def test_runs_of_different_widths_share_columns_without_a_width():
    narrow = metrics(60.0, 55.0, 54.0, weight_bits=4)
    table = results_table({"w8a8": metrics(60.0, 59.0, 58.0), "w4a8": narrow})
    assert list(table.columns)[4:] == ["fp32 (%)", "weights only (%)", "integer (%)", "integer - fp32 (pts)"]
    assert table["weights"].tolist() == ["int8 sigma per_tensor", "int4 sigma per_tensor"]
    narrow_activations = metrics(60.0, 59.0, 57.0)
    narrow_activations["quantization"]["activation_bits"] = 4
    table = results_table({"w8a8": metrics(60.0, 59.0, 58.0), "w8a4": narrow_activations})
    assert list(table.columns)[4:] == ["fp32 (%)", "W8 weights only (%)", "integer (%)", "integer - fp32 (pts)"]


def test_stage_labels_name_one_width_or_the_range_per_layer():
    assert stage_labels({"weight_bits": 2, "activation_bits": 4}) == {
        "fp32": "fp32", "weights_only": "W2 weights only", "integer": "W2A4 integer"}
    mixed = stage_labels({"weight_bits": {"conv1": 8, "fc1": 2}, "activation_bits": 8})
    assert (mixed["weights_only"], mixed["integer"]) == ("W2-8 weights only", "W2-8A8 integer")


def test_metrics_from_before_the_keys_lost_their_width_are_read_under_todays_keys():
    old = metrics(60.0, 59.0, 58.0)
    old["accuracy"] = {"fp32": 60.0, "weights_int8": 59.0, "full_int8": 58.0, "simulated_int8": 58.0}
    del old["quantization"]["weight_rounding"]  # an old revision: no activation_bits nor weight methods either
    lines = results_markdown({"old": old, "new": metrics(60.0, 59.5, 59.0)}).splitlines()
    assert [cell.strip() for cell in lines[2].split("|")[5:-1]] == ["60.00", "59.00", "58.00", "-2.00"]
    assert [cell.strip() for cell in lines[3].split("|")[5:-1]] == ["60.00", "59.50", "59.00", "-1.00"]
