"""The train stage imports a model trained elsewhere: a state_dict, safetensors or a float ONNX file, with its own
normalization; ``train.epochs: 0`` keeps every float, and a bad file fails before any output is written."""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

from pipeline.arrays import CifarArrays, save_arrays
from pipeline.data import CLASS_NAMES
from pipeline.graph.capture import capture
from pipeline.io import load_checkpoint, read_json
from pipeline.models import CheckpointError, restore_model
from pipeline.onnx_import import build_onnx_network, read_onnx_model
from pipeline.transforms import normalize
from pipeline.weights_import import file_sha256
from stages import train as train_stage
from tests.model_fixtures import LEGACY_ONNX_EXPORT_WARNINGS, randomize_batchnorm
from tests.project_copy import (
    ALL_STAGES,
    PROJECT_ROOT,
    ran_stages,
    run,
    set_params,
    tiny_project_copy,
)

pytestmark = LEGACY_ONNX_EXPORT_WARNINGS

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.247, 0.2435, 0.2616]

# A user's model code, as it would be copied into models/: the pipeline builds it, the user's script trains it.
USER_MODEL = """\
from torch import nn


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.features(x))


def build():
    return Small()
"""

# The user's own training script, run in a subprocess: plain PyTorch, nothing of the pipeline.
TRAINING_SCRIPT = """\
import sys

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, ".")
from models.small import build

mean = torch.tensor({mean}).view(1, 3, 1, 1)
std = torch.tensor({std}).view(1, 3, 1, 1)
data = np.load("data/dataset.npz")
# Contiguous, as torchvision's ToTensor gives (a permuted layout runs other convolution kernels, other roundings).
images = torch.from_numpy(data["train_images"]).permute(0, 3, 1, 2).contiguous().float().div(255)
x, y = (images - mean) / std, torch.from_numpy(data["train_labels"])
torch.manual_seed(0)
model = build()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for step in range(20):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
model.eval()
with torch.no_grad():
    np.save("logits.npy", model(x).numpy())
torch.save(model.state_dict(), "models/small.pt")
save_file(model.state_dict(), "models/small.safetensors")
"""

# The imported checkpoint's logits on the script's images, as every later stage computes them.
CHECKPOINT_LOGITS = """\
import numpy as np
import torch

from pipeline.io import load_checkpoint
from pipeline.models import restore_model
from pipeline.transforms import normalize

checkpoint = load_checkpoint("data/model.pt")
model = restore_model(checkpoint, checkpoint["model"], "data/model.pt").eval()
with torch.no_grad():
    logits = model(normalize(torch.from_numpy(np.load("data/dataset.npz")["train_images"]), checkpoint["mean"],
                             checkpoint["std"]))
np.save("checkpoint_logits.npy", logits.numpy())
"""


def tiny_arrays(root: Path, train: int = 40, test: int = 20) -> CifarArrays:
    """A learnable 10-class dataset (each class its own mean colour), saved as data/dataset.npz under ``root``."""
    rng = np.random.default_rng(0)
    labels = np.arange(train + test, dtype=np.int64) % 10
    base = np.stack([(37 * labels) % 256, (91 * labels) % 256, (151 * labels) % 256], axis=1)[:, None, None, :]
    images = np.clip(base + rng.integers(-20, 21, (train + test, 32, 32, 3)), 0, 255).astype(np.uint8)
    arrays = CifarArrays(images[:train], labels[:train], images[train:], labels[train:], CLASS_NAMES)
    save_arrays(arrays, root / "data" / "dataset.npz")
    return arrays


@pytest.fixture(scope="module")
def trained_elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a tiny dataset, models/small.py, and the user's script run on them (once for the module)."""
    root = tmp_path_factory.mktemp("elsewhere")
    tiny_arrays(root)
    (root / "models").mkdir()
    (root / "models" / "small.py").write_text(USER_MODEL)
    (root / "train_elsewhere.py").write_text(TRAINING_SCRIPT.format(mean=CIFAR_MEAN, std=CIFAR_STD))
    run([sys.executable, "train_elsewhere.py"], root)
    return root


@pytest.fixture
def project(trained_elsewhere: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working folder: that folder's files and the project's params.yaml."""
    project = tmp_path / "project"
    shutil.copytree(trained_elsewhere, project)
    shutil.copy(PROJECT_ROOT / "params.yaml", project / "params.yaml")
    monkeypatch.chdir(project)
    return project


def import_weights(project: Path, **train: object) -> dict:
    """Run the train stage on ``train`` params (the Small model, CIFAR normalization, no epochs) and load its
    checkpoint."""
    set_params(project, {"train": {"model": "models/small.py:build", "epochs": 0, "mean": CIFAR_MEAN,
                                   "std": CIFAR_STD, "device": "cpu"} | train})
    threads = torch.get_num_threads()
    try:
        train_stage.main()
    finally:
        torch.set_num_threads(threads)  # the stage sets the process-wide thread count
    return load_checkpoint(project / "data" / "model.pt")


def train_error(project: Path, **train: object) -> str:
    """The message the train stage exits with for ``train`` params; it must have written no output."""
    with pytest.raises(SystemExit) as exit_info:
        import_weights(project, **train)
    for output in ("model.pt", "training", "train_metrics.json"):
        assert not (project / "data" / output).exists(), output
    return str(exit_info.value.code)


@pytest.mark.parametrize(("weights", "file_format"), [("models/small.pt", "state_dict"),
                                                      ("models/small.safetensors", "safetensors")])
def test_weights_trained_by_a_plain_script_are_imported_bit_for_bit(project, weights, file_format, caplog):
    with caplog.at_level(logging.INFO):
        checkpoint = import_weights(project, weights=weights)
    script_weights = torch.load(project / "models/small.pt", weights_only=True)
    assert checkpoint["state_dict"].keys() == script_weights.keys()
    assert all(torch.equal(checkpoint["state_dict"][key], value) for key, value in script_weights.items())
    assert (checkpoint["mean"], checkpoint["std"]) == (CIFAR_MEAN, CIFAR_STD)
    assert checkpoint["imported"] == {"file": weights, "format": file_format,
                                      "sha256": file_sha256(weights), "epochs": 0}

    # In a process like the script's: this one may run other CPU kernels (torch loaded before the stages' pins).
    run([sys.executable, "-c", CHECKPOINT_LOGITS], project)
    assert np.array_equal(np.load("checkpoint_logits.npy"), np.load("logits.npy"))

    imported = read_json("data/train_metrics.json")["imported"]
    assert imported["sha256"] == file_sha256(weights) and 0 <= imported["test_accuracy"] <= 100
    assert f"{imported['test_accuracy']:.2f}% on the test split" in caplog.text
    assert "training-split images (mean [0.4914, 0.4822, 0.4465]" in caplog.text


def test_fine_tuning_starts_from_the_imported_weights(project):
    checkpoint = import_weights(project, weights="models/small.safetensors", epochs=1, batch_size=8, lr=1e-4)
    script_weights = torch.load(project / "models/small.pt", weights_only=True)
    difference = max(float((checkpoint["state_dict"][key] - value).abs().max())
                     for key, value in script_weights.items() if key.endswith(("weight", "bias")))
    assert 0 < difference < 0.01  # moved, a little: fine-tuned, not re-initialized
    assert checkpoint["imported"]["epochs"] == 1


def test_a_model_near_chance_is_warned_about_loudly(project, caplog):
    # What a wrong normalization gives on real data, made certain here: a head that scores every class 0 picks class
    # 0 for every image, 10% on this balanced dataset.
    state_dict = torch.load("models/small.pt", weights_only=True)
    torch.save(state_dict | {"head.weight": torch.zeros(10, 8), "head.bias": torch.zeros(10)}, "models/chance.pt")
    with caplog.at_level(logging.WARNING):
        import_weights(project, weights="models/chance.pt")
    assert "WARNING: the imported model is near chance" in caplog.text
    assert "Check train.mean and train.std against the normalization it was trained with" in caplog.text


def test_a_checkpoint_of_this_pipeline_seeds_another_run_of_the_same_model_and_normalization(project):
    import_weights(project, weights="models/small.pt")
    shutil.move("data/model.pt", "models/seed.pt")
    shutil.rmtree("data/training")
    Path("data/train_metrics.json").unlink()
    seeded = import_weights(project, weights="models/seed.pt")
    assert seeded["imported"]["format"] == "checkpoint"
    assert torch.equal(seeded["state_dict"]["head.weight"], torch.load("models/small.pt", weights_only=True)["head.weight"])
    for output in ("model.pt", "train_metrics.json"):
        Path("data", output).unlink()
    shutil.rmtree("data/training")
    assert train_error(project, weights="models/seed.pt", mean=[0.5, 0.5, 0.5]) == (
        "[train] models/seed.pt: trained with mean [0.4914, 0.4822, 0.4465]; train.mean is [0.5, 0.5, 0.5]: set "
        "train.mean to the checkpoint's")
    assert train_error(project, weights="models/seed.pt", model="resnet20") == (
        "[train] models/seed.pt: a checkpoint of the model 'models/small.py:build'; train.model is 'resnet20': set "
        "train.model to the checkpoint's")


class Payload:
    """A pickled object that would write a file if it were ever unpickled."""

    def __reduce__(self):
        return (Path("unpickled").write_text, ("code ran",))


def test_bad_weights_files_fail_before_any_output(project):
    state_dict = torch.load(project / "models/small.pt", weights_only=True)
    torch.save({key: value for key, value in state_dict.items() if not key.startswith("head.")}, "models/missing.pt")
    torch.save(state_dict | {"head.weight": torch.zeros(10, 16)}, "models/wide.pt")
    torch.save(state_dict | {"head.bias": torch.full((10,), float("nan"))}, "models/nan.pt")
    torch.save(state_dict | {"payload": Payload()}, "models/pickle.pt")
    Path("models/truncated.safetensors").write_bytes(Path("models/small.safetensors").read_bytes()[:-100])

    assert train_error(project, weights="models/missing.pt") == (
        "[train] models/missing.pt: does not fit the model: 2 missing from the file: head.weight, head.bias")
    assert train_error(project, weights="models/wide.pt") == (
        "[train] models/wide.pt: does not fit the model: 1 of another shape: head.weight: file (10, 16) vs model (10, 8)")
    assert train_error(project, weights="models/nan.pt") == (
        "[train] models/nan.pt: does not fit the model: 1 with NaN or infinity: head.bias")
    assert train_error(project, weights="models/truncated.safetensors").startswith(
        "[train] models/truncated.safetensors: not a safetensors file, or a truncated or corrupted one")
    assert train_error(project, weights="models/pickle.pt").startswith(
        "[train] models/pickle.pt: refused without running any of its code: it holds Python objects other than tensors")
    assert not Path("unpickled").exists()
    torch.load("models/pickle.pt", weights_only=False)  # the control: a loader that runs code runs the payload
    assert Path("unpickled").read_text() == "code ran"


class Residual(nn.Module):
    """A residual block with BatchNorm, which torch.onnx.export folds into the convolutions."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def export_onnx(model: nn.Module, path: str, size: int = 32) -> None:
    randomize_batchnorm(model, seed=0)  # not the fresh statistics, which fold to nothing
    torch.onnx.export(model.eval(), (torch.zeros(1, 3, size, size),), path, dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})


def test_an_onnx_model_is_imported_with_its_weights_and_computes_what_onnxruntime_computes(project):
    export_onnx(Residual(), "models/residual.onnx")
    checkpoint = import_weights(project, model="models/residual.onnx")
    assert checkpoint["imported"] == {"file": "models/residual.onnx", "format": "onnx",
                                      "sha256": file_sha256("models/residual.onnx"), "epochs": 0}
    model = restore_model(checkpoint, "models/residual.onnx", "data/model.pt").eval()
    x = normalize(torch.from_numpy(np.load("data/dataset.npz")["test_images"]), CIFAR_MEAN, CIFAR_STD)
    with torch.no_grad():
        logits = model(x).numpy()
    session = onnxruntime.InferenceSession("models/residual.onnx", providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_an_export_that_keeps_batchnorm_gives_the_state_dicts_float_graph_bit_for_bit(tmp_path):
    """What docs/your-model.md advises (TrainingMode.PRESERVE): the graph stage folds the ONNX model's BatchNorm as it
    folds the torch model's, so every folded weight and bias, and then every integer, is the same. Small running
    variances, as trained networks have: with BatchNorm's eps read back as float32 (9.99999974738e-06, not 1e-05),
    folded weights differ in their last bit."""
    model = Residual()
    randomize_batchnorm(model, seed=0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.mul_(1e-4)
    path = str(tmp_path / "residual.onnx")
    torch.onnx.export(model.eval(), (torch.zeros(1, 3, 32, 32),), path, dynamo=False,
                      training=torch.onnx.TrainingMode.PRESERVE, input_names=["input"])
    from_module, from_onnx = capture(model), capture(build_onnx_network(read_onnx_model(path)))
    pairs = list(zip(from_module.layers(), from_onnx.layers(), strict=True))
    assert len(pairs) == 4
    for torch_layer, onnx_layer in pairs:
        assert torch.equal(torch_layer.weight, onnx_layer.weight), torch_layer.name
        assert torch.equal(torch_layer.bias, onnx_layer.bias), torch_layer.name


def test_bad_onnx_models_fail_before_any_output(project):
    export_onnx(nn.Sequential(Residual(), nn.Softmax(1)), "models/softmax.onnx")
    export_onnx(Residual(classes=100), "models/hundred.onnx")
    export_onnx(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 62 * 62, 10)), "models/large.onnx", 64)
    Path("models/truncated.onnx").write_bytes(Path("models/softmax.onnx").read_bytes()[:-200])

    softmax = train_error(project, model="models/softmax.onnx")
    assert softmax.startswith("[train] models/softmax.onnx: node '/1/Softmax' (Softmax) is not supported; the "
                              "pipeline takes the logits: export the model without it; supported ops: Conv, Gemm")
    assert train_error(project, model="models/hundred.onnx") == (
        "[train] train.model 'models/hundred.onnx' outputs 100 classes per image; the dataset data/dataset.npz has 10 "
        "classes: the model's last layer must have 10 outputs")
    assert train_error(project, model="models/large.onnx") == (
        "[train] models/large.onnx: input 'input' has shape (N, 3, 64, 64); the pipeline's images are (N, 3, 32, 32) "
        "(CIFAR-10, channels first)")
    assert train_error(project, model="models/truncated.onnx").startswith(
        "[train] models/truncated.onnx: not an ONNX model, or a truncated or corrupted one")


def test_a_checkpoint_without_the_onnx_architecture_is_refused(project):
    export_onnx(Residual(), "models/residual.onnx")
    checkpoint = import_weights(project, model="models/residual.onnx")
    del checkpoint["architecture"]
    with pytest.raises(CheckpointError, match=r"^data/model.pt: no readable architecture of the ONNX model "
                                              r"'models/residual.onnx' \('architecture'\); rerun the train stage$"):
        restore_model(checkpoint, "models/residual.onnx", "data/model.pt")


def repro(project: Path) -> set[str]:
    """Run `dvc repro` in ``project``; the stages it ran."""
    return ran_stages(run(["dvc", "repro"], project).stdout)


def mismatches(project: Path) -> dict[str, int]:
    return read_json(project / "data/metrics.json")["mismatches"]


# Real `dvc repro` runs on the tiny dataset (a minute or two), so CI runs them with `slow`.
@pytest.mark.slow
def test_weights_trained_elsewhere_are_quantized_end_to_end_and_replacing_them_reruns_from_train(tmp_path):
    project = tiny_project_copy(tmp_path)
    run(["dvc", "repro", "download"], project)
    (project / "models" / "small.py").write_text(USER_MODEL)
    (project / "train_elsewhere.py").write_text(TRAINING_SCRIPT.format(mean=CIFAR_MEAN, std=CIFAR_STD))
    run([sys.executable, "train_elsewhere.py"], project)
    set_params(project, {"train": {"model": "models/small.py:build", "weights": "models/small.safetensors",
                                   "epochs": 0, "mean": CIFAR_MEAN, "std": CIFAR_STD}})
    assert repro(project) == ALL_STAGES - {"download"}
    assert mismatches(project)["c_logits"] == 0 and mismatches(project)["onnx_integer_logits"] == 0
    assert mismatches(project)["tflite_logits"] == 0
    assert load_checkpoint(project / "data/model.pt")["imported"]["sha256"] == file_sha256(
        project / "models/small.safetensors")
    assert repro(project) == set()  # nothing changed, nothing runs

    (project / "train_elsewhere.py").write_text(
        TRAINING_SCRIPT.format(mean=CIFAR_MEAN, std=CIFAR_STD).replace("range(20)", "range(21)"))
    run([sys.executable, "train_elsewhere.py"], project)  # a replaced weights file
    assert {"train", "graph", "profile", "quantize-weights", "export", "evaluate"} <= repro(project)
    assert mismatches(project)["c_logits"] == 0 and mismatches(project)["onnx_integer_logits"] == 0
    assert mismatches(project)["tflite_logits"] == 0


@pytest.mark.slow
def test_an_onnx_model_is_quantized_end_to_end(tmp_path):
    project = tiny_project_copy(tmp_path)
    export_onnx(Residual(), str(project / "models" / "residual.onnx"))
    set_params(project, {"train": {"model": "models/residual.onnx", "epochs": 0}})
    assert repro(project) == ALL_STAGES
    assert mismatches(project)["c_logits"] == 0 and mismatches(project)["onnx_integer_logits"] == 0
    assert mismatches(project)["tflite_logits"] == 0
    assert repro(project) == set()
