"""The sensitivity stage and a quantize-weights size budget, run in a temporary project on synthetic data."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.arrays import CifarArrays, save_arrays
from pipeline.data import CLASS_NAMES
from pipeline.io import read_json, save_checkpoint
from pipeline.models import build_model
from pipeline.quant.mixed_precision import packed_model_bytes
from pipeline.transforms import SEED_MEAN, SEED_STD
from pipeline.weights_file import load_quantized_weights
from stages import quantize_weights as quantize_weights_stage
from stages import sensitivity as sensitivity_stage
from tests.project_copy import PROJECT_ROOT, run_graph_stage, set_params

NET_WEIGHTS = {"conv1": 450, "conv2": 2400, "fc1": 48000, "fc2": 10080, "fc3": 840}
WIDTHS = [2, 4, 8]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder with params.yaml, a checkpoint of the untrained LeNet, 64 random training images, and the
    sensitivity stage's outputs at 2, 4 and 8 bits on 48 of them."""
    root = tmp_path_factory.mktemp("sensitivity")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (74, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 74, dtype=np.int64)
    save_arrays(CifarArrays(images[:64], labels[:64], images[64:], labels[64:], CLASS_NAMES), root / "data" / "dataset.npz")
    save_checkpoint(root / "data" / "model.pt", {"model": "net", "state_dict": build_model("net", seed=0).state_dict(),
                                                 "mean": list(SEED_MEAN), "std": list(SEED_STD)})
    shutil.copy(PROJECT_ROOT / "params.yaml", root / "params.yaml")
    set_params(root, {"sensitivity": {"bits": WIDTHS, "num_samples": 48}})
    run_graph_stage(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        sensitivity_stage.main()
    return root


def run_quantize_weights(project: Path, monkeypatch: pytest.MonkeyPatch, **weights: object) -> dict:
    """quantize-weights with these quantize_weights params (the file restored after); the weights' meta."""
    original = (project / "params.yaml").read_text()
    set_params(project, {"quantize_weights": weights})
    monkeypatch.chdir(project)
    try:
        quantize_weights_stage.main()
    finally:
        (project / "params.yaml").write_text(original)
    return load_quantized_weights(project / "data" / "weights_int8.npz")[1]


def test_the_report_has_every_layer_at_every_width_and_the_curve(project):
    report = read_json(project / "data" / "sensitivity.json")
    assert (report["split"], report["num_samples"], report["num_weights"]) == ("train", 48, NET_WEIGHTS)
    assert report["measured_with"] == {"model": "net", "equalize": False, "calibrator": "sigma", "granularity": "per_tensor",
                                       "options": {"k": 3.0}}
    assert list(report["layers"]) == list(NET_WEIGHTS)
    for by_bits in report["layers"].values():
        assert list(by_bits) == ["2", "4", "8"]
        assert by_bits["2"]["noise"] > by_bits["8"]["noise"]
    # The narrowest width has no curve point: at its size every layer must be at it.
    assert {series: list(points) for series, points in report["size_accuracy"].items()} == {
        "uniform": ["8", "4"], "mixed": ["8", "4"]}
    mixed = report["size_accuracy"]["mixed"]["4"]
    assert mixed["packed_bytes"] == packed_model_bytes(NET_WEIGHTS, mixed["bits"]) <= packed_model_bytes(NET_WEIGHTS, 4)


def test_the_plot_data_is_a_layers_by_bits_grid_and_two_series_of_sizes(project):
    heat_map = pd.read_csv(project / "data" / "plots" / "sensitivity.csv")
    assert list(heat_map.columns) == ["layer", "bits", "sqnr_db", "accuracy", "accuracy_drop"]
    assert heat_map["layer"].unique().tolist() == list(NET_WEIGHTS)
    assert heat_map["bits"].tolist() == WIDTHS * len(NET_WEIGHTS)
    curve = pd.read_csv(project / "data" / "plots" / "size_accuracy.csv")
    assert list(curve.columns) == ["series", "width", "packed_bytes", "accuracy", "bits"]
    assert curve["series"].tolist() == ["uniform", "mixed"] * 2
    assert curve["packed_bytes"][0] == sum(NET_WEIGHTS.values())


def test_a_budget_fraction_picks_bits_that_fit_and_records_them_with_the_packed_size(project, monkeypatch):
    meta = run_quantize_weights(project, monkeypatch, size_budget_fraction=0.5)
    budget = math.floor(0.5 * sum(NET_WEIGHTS.values()))
    assert meta["size_budget_bytes"] == budget
    assert set(meta["bits"]) == set(NET_WEIGHTS) and set(meta["bits"].values()) <= set(WIDTHS)
    assert meta["packed_weight_bytes"] == packed_model_bytes(NET_WEIGHTS, meta["bits"]) <= budget
    quantized, _ = load_quantized_weights(project / "data" / "weights_int8.npz")
    for name, (q_weight, _) in quantized.items():
        assert q_weight.dtype == torch.int8  # narrower weights stay stored as int8
        assert int(q_weight.abs().max()) <= 2 ** (meta["bits"][name] - 1) - 1


def test_without_a_budget_the_meta_has_the_packed_size_of_the_uniform_bits(project, monkeypatch):
    meta = run_quantize_weights(project, monkeypatch)
    assert (meta["bits"], meta["packed_weight_bytes"]) == (8, sum(NET_WEIGHTS.values()))
    assert "size_budget_bytes" not in meta


def test_an_impossible_budget_fails_naming_the_smallest_size(project, monkeypatch):
    with pytest.raises(SystemExit, match=r"quantize_weights.size_budget_bytes 1000: size budget 1000 bytes is below the "
                                         r"smallest size possible, 15443 bytes \(every layer at its fewest bits, conv1 2"):
        run_quantize_weights(project, monkeypatch, size_budget_bytes=1000)


def test_a_budget_refuses_a_sensitivity_measured_with_another_weight_quantizer(project, monkeypatch):
    with pytest.raises(SystemExit, match="was measured with .* run the sensitivity stage first"):
        run_quantize_weights(project, monkeypatch, size_budget_fraction=0.5, granularity="per_channel")


def test_more_held_out_images_than_the_training_split_has_fail_naming_the_key(project, monkeypatch):
    original = (project / "params.yaml").read_text()
    set_params(project, {"sensitivity": {"num_samples": 65}})
    monkeypatch.chdir(project)
    try:
        with pytest.raises(SystemExit, match=r"sensitivity.num_samples: value 65 is out of range; allowed: 1..64"):
            sensitivity_stage.main()
    finally:
        (project / "params.yaml").write_text(original)
