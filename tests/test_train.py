import dataclasses

import pytest
import torch

from pipeline.models import Net, build_model
from pipeline.params import TrainParams
from pipeline.train import (
    SEED_MEAN,
    SEED_STD,
    DivergedError,
    EpochRecord,
    accuracy_report,
    augment,
    normalize,
    normalized_batches,
    predict,
    test_model,
    train_model,
)

FAST = TrainParams(epochs=3, batch_size=16, lr=0.01, device="cpu", threads=1, seed=3)


def test_normalize_maps_pixels_to_minus_one_one_channels_first():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 2, 2, 3)
    x = normalize(images, (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (2, 3, 2, 2) and x.dtype == torch.float32
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


def test_a_few_steps_reduce_the_loss(synthetic_images):
    images, labels = synthetic_images
    history = train_model(Net(), images, labels, FAST, progress=False)
    assert history[-1].loss < history[0].loss


@pytest.mark.parametrize("model_name, threads", [("net", 1), ("net", 2), ("bnnet", 2)])
def test_training_is_bit_for_bit_deterministic_on_cpu(synthetic_images, model_name, threads):
    # Two threads as well as one: the README's stronger recipes train on 2 threads.
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
                epoch_logger(live)(record)
    files = sorted(path.relative_to(tmp_path / "a") for path in (tmp_path / "a").rglob("*") if path.is_file())
    assert [str(path) for path in files] == ["metrics.json", "plots/metrics/accuracy.tsv", "plots/metrics/loss.tsv",
                                             "plots/metrics/lr.tsv"]
    assert all((tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes() for path in files)
    assert (tmp_path / "a/plots/metrics/loss.tsv").read_text() == "step\tloss\n1\t1.5\n2\t1.25\n"
    curves = read_training_curves(tmp_path / "a")
    assert curves.to_dict("list") == {"epoch": [1, 2], "loss": [1.5, 1.25], "accuracy": [40.0, 50.0],
                                      "lr": [0.001, 0.0005]}


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


def test_the_step_named_is_the_first_with_a_non_finite_loss(synthetic_images, monkeypatch):
    images, labels = synthetic_images
    calls = []
    real_loss = torch.nn.CrossEntropyLoss.forward

    def loss_nan_from_step_3(self, logits, targets):
        calls.append(1)
        loss = real_loss(self, logits, targets)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", loss_nan_from_step_3)
    with pytest.raises(DivergedError, match=r"at epoch 1, step 3 of 4;"):
        train_model(Net(), images, labels, FAST, progress=False)


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
