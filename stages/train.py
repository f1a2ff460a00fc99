"""train stage: train the float model named in params and save its checkpoint and curves."""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import sys
import time
from pathlib import Path

import torch

from pipeline.data import load_arrays
from pipeline.io import atomic_path, save_checkpoint, write_json
from pipeline.models import build_model
from pipeline.train import SEED_MEAN, SEED_STD, DivergedError, EpochRecord, resolve_device, train_model
from stages.common import ARRAYS, CHECKPOINT, TRAIN_CURVES, TRAIN_METRICS, start_stage

# The curves hold what training computed, not how long it took: the same run gives the same file,
# so a forced retrain that reproduces the weights does not re-run the plot stage. Seconds go to
# train_metrics.json, which no stage depends on.
CURVE_FIELDS = ("epoch", "loss", "accuracy", "lr")


def write_curves(path: Path, history: list[EpochRecord]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CURVE_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(dataclasses.asdict(record) for record in history)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def main() -> None:
    params = start_stage("train").train
    arrays = load_arrays(ARRAYS)
    device = resolve_device(params.device)
    model = build_model(params.model, seed=params.seed)
    logging.info("training %s on %s for %d epochs", params.model, device, params.epochs)
    started = time.perf_counter()
    try:
        history = train_model(
            model, torch.from_numpy(arrays.train_images), torch.from_numpy(arrays.train_labels), params
        )
    except DivergedError as error:
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
    write_curves(TRAIN_CURVES, history)
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
            }
        },
    )
    logging.info("done in %.1f s: loss %.4f, train accuracy %.2f%%", seconds, final.loss, final.accuracy)


if __name__ == "__main__":
    main()
