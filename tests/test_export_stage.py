"""The export stage and its library entry points: all artifacts, their metrics, their agreement."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.evaluation import export_agreement
from pipeline.export.artifacts import export_integer_model
from pipeline.export.c_build import find_compiler
from pipeline.export.c_model import C_FILES
from pipeline.export_layout import ONNX_FILES, TFLITE_FILE
from pipeline.io import read_json
from pipeline.model_files import save_integer_model
from pipeline.quant.engine import quantize_input, run_integer
from tests.integer_graphs import cifar_model
from tests.test_export_plan import random_images

REPO = Path(__file__).resolve().parents[1]
needs_gcc = pytest.mark.skipif(find_compiler("gcc") is None, reason="needs gcc on PATH")


@needs_gcc
def test_export_integer_model_writes_every_artifact_and_its_sizes(tmp_path):
    metrics = export_integer_model(cifar_model("net", "per_tensor", logits="int8"), tmp_path)
    names = [*ONNX_FILES.values(), *C_FILES, TFLITE_FILE]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names)  # no temporary file left
    assert metrics["artifact_bytes"] == {name: (tmp_path / name).stat().st_size for name in names}
    assert metrics["c"]["static_ram_bytes"] == 5880
    assert metrics["c"]["code_size_bytes"] > metrics["c"]["parameter_bytes"]
    assert 5880 < metrics["tflite"]["tflm_arena_bytes"] < 64 * 1024  # TFLM's plan plus its own records


def test_a_model_the_tflite_cannot_express_fails_before_any_file_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"the logits 'fc3' are int32; TFLite's FULLY_CONNECTED outputs int8"):
        export_integer_model(cifar_model("net", "per_tensor", logits="int32"), tmp_path)
    assert list(tmp_path.iterdir()) == []


@needs_gcc
def test_export_agreement_counts_mismatches(tmp_path):
    model = cifar_model("bnnet", "per_channel", logits="int8")
    export_integer_model(model, tmp_path)
    x = random_images(60, (3, 32, 32), seed=9)
    labels = x.flatten(1).sum(dim=1).gt(0).long()  # any labels: the accuracies must just be consistent
    report = export_agreement(model, tmp_path, x, labels)
    assert report["images"] == 60
    assert report["c_logit_mismatches"] == 0 and report["onnx_integer_logit_mismatches"] == 0
    assert report["tflite_logit_mismatches"] == 0 and report["accuracy"]["tflite_int8"] == report["accuracy"]["engine"]
    assert report["onnx_qlinear_prediction_mismatches"] <= 1
    assert report["accuracy"]["c"] == report["accuracy"]["engine"] == report["accuracy"]["onnx_integer"]
    # The evaluate stage passes the engine logits it already has: the report must not change.
    logits = run_integer(model, quantize_input(x, model.input_scale)).flatten(1)
    assert export_agreement(model, tmp_path, x, labels, engine_logits=logits) == report
    # Logits that are not the engine's are counted as mismatches, so they are really used.
    shifted = export_agreement(model, tmp_path, x, labels, engine_logits=logits + 1)
    assert shifted["c_logit_mismatches"] == shifted["tflite_logit_mismatches"] == 60
    with pytest.raises(ValueError, match="engine_logits holds 59 images but x_normalized 60"):
        export_agreement(model, tmp_path, x, labels, engine_logits=logits[:59])


def test_stage_writes_the_export_folder(tmp_path, monkeypatch):
    from stages import export

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    save_integer_model(cifar_model("net", "per_channel", logits="int8"), tmp_path / "data" / "integer_model.npz")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-compiler"))  # the sources are written without a compiler
    export.main()
    metrics = read_json(tmp_path / "data" / "export" / "export_metrics.json")
    assert set(metrics["artifact_bytes"]) == {*ONNX_FILES.values(), *C_FILES, TFLITE_FILE}
    assert metrics["c"]["compiler"] is None and metrics["c"]["static_ram_bytes"] == 5880
