"""A user's model or a checkpoint the pipeline cannot use is refused in one line naming the file, before any output."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.arrays import CifarArrays, save_arrays
from pipeline.data import CLASS_NAMES
from pipeline.io import save_checkpoint
from pipeline.models import build_model
from stages import check_params as check_params_stage
from stages import train as train_stage
from stages.trained_model import load_trained_model
from tests.project_copy import PROJECT_ROOT, set_params

MODEL_FILE = """\
import torch
from torch import nn


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3072, 10)

    def forward(self, x):
        logits = self.fc(x.flatten(1))
        return logits, logits


def hundred_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 100))


def spatial_logits():
    return nn.Sequential(nn.Conv2d(3, 10, 32))


def pair():
    return Pair()


def wrong_input_size():
    return nn.Sequential(nn.Flatten(), nn.Linear(400, 10))


def needs_even_width(width=5):
    if width % 2:
        raise ValueError(f"width {width} must be even")
    return nn.Linear(width, 10)
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder (the working folder) with params.yaml, models/user.py and a 10-class dataset of 20 images."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(20, dtype=np.int64) % 10
    save_arrays(CifarArrays(images[:10], labels[:10], images[10:], labels[10:], CLASS_NAMES),
                tmp_path / "data" / "dataset.npz")
    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "user.py").write_text(MODEL_FILE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def train_error(project: Path, model: str) -> str:
    """The message the train stage exits with for ``train.model: model``; it must have written no output."""
    set_params(project, {"train": {"model": model}})
    with pytest.raises(SystemExit) as exit_info:
        train_stage.main()
    assert not (project / "data" / "model.pt").exists()
    assert not (project / "data" / "training").exists()
    assert not (project / "data" / "train_metrics.json").exists()
    return str(exit_info.value.code)


def test_a_head_wider_than_the_dataset_s_classes_is_refused_naming_both(project):
    assert train_error(project, "models/user.py:hundred_classes") == (
        "[train] train.model 'models/user.py:hundred_classes' outputs 100 classes per image; the dataset "
        "data/dataset.npz has 10 classes: the model's last layer must have 10 outputs"
    )


def test_an_output_that_is_not_one_row_per_image_is_refused(project):
    assert train_error(project, "models/user.py:spatial_logits") == (
        "[train] train.model 'models/user.py:spatial_logits' outputs a tensor of shape (1, 10, 1, 1) for a batch "
        "of shape (1, 3, 32, 32); it must output (images, classes) scores: (1, 10) for the 10 classes of "
        "data/dataset.npz"
    )
    assert train_error(project, "models/user.py:pair") == (
        "[train] train.model 'models/user.py:pair' outputs a tuple for a batch of shape (1, 3, 32, 32); "
        "it must output (images, classes) scores: (1, 10) for the 10 classes of data/dataset.npz"
    )


def test_a_model_that_fails_on_an_image_names_the_line_of_its_file(project):
    assert train_error(project, "models/user.py:wrong_input_size") == (
        "[train] train.model 'models/user.py:wrong_input_size' fails on a batch of shape (1, 3, 32, 32): "
        "RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x3072 and 400x10)"
    )


def test_a_factory_that_raises_is_one_line_naming_the_file_and_the_error(project):
    assert train_error(project, "models/user.py:needs_even_width") == (
        "[train] train.model 'models/user.py:needs_even_width': the factory raised "
        "ValueError: width 5 must be even (models/user.py, line 33)"
    )


def test_a_model_file_that_cannot_be_imported_is_one_line_naming_the_file(project):
    (project / "models" / "user.py").write_text("import torch\nimport not_a_module_anywhere\n" + MODEL_FILE)
    assert train_error(project, "models/user.py:pair") == (
        "[train] train.model 'models/user.py:pair': cannot load models/user.py: "
        "ModuleNotFoundError: No module named 'not_a_module_anywhere' (models/user.py, line 2)"
    )


def test_a_model_file_with_a_syntax_error_fails_at_params_validation(project):
    (project / "models" / "user.py").write_text(MODEL_FILE.replace("def pair():", "def pair()"))
    assert train_error(project, "models/user.py:pair") == (
        "[train] invalid params.yaml: train.model 'models/user.py:pair': cannot load models/user.py: "
        "SyntaxError: expected ':' (models/user.py, line 23)"
    )


def test_check_params_refuses_a_model_file_with_a_syntax_error(project):
    (project / "models" / "user.py").write_text(MODEL_FILE.replace("def pair():", "def pair()"))
    set_params(project, {"train": {"model": "models/user.py:pair"}})
    with pytest.raises(SystemExit) as exit_info:
        check_params_stage.main()
    assert exit_info.value.code == (
        "[check-params] invalid params.yaml: train.model 'models/user.py:pair': cannot load models/user.py: "
        "SyntaxError: expected ':' (models/user.py, line 23)"
    )


class RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it would create ``marker`` (the pipeline must never run it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def checkpoint_error(path: Path) -> str:
    """The message a stage exits with when it loads the trained model from ``path``."""
    with pytest.raises(SystemExit) as exit_info:
        load_trained_model(path)
    return str(exit_info.value.code)


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"model": "net", "state_dict": {}, "mean": RunsCodeWhenUnpickled(marker)})
    message = checkpoint_error(path)
    assert message == (
        f"error: {path}: refused: it holds Python objects other than tensors and plain data, which could run code "
        "when loaded (Trying to load unsupported GLOBAL posix.mkdir whose module posix is blocked); "
        "rerun the train stage to rewrite it"
    )
    assert not marker.exists()


@pytest.mark.parametrize("content, error", [
    (lambda good: good[: len(good) // 2],
     "RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory"),
    (lambda good: b"hello\n", "KeyError: 101"),
    (lambda good: b"", "EOFError"),
], ids=["truncated", "text", "empty"])
def test_a_truncated_or_foreign_checkpoint_is_one_line_naming_the_file(tmp_path, content, error):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model": "net", "state_dict": build_model("net", seed=0).state_dict()})
    path = tmp_path / "model.pt"
    path.write_bytes(content(good.read_bytes()))
    assert checkpoint_error(path) == (
        f"error: {path}: not a PyTorch checkpoint, or a truncated or corrupted one ({error}); "
        "rerun the train stage to rewrite it"
    )
