"""Off a terminal, the long loops log a line as they go, with the time spent and an estimate of what remains."""
from __future__ import annotations

import doctest
import io
import itertools
import logging
import re

import pytest
import torch

from pipeline import progress
from pipeline.graph.capture import capture
from pipeline.models import build_model
from pipeline.progress import progress_items
from pipeline.quant.adaround import adaround_model_weights
from pipeline.quant.bias_correction import corrected_biases
from pipeline.quant.mixed_precision import (
    choose_bits,
    layer_sensitivity,
    size_accuracy_curve,
)
from pipeline.quant.settings import AdaRoundSettings
from pipeline.quant.weights import quantize_model_weights
from pipeline.transforms import SEED_MEAN, SEED_STD, normalize

NET_LAYERS = ["conv1", "conv2", "fc1", "fc2", "fc3"]
SECONDS = r"[0-9.]+ s|\d+ min \d+ s|\d+ h \d+ min"


@pytest.fixture
def off_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # as in CI, a Prefect run and DVC's captured stage output


@pytest.fixture
def clock(monkeypatch):
    """perf_counter as seen by pipeline.progress: 0, 1, 3, 6, 10, ... seconds (each call 1 s more than the last gap)."""
    times = itertools.accumulate(itertools.count())
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(times)))


def logged(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "pipeline.progress"]


def test_the_examples_in_the_docstrings_hold():
    assert doctest.testmod(progress).failed == 0


def test_off_a_terminal_each_item_logs_its_time_and_the_time_left(off_a_terminal, clock, caplog):
    with caplog.at_level(logging.INFO):
        assert list(progress_items(["conv1", "conv2", "fc"], "adaround", name=str)) == ["conv1", "conv2", "fc"]
    # started at 0; items from 1 to 3, 6 to 10, 15 to 21 (s)
    assert logged(caplog) == ["adaround: 1/3 conv1 done in 2.0 s, about 6.0 s left",
                              "adaround: 2/3 conv2 done in 4.0 s, about 5.0 s left",
                              "adaround: 3/3 fc done in 6.0 s, 21.0 s in all"]


def test_many_quick_steps_log_at_most_one_line_per_interval(off_a_terminal, clock, caplog, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 20.0)
    with caplog.at_level(logging.INFO):
        assert list(progress_items(range(6), "adaround fc1", every_item=False)) == list(range(6))
    # steps end at 3, 10, 21, 36, 55, 78 s: lines where 20 s have passed since the last one, never at the end
    assert logged(caplog) == ["adaround fc1: 3/6 after 21.0 s, about 21.0 s left",
                              "adaround fc1: 5/6 after 55.0 s, about 11.0 s left"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_or_when_told_to_be_quiet_nothing_is_logged(clock, caplog, monkeypatch):
    monkeypatch.setattr("sys.stderr", Terminal())  # a bar shows instead
    with caplog.at_level(logging.INFO):
        list(progress_items(["a", "b"], "adaround", progress=False))
        list(progress_items(["a", "b"], "adaround"))
    assert logged(caplog) == []


def test_adaround_logs_each_layer_as_it_is_learned(off_a_terminal, caplog):
    graph = capture(build_model("net", seed=0).eval())
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO):
        adaround_model_weights(graph, images, SEED_MEAN, SEED_STD, 4, settings=AdaRoundSettings(iterations=2))
    assert [re.sub(SECONDS, "T", line) for line in logged(caplog)] == [
        *(f"adaround: {index}/5 {name} done in T, about T left" for index, name in enumerate(NET_LAYERS[:-1], 1)),
        "adaround: 5/5 fc3 done in T, T in all"]


def test_bias_correction_logs_each_layer(off_a_terminal, caplog):
    graph = capture(build_model("net", seed=0).eval())
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO):
        corrected_biases(graph, quantize_model_weights(graph, 4), images, SEED_MEAN, SEED_STD)
    assert [re.sub(SECONDS, "T", line) for line in logged(caplog)][-1] == "bias correction: 5/5 fc3 done in T, T in all"


def test_sensitivity_and_mixed_precision_log_their_steps_and_the_curve_each_width(off_a_terminal, caplog, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # a line after every step but the last
    graph = capture(build_model("net", seed=0).eval())
    generator = torch.Generator().manual_seed(1)
    x = normalize(torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8, generator=generator), SEED_MEAN, SEED_STD)
    labels = torch.randint(0, 10, (16,), generator=generator)
    with caplog.at_level(logging.INFO):
        table = layer_sensitivity(graph, x, labels, (2, 8))
        noise = {layer: {bits: entry["noise"] for bits, entry in by_bits.items()} for layer, by_bits in table.items()}
        choose_bits(graph, x, noise, 30000)
        size_accuracy_curve(graph, x, labels, noise, [8])
    lines = [re.sub(SECONDS, "T", line) for line in logged(caplog)]
    assert lines[:9] == [f"sensitivity: {done}/10 after T, about T left" for done in range(1, 10)]
    assert "mixed precision: 1/5 after T, about T left" in lines
    assert lines[-1] == "size-accuracy curve: 1/1 8-bit size done in T, T in all"
