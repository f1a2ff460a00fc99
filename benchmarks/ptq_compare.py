"""Accuracy drop of this project's PTQ settings against PyTorch's own static PTQ, same checkpoint, same calibration images.

For one fp32 checkpoint and the calibration subset the profile stage used
(``data/profile.json`` indices, from the training split), it measures the test
accuracy of:

- this project with the defaults (seed activation rule, 3-sigma per-tensor weights) and
  every other combination of activation calibrator x weight calibrator x granularity,
  each through the integer engine (``full_int8``);
- PyTorch's ``torch.ao.quantization`` FX static PTQ with the x86 qconfig (torchao's
  PT2E path is used instead when torchao is installed).

    python -m benchmarks.ptq_compare [--checkpoint data/model.pt] [--bits 8]

Run it after ``dvc repro`` (it reads data/dataset.npz, data/model.pt, data/profile.json).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import time
import warnings

import numpy as np
import torch
from torch import nn

from pipeline.data import load_arrays
from pipeline.evaluation import engine_predictions, percent_equal
from pipeline.io import load_checkpoint, read_json
from pipeline.models import restore_model
from pipeline.profile import profile_activations
from pipeline.quant.calibrators import ACTIVATION_CALIBRATORS, WEIGHT_CALIBRATORS, activation_range
from pipeline.quant.model import build_integer_model, quantize_model_weights
from pipeline.train import normalize, predict
from stages.common import ARRAYS, CHECKPOINT, PROFILE

DEFAULT = ("seed", "sigma", "per_tensor")


def pytorch_fx_accuracy(model: nn.Module, calibration: torch.Tensor, test_x: torch.Tensor, labels: torch.Tensor) -> float:
    """Test accuracy of torch.ao.quantization FX static PTQ (x86 qconfig), calibrated on ``calibration``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calibration[:1],))
        with torch.no_grad():
            for start in range(0, len(calibration), 500):
                prepared(calibration[start : start + 500])
        quantized = convert_fx(prepared)
        with torch.no_grad():
            predictions = torch.cat([quantized(test_x[s : s + 1000]).argmax(1) for s in range(0, len(test_x), 1000)])
    return percent_equal(predictions, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--bits", type=int, default=8, help="weight bits for this project's settings")
    args = parser.parse_args()
    torch.set_num_threads(1)
    arrays = load_arrays(ARRAYS)
    checkpoint = load_checkpoint(args.checkpoint)
    model = restore_model(checkpoint, checkpoint.get("model"), args.checkpoint).eval()  # any model this pipeline trains
    mean, std = checkpoint["mean"], checkpoint["std"]
    indices = np.asarray(read_json(PROFILE)["indices"])
    calibration_images = torch.from_numpy(arrays.train_images[indices])
    test_images, labels = torch.from_numpy(arrays.test_images), torch.from_numpy(arrays.test_labels)
    fp32 = percent_equal(predict(model, test_images, mean, std), labels)
    print(f"checkpoint {args.checkpoint} ({checkpoint['model']}): fp32 {fp32:.2f}% on {len(labels)} test images; "
          f"{len(indices)} calibration images from the training split")

    layer_stats = profile_activations(model, calibration_images, mean, std, progress=False)
    rows = []
    started = time.perf_counter()
    for activation_calibrator, weight_calibrator, granularity in itertools.product(
        ACTIVATION_CALIBRATORS, WEIGHT_CALIBRATORS, ("per_tensor", "per_channel")
    ):
        ranges = {name: activation_range(stats, activation_calibrator) for name, stats in layer_stats.items()}
        weights = quantize_model_weights(model, args.bits, weight_calibrator, granularity)
        integer_model = build_integer_model(model, ranges, quantized_weights=weights)
        engine = engine_predictions(integer_model, test_images, mean, std)
        accuracy = percent_equal(engine, labels)
        rows.append((f"this project: act {activation_calibrator}, w {weight_calibrator} {granularity}",
                     (activation_calibrator, weight_calibrator, granularity), accuracy))
    ours_seconds = time.perf_counter() - started

    pytorch = pytorch_fx_accuracy(model, normalize(calibration_images, mean, std), normalize(test_images, mean, std), labels)
    default = next(row for row in rows if row[1] == DEFAULT)
    best = max(rows, key=lambda row: row[2])
    print(f"\n{len(rows)} settings of this project in {ours_seconds:.0f} s\n")
    print(f"| {'method':<62} | {'int8 acc %':>10} | {'drop (points)':>13} |")
    print(f"|{'-' * 64}|{'-' * 12}|{'-' * 15}|")
    for label, accuracy in [
        (default[0] + " (default)", default[2]),
        (best[0] + " (best)", best[2]),
        ("PyTorch torch.ao FX static PTQ, x86 qconfig", pytorch),
    ]:
        print(f"| {label:<62} | {accuracy:>10.2f} | {fp32 - accuracy:>13.2f} |")
    print("\nall settings, best first:")
    for label, _, accuracy in sorted(rows, key=lambda row: -row[2]):
        print(f"  {accuracy:6.2f}%  drop {fp32 - accuracy:5.2f}  {label}")


if __name__ == "__main__":
    main()
