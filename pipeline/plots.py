"""Figures and DVC plot data that explain what quantization did.

Each figure answers one question: how are each layer's weights and input
activations distributed against the clipping range chosen for them, and what
share falls beyond it; what did each step cost in test accuracy; how much
noise did quantization add per layer (SQNR); how did training go.

Figures are ``matplotlib.figure.Figure`` objects on the Agg canvas, never
pyplot's global state: the module draws headless, does not change the
process-wide backend, and a figure returned in a notebook displays once.

A value is *clipped* when |x| > range: the quantizer saturates it to the end
of the integer grid. For weights, range = weight_scale * qmax with
qmax = 2^(bits-1) - 1 (one range per output channel with per-channel scales);
for activations, range is the calibrated input range of the layer.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter
from torch import Tensor

from pipeline.graph.nodes import FloatGraph
from pipeline.io import atomic_path, read_json
from pipeline.quant.calibrators import seed_range, weight_range
from pipeline.quant.observers import (
    ActivationObserver,
    ActivationStats,
    clipped_fraction,
)
from pipeline.quant.ranges import int_range, layer_bits
from pipeline.quant.settings import SigmaSettings
from pipeline.report import (
    STAGES,
    activations_label,
    bits_label,
    dataset_label,
    stage_accuracies,
    weight_methods,
)

FIGURE_DPI = 100  # pixels per inch: figure sizes below are in inches, PNGs are size * FIGURE_DPI pixels
LAYER_FIGSIZE = (6.4, 4.0)  # one layer's distribution: 640 x 400 px
PANEL_SIZE = (4.4, 3.2)  # one layer's panel in an all-layers figure
PANELS_PER_ROW = 3
WEIGHT_BINS = 101  # odd, so one bin is centred on 0
MAX_DISPLAY_BINS = 160  # activation histograms are merged down to at most this many bins
DISPLAY_MARGIN = 1.08  # the x axis reaches 8% past the larger of the clipping range and the largest |value|
LOG_SCALE_RATIO = 100  # activation histograms whose bins differ more than this get a log y axis
SEED_WEIGHT_K = 3.0  # the seed's weight rule: |mean| + 3 std

KEPT_COLOR = "#4c72b0"
CLIPPED_COLOR = "#dd4444"
RANGE_COLOR = "#222222"
OUTPUT_COLOR = "#55a868"
STAGE_COLORS = (KEPT_COLOR, "#8172b3", OUTPUT_COLOR)  # fp32, weights_only, integer

# File names written into the plots folder by ``write_plots``; dvc.yaml names the same paths.
WEIGHTS_PNG = "weights.png"
ACTIVATIONS_PNG = "activations.png"
ACCURACY_PNG = "accuracy.png"
SQNR_PNG = "sqnr.png"
TRAINING_PNG = "training.png"
ACCURACY_CSV = "accuracy.csv"
SQNR_CSV = "sqnr.csv"
CLIPPING_CSV = "clipping.csv"
WEIGHT_HIST_CSV = "weight_hist.csv"
ACTIVATION_HIST_CSV = "activation_hist.csv"


class DistributionPlot(NamedTuple):
    """What a distribution plot drew: the figure, the clipping range and the share of values beyond it."""

    figure: Figure
    clip_range: np.ndarray  # 0-D, or one range per output channel
    clipped_fraction: float  # share (0..1) of values with |x| > range


# ---------------------------------------------------------------- clipping


def weight_clip_ranges(weight_scale: Tensor | np.ndarray, bits: int) -> np.ndarray:
    """The largest |w| each scale represents: weight_scale * (2^(bits-1) - 1), 0-D or per channel."""
    qmax = int_range(bits, narrow=True)[1]
    return np.asarray(weight_scale, dtype=np.float64) * qmax


def _channel_ranges(weights: np.ndarray, clip_range: np.ndarray) -> np.ndarray:
    """``clip_range`` shaped to broadcast against ``weights`` (per tensor, or one value per index of axis 0)."""
    if clip_range.size == 1:
        return clip_range.reshape(())
    if clip_range.ndim != 1 or clip_range.size != weights.shape[0]:
        raise ValueError(
            f"clip_range must be one value or one per output channel ({weights.shape[0]}), got shape {clip_range.shape}"
        )
    return clip_range.reshape((-1,) + (1,) * (weights.ndim - 1))


def weight_clipped_mask(weights: np.ndarray, clip_range: np.ndarray) -> np.ndarray:
    """True where |w| > its range (per tensor, or per output channel = axis 0)."""
    return np.abs(weights) > _channel_ranges(weights, clip_range)


# ---------------------------------------------------------------- inputs


def _as_array(values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().to(torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def _raw_values(values: Tensor | np.ndarray | Sequence[Tensor]) -> np.ndarray:
    """All values of a tensor or array, or of a list of them (e.g. one per batch), as one flat float64 array."""
    chunks = [values] if isinstance(values, (Tensor, np.ndarray)) else list(values)
    return np.concatenate([_as_array(chunk).reshape(-1) for chunk in chunks]) if chunks else np.zeros(0)


def activation_stats(values: Tensor | np.ndarray | Sequence[Tensor]) -> ActivationStats:
    """Observer statistics (``pipeline.quant.observers``) of raw activation values, any shape."""
    observer = ActivationObserver()
    observer.observe(torch.from_numpy(_raw_values(values)))
    return observer.statistics()


def _stats_of(activations: Any) -> ActivationStats:
    """Observer statistics from themselves, their JSON form, an observer, or raw values (a tensor, an array, or a
    list of tensors)."""
    if isinstance(activations, ActivationStats):
        return activations
    if isinstance(activations, Mapping):
        return ActivationStats.from_json(activations)
    if isinstance(activations, ActivationObserver):
        return activations.statistics()
    if isinstance(activations, (Tensor, np.ndarray, list, tuple)):
        return activation_stats(activations)
    raise TypeError(
        f"activations must be a tensor, an array, a list of tensors, an observer, its statistics or their JSON "
        f"form, got {type(activations).__name__}"
    )


# ---------------------------------------------------------------- histograms


def _symmetric_limit(largest_value: float, clip_range: np.ndarray) -> float:
    limit = max(largest_value, float(np.max(clip_range))) * DISPLAY_MARGIN
    return limit if limit > 0 else 1.0


def weight_histogram(weights: np.ndarray, clip_range: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(edges, all counts, clipped counts) over ``WEIGHT_BINS`` equal bins symmetric about 0."""
    limit = _symmetric_limit(float(np.abs(weights).max(initial=0.0)), clip_range)
    edges = np.linspace(-limit, limit, WEIGHT_BINS + 1)
    counts = np.histogram(weights, edges)[0]
    clipped = np.histogram(weights[weight_clipped_mask(weights, clip_range)], edges)[0]
    return edges, counts, clipped


def _observer_clipped_counts(stats: ActivationStats, clip_range: float) -> np.ndarray:
    """Per observer bin, the count beyond the range: the rule of ``pipeline.quant.observers.clipped_fraction``."""
    counts = np.asarray(stats.hist_counts, dtype=np.float64)
    span = stats.hist_span
    if span == 0 or clip_range >= stats.abs_max:
        return np.zeros_like(counts)
    centers = -span + (np.arange(counts.size) + 0.5) * (2 * span / counts.size)
    return np.where(np.abs(centers) > clip_range, counts, 0.0)


def display_histogram(
    stats: ActivationStats, clip_range: float, limit: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(edges, counts, clipped counts) of the observer histogram within [-limit, limit], at most
    ``MAX_DISPLAY_BINS`` bins.

    The observer keeps thousands of bins over a power-of-two span, most of them
    empty; groups of adjacent bins are merged. Clipping is decided per observer
    bin before merging, so the red share matches the reported one. Every
    observed value lies within ``limit`` >= max|x|: the counts keep their total.
    """
    counts = np.asarray(stats.hist_counts, dtype=np.float64)
    span = stats.hist_span
    if span == 0:  # only zeros were observed: one narrow bin around 0
        return np.array([-limit, limit]) / MAX_DISPLAY_BINS, np.array([counts.sum()]), np.zeros(1)
    width = 2 * span / counts.size
    low = max(0, math.floor((span - limit) / width))
    high = min(counts.size, math.ceil((span + limit) / width))
    factor = max(1, math.ceil((high - low) / MAX_DISPLAY_BINS))

    def merge(values: np.ndarray) -> np.ndarray:
        window = values[low:high]
        return np.pad(window, (0, -window.size % factor)).reshape(-1, factor).sum(axis=1)

    merged = merge(counts)
    edges = -span + low * width + np.arange(merged.size + 1) * width * factor
    return edges, merged, merge(_observer_clipped_counts(stats, clip_range))


def _bin_centers(edges: np.ndarray) -> np.ndarray:
    return (edges[:-1] + edges[1:]) / 2


def _density(counts: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Probability density per unit of value: comparable across histograms with different bins."""
    total = counts.sum()
    return counts / (total * np.diff(edges)) if total else np.zeros_like(counts, dtype=np.float64)


def _percent(counts: np.ndarray, total: float) -> np.ndarray:
    return 100.0 * counts / total if total else np.zeros_like(counts, dtype=np.float64)


# ---------------------------------------------------------------- drawing


def _new_figure(figsize: tuple[float, float]) -> Figure:
    figure = Figure(figsize=figsize, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _range_text(clip_range: np.ndarray) -> str:
    if clip_range.size == 1:
        return f"range ±{float(clip_range):.3g}"
    return f"ranges ±{clip_range.min():.3g}..{clip_range.max():.3g}"


def _draw_range(axes: Axes, clip_range: np.ndarray) -> None:
    """Dashed lines at ±range; per channel, a band from the smallest to the largest range and lines at the largest."""
    largest = float(np.max(clip_range))
    if clip_range.size > 1:
        smallest = float(np.min(clip_range))
        for low, high in ((smallest, largest), (-largest, -smallest)):
            axes.axvspan(low, high, color=RANGE_COLOR, alpha=0.12, linewidth=0)
    for side in (-1, 1):
        axes.axvline(side * largest, color=RANGE_COLOR, linestyle="--", linewidth=1.2,
                     label="clipping range" if side > 0 else None)


def _draw_bars(axes: Axes, edges: np.ndarray, percent: np.ndarray, clipped_percent: np.ndarray, log: bool) -> None:
    """All values as one filled step outline, the clipped ones over it in red (one patch each: fast to draw)."""
    floor = 0.0
    if log:
        # A log axis has no 0: empty bins sit on a floor just below the smallest non-empty one.
        floor = percent[percent > 0].min() / 2 if percent.any() else 1e-3
        axes.set_yscale("log")
        percent, clipped_percent = np.maximum(percent, floor), np.maximum(clipped_percent, floor)
    axes.stairs(percent, edges, fill=True, color=KEPT_COLOR, baseline=floor, label="kept")
    # Drawn even when empty so that every panel has the same legend entries.
    axes.stairs(clipped_percent, edges, fill=True, color=CLIPPED_COLOR, baseline=floor, label="clipped (|x| > range)")
    if log:
        axes.set_ylim(floor, percent.max() * 2)
        # Within one or two decades matplotlib labels minor ticks too (3x10^-1, 4x10^-1, ...): unreadable.
        axes.yaxis.set_minor_formatter(NullFormatter())


def _draw_weights(axes: Axes, weights: np.ndarray, clip_range: np.ndarray, name: str) -> float:
    edges, counts, clipped = weight_histogram(weights, clip_range)
    _draw_bars(axes, edges, _percent(counts, weights.size), _percent(clipped, weights.size), log=False)
    _draw_range(axes, clip_range)
    share = float(weight_clipped_mask(weights, clip_range).mean()) if weights.size else 0.0
    axes.set_title(f"{name}: {weights.size:,} weights, {_range_text(clip_range)}\n{100 * share:.2f}% clipped",
                   fontsize="medium")
    axes.set_xlabel("weight value")
    axes.set_ylabel("weights per bin (%)")
    return share


def _draw_activations(axes: Axes, stats: ActivationStats, clip_range: float, share: float, name: str) -> None:
    limit = _symmetric_limit(stats.abs_max, np.asarray(clip_range))
    edges, counts, clipped = display_histogram(stats, clip_range, limit)
    percent = _percent(counts, counts.sum())
    log = _has_tails(percent)
    _draw_bars(axes, edges, percent, _percent(clipped, counts.sum()), log=log)
    _draw_range(axes, np.asarray(clip_range))
    axes.set_xlim(-limit, limit)
    axes.set_title(f"{name} input: {_range_text(np.asarray(clip_range))}\n{100 * share:.3f}% clipped",
                   fontsize="medium")
    axes.set_xlabel("activation value (real units)")
    axes.set_ylabel("values per bin (%, log scale)" if log else "values per bin (%)")


def _has_tails(percent: np.ndarray) -> bool:
    """Whether bin heights span more than ``LOG_SCALE_RATIO``: then only a log axis shows the rare large values."""
    nonzero = percent[percent > 0]
    return nonzero.size > 0 and nonzero.max() / nonzero.min() > LOG_SCALE_RATIO


def _save(figure: Figure, path: str | Path | None) -> None:
    if path is not None:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=FIGURE_DPI)


def _saved(figure: Figure, path: str | Path | None) -> Figure:
    _save(figure, path)
    return figure


# ---------------------------------------------------------------- the seed's entry points


def plot_weight_distribution(
    weights: Tensor | np.ndarray,
    name: str,
    clip_range: float | Tensor | np.ndarray | None = None,
    path: str | Path | None = None,
) -> DistributionPlot:
    """Histogram of one layer's weights with the clipping range and the share of weights beyond it.

    ``clip_range`` is one value, or one per output channel (axis 0); None uses
    the seed's rule, |mean| + 3 std over the whole tensor. With ``path`` the
    figure is also written there as a PNG of ``LAYER_FIGSIZE`` * ``FIGURE_DPI`` pixels.
    """
    values = _as_array(weights)
    if clip_range is None:
        clip_range = weight_range(torch.from_numpy(values), int_range(8, narrow=True)[1], "sigma", "per_tensor",
                                  SigmaSettings(k=SEED_WEIGHT_K))
    ranges = _as_array(clip_range)
    figure = _new_figure(LAYER_FIGSIZE)
    axes = figure.add_subplot()
    share = _draw_weights(axes, values, ranges, name)
    axes.legend(fontsize="small", loc="best")
    _save(figure, path)
    return DistributionPlot(figure, ranges, share)


def plot_activation_distribution(
    activations: Any,
    name: str,
    clip_range: float | None = None,
    path: str | Path | None = None,
) -> DistributionPlot:
    """Histogram of one layer's input activations with the clipping range and the share beyond it.

    ``activations`` is raw values (a tensor or array of any shape, or a list
    of tensors), an ``ActivationObserver``, its ``ActivationStats`` or their JSON form
    (as stored in data/profile.json). ``clip_range`` None uses the seed's rule,
    max(4 std, max|x|). From raw values the clipped share is exact; from
    statistics it is exact to one histogram bin. The y axis is logarithmic
    when the bins span more than ``LOG_SCALE_RATIO`` (a ReLU output's long
    tail). With ``path`` the figure is also written there as a PNG of
    ``LAYER_FIGSIZE`` * ``FIGURE_DPI`` pixels.
    """
    stats = _stats_of(activations)
    chosen = float(seed_range(stats.to_json(), int_range(8)[1]) if clip_range is None else clip_range)
    if not 0 <= chosen < math.inf:
        raise ValueError(f"clip_range must be finite and >= 0, got {clip_range!r}")
    if isinstance(activations, (ActivationStats, Mapping, ActivationObserver)):
        share = clipped_fraction(stats, chosen)
    else:  # raw values: count exactly rather than to a histogram bin
        share = float(np.mean(np.abs(_raw_values(activations)) > chosen))
    figure = _new_figure(LAYER_FIGSIZE)
    axes = figure.add_subplot()
    _draw_activations(axes, stats, chosen, share, name)
    axes.legend(fontsize="small", loc="best")
    _save(figure, path)
    return DistributionPlot(figure, np.asarray(chosen), share)


# ---------------------------------------------------------------- all layers, from the pipeline's artifacts


def layer_weights(
    graph: FloatGraph, quantized_weights: Mapping[str, tuple[Tensor, Tensor]], bits: int | Mapping[str, int]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per quantized layer: the float weights as quantized (BatchNorm folded) and their clipping ranges.

    ``bits``: one width, or each layer's (mixed precision).
    """
    layers = {node.name: node for node in graph.layers()}
    unknown = sorted(set(quantized_weights) - set(layers))
    if unknown:
        raise ValueError(f"quantized weights name layers {unknown} that the float model lacks; it has {list(layers)}")
    return {
        name: (_as_array(layers[name].weight), weight_clip_ranges(scale, layer_bits(bits, name)))
        for name, (_, scale) in quantized_weights.items()
    }


def _panel_grid(count: int, title: str) -> tuple[Figure, list[Axes]]:
    if count < 1:
        raise ValueError(f"need at least one layer to plot, got {count}")
    columns = min(PANELS_PER_ROW, count)
    rows = math.ceil(count / columns)
    figure = _new_figure((columns * PANEL_SIZE[0], rows * PANEL_SIZE[1] + 0.6))
    figure.suptitle(title, fontsize="large")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for unused in axes[count:]:
        unused.set_visible(False)
    return figure, axes[:count]


def _figure_legend(figure: Figure, axes: Axes) -> None:
    # One legend for all panels, below them: per-panel legends would hide the tails.
    handles, labels = axes.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)


def plot_weight_distributions(
    layers: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, path: str | Path | None = None
) -> tuple[Figure, dict[str, float]]:
    """One panel per layer (``layer_weights``' result); returns the figure and each layer's clipped share."""
    figure, axes = _panel_grid(len(layers), title)
    shares = {
        name: _draw_weights(ax, weights, ranges, name) for ax, (name, (weights, ranges)) in zip(axes, layers.items())
    }
    _figure_legend(figure, axes[0])
    _save(figure, path)
    return figure, shares


def plot_activation_distributions(
    profile_layers: Mapping[str, Mapping[str, Any]], title: str, path: str | Path | None = None
) -> Figure:
    """One panel per layer from data/profile.json's ``layers`` (stats, range, clipped_fraction)."""
    figure, axes = _panel_grid(len(profile_layers), title)
    for ax, (name, layer) in zip(axes, profile_layers.items()):
        _draw_activations(ax, ActivationStats.from_json(layer["stats"]), layer["range"], layer["clipped_fraction"],
                          name)
    _figure_legend(figure, axes[0])
    return _saved(figure, path)


def accuracy_bar_names(quantization: Mapping[str, Any]) -> list[str]:
    """Each stage's bar name, on two lines, with the widths metrics.json's ``quantization`` records: weight_bits,
    activation_bits and unsigned_activations (int8 when absent, as in revisions from before them)."""
    weights = f"{bits_label(quantization['weight_bits'])} weights"
    return ["fp32", f"{weights},\nfloat activations", f"{weights},\n{activations_label(quantization)} activations"]


def plot_accuracy(
    accuracy: Mapping[str, float], quantization: Mapping[str, Any], subtitle: str, path: str | Path | None = None
) -> Figure:
    """Bar chart of test accuracy per stage (``STAGES``), each bar labeled with its value and its drop from fp32,
    and named with the widths in ``quantization`` (``accuracy_bar_names``)."""
    values = [float(value) for value in stage_accuracies(accuracy).values()]
    names = accuracy_bar_names(quantization)
    figure = _new_figure((6.4, 4.6))
    axes = figure.add_subplot()
    bars = axes.bar(names, values, color=STAGE_COLORS, width=0.6)
    labels = [f"{values[0]:.2f}%"] + [f"{value:.2f}%\n({value - values[0]:+.2f} pts)" for value in values[1:]]
    axes.bar_label(bars, labels, padding=3)
    axes.set_ylim(0, 100 * 1.15)  # room above a 100% bar for its label
    axes.set_yticks(range(0, 101, 20))
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(f"Test accuracy per stage\n{subtitle}", fontsize="medium")
    return _saved(figure, path)


def plot_sqnr(sqnr_db: Mapping[str, Mapping[str, float | None]], path: str | Path | None = None) -> Figure:
    """Grouped bars of per-layer SQNR (dB) of the weights and of the layer outputs; None (exact) is marked."""
    layers = list(sqnr_db["weights"])
    figure = _new_figure((max(6.4, 1.1 * len(layers) + 2), 4.2))
    axes = figure.add_subplot()
    positions = np.arange(len(layers))
    for offset, kind, color in ((-0.2, "weights", KEPT_COLOR), (0.2, "outputs", OUTPUT_COLOR)):
        values = [sqnr_db[kind].get(layer) for layer in layers]
        heights = [0.0 if value is None else value for value in values]
        bars = axes.bar(positions + offset, heights, width=0.4, color=color, label=kind)
        axes.bar_label(bars, ["exact" if value is None else f"{value:.1f}" for value in values], fontsize="small")
    axes.set_xticks(positions, layers)
    axes.set_xlabel("layer (forward order)")
    axes.set_ylabel("SQNR (dB, higher is better)")
    axes.set_title("Per-layer SQNR of the quantized weights and layer outputs\n"
                   "(outputs include the error of every earlier layer; 'exact' = no quantization noise)",
                   fontsize="medium")
    axes.legend()
    return _saved(figure, path)


def read_training_curves(log_dir: str | Path) -> pd.DataFrame:
    """The train stage's dvclive curves (``<log_dir>/plots/metrics/<name>.tsv``, step = epoch) as one
    table: epoch and a column per curve (loss, accuracy, lr), in file-name order."""
    metrics_dir = Path(log_dir) / "plots" / "metrics"
    tables = [pd.read_csv(path, sep="\t") for path in sorted(metrics_dir.glob("*.tsv"))]
    summary = Path(log_dir) / "metrics.json"
    if not tables and summary.is_file() and read_json(summary) == {}:  # imported weights, train.epochs 0: no epoch ran
        return pd.DataFrame({"epoch": [], "loss": [], "accuracy": []})
    if not tables:
        raise FileNotFoundError(f"{metrics_dir}: no training curves (*.tsv) in it; rerun the train stage")
    curves = tables[0]
    for table in tables[1:]:
        curves = curves.merge(table, on="step", how="outer")
    return curves.rename(columns={"step": "epoch"})


def plot_training_curves(curves: pd.DataFrame, path: str | Path | None = None) -> Figure:
    """Training loss and accuracy per epoch (a table with epoch, loss, accuracy, ...); an empty table, imported
    weights that were not trained, says so on empty axes."""
    missing = {"epoch", "loss", "accuracy"} - set(curves.columns)
    if missing:
        raise ValueError(f"training curves lack columns {sorted(missing)}; they have {list(curves.columns)}")
    figure = _new_figure((9.6, 3.8))
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for axes, column, label in ((loss_axes, "loss", "cross-entropy loss"), (accuracy_axes, "accuracy", "accuracy (%)")):
        axes.plot(curves["epoch"], curves[column], marker="o", color=KEPT_COLOR)
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    if curves.empty:
        for axes in (loss_axes, accuracy_axes):
            axes.text(0.5, 0.5, "no training: imported weights\n(train.epochs 0)", ha="center", va="center",
                      transform=axes.transAxes)
    loss_axes.set_title("Training loss per epoch")
    accuracy_axes.set_title("Training accuracy per epoch (training split)")
    return _saved(figure, path)


# ---------------------------------------------------------------- DVC plot data


def accuracy_rows(accuracy: Mapping[str, float]) -> pd.DataFrame:
    """One row per stage, named by its key (no width): `dvc plots diff` lines up runs of different bits."""
    return pd.DataFrame({"stage": list(STAGES), "accuracy": list(stage_accuracies(accuracy).values())})


def sqnr_rows(sqnr_db: Mapping[str, Mapping[str, float | None]]) -> pd.DataFrame:
    """One row per layer; an exact layer (null SQNR) is an empty cell, which DVC plots leave out."""
    layers = list(sqnr_db["weights"])
    return pd.DataFrame({
        "layer": layers,
        "weights_db": [sqnr_db["weights"].get(layer) for layer in layers],
        "outputs_db": [sqnr_db["outputs"].get(layer) for layer in layers],
    })


def input_groups(profile_groups: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Node name -> the scale group its input belongs to, from data/profile.json's ``read_by`` lists."""
    return {reader: root for root, group in profile_groups.items() for reader in group["stats"]["read_by"]}


def clipping_rows(
    weight_ranges: Mapping[str, np.ndarray],
    weight_shares: Mapping[str, float],
    profile_groups: Mapping[str, Mapping[str, Any]],
) -> pd.DataFrame:
    """Per layer: the weight range (the largest, per channel) and its input's range, and the percent clipped."""
    layers = list(weight_ranges)
    group_of = input_groups(profile_groups)
    return pd.DataFrame({
        "layer": layers,
        "weight_range": [float(np.max(weight_ranges[name])) for name in layers],
        "weight_clipped_percent": [100 * weight_shares[name] for name in layers],
        "activation_range": [profile_groups[group_of[name]]["range"] for name in layers],
        "activation_clipped_percent": [100 * profile_groups[group_of[name]]["clipped_fraction"] for name in layers],
    })


def _histogram_frame(name: str, edges: np.ndarray, counts: np.ndarray, clip_range: float) -> pd.DataFrame:
    return pd.DataFrame({
        "layer": name,
        "value": _bin_centers(edges),
        "density": _density(counts, edges),
        "clip_range": clip_range,
    })


def weight_histogram_rows(layers: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Long format (layer, value, density, clip_range) for the DVC histogram template."""
    frames = []
    for name, (weights, ranges) in layers.items():
        edges, counts, _ = weight_histogram(weights, ranges)
        frames.append(_histogram_frame(name, edges, counts, float(np.max(ranges))))
    return pd.concat(frames, ignore_index=True)


def activation_histogram_rows(profile_layers: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Long format (layer, value, density, clip_range); empty bins are left out (the plot's y axis is log)."""
    frames = []
    for name, layer in profile_layers.items():
        stats = ActivationStats.from_json(layer["stats"])
        edges, counts, _ = display_histogram(
            stats, layer["range"], _symmetric_limit(stats.abs_max, np.asarray(layer["range"]))
        )
        frame = _histogram_frame(name, edges, counts, layer["range"])
        frames.append(frame[frame["density"] > 0])
    return pd.concat(frames, ignore_index=True)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")


# ---------------------------------------------------------------- the plot stage


def quantization_summary(metrics: Mapping[str, Any]) -> str:
    """'int8 weights (sigma, per_tensor), int8 activations (seed)' from metrics.json's ``quantization``."""
    q = metrics["quantization"]
    methods = "".join(f", {method}" for method in weight_methods(q))
    return (f"{bits_label(q['weight_bits'])} weights ({q['weight_calibrator']}, {q['granularity']}{methods}), "
            f"{activations_label(q)} activations ({q['activation_calibrator']})")


def weights_title(weight_meta: Mapping[str, Any]) -> str:
    """The weights figure's title from data/weights_int8.npz's meta: the widths, calibrator, options, granularity."""
    options = ", ".join(f"{key}={value}" for key, value in weight_meta.get("options", {}).items())
    return (f"Float weights (BatchNorm folded) and their {bits_label(weight_meta['bits'])} clipping ranges: "
            f"{weight_meta['calibrator']}{f' ({options})' if options else ''}, {weight_meta['granularity']}")


def activations_title(profile: Mapping[str, Any], quantization: Mapping[str, Any]) -> str:
    """The activations figure's title from data/profile.json and the widths metrics.json's ``quantization`` records."""
    return (f"Activations (one panel per scale group) on {profile['num_samples']} {profile['split']}-split "
            f"calibration images and their {activations_label(quantization)} ranges: "
            f"{profile['calibrator']} calibrator")


def write_plots(
    graph: FloatGraph,
    quantized_weights: Mapping[str, tuple[Tensor, Tensor]],
    weight_meta: Mapping[str, Any],
    profile: Mapping[str, Any],
    metrics: Mapping[str, Any],
    curves: pd.DataFrame,
    out_dir: str | Path,
) -> dict[str, float]:
    """Write every figure (PNG) and DVC plot data file (CSV) of the plot stage into ``out_dir``.

    Inputs are the earlier stages' artifacts: the float graph, the quantized
    weights and their meta (bits, calibrator, granularity), data/profile.json,
    data/metrics.json and the training curves. Returns each layer's share of
    clipped weights.
    """
    out = Path(out_dir)
    weights = layer_weights(graph, quantized_weights, weight_meta["bits"])
    profile_layers = profile["activations"]
    _, weight_shares = plot_weight_distributions(weights, weights_title(weight_meta), out / WEIGHTS_PNG)
    plot_activation_distributions(profile_layers, activations_title(profile, metrics["quantization"]),
                                  out / ACTIVATIONS_PNG)
    subtitle = (f"CIFAR-10 {dataset_label(metrics['dataset'])}, {metrics['test_images']:,} test images\n"
                f"{quantization_summary(metrics)}")
    plot_accuracy(metrics["accuracy"], metrics["quantization"], subtitle, out / ACCURACY_PNG)
    plot_sqnr(metrics["sqnr_db"], out / SQNR_PNG)
    plot_training_curves(curves, out / TRAINING_PNG)
    _write_csv(accuracy_rows(metrics["accuracy"]), out / ACCURACY_CSV)
    _write_csv(sqnr_rows(metrics["sqnr_db"]), out / SQNR_CSV)
    _write_csv(clipping_rows({name: ranges for name, (_, ranges) in weights.items()}, weight_shares, profile_layers),
               out / CLIPPING_CSV)
    _write_csv(weight_histogram_rows(weights), out / WEIGHT_HIST_CSV)
    _write_csv(activation_histogram_rows(profile_layers), out / ACTIVATION_HIST_CSV)
    return weight_shares
