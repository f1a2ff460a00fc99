"""Observers (bounded memory, exact merged statistics) and calibrators on known distributions."""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math

import pytest
import torch
from torch import nn

from pipeline.graph.capture import capture
from pipeline.models import Net
from pipeline.profile import calibrate_ranges, profile_activations
from pipeline.quant.calibrators import (
    ACTIVATION_CALIBRATORS,
    WEIGHT_CALIBRATORS,
    PerChannel,
    PerTensor,
    abs_histogram,
    activation_range,
    entropy_range,
    parse_granularity,
    weight_range,
)
from pipeline.quant.observers import ActivationObserver, ActivationStats
from pipeline.quant.ranges import ZERO_RANGE_SCALE
from pipeline.quant.settings import (
    EntropySettings,
    HistogramMseSettings,
    PercentileSettings,
    SigmaSettings,
    WeightMseSettings,
)
from pipeline.transforms import SEED_MEAN, SEED_STD, normalize


def observed_stats(x: torch.Tensor, num_bins: int = 2048) -> dict:
    observer = ActivationObserver(num_bins)
    observer(x)
    return observer.stats()


def gaussian(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- observer


def test_observer_returns_its_input_unchanged():
    x = gaussian(100)
    assert ActivationObserver()(x) is x


def test_merged_batches_equal_statistics_of_the_concatenation():
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(50 + 37 * i, generator=generator) * (i + 1) + i for i in range(10)]
    observer = ActivationObserver()
    for batch in batches:
        observer(batch)
    stats = observer.stats()
    everything = torch.cat(batches).double()
    assert stats["count"] == everything.numel()
    assert stats["min"] == float(everything.min()) and stats["max"] == float(everything.max())
    assert stats["mean"] == pytest.approx(float(everything.mean()), rel=1e-12)
    assert stats["std"] == pytest.approx(float(everything.std(correction=0)), rel=1e-12)


def test_histogram_is_independent_of_batching_and_sums_to_count():
    """Re-binning merges nested bins exactly, so growing the span batch by batch loses nothing."""
    generator = torch.Generator().manual_seed(4)
    batches = [torch.zeros(20)] + [torch.randn(200, generator=generator) * 4.0**i for i in range(6)]
    incremental = ActivationObserver(256)
    for batch in batches:
        incremental(batch)
    at_once = ActivationObserver(256)
    at_once(torch.cat(batches))
    assert incremental.stats()["hist_counts"] == at_once.stats()["hist_counts"]
    assert incremental.stats()["hist_span"] == at_once.stats()["hist_span"]
    assert sum(incremental.stats()["hist_counts"]) == incremental.stats()["count"]


def test_histogram_bins_hold_their_values():
    stats = observed_stats(torch.tensor([-2.5, -0.1, 0.0, 0.0, 0.2, 1.5]), num_bins=8)
    assert stats["hist_span"] == 4.0  # smallest power of two above max|x| = 2.5
    # bins of width 1 over [-4, 4): [-4,-3) [-3,-2) [-2,-1) [-1,0) [0,1) [1,2) [2,3) [3,4)
    assert stats["hist_counts"] == [0, 1, 0, 1, 3, 1, 0, 0]


def _state_nbytes(observer: ActivationObserver) -> int:
    tensors = [value for value in vars(observer).values() if isinstance(value, torch.Tensor)]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def test_observer_memory_is_bounded():
    """Same state (names, types, tensor bytes) after 10 batches as after 1000, while the span keeps growing."""
    generator = torch.Generator().manual_seed(5)
    observer = ActivationObserver()
    for i in range(1000):
        observer(torch.randn(64, generator=generator) * (1 + i / 10))
        if i == 9:
            nbytes_after_10 = _state_nbytes(observer)
            layout_after_10 = {name: type(value) for name, value in vars(observer).items()}
    assert _state_nbytes(observer) == nbytes_after_10
    assert {name: type(value) for name, value in vars(observer).items()} == layout_after_10
    assert observer.stats()["count"] == 64_000


def test_stats_are_json_serializable():
    stats = observed_stats(gaussian(1000))
    assert json.loads(json.dumps(stats)) == stats


def test_statistics_round_trip_through_their_json_form_with_the_keys_profile_json_stores():
    observer = ActivationObserver()
    observer.observe(gaussian(1000))
    statistics = observer.statistics()
    assert list(statistics.to_json()) == ["count", "min", "max", "abs_max", "mean", "std", "num_bins", "hist_span",
                                          "hist_counts"]
    assert statistics.to_json() == observer.stats()
    assert ActivationStats.from_json(json.loads(json.dumps(statistics.to_json()))) == statistics
    # data/profile.json's scale-group entries add their tensors' names: read, not kept
    assert ActivationStats.from_json(observer.stats() | {"read_by": ["conv1"]}) == statistics
    with pytest.raises(ValueError, match=r"lack keys \['std'\]"):
        ActivationStats.from_json({key: value for key, value in observer.stats().items() if key != "std"})


def test_observer_errors():
    with pytest.raises(ValueError, match="observer has seen no values"):
        ActivationObserver().stats()
    with pytest.raises(ValueError, match="non-finite"):
        ActivationObserver()(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="num_bins must be a positive multiple of 4, got 10"):
        ActivationObserver(10)


def test_all_zero_input_gives_zero_ranges():
    stats = observed_stats(torch.zeros(100))
    assert stats["hist_span"] == 0.0 and stats["hist_counts"][1024] == 100
    for name in ACTIVATION_CALIBRATORS:
        assert activation_range(stats, name) == 0.0


def test_profiling_observes_each_scale_group_where_a_rescaling_node_reads_it():
    torch.manual_seed(0)
    model = Net().eval()
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    stats = profile_activations(capture(model), images, SEED_MEAN, SEED_STD, batch_size=2, progress=False)
    assert list(stats) == ["input_1", "relu1", "relu2", "relu3", "relu4"]
    x = normalize(images, SEED_MEAN, SEED_STD)
    with torch.no_grad():
        fc1_input = nn.Sequential(*list(model)[:7])(x)  # everything up to and including flatten
    assert stats["input_1"]["max"] == float(x.max()) and stats["input_1"]["read_by"] == ["conv1"]
    assert stats["relu2"]["observed"] == ["flatten"] and stats["relu2"]["read_by"] == ["fc1"]
    assert stats["relu2"]["count"] == fc1_input.numel()
    assert stats["relu2"]["mean"] == pytest.approx(float(fc1_input.double().mean()))


# ---------------------------------------------------------------- activation calibrators


def test_abs_histogram_folds_at_zero():
    counts, width = abs_histogram(observed_stats(torch.tensor([-2.5, -0.1, 0.0, 0.0, 0.2, 1.5]), num_bins=8))
    assert width == 1.0 and counts.tolist() == [4, 1, 1, 0]


def test_minmax_and_seed_rules():
    x = torch.tensor([-3.0, 1.0, 2.0, 0.5])
    stats = observed_stats(x)
    assert activation_range(stats, "minmax") == 3.0
    narrow = torch.cat([torch.zeros(1000), torch.tensor([0.5, -0.5])])  # 4 * std < max|x|
    assert activation_range(observed_stats(narrow), "seed") == 0.5
    wide = gaussian(10_000)
    expected = max(4 * float(wide.double().std(correction=0)), float(wide.abs().max()))
    assert activation_range(observed_stats(wide), "seed") == pytest.approx(expected, rel=1e-9)


def test_percentile_of_uniform_data():
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(6)) * 2 - 1  # |x| uniform on [0, 1)
    stats = observed_stats(x)
    assert activation_range(stats, "percentile", PercentileSettings(99.0)) == pytest.approx(0.99, abs=2e-3)
    assert activation_range(stats, "percentile", PercentileSettings(50.0)) == pytest.approx(0.5, abs=5e-3)
    assert activation_range(stats, "percentile", PercentileSettings(100.0)) == stats["abs_max"]
    assert activation_range(stats, "percentile") == activation_range(stats, "percentile", PercentileSettings(99.99))


def test_mse_barely_clips_uniform_data():
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(7)) * 2 - 1
    stats = observed_stats(x)
    assert 0.97 * stats["abs_max"] <= activation_range(stats, "mse") <= stats["abs_max"]


@pytest.mark.parametrize("calibrator", ["mse", "percentile"])
def test_clipping_calibrators_clip_gaussian_tails(calibrator):
    stats = observed_stats(gaussian(100_000, seed=8))
    assert 2.0 < activation_range(stats, calibrator) < stats["abs_max"]


def test_entropy_keeps_a_gaussian_and_clips_far_outliers():
    """On 1e5 gaussian samples KL calibration keeps (nearly) everything, as pytorch-quantization's does;
    two far outliers do not set the range: it stays at the smallest candidate above the bulk."""
    bulk = gaussian(100_000, seed=9)
    bulk_stats = observed_stats(bulk)
    assert 3.0 < activation_range(bulk_stats, "entropy") <= bulk_stats["abs_max"]
    with_outliers = observed_stats(torch.cat([bulk, torch.tensor([40.0, -40.0])]))
    assert activation_range(with_outliers, "entropy") < 10.0


@pytest.mark.parametrize("calibrator", ["mse", "entropy"])
def test_searching_calibrators_search_on_the_tensors_own_grid(calibrator):
    """A post-ReLU tensor: half-normal values. Unsigned 8-bit (qmax 255) has twice the levels of signed
    int8's 127, so rounding costs less and both searches keep more of the tail; 4 bits (qmax 7) clip far more."""
    stats = observed_stats(gaussian(100_000, seed=8).abs())
    signed = activation_range(stats, calibrator, qmax=127)
    assert signed == activation_range(stats, calibrator)  # the default grid is signed int8's
    unsigned, narrow = activation_range(stats, calibrator, qmax=255), activation_range(stats, calibrator, qmax=7)
    assert unsigned >= signed > narrow  # entropy keeps (nearly) all of 1e5 gaussian samples at 127 already
    assert unsigned > signed or calibrator == "entropy"


def test_entropy_levels_follow_the_grid():
    stats = observed_stats(gaussian(100_000, seed=9).abs())
    # num_quantized_bins is given for qmax 127; qmax 255 doubles it, exactly as asking for 256 levels at 127
    assert entropy_range(stats, 255, 128) == entropy_range(stats, 127, 256)
    assert entropy_range(stats, 7, 128) == entropy_range(stats, 127, 8)


def test_calibrated_ranges_map_onto_each_groups_qmax():
    stats = {"a": observed_stats(gaussian(1000, seed=1).abs()), "b": observed_stats(gaussian(1000, seed=2))}
    calibrated = calibrate_ranges(stats, "minmax", integer_ranges={"a": (0, 255), "b": (-8, 7)})
    assert calibrated["a"]["scale"] == calibrated["a"]["range"] / 255 and calibrated["a"]["qmin"] == 0
    assert calibrated["b"]["scale"] == calibrated["b"]["range"] / 7 and calibrated["b"]["qmin"] == -8
    default = calibrate_ranges(stats, "minmax")
    assert default["a"]["scale"] == default["a"]["range"] / 127 and default["a"]["qmax"] == 127


def test_a_group_whose_calibration_range_is_zero_is_named_in_a_warning(caplog):
    stats = {"relu1": observed_stats(gaussian(1000).abs()), "relu2": observed_stats(torch.zeros(1000))}
    with caplog.at_level(logging.WARNING):
        calibrated = calibrate_ranges(stats, "percentile")
    assert calibrated["relu2"]["scale"] == ZERO_RANGE_SCALE
    assert [record.getMessage() for record in caplog.records] == [
        "activation 'relu2': calibration range 0 (every calibration value is 0): scale 1.0 used, so it quantizes "
        "to 0; a layer that never activates on the calibration images?"]


def test_activation_calibrator_errors():
    stats = observed_stats(gaussian(100))
    with pytest.raises(ValueError, match=r"unknown activation calibrator 'kl'; allowed: \['entropy', 'minmax'"):
        activation_range(stats, "kl")
    with pytest.raises(ValueError, match=r"calibrator 'minmax' takes NoSettings, got PercentileSettings\(percent=99.0\)"):
        activation_range(stats, "minmax", PercentileSettings(99.0))


@pytest.mark.parametrize("registry", [ACTIVATION_CALIBRATORS, WEIGHT_CALIBRATORS], ids=["activation", "weight"])
def test_each_calibrators_settings_are_its_range_functions_keyword_arguments(registry):
    """A settings field the function does not take (or the reverse) would fail only when that calibrator runs."""
    for name, entry in registry.items():
        leading = 2  # (stats, qmax) or (groups, qmax)
        keywords = list(inspect.signature(entry.range).parameters)[leading:]
        assert [field.name for field in dataclasses.fields(entry.settings)] == keywords, name


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PercentileSettings(0.0), r"PercentileSettings.percent: value 0.0 is out of range; allowed: > 0.0"),
        (lambda: PercentileSettings(120.0), r"PercentileSettings.percent: value 120.0 is out of range; allowed: <= 100.0"),
        (lambda: HistogramMseSettings(samples_per_bin=0), r"HistogramMseSettings.samples_per_bin: value 0 .* >= 1"),
        (lambda: EntropySettings(0), r"EntropySettings.num_quantized_bins: value 0 .* >= 1"),
        (lambda: SigmaSettings(k=-1.0), r"SigmaSettings.k: value -1.0 is out of range; allowed: > 0.0"),
        (lambda: WeightMseSettings(0), r"WeightMseSettings.num_candidates: value 0 .* >= 1"),
    ],
)
def test_settings_are_checked_when_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_settings_change_the_range():
    stats = observed_stats(gaussian(100_000, seed=8))
    assert activation_range(stats, "mse", HistogramMseSettings(num_candidates=4)) != activation_range(stats, "mse")
    assert activation_range(stats, "entropy", EntropySettings(64)) != activation_range(stats, "entropy")
    weight = gaussian(600, seed=10).reshape(20, 30)
    assert float(weight_range(weight, 127, "mse", settings=WeightMseSettings(3))) != float(weight_range(weight, 127, "mse"))


# ---------------------------------------------------------------- weight calibrators


def test_sigma_rule_value():
    weight = gaussian(600, seed=10).reshape(20, 30) * 0.1 + 0.02
    mean, std = float(weight.double().mean()), float(weight.double().std())
    expected = max(abs(mean - 3 * std), abs(mean + 3 * std))
    assert float(weight_range(weight, 127, "sigma")) == pytest.approx(expected, rel=1e-12)
    assert float(weight_range(weight, 127, "sigma", settings=SigmaSettings(k=2.0))) == pytest.approx(
        abs(mean) + 2 * std, rel=1e-12)


def test_minmax_weight_range_per_tensor_and_per_channel():
    weight = torch.tensor([[1.0, -4.0], [0.5, 0.25], [-2.0, 0.0]])
    assert float(weight_range(weight, 127, "minmax")) == 4.0
    assert weight_range(weight, 127, "minmax", "per_channel").tolist() == [4.0, 0.5, 2.0]
    assert weight_range(weight, 127, "minmax", PerChannel(axis=1)).tolist() == [2.0, 4.0]


def test_mse_weight_range_never_worse_than_minmax():
    weight = gaussian(4000, seed=11).reshape(8, 500)
    for bits_qmax in (7, 127):
        ranges = weight_range(weight, bits_qmax, "mse", "per_channel")
        abs_max = weight.double().abs().amax(dim=1)
        assert bool((ranges <= abs_max).all())
        assert bool((ranges < abs_max).any())  # gaussian tails get clipped
    uniform = torch.rand(2000, generator=torch.Generator().manual_seed(12)) * 2 - 1
    assert float(weight_range(uniform, 127, "mse")) >= 0.9 * float(uniform.abs().max())


@pytest.mark.parametrize("calibrator", sorted(WEIGHT_CALIBRATORS))
def test_per_channel_is_per_tensor_on_each_output_channel(calibrator):
    weight = gaussian(6 * 3 * 3 * 3, seed=13).reshape(6, 3, 3, 3) * torch.linspace(0.1, 2.0, 6).reshape(6, 1, 1, 1)
    per_tensor = weight_range(weight, 127, calibrator, PerTensor())
    per_channel = weight_range(weight, 127, calibrator, "per_channel")
    assert per_tensor.shape == () and per_channel.shape == (6,)
    for channel in range(6):
        alone = float(weight_range(weight[channel], 127, calibrator))
        assert float(per_channel[channel]) == pytest.approx(alone, rel=1e-12)


def test_weight_calibrator_errors():
    weight = torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"unknown weight calibrator 'max'; allowed: \['minmax', 'mse', 'sigma'\]"):
        weight_range(weight, 127, "max")
    with pytest.raises(ValueError, match=r"weight calibrator 'sigma' takes SigmaSettings, got WeightMseSettings"):
        weight_range(weight, 127, "sigma", settings=WeightMseSettings())
    with pytest.raises(ValueError, match=r"unknown granularity 'per_row'; allowed: \['per_channel', 'per_tensor'\]"):
        parse_granularity("per_row")
    with pytest.raises(ValueError, match=r"PerChannel axis must be in \[-2, 2\), got 2"):
        weight_range(weight, 127, "minmax", PerChannel(axis=2))


def test_calibrators_work_on_a_profiled_model():
    """Every activation calibrator gives a positive range <= a never-clipping bound for each layer of Net."""
    torch.manual_seed(1)
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    group_stats = profile_activations(capture(Net().eval()), images, SEED_MEAN, SEED_STD, progress=False)
    for name, stats in group_stats.items():
        for calibrator in ACTIVATION_CALIBRATORS:
            value = activation_range(stats, calibrator)
            assert 0 < value <= activation_range(stats, "seed"), (name, calibrator)


def test_a_tensor_that_overflows_is_named():
    net = Net().eval()
    with torch.no_grad():
        net.fc1.weight.fill_(3e38)  # finite, but its outputs overflow float32 to inf: fc2's input
    images = torch.full((2, 32, 32, 3), 255, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"tensor 'relu3': observed tensor has non-finite values"):
        profile_activations(capture(net), images, (0.5,) * 3, (0.5,) * 3, progress=False)
