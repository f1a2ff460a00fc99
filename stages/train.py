"""train stage: train the float model named in params and save its checkpoint and curves."""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

import torch
from dvclive import Live

from pipeline.arrays import load_arrays
from pipeline.graph.capture import capture
from pipeline.graph.nodes import (
    CIFAR10_INPUT_SHAPE,
    UnsupportedModelError,
    check_output_layer,
)
from pipeline.io import save_checkpoint, write_json
from pipeline.models import ModelSpecError, build_model, check_class_scores
from pipeline.progress import progress_line
from pipeline.train import (
    CURVES,
    DivergedError,
    EpochRecord,
    resolve_device,
    train_model,
)
from pipeline.transforms import SEED_MEAN, SEED_STD
from stages import CPU_KERNEL_PINS
from stages.common import ARRAYS, CHECKPOINT, TRAIN_METRICS, TRAINING_LOG, start_stage

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


def main() -> None:
    params = start_stage("train").train
    arrays = load_arrays(ARRAYS)
    device = resolve_device(params.device)
    try:
        model = build_model(params.model, seed=params.seed)
        # Before any training: one zero image must give one score per class of the dataset.
        check_class_scores(model, params.model, torch.zeros(1, *CIFAR10_INPUT_SHAPE), len(arrays.class_names),
                           str(ARRAYS))
    except ModelSpecError as error:
        sys.exit(f"[train] {error}")
    # Before any training: a model the quantizer cannot take fails here, naming the node.
    try:
        check_output_layer(capture(model))
    except UnsupportedModelError as error:
        sys.exit(f"[train] the model cannot be quantized: {error}")
    logging.info("training %s on %s for %d epochs", params.model, device, params.epochs)
    started = time.perf_counter()
    # No dvc.yaml edits, report or `dvc exp save` of its own: DVC runs this stage and owns all of that.
    with Live(str(TRAINING_LOG), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        try:
            history = train_model(
                model, torch.from_numpy(arrays.train_images), torch.from_numpy(arrays.train_labels), params,
                on_epoch=epoch_logger(live, params.epochs),
            )
        except DivergedError as error:
            # Recorded, or the metrics file would read {} (or the last good epoch's figures, as if the run succeeded).
            live.summary.update(error.summary())
            sys.exit(f"[train] {error}")
    seconds = time.perf_counter() - started
    checkpoint = {
        "model": params.model,
        "state_dict": {key: value.cpu() for key, value in model.state_dict().items()},
        "mean": list(SEED_MEAN),
        "std": list(SEED_STD),
        "class_names": list(arrays.class_names),
    }
    save_checkpoint(CHECKPOINT, checkpoint)
    final = history[-1]
    write_json(
        TRAIN_METRICS,
        {
            "train": {
                "loss": final.loss,
                "accuracy": final.accuracy,
                "seconds": round(seconds, 2),
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "threads": params.threads,
                # What decides the float rounding, to compare runs across machines (see stages/__init__.py).
                "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "cpu_kernel_pins": {name: os.environ.get(name) for name in CPU_KERNEL_PINS},
            }
        },
    )
    logging.info("done in %.1f s: loss %.4f, train accuracy %.2f%%", seconds, final.loss, final.accuracy)


if __name__ == "__main__":
    main()
