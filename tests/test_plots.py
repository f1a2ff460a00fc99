"""Plot functions on small synthetic inputs: PNG sizes, clipped shares against hand-computed values, the stage."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.graph.capture import capture
from pipeline.graph.file import GraphFile, save_graph_file
from pipeline.graph.trace import record_trace
from pipeline.io import save_checkpoint, write_json
from pipeline.models import build_model
from pipeline.plots import (
    FIGURE_DPI,
    LAYER_FIGSIZE,
    MAX_DISPLAY_BINS,
    accuracy_bar_names,
    activation_stats,
    activations_title,
    display_histogram,
    layer_weights,
    plot_accuracy,
    plot_activation_distribution,
    plot_weight_distribution,
    weight_clip_ranges,
    weights_title,
)
from pipeline.profile import calibrate_ranges, profile_activations
from pipeline.quant.observers import ActivationObserver, clipped_fraction
from pipeline.quant.settings import PercentileSettings, SigmaSettings
from pipeline.quant.weights import quantize_model_weights
from pipeline.transforms import SEED_MEAN, SEED_STD
from pipeline.weights_file import save_quantized_weights
from tests.project_copy import PROJECT_ROOT

LAYER_PIXELS = (int(LAYER_FIGSIZE[0] * FIGURE_DPI), int(LAYER_FIGSIZE[1] * FIGURE_DPI))
PNGS = ["weights.png", "activations.png", "accuracy.png", "sqnr.png", "training.png"]
CSVS = ["accuracy.csv", "sqnr.csv", "clipping.csv", "weight_hist.csv", "activation_hist.csv"]


def png_size(path: Path) -> tuple[int, int]:
    assert path.stat().st_size > 1000, f"{path} is (nearly) empty"
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


# ---------------------------------------------------------------- weights


def test_weight_plot_writes_a_png_and_reports_the_hand_counted_clipped_share(tmp_path):
    weights = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.5])  # |w| > 2: -3.0 and 2.5
    plot = plot_weight_distribution(weights, "fc", clip_range=2.0, path=tmp_path / "w.png")
    assert plot.clipped_fraction == pytest.approx(2 / 6)
    assert float(plot.clip_range) == 2.0
    assert png_size(tmp_path / "w.png") == LAYER_PIXELS


def test_weight_plot_clips_each_output_channel_at_its_own_range():
    # Beyond channel 0's 0.4: 0.5 and -0.9; beyond channel 1's 2.5: -3.0.
    weights = np.array([[0.1, 0.5, -0.9], [2.0, -3.0, 0.5]])
    plot = plot_weight_distribution(weights, "conv", clip_range=np.array([0.4, 2.5]))
    assert plot.clipped_fraction == pytest.approx(3 / 6)
    assert plot.figure.get_size_inches().tolist() == list(LAYER_FIGSIZE)


def test_weight_plot_defaults_to_the_seeds_three_sigma_rule():
    weights = torch.randn(4000, generator=torch.Generator().manual_seed(0)) ** 3  # heavy tails: some beyond 3 sigma
    values = weights.numpy().astype(np.float64)
    mean, std = values.mean(), values.std(ddof=1)  # the seed's Tensor.std() has Bessel's correction
    three_sigma = max(abs(mean - 3 * std), abs(mean + 3 * std))
    plot = plot_weight_distribution(weights, "fc1")
    assert float(plot.clip_range) == pytest.approx(three_sigma)
    assert plot.clipped_fraction == pytest.approx(np.mean(np.abs(values) > three_sigma))
    assert plot.clipped_fraction > 0


def test_weight_plot_rejects_a_range_per_channel_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"one per output channel \(2\), got shape \(3,\)"):
        plot_weight_distribution(np.ones((2, 4)), "fc", clip_range=np.ones(3))


def test_weight_ranges_are_scale_times_qmax_of_the_bit_width():
    assert weight_clip_ranges(torch.tensor(0.01, dtype=torch.float64), 8) == pytest.approx(1.27)
    assert weight_clip_ranges(np.array([0.5, 1.0]), 4).tolist() == [3.5, 7.0]  # qmax 7


# ---------------------------------------------------------------- activations

VALUES = torch.tensor([-4.0, -1.0, 0.0, 0.5, 1.0, 3.9, 8.0])  # |x| > 3: -4, 3.9, 8 (none within a bin of 3)


def test_activation_plot_from_raw_values_counts_exactly(tmp_path):
    plot = plot_activation_distribution(VALUES.reshape(1, 7), "conv2", clip_range=3.0, path=tmp_path / "a.png")
    assert plot.clipped_fraction == pytest.approx(3 / 7)
    assert png_size(tmp_path / "a.png") == LAYER_PIXELS


@pytest.mark.parametrize("as_input", ["stats", "statistics", "observer", "batches"])
def test_activation_plot_from_statistics_observers_and_batches_agrees(as_input):
    observer = ActivationObserver()
    observer.observe(VALUES)
    activations = {"stats": observer.stats(), "statistics": observer.statistics(), "observer": observer,
                   "batches": [VALUES[:3], VALUES[3:]]}[as_input]
    assert plot_activation_distribution(activations, "fc1", clip_range=3.0).clipped_fraction == pytest.approx(3 / 7)


def test_activation_plot_defaults_to_the_seeds_rule_which_never_clips():
    plot = plot_activation_distribution(VALUES, "fc1")
    assert float(plot.clip_range) == pytest.approx(max(4 * VALUES.double().std(unbiased=False).item(), 8.0))
    assert plot.clipped_fraction == 0.0


def test_activation_plot_names_what_it_cannot_read():
    with pytest.raises(TypeError, match="got str"):
        plot_activation_distribution("conv1", "conv1")
    with pytest.raises(ValueError, match=r"lack keys \['count', 'min', 'max', 'mean', 'hist_counts'\]"):
        plot_activation_distribution({"abs_max": 1.0, "std": 0.5, "hist_span": 1.0, "num_bins": 8}, "conv1")
    with pytest.raises(ValueError, match="clip_range must be finite and >= 0, got -1.0"):
        plot_activation_distribution(VALUES, "conv1", clip_range=-1.0)


def test_display_histogram_merges_bins_keeps_every_count_and_the_clipped_share():
    values = torch.randn(20000, generator=torch.Generator().manual_seed(1)).clamp(min=0) * 3  # a ReLU output
    stats = activation_stats(values)
    clip_range = 4.0
    edges, counts, clipped = display_histogram(stats, clip_range, limit=stats.abs_max * 1.08)
    assert len(counts) <= MAX_DISPLAY_BINS and len(edges) == len(counts) + 1
    assert np.allclose(np.diff(edges), np.diff(edges)[0])
    assert counts.sum() == stats.count
    assert clipped.sum() / counts.sum() == pytest.approx(clipped_fraction(stats, clip_range))


# ---------------------------------------------------------------- the stage, on synthetic artifacts


def write_training_log(folder: Path, curves: dict[str, list[float]]) -> None:
    """Curves in the train stage's dvclive layout: plots/metrics/<name>.tsv with step = epoch."""
    (folder / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
    for name, values in curves.items():
        rows = "".join(f"{epoch}\t{value}\n" for epoch, value in enumerate(values, start=1))
        (folder / "plots" / "metrics" / f"{name}.tsv").write_text(f"step\t{name}\n{rows}")


def synthetic_artifacts(
    data: Path, images: torch.Tensor, model_name: str = "net", granularity: str = "per_tensor", weight_bits: int = 8,
    activation_bits: int = 8,
) -> dict:
    """Write the plot stage's inputs under ``data``: checkpoint, graph, quantized weights, profile, metrics, curves."""
    model = build_model(model_name, seed=0).eval()
    save_checkpoint(data / "model.pt", {"model": model_name, "state_dict": model.state_dict(),
                                        "mean": list(SEED_MEAN), "std": list(SEED_STD)})
    graph = capture(model)
    save_graph_file(data / "graph.pt", GraphFile(graph, {"model": model_name, "mean": list(SEED_MEAN),
                                                         "std": list(SEED_STD)}, False, record_trace(graph.traced)))
    quantized = quantize_model_weights(graph, weight_bits, "sigma", granularity, SigmaSettings(3.0))
    save_quantized_weights(quantized, {"bits": weight_bits, "calibrator": "sigma", "options": {"k": 3.0},
                                       "granularity": granularity}, data / "weights_int8.npz")
    stats = profile_activations(graph, images, SEED_MEAN, SEED_STD, batch_size=32, progress=False)
    calibrated = calibrate_ranges(stats, "percentile", PercentileSettings(99.0))  # clips: the red part is drawn
    profile = {"split": "train", "num_samples": len(images), "seed": 0, "calibrator": "percentile",
               "activations": {name: {"stats": stats[name], **calibrated[name]} for name in stats}}
    write_json(data / "profile.json", profile)
    names = list(quantized)
    metrics = {
        "accuracy": {"fp32": 61.25, "weights_only": 60.5, "integer": 59.75, "simulated": 59.75},
        "sqnr_db": {"weights": {name: 30.0 + index for index, name in enumerate(names)},
                    "outputs": {name: None if index == 0 else 20.0 for index, name in enumerate(names)}},
        "quantization": {"weight_bits": weight_bits, "weight_calibrator": "sigma", "granularity": granularity,
                         "weight_rounding": "nearest", "bias_correction": False, "activation_bits": activation_bits,
                         "activation_calibrator": "percentile", "calibration_images": len(images)},
        "test_images": 30,
        "dataset": {"source": "/somewhere/tiny-cifar.tar.gz", "format": "image-folder"},
    }
    write_json(data / "metrics.json", metrics)
    write_training_log(data / "training", {"loss": [2.2, 1.9], "accuracy": [15.0, 30.0], "lr": [0.001, 0.001]})
    return {"model": model, "graph": graph, "quantized": quantized, "profile": profile, "metrics": metrics}


@pytest.mark.parametrize("weight_bits, activation_bits", [(8, 8), (2, 4)])
def test_plot_stage_writes_every_figure_plot_data_and_the_results_table(
    tmp_path, monkeypatch, synthetic_images, weight_bits, activation_bits
):
    synthetic_artifacts(tmp_path / "data", synthetic_images[0], weight_bits=weight_bits,
                        activation_bits=activation_bits)
    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    from stages import plot as plot_stage

    plot_stage.main()

    plots = tmp_path / "data" / "plots"
    assert sorted(path.name for path in plots.iterdir()) == sorted(PNGS + CSVS)
    for name in PNGS:
        width, height = png_size(plots / name)
        assert width >= 600 and height >= 350, name
    accuracy = pd.read_csv(plots / "accuracy.csv")
    # Keyed by what ran, not by the width: `dvc plots diff` lines up runs of different bits.
    assert accuracy.to_dict("list") == {"stage": ["fp32", "weights_only", "integer"],
                                        "accuracy": [61.25, 60.5, 59.75]}
    sqnr = pd.read_csv(plots / "sqnr.csv")
    assert sqnr["layer"].tolist() == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert np.isnan(sqnr["outputs_db"][0]) and sqnr["weights_db"][0] == 30.0  # null (exact) is an empty cell
    clipping = pd.read_csv(plots / "clipping.csv")
    assert (clipping["activation_clipped_percent"] > 0).any()
    groups = ["input_1", "relu1", "relu2", "relu3", "relu4"]  # scale groups, by their first tensor
    for name, expected in (("weight_hist.csv", sqnr["layer"].tolist()), ("activation_hist.csv", groups)):
        histogram = pd.read_csv(plots / name)
        assert list(histogram.columns) == ["layer", "value", "density", "clip_range"]
        assert histogram["layer"].unique().tolist() == expected
    results = (tmp_path / "data" / "results.md").read_text()
    assert f"| workspace | tiny-cifar.tar.gz (image-folder) | int{weight_bits} sigma per_tensor |" in results
    titles = [cell.strip() for cell in results.splitlines()[0].split("|")[5:-1]]
    integer = f"W{weight_bits}A{activation_bits} integer"
    assert titles == ["fp32 (%)", f"W{weight_bits} weights only (%)", f"{integer} (%)", f"{integer} - fp32 (pts)"]


def test_accuracy_bars_and_titles_name_the_widths_that_ran():
    quantization = {"weight_bits": 2, "activation_bits": 4, "unsigned_activations": False}
    names = ["fp32", "int2 weights,\nfloat activations", "int2 weights,\nint4 activations"]
    assert accuracy_bar_names(quantization) == names
    figure = plot_accuracy({"fp32": 61.25, "weights_only": 40.5, "integer": 30.0}, quantization, "W2A4")
    assert [label.get_text() for label in figure.axes[0].get_xticklabels()] == names
    assert accuracy_bar_names({"weight_bits": {"conv1": 8, "fc1": 3}, "activation_bits": 6,
                               "unsigned_activations": True})[2] == "int3-8 per layer weights,\nint6/uint6 activations"
    meta = {"bits": 2, "calibrator": "sigma", "options": {"k": 3.0}, "granularity": "per_channel"}
    assert weights_title(meta) == ("Float weights (BatchNorm folded) and their int2 clipping ranges: "
                                   "sigma (k=3.0), per_channel")
    profile = {"num_samples": 500, "split": "train", "calibrator": "mse"}
    assert activations_title(profile, quantization) == (
        "Activations (one panel per scale group) on 500 train-split calibration images and their int4 ranges: "
        "mse calibrator")


def test_layer_weights_are_the_batchnorm_folded_weights_with_one_range_per_channel():
    model = build_model("bnnet", seed=0).eval()
    with torch.no_grad():  # non-trivial running statistics, so that folding changes the weights
        model.bn1.running_var.fill_(4.0)
    graph = capture(model)
    quantized = quantize_model_weights(graph, 6, "minmax", "per_channel")
    weights = layer_weights(graph, quantized, bits=6)
    folded = {node.name: node for node in graph.layers()}
    assert list(weights) == list(folded)
    for name, (values, ranges) in weights.items():
        expected = folded[name].weight.detach().double()
        assert np.allclose(values, expected.numpy())
        # minmax per channel: each range is its channel's max|w|, up to the float64 scale's rounding
        assert np.allclose(ranges, expected.abs().amax(dim=tuple(range(1, expected.ndim))).numpy())
    assert not np.allclose(weights["conv1"][0], model.conv1.weight.detach().numpy())


def test_activation_y_axis_is_logarithmic_only_for_long_tails():
    generator = torch.Generator().manual_seed(2)
    relu_output = torch.randn(50000, generator=generator).clamp(min=0) ** 2  # a spike at 0 and a long tail
    image_like = torch.rand(50000, generator=generator) * 2 - 1
    assert plot_activation_distribution(relu_output, "fc1").figure.axes[0].get_yscale() == "log"
    assert plot_activation_distribution(image_like, "conv1").figure.axes[0].get_yscale() == "linear"
