"""train stage: train the float model named in params, or import one trained elsewhere, and save its checkpoint.

Imported weights (``train.weights``, or the weights of an ONNX ``train.model``) are loaded before any training and
checked (``pipeline.weights_import``, ``pipeline.onnx_import``); with ``train.epochs`` 0 they are saved as they are,
with their file's sha256 and the imported model's fp32 accuracy in data/train_metrics.json.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from dvclive import Live
from torch import nn

from pipeline.arrays import CifarArrays, load_arrays
from pipeline.graph.capture import capture
from pipeline.graph.nodes import (
    CIFAR10_INPUT_SHAPE,
    UnsupportedModelError,
    check_output_layer,
)
from pipeline.io import save_checkpoint, write_json
from pipeline.model_spec import is_onnx_model
from pipeline.models import ModelSpecError, build_model, check_class_scores, test_model
from pipeline.onnx_import import OnnxImportError, OnnxNetwork
from pipeline.params import TrainParams
from pipeline.progress import progress_line
from pipeline.train import (
    CURVES,
    DivergedError,
    EpochRecord,
    resolve_device,
    train_model,
)
from pipeline.transforms import sample_indices
from pipeline.weights_import import (
    WeightsFileError,
    file_sha256,
    fit_weights,
    read_weights_file,
)
from stages import CPU_KERNEL_PINS
from stages.common import ARRAYS, CHECKPOINT, TRAIN_METRICS, TRAINING_LOG, start_stage

# The imported model's fp32 accuracy is also measured on this many training-split images, and called near chance
# below this multiple of chance (a wrong normalization gives about chance; a weak but working model far more).
IMPORT_CHECK_TRAIN_IMAGES = 1000
NEAR_CHANCE = 1.5

# The curves record what training computed, not how long it took (CURVES; dvclive writes no timestamps
# unless asked), so a forced retrain that reproduces the weights writes the same files and does not
# re-run the plot stage. Seconds go to train_metrics.json, which no stage depends on.


def epoch_logger(live: Live, epochs: int) -> Callable[[EpochRecord], None]:
    """Log each epoch's record with dvclive as it ends, at step = epoch, so `dvc plots show` draws the
    curves while training runs; and a line with the time left, so that a log (DVC's captured output, CI, a
    Prefect run) tells a long training from a hung one."""
    started = time.perf_counter()

    def log(record: EpochRecord) -> None:
        live.step = record.epoch
        for name in CURVES:
            live.log_metric(name, getattr(record, name))
        elapsed = time.perf_counter() - started
        line = progress_line("training", record.epoch, epochs, elapsed, f"epoch {record.epoch}", record.seconds)
        logging.info("%s (loss %.4f, training accuracy %.2f%%)", line, record.loss, record.accuracy)

    return log


def imported_model(params: TrainParams) -> tuple[nn.Module, dict[str, Any] | None]:
    """``train.model`` with its initial weights, and where imported weights came from (None for fresh ones).

    Every refusal (a model that cannot be built, a weights file that cannot be read safely or does not fit, a
    checkpoint of another model or normalization) is raised here, before any work.
    """
    if is_onnx_model(params.model):
        model = build_model(params.model)
        return model, {"file": params.model, "format": "onnx", "sha256": file_sha256(params.model)}
    model = build_model(params.model, seed=params.seed)
    if params.weights is None:
        return model, None
    weights = read_weights_file(params.weights)
    if weights.checkpoint is not None:
        check_checkpoint_matches(weights.checkpoint, params)
    fit_weights(model, weights.state_dict, params.weights)
    return model, {"file": params.weights, "format": weights.format, "sha256": weights.sha256}


def check_checkpoint_matches(recorded: dict[str, Any], params: TrainParams) -> None:
    """A checkpoint of this pipeline seeds only the same model with the same normalization."""
    if recorded.get("model") != params.model:
        raise WeightsFileError(
            f"{params.weights}: a checkpoint of the model {recorded.get('model')!r}; train.model is {params.model!r}: "
            "set train.model to the checkpoint's"
        )
    for key in ("mean", "std"):
        if recorded.get(key) is not None and tuple(recorded[key]) != getattr(params, key):
            raise WeightsFileError(
                f"{params.weights}: trained with {key} {list(recorded[key])}; train.{key} is {list(getattr(params, key))}: "
                f"set train.{key} to the checkpoint's"
            )


def imported_accuracy(model: nn.Module, arrays: CifarArrays, params: TrainParams) -> dict[str, float]:
    """The imported model's fp32 accuracy on the test split and on training-split images, logged; a warning when
    either is near chance, the sign of a normalization (train.mean, train.std) other than the model's."""
    mean, std = params.mean, params.std
    sample = sample_indices(len(arrays.train_labels), min(IMPORT_CHECK_TRAIN_IMAGES, len(arrays.train_labels)), 0)
    figures = {
        "test_accuracy": test_model(model, torch.from_numpy(arrays.test_images), torch.from_numpy(arrays.test_labels),
                                    mean, std),
        "train_sample_accuracy": test_model(model, torch.from_numpy(arrays.train_images[sample]),
                                            torch.from_numpy(arrays.train_labels[sample]), mean, std),
    }
    logging.info("imported weights, fp32: %.2f%% on the test split, %.2f%% on %d training-split images (mean %s, std %s)",
                 figures["test_accuracy"], figures["train_sample_accuracy"], len(sample), list(mean), list(std))
    chance = 100.0 / len(arrays.class_names)
    if min(figures.values()) < NEAR_CHANCE * chance:
        logging.warning(
            "WARNING: the imported model is near chance (%.2f%% on the test split, %.2f%% on training-split images; "
            "chance is %.0f%%). Check train.mean and train.std against the normalization it was trained with (now "
            "mean %s, std %s), and train.model against its architecture: quantizing it measures nothing.",
            figures["test_accuracy"], figures["train_sample_accuracy"], chance, list(mean), list(std))
    return figures


def main() -> None:
    params = start_stage("train").train
    arrays = load_arrays(ARRAYS)
    device = resolve_device(params.device)
    try:
        model, origin = imported_model(params)
        # Before any training: one zero image must give one score per class of the dataset.
        check_class_scores(model, params.model, torch.zeros(1, *CIFAR10_INPUT_SHAPE), len(arrays.class_names),
                           str(ARRAYS))
    except (ModelSpecError, WeightsFileError, OnnxImportError) as error:
        sys.exit(f"[train] {error}")
    # Before any training: a model the quantizer cannot take fails here, naming the node.
    try:
        check_output_layer(capture(model))
    except UnsupportedModelError as error:
        sys.exit(f"[train] the model cannot be quantized: {error}")
    imported = imported_accuracy(model, arrays, params) if origin is not None else None
    if params.epochs:
        what = "fine-tuning the imported weights of" if origin is not None else "training"
        logging.info("%s %s on %s for %d epochs", what, params.model, device, params.epochs)
    started = time.perf_counter()
    # No dvc.yaml edits, report or `dvc exp save` of its own: DVC runs this stage and owns all of that.
    with Live(str(TRAINING_LOG), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        try:
            history = train_model(
                model, torch.from_numpy(arrays.train_images), torch.from_numpy(arrays.train_labels), params,
                params.mean, params.std, on_epoch=epoch_logger(live, params.epochs),
            ) if params.epochs else []
        except DivergedError as error:
            # Recorded, or the metrics file would read {} (or the last good epoch's figures, as if the run succeeded).
            live.summary.update(error.summary())
            sys.exit(f"[train] {error}")
    seconds = time.perf_counter() - started
    checkpoint = {
        "model": params.model,
        "state_dict": {key: value.cpu() for key, value in model.state_dict().items()},
        "mean": list(params.mean),
        "std": list(params.std),
        "class_names": list(arrays.class_names),
    }
    if origin is not None:
        origin["epochs"] = params.epochs
        checkpoint["imported"] = origin
    if isinstance(model, OnnxNetwork):
        checkpoint["architecture"] = model.architecture
    save_checkpoint(CHECKPOINT, checkpoint)
    final = history[-1] if history else None
    write_json(
        TRAIN_METRICS,
        {
            "train": {
                "loss": final.loss if final else None,
                "accuracy": final.accuracy if final else None,
                "seconds": round(seconds, 2),
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "threads": params.threads,
                # What decides the float rounding, to compare runs across machines (see stages/__init__.py).
                "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "cpu_kernel_pins": {name: os.environ.get(name) for name in CPU_KERNEL_PINS},
            }
        } | ({"imported": origin | imported} if origin is not None and imported is not None else {}),
    )
    if final:
        logging.info("done in %.1f s: loss %.4f, train accuracy %.2f%%", seconds, final.loss, final.accuracy)
    else:
        logging.info("imported as it is (train.epochs 0) in %.1f s", seconds)


if __name__ == "__main__":
    main()
