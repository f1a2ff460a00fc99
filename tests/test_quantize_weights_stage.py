"""The quantize-weights stage's checks and log, run in a temporary project on an untrained LeNet."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.arrays import CifarArrays, save_arrays
from pipeline.data import CLASS_NAMES
from pipeline.graph.capture import capture
from pipeline.io import save_checkpoint
from pipeline.models import build_model
from pipeline.quant.weights import quantize_model_weights
from pipeline.transforms import SEED_MEAN, SEED_STD
from pipeline.weights_file import load_quantized_weights
from stages import quantize_weights as quantize_weights_stage
from tests.project_copy import PROJECT_ROOT, run_graph_stage, set_params

NET_LAYERS = "conv1, conv2, fc1, fc2, fc3"


def make_project(root: Path, state_dict: dict[str, torch.Tensor] | None = None, num_images: int = 0) -> Path:
    """params.yaml, a checkpoint of the untrained LeNet (or of ``state_dict``) and ``num_images`` random training
    images (none: no data/dataset.npz at all)."""
    (root / "data").mkdir()
    shutil.copy(PROJECT_ROOT / "params.yaml", root / "params.yaml")
    save_checkpoint(root / "data" / "model.pt", {"model": "net", "mean": list(SEED_MEAN), "std": list(SEED_STD),
                                                 "state_dict": state_dict or build_model("net", seed=0).state_dict()})
    if num_images:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (num_images + 10, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, num_images + 10, dtype=np.int64)
        save_arrays(CifarArrays(images[:num_images], labels[:num_images], images[num_images:], labels[num_images:],
                                CLASS_NAMES), root / "data" / "dataset.npz")
    run_graph_stage(root)
    return root


def run_stage(project: Path, monkeypatch: pytest.MonkeyPatch, **weights: object) -> dict:
    """quantize-weights with these quantize_weights params; the weights' meta."""
    set_params(project, {"quantize_weights": weights})
    monkeypatch.chdir(project)
    quantize_weights_stage.main()
    return load_quantized_weights(project / "data" / "weights_int8.npz")[1]


def test_a_bits_mapping_that_leaves_out_layers_fails_naming_them_before_any_work(tmp_path, monkeypatch):
    project = make_project(tmp_path)  # no dataset: the check needs the model's layers only
    with pytest.raises(SystemExit) as failure:
        run_stage(project, monkeypatch, bits={"conv1": 8, "conv2": 4})
    assert str(failure.value) == (
        "[quantize-weights] quantize_weights.bits: weight bits per layer: missing layers fc1, fc2, fc3; allowed: one "
        f"width for every layer, or one for each of the model's layers {NET_LAYERS}")
    assert not (project / "data" / "weights_int8.npz").exists()


def test_a_bits_mapping_with_an_unknown_layer_names_only_that(tmp_path, monkeypatch):
    project = make_project(tmp_path)
    with pytest.raises(SystemExit) as failure:
        run_stage(project, monkeypatch, bits={"conv1": 8, "conv2": 4, "fc1": 4, "fc2": 4, "fc3": 4, "fc9": 2})
    assert str(failure.value) == (
        "[quantize-weights] quantize_weights.bits: weight bits per layer: unknown layers fc9; allowed: one width for "
        f"every layer, or one for each of the model's layers {NET_LAYERS}")


def test_weights_whose_calibration_range_is_zero_are_named_in_a_warning(tmp_path, monkeypatch, caplog):
    state = build_model("net", seed=0).state_dict()
    state["fc3.weight"][[2, 7]] = 0.0  # two output channels pruned
    state["conv1.weight"][:] = 0.0  # a dead layer
    project = make_project(tmp_path, state)
    with caplog.at_level(logging.WARNING):
        run_stage(project, monkeypatch, granularity="per_channel")
    assert [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING] == [
        "conv1: weight calibration range 0 (its weights are all 0): scale 1.0 used",
        "fc3: weight calibration range 0 in output channels 2, 7 of 10 (their weights are all 0): scale 1.0 used for them"]
    with caplog.at_level(logging.WARNING):
        run_stage(project, monkeypatch, granularity="per_tensor")
    assert caplog.records[-1].getMessage() == (
        "conv1: weight calibration range 0 (its weights are all 0): scale 1.0 used")


def test_adaround_keeps_round_to_nearest_where_it_reconstructs_better_and_says_so(tmp_path, monkeypatch, caplog):
    project = make_project(tmp_path, num_images=64)
    # One Adam step with a huge learning rate: a rounding learned that badly reconstructs worse than nearest.
    with caplog.at_level(logging.INFO):
        meta = run_stage(project, monkeypatch, bits=4, rounding="adaround",
                         adaround={"iterations": 1, "lr": 10.0, "batch_size": 8}, calibration={"num_samples": 32})
    errors = meta["reconstruction_error"]
    assert {error["kept"] for error in errors.values()} == {"nearest", "adaround"}
    quantized, _ = load_quantized_weights(project / "data" / "weights_int8.npz")
    nearest = quantize_model_weights(capture(build_model("net", seed=0).eval()), 4, "sigma", "per_tensor")
    messages = [record.getMessage() for record in caplog.records]
    for name, error in errors.items():
        learned_better = error["adaround"] <= error["nearest"]
        assert error["kept"] == ("adaround" if learned_better else "nearest")
        if not learned_better:
            assert torch.equal(quantized[name][0], nearest[name][0]), name
        kept = "learned rounding" if learned_better else "round-to-nearest"
        assert (f"{name:<6} reconstruction error: nearest {error['nearest']:.4g}, adaround {error['adaround']:.4g}: "
                f"kept {kept}") in messages
