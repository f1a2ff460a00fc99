import dataclasses
import logging

import pytest
import torch

from pipeline.evaluation import accuracy_report
from pipeline.models import Net, batch_layout, build_model, predict, test_model
from pipeline.params import TrainParams
from pipeline.train import (
    DivergedError,
    EpochRecord,
    augment,
    train_model,
)
from pipeline.transforms import SEED_MEAN, SEED_STD, normalize, normalized_batches

FAST = TrainParams(epochs=3, batch_size=16, lr=0.01, device="cpu", threads=1, seed=3)


def test_normalize_maps_pixels_to_minus_one_one_channels_first():
    # Contiguous, as a dataset's images are (an expanded view would hide the strides normalize gives).
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).repeat(1, 2, 2, 3)
    x = normalize(images, (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (2, 3, 2, 2) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x[0], torch.full((3, 2, 2), -1.0)) and torch.equal(x[1], torch.full((3, 2, 2), 1.0))


def test_augment_is_a_padded_crop_and_maybe_a_flip_of_each_image():
    images = torch.randint(1, 256, (16, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (0, 0, 4, 4, 4, 4))
    flips_seen = set()
    for index in range(len(images)):
        matches = [
            (top, left, flip)
            for top in range(9)
            for left in range(9)
            for flip in (False, True)
            if torch.equal(out[index], _crop(padded[index], top, left, flip))
        ]
        assert matches, f"image {index} is not a crop of its padded input"
        flips_seen.add(matches[0][2])
    assert flips_seen == {False, True}


def _crop(image: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    crop = image[top : top + 32, left : left + 32]
    return crop.flip(1) if flip else crop


class ConvThenView(torch.nn.Module):
    """Ends as many hand-written models do: a conv output flattened with ``view``, which needs contiguous NCHW."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
        self.fc = torch.nn.Linear(4 * 15 * 15, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


def test_a_model_that_views_a_conv_output_trains_and_predicts(synthetic_images):
    images, labels = synthetic_images
    one_step = dataclasses.replace(FAST, epochs=1, batch_size=len(labels))
    history = train_model(ConvThenView(), images, labels, one_step, progress=False)
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0].loss))
    assert predict(ConvThenView(), images, batch_size=16).shape == labels.shape


def test_user_models_get_contiguous_nchw_batches_and_the_built_in_ones_channels_last():
    class NetWithItsOwnForward(Net):
        pass

    assert [batch_layout(model) for model in (ConvThenView(), NetWithItsOwnForward())] == [torch.contiguous_format] * 2
    built_in = ("net", "bnnet", "resnet20", "mobilenet")
    assert {batch_layout(build_model(name)) for name in built_in} == {torch.channels_last}
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    channels_last = normalize(images, SEED_MEAN, SEED_STD, torch.channels_last)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(channels_last, normalize(images, SEED_MEAN, SEED_STD))


def test_a_few_steps_reduce_the_loss(synthetic_images):
    images, labels = synthetic_images
    history = train_model(Net(), images, labels, FAST, progress=False)
    assert history[-1].loss < history[0].loss


@pytest.mark.parametrize("model_name, threads", [("net", 1), ("net", 2), ("bnnet", 2)])
def test_training_is_bit_for_bit_deterministic_on_cpu(synthetic_images, model_name, threads):
    # Two threads as well as one: docs/experiments.md's stronger recipes train on 2 threads.
    images, labels = synthetic_images
    params = dataclasses.replace(FAST, augment=True, schedule="onecycle", epochs=2, threads=threads)
    weights = []
    threads_before = torch.get_num_threads()
    try:
        for _ in range(2):
            torch.randn(7)  # moves the global RNG: nothing below may depend on its state
            model = build_model(model_name, seed=params.seed)
            train_model(model, images, labels, params, progress=False)
            weights.append(model.state_dict())
    finally:
        torch.set_num_threads(threads_before)  # train_model sets the process-wide thread count
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_adam_and_onecycle_run(synthetic_images):
    images, labels = synthetic_images
    params = dataclasses.replace(FAST, optimizer="adam", schedule="onecycle", epochs=1)
    history = train_model(Net(), images, labels, params, progress=False)
    assert history[-1].lr < params.lr  # onecycle ends far below its peak


def test_accuracy_report_and_test_model_agree(synthetic_images):
    images, labels = synthetic_images
    model = Net()
    train_model(model, images, labels, FAST, progress=False)
    report = accuracy_report(predict(model, images), labels, [str(i) for i in range(10)])
    assert abs(report["accuracy"] - test_model(model, images, labels)) < 1e-9
    assert set(report["per_class"]) == {str(i) for i in range(10)}
    hand = 100.0 * (predict(model, images) == labels).float().mean().item()
    assert report["accuracy"] == hand


def test_normalize_is_bit_identical_to_torchvision_to_tensor_and_normalize():
    from PIL import Image
    from torchvision import transforms

    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    expected = torch.stack([reference(Image.fromarray(image.numpy())) for image in images])
    assert torch.equal(normalize(images, mean, std), expected)


def test_train_curves_record_no_times_so_equal_runs_write_equal_files(tmp_path, monkeypatch):
    from dvclive import Live

    from pipeline.plots import read_training_curves
    from stages.train import epoch_logger

    monkeypatch.chdir(tmp_path)
    first = [EpochRecord(epoch=1, loss=1.5, accuracy=40.0, lr=0.001, seconds=37.4),
             EpochRecord(epoch=2, loss=1.25, accuracy=50.0, lr=0.0005, seconds=36.0)]
    second = [dataclasses.replace(record, seconds=51.9) for record in first]
    for folder, history in (("a", first), ("b", second)):
        with Live(folder, save_dvc_exp=False, dvcyaml=None, report=None) as live:
            for record in history:
                epoch_logger(live, len(history))(record)
    files = sorted(path.relative_to(tmp_path / "a") for path in (tmp_path / "a").rglob("*") if path.is_file())
    assert [str(path) for path in files] == ["metrics.json", "plots/metrics/accuracy.tsv", "plots/metrics/loss.tsv",
                                             "plots/metrics/lr.tsv"]
    assert all((tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes() for path in files)
    assert (tmp_path / "a/plots/metrics/loss.tsv").read_text() == "step\tloss\n1\t1.5\n2\t1.25\n"
    curves = read_training_curves(tmp_path / "a")
    assert curves.to_dict("list") == {"epoch": [1, 2], "loss": [1.5, 1.25], "accuracy": [40.0, 50.0],
                                      "lr": [0.001, 0.0005]}


def test_no_epochs_give_empty_curves_and_a_plot_that_says_so_but_lost_curves_are_an_error(tmp_path, monkeypatch):
    from dvclive import Live

    from pipeline.plots import plot_training_curves, read_training_curves

    monkeypatch.chdir(tmp_path)
    with Live("imported", save_dvc_exp=False, dvcyaml=None, report=None):
        pass  # train.epochs 0: the stage logs no epoch
    curves = read_training_curves(tmp_path / "imported")
    assert curves.empty
    figure = plot_training_curves(curves)
    assert ["no training: imported weights\n(train.epochs 0)"] * 2 == [
        text.get_text() for axes in figure.axes for text in axes.texts]
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained/metrics.json").write_text('{"loss": 1.2, "accuracy": 55.0, "step": 2}')
    with pytest.raises(FileNotFoundError, match="no training curves"):
        read_training_curves(tmp_path / "trained")


def test_each_epoch_logs_a_line_with_the_time_left(tmp_path, monkeypatch, caplog):
    from dvclive import Live

    from stages.train import epoch_logger

    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    with Live("live", save_dvc_exp=False, dvcyaml=None, report=None) as live:
        log = epoch_logger(live, 4)
        log(EpochRecord(epoch=1, loss=1.5, accuracy=40.0, lr=0.001, seconds=37.4))
    line = caplog.messages[-1]
    assert line.startswith("training: 1/4 epoch 1 done in 37.4 s, about ") and line.endswith(
        " left (loss 1.5000, training accuracy 40.00%)")


def test_on_epoch_sees_each_record_as_its_epoch_ends(synthetic_images):
    images, labels = synthetic_images
    seen = []
    history = train_model(Net(), images, labels, FAST, progress=False, on_epoch=seen.append)
    assert seen == history and [record.epoch for record in seen] == [1, 2, 3]


def test_normalized_batches_cover_the_images_in_order_with_a_short_last_batch(synthetic_images):
    images = synthetic_images[0][:10]
    batches = list(normalized_batches(images, SEED_MEAN, SEED_STD, 4, "test", progress=False))
    assert [len(batch) for batch in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), normalize(images, SEED_MEAN, SEED_STD))


def test_a_diverging_run_fails_naming_the_epoch_and_step(synthetic_images):
    images, labels = synthetic_images
    diverging = dataclasses.replace(FAST, lr=1e6, epochs=2)
    with pytest.raises(DivergedError, match=r"training diverged: the loss is not finite \(NaN or infinity\) at "
                                            r"epoch 1, step \d+ of 4; no checkpoint written. Lower train.lr \(now 1000000.0\)"):
        train_model(Net(), images, labels, diverging, progress=False)


def make_the_loss_nan_from_call(first_nan_call: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cross-entropy from the ``first_nan_call``-th call on (counting from 1) is NaN."""
    calls = []
    real_loss = torch.nn.CrossEntropyLoss.forward

    def loss(self, logits, targets):
        calls.append(1)
        value = real_loss(self, logits, targets)
        return value * float("nan") if len(calls) >= first_nan_call else value

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", loss)


def test_the_step_named_is_the_first_with_a_non_finite_loss(synthetic_images, monkeypatch):
    images, labels = synthetic_images
    make_the_loss_nan_from_call(3, monkeypatch)
    with pytest.raises(DivergedError, match=r"at epoch 1, step 3 of 4;"):
        train_model(Net(), images, labels, FAST, progress=False)


def test_a_divergence_summary_names_the_epochs_that_ran_and_where_the_loss_broke(synthetic_images, monkeypatch):
    images, labels = synthetic_images
    make_the_loss_nan_from_call(6, monkeypatch)  # 4 steps per epoch: epoch 2, step 2
    with pytest.raises(DivergedError, match=r"at epoch 2, step 2 of 4;") as caught:
        train_model(Net(), images, labels, FAST, progress=False)
    assert caught.value.summary() == {"epochs_completed": 1,
                                      "diverged": {"epoch": 2, "step": 2, "steps_per_epoch": 4}}


def test_a_diverged_train_stage_fails_naming_train_lr_and_its_metrics_file_says_where(tmp_path, monkeypatch):
    import re
    import shutil

    import numpy as np

    from pipeline.arrays import CifarArrays, save_arrays
    from pipeline.data import CLASS_NAMES
    from pipeline.io import read_json
    from stages import train as train_stage
    from tests.project_copy import PROJECT_ROOT, set_params

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (74, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 74, dtype=np.int64)
    arrays = CifarArrays(images[:64], labels[:64], images[64:], labels[64:], CLASS_NAMES)
    save_arrays(arrays, tmp_path / "data/dataset.npz")
    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")
    set_params(tmp_path, {"train": {"model": "net", "lr": 1e6, "epochs": 2, "batch_size": 16, "device": "cpu"}})
    monkeypatch.chdir(tmp_path)
    threads_before = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match=r"^\[train\] training diverged: .* at epoch 1, step \d of 4; no "
                                             r"checkpoint written. Lower train.lr \(now 1000000.0\)") as caught:
            train_stage.main()
    finally:
        torch.set_num_threads(threads_before)  # the stage sets the process-wide thread count
    step = int(re.search(r"step (\d) of 4", str(caught.value)).group(1))
    assert read_json(tmp_path / "data/training/metrics.json") == {
        "epochs_completed": 0, "diverged": {"epoch": 1, "step": step, "steps_per_epoch": 4}}
    assert not (tmp_path / "data/model.pt").exists()


@pytest.mark.skipif(__import__("platform").machine().lower() not in ("x86_64", "amd64"), reason="x86-64 pins only")
@pytest.mark.parametrize(("preset", "capability"), [(None, "AVX2"), ("default", "DEFAULT")])
def test_stages_pin_the_cpu_kernels_before_torch_loads_unless_the_user_set_them(preset, capability):
    import os
    import subprocess
    import sys

    from tests.project_copy import PROJECT_ROOT

    env = {key: value for key, value in os.environ.items() if key not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR",
                                                                          "ONEDNN_MAX_CPU_ISA")}
    if preset is not None:
        env["ATEN_CPU_CAPABILITY"] = preset
    probe = ("import os, stages, torch; print(torch.backends.cpu.get_cpu_capability(), "
             "os.environ['ONEDNN_MAX_CPU_ISA'], os.environ['MKL_CBWR'])")
    result = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == [capability, "AVX2", "COMPATIBLE"]


def test_the_determinism_benchmark_measures_the_pins_the_stages_apply():
    import subprocess
    import sys

    from tests.project_copy import PROJECT_ROOT

    # In a child: importing stages sets the pins in the importing process.
    probe = "import benchmarks.cpu_determinism as b, stages; assert b.PIN == stages.CPU_KERNEL_PINS, b.PIN"
    subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, check=True)
