"""`dvc repro` for real, in a temporary git repo, on a tiny image-folder dataset."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.params import DownloadParams
from tests.project_copy import (
    ALL_STAGES,
    PROJECT_ROOT,
    ran_stages,
    run,
    set_params,
    tiny_project_copy,
)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return tiny_project_copy(tmp_path_factory.mktemp("dvc"))


# Four real `dvc repro` runs of the whole pipeline (and a forced train): about 2 minutes, so CI runs it with `slow`.
@pytest.mark.slow
def test_repro_runs_every_stage_then_nothing_then_only_what_a_param_change_touches(project):
    first = run(["dvc", "repro"], project)
    assert ran_stages(first.stdout) == ALL_STAGES
    metrics = json.loads((project / "data/metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"fp32", "weights_only", "integer", "simulated", "onnx_qlinear", "onnx_integer", "c",
                                        "tflite_int8"}
    assert all(0.0 <= value <= 100.0 for value in metrics["accuracy"].values())
    assert metrics["agreement"]["engine_vs_simulated"] >= 90.0
    # The exported C and integer ONNX models compute the engine's logits exactly.
    assert metrics["mismatches"]["c_logits"] == 0 and metrics["mismatches"]["onnx_integer_logits"] == 0
    assert metrics["mismatches"]["tflite_logits"] == 0  # data/export/model.tflite in TensorFlow Lite Micro
    assert metrics["accuracy"]["c"] == metrics["accuracy"]["integer"]
    profile = json.loads((project / "data/profile.json").read_text())
    assert profile["split"] == "train" and len(profile["indices"]) == 40
    assert metrics["test_images"] == 30
    manifest = json.loads((project / "data/dataset_manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 80

    second = run(["dvc", "repro"], project)
    assert ran_stages(second.stdout) == set()
    assert "Data and pipelines are up to date" in second.stdout

    forced = run(["dvc", "repro", "--force", "--single-item", "train"], project)
    assert ran_stages(forced.stdout) == {"train"}
    after_forced = run(["dvc", "repro"], project)
    # Same weights, same checkpoint bytes, same curves: nothing downstream re-runs.
    assert ran_stages(after_forced.stdout) == set()

    set_params(project, {"quantize_weights": {"sigma": {"k": 2.5}}, "sensitivity": {"sigma": {"k": 2.5}}})
    third = run(["dvc", "repro"], project)
    # The sensitivity measures quantize-weights' weight quantizer (its own keys, kept equal), so it re-runs too.
    assert ran_stages(third.stdout) == {"check-params", "sensitivity", "quantize-weights", "quantize-biases", "export",
                                        "evaluate", "plot"}

    # AdaRound and bias correction at 4 bits, 8 for the first and last layers (a few steps on the tiny data): the
    # same stages, and the C and integer ONNX proofs hold with the learned integers and the corrected biases.
    mixed_bits = {"conv1": 8, "conv2": 4, "fc1": 4, "fc2": 4, "fc3": 8}
    set_params(project, {"quantize_weights": {"rounding": "adaround", "bits": mixed_bits, "bias_correction": True,
                                              "adaround": {"iterations": 20, "batch_size": 8},
                                              "calibration": {"num_samples": 40}}})
    learned = run(["dvc", "repro"], project)
    assert ran_stages(learned.stdout) == {"check-params", "quantize-weights", "quantize-biases", "export", "evaluate", "plot"}
    metrics = metrics_after(project)
    assert metrics["quantization"]["weight_rounding"] == "adaround" and metrics["quantization"]["weight_bits"] == mixed_bits
    assert metrics["quantization"]["bias_correction"] is True
    assert metrics["mismatches"]["c_logits"] == 0 and metrics["mismatches"]["onnx_integer_logits"] == 0
    assert metrics["mismatches"]["tflite_logits"] == 0  # data/export/model.tflite in TensorFlow Lite Micro

    # Cross-layer equalization with 4-bit full-range activations, AdaRound learning from them: the graph stage
    # equalizes, and every stage after it reads the equalized graph, so they re-run too; the proofs hold.
    set_params(project, {"profile": {"activation_bits": 4, "unsigned_activations": True}, "graph": {"equalize": True},
                         "quantize_weights": {"adaround": {"quantized_activations": True}}})
    equalized = run(["dvc", "repro"], project)
    assert ran_stages(equalized.stdout) == ALL_STAGES - {"download", "train"}
    metrics = metrics_after(project)
    assert metrics["quantization"]["equalize"] is True
    assert (metrics["quantization"]["activation_bits"], metrics["quantization"]["unsigned_activations"]) == (4, True)
    assert metrics["mismatches"]["c_logits"] == 0 and metrics["mismatches"]["onnx_integer_logits"] == 0
    assert metrics["mismatches"]["tflite_logits"] == 0  # data/export/model.tflite in TensorFlow Lite Micro

    # Mixed precision from the sensitivity stage at the uniform-W4 size: graph, profile and sensitivity come back
    # from the run-cache (their params and deps are those of a run before), quantize-weights and after re-run.
    set_params(project, {"profile": {"activation_bits": 8, "unsigned_activations": False}, "graph": {"equalize": False},
                         "quantize_weights": {"rounding": "nearest", "bits": 8, "bias_correction": False,
                                              "adaround": {"quantized_activations": False},
                                              "size_budget_fraction": 0.5}})
    budgeted = run(["dvc", "repro"], project)
    assert ran_stages(budgeted.stdout) == {"check-params", "quantize-weights", "quantize-biases", "export", "evaluate", "plot"}
    metrics = metrics_after(project)
    chosen = metrics["quantization"]["weight_bits"]
    sizes = json.loads((project / "data" / "sensitivity.json").read_text())["num_weights"]
    assert sum(math.ceil(sizes[layer] * bits / 8) for layer, bits in chosen.items()) <= sum(sizes.values()) // 2
    assert metrics["mismatches"]["c_logits"] == 0 and metrics["mismatches"]["onnx_integer_logits"] == 0
    assert metrics["mismatches"]["tflite_logits"] == 0  # data/export/model.tflite in TensorFlow Lite Micro

    set_params(project, {"train": {"epochs": 2}})
    fourth = run(["dvc", "repro"], project)
    assert ran_stages(fourth.stdout) == ALL_STAGES - {"download"}

    shown = run(["dvc", "metrics", "show"], project).stdout
    assert max(map(len, shown.splitlines())) <= 160, shown  # the accuracy table, readable in a wide terminal
    header = shown.splitlines()[0].split()
    assert header == ["Path", "c", "c_mismatches", "drop", "fp32", "integer", "onnx_qlinear", "packed_bytes",
                      "tflite_int8", "tflite_mismatches", "weights_only"]
    accuracy = json.loads((project / "data/accuracy.json").read_text())
    assert accuracy["fp32"] == metrics_after(project)["accuracy"]["fp32"]
    # The details stay tracked, one command away.
    assert "per_class_accuracy.fp32.airplane" in run(["dvc", "metrics", "show", "data/metrics.json"], project).stdout


def metrics_after(project):
    return json.loads((project / "data/metrics.json").read_text())


def test_bad_param_fails_before_work_and_leaves_no_output(project):
    set_params(project, {"train": {"epochs": -1}})
    (project / "data/model.pt").unlink(missing_ok=True)
    try:
        result = run(["dvc", "repro", "train"], project, check=False)
        assert result.returncode != 0
        assert "train.epochs: value -1 is out of range; allowed: >= 0" in result.stdout + result.stderr
        assert not (project / "data/model.pt").exists()
    finally:
        set_params(project, {"train": {"epochs": 2}})


@pytest.mark.slow
def test_a_misspelled_section_fails_repro_and_exp_run_even_when_no_stage_would_run(project):
    run(["dvc", "repro"], project)  # everything up to date first
    params = project / "params.yaml"
    original = params.read_text()
    message = ("trian: unknown section; allowed sections: download, train, graph, profile, sensitivity, quantize_weights, "
               "quantize_biases, evaluate")
    try:
        params.write_text(original + "trian:\n  epochs: 5\n")
        result = run(["dvc", "repro"], project, check=False)
        assert result.returncode != 0 and message in result.stdout + result.stderr
        params.write_text(original)
        # DVC adds a new key only with "+"; check-params then rejects it.
        result = run(["dvc", "exp", "run", "-S", "+trian.epochs=5"], project, check=False)
        assert result.returncode != 0 and message in result.stdout + result.stderr
    finally:
        params.write_text(original)


DOWNLOAD_DEPS = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]["download"]["deps"]


def test_the_download_stage_depends_on_its_source():
    # DVC re-runs a stage only for a changed dep or param: the source's files must be a dep (the slow test below).
    assert "${download.source}" in DOWNLOAD_DEPS


def test_the_default_download_source_resolves_as_a_dependency():
    # DVC fails a stage whose dep is missing, so the keyword `official` must name a file of the project too.
    assert (PROJECT_ROOT / DownloadParams().source).is_file()


# Four real DVC runs (two of the download stage): about 40 s on a loaded 2-core machine, so CI runs it with `slow`.
@pytest.mark.slow
def test_a_changed_file_of_a_local_folder_source_reruns_download(tmp_path):
    project = tiny_project_copy(tmp_path)
    source = tmp_path / "tiny-cifar"
    assert ran_stages(run(["dvc", "repro", "download"], project).stdout) == {"download"}
    before = json.loads((project / "data/dataset_manifest.json").read_text())
    assert ran_stages(run(["dvc", "repro", "download"], project).stdout) == set()

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(source / "train" / "cat" / "0000.png")
    status = run(["dvc", "status", "download"], project).stdout
    assert re.search(rf"modified: +{re.escape(str(source))}$", status, re.MULTILINE), status
    assert ran_stages(run(["dvc", "repro", "download"], project).stdout) == {"download"}
    after = json.loads((project / "data/dataset_manifest.json").read_text())
    assert after["checksum"]["value"] != before["checksum"]["value"]
    assert after["decoded_sha256"]["train_images"] != before["decoded_sha256"]["train_images"]


USER_MODEL = '''import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.body(x))
        return self.fc(x.mean((2, 3)))


def build():
    return Residual()
'''


# Three real `dvc repro` runs of a user's model file (about a minute), so CI runs it with `slow`.
@pytest.mark.slow
def test_a_users_model_file_is_quantized_end_to_end_and_editing_it_retrains(tmp_path):
    project = tiny_project_copy(tmp_path)
    (project / "models" / "mine.py").write_text(USER_MODEL)
    set_params(project, {"train": {"model": "models/mine.py:build", "epochs": 1}})
    first = run(["dvc", "repro"], project)
    assert ran_stages(first.stdout) == ALL_STAGES
    metrics = metrics_after(project)
    assert metrics["mismatches"]["c_logits"] == 0 and metrics["mismatches"]["onnx_integer_logits"] == 0
    assert metrics["mismatches"]["tflite_logits"] == 0  # data/export/model.tflite in TensorFlow Lite Micro
    assert list(metrics["sqnr_db"]["outputs"]) == ["stem", "body.0", "fc"]  # the layers of the traced graph

    (project / "models" / "mine.py").write_text(USER_MODEL.replace("width=4", "width=6"))
    second = run(["dvc", "repro"], project)
    assert {"train", "profile", "quantize-weights", "quantize-biases"} <= ran_stages(second.stdout)

    (project / "models" / "mine.py").write_text(USER_MODEL.replace("F.relu(self.stem(x))", "self.stem(x).sigmoid()"))
    (project / "data/model.pt").unlink()
    failed = run(["dvc", "repro", "train"], project, check=False)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "node 'sigmoid' (method .sigmoid()) is not supported" in output
    assert "supported: Conv2d" in output and not (project / "data/model.pt").exists()
    assert "training models/mine.py:build" not in output  # it failed before training
