"""evaluate stage: test-split accuracy, overall and per class, into the metrics JSON."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.data import load_arrays
from pipeline.io import load_checkpoint, read_json, write_json
from pipeline.models import build_model
from pipeline.train import accuracy_report, predict
from stages.common import start_stage

ARRAYS = Path("data/dataset.npz")
MANIFEST = Path("data/dataset_manifest.json")
CHECKPOINT = Path("data/model.pt")
METRICS = Path("data/metrics.json")


def main() -> None:
    params = start_stage("evaluate").evaluate
    arrays = load_arrays(ARRAYS)
    checkpoint = load_checkpoint(CHECKPOINT)
    model = build_model(checkpoint["model"])
    model.load_state_dict(checkpoint["state_dict"])
    images, labels = torch.from_numpy(arrays.test_images), torch.from_numpy(arrays.test_labels)
    fp32 = accuracy_report(
        predict(model, images, checkpoint["mean"], checkpoint["std"], params.batch_size), labels, arrays.class_names
    )
    manifest = read_json(MANIFEST)
    write_json(
        METRICS,
        {
            "accuracy": {"fp32": round(fp32["accuracy"], 2)},
            "per_class_accuracy": {"fp32": {k: round(v, 2) for k, v in fp32["per_class"].items() if v is not None}},
            "test_images": len(labels),
            "dataset": {"source": manifest["source"], "format": manifest["format"]},
        },
    )
    logging.info("fp32 test accuracy %.2f%% on %d images", fp32["accuracy"], len(labels))


if __name__ == "__main__":
    main()
