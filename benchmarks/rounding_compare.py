"""One run's integer model under each requantization rule and logits type: accuracy and paired standard errors.

In a folder where the pipeline ran (its ``data/``: the checkpoint, graph, profile and quantized weights), the
integer model is rebuilt as the quantize-biases stage builds it, for every ``quantize_biases.rounding`` and
``quantize_biases.logits``, and run by the engine on the test split. Each row prints the integer accuracy,
its drop from fp32 with the paired standard error, and its difference from the first row (the pipeline's
default, double rounding with int8 logits) with the paired standard error of that difference. Nothing is
chosen from these figures: they show what the rule costs, on the test split, after the fact.

``--save-correct FILE.npy`` writes the first row's per-image correctness, and ``--reference-correct FILE.npy``
adds a row for another run's (for instance an earlier commit's integer model on the same checkpoint).

    python -m benchmarks.rounding_compare [--run-dir .] [--save-correct FILE.npy]
                                          [--reference-correct FILE.npy --reference-name NAME]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from pipeline.arrays import load_arrays
from pipeline.evaluation import engine_logits, paired_difference_error
from pipeline.graph.nodes import with_biases
from pipeline.io import read_json
from pipeline.models import predict
from pipeline.quant.build import build_integer_model
from pipeline.quant.ranges import ActivationFormat
from pipeline.quant.settings import LOGITS_TYPES, REQUANTIZE_ROUNDINGS
from pipeline.weights_file import load_corrected_biases, load_quantized_weights
from stages.common import ARRAYS, PROFILE, QUANTIZED_WEIGHTS
from stages.inputs import load_stage_graph
from stages.trained_model import load_trained_model


def settings() -> list[tuple[str, str]]:
    """(rounding, logits) pairs, the pipeline's default first."""
    return [(rounding, logits) for rounding in REQUANTIZE_ROUNDINGS for logits in LOGITS_TYPES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("."), help="the folder the pipeline ran in (its data/)")
    parser.add_argument("--save-correct", type=Path, help="write the default row's per-image correctness (.npy)")
    parser.add_argument("--reference-correct", type=Path, help="another run's per-image correctness (.npy)")
    parser.add_argument("--reference-name", default="reference", help="the row name of --reference-correct")
    args = parser.parse_args()
    os.chdir(args.run_dir)  # the stages' paths are relative to the run's folder
    arrays = load_arrays(ARRAYS)
    images, labels = torch.from_numpy(arrays.test_images), torch.from_numpy(arrays.test_labels)
    model, checkpoint = load_trained_model()
    mean, std = checkpoint["mean"], checkpoint["std"]
    fp32_correct = predict(model, images, mean, std) == labels
    graph_file = load_stage_graph()
    profile = read_json(PROFILE)
    ranges = {name: group["range"] for name, group in profile["activations"].items()}
    weights, _ = load_quantized_weights(QUANTIZED_WEIGHTS)
    graph = with_biases(graph_file.graph, load_corrected_biases(QUANTIZED_WEIGHTS))
    rows: list[tuple[str, torch.Tensor]] = []
    for rounding, logits in settings():
        integer_model = build_integer_model(
            graph, ranges, weights, mean, std, ActivationFormat(**profile["activation_format"]), rounding,
            profile["logits"]["range"] if logits == "int8" else None,
        )
        predictions = engine_logits(integer_model, images, mean, std).argmax(dim=1)
        rows.append((f"{rounding} rounding, {logits} logits", predictions == labels))
    if args.save_correct:
        np.save(args.save_correct, rows[0][1].numpy())
    if args.reference_correct:
        rows.append((args.reference_name, torch.from_numpy(np.load(args.reference_correct))))
    n = len(labels)
    print(f"{n} test images; fp32 {100 * float(fp32_correct.double().mean()):.2f}%")
    width = max(len(name) for name, _ in rows)
    print(f"{'integer model':<{width}} {'accuracy':>8} {'drop from fp32':>16} {'vs the first row':>18}")
    default = rows[0][1]
    for name, correct in rows:
        accuracy = 100 * float(correct.double().mean())
        drop = 100 * float(fp32_correct.double().mean()) - accuracy
        versus = accuracy - 100 * float(default.double().mean())
        print(f"{name:<{width}} {accuracy:>7.2f}% {drop:>7.2f} +- {paired_difference_error(fp32_correct, correct):.2f}"
              f" {versus:>+9.2f} +- {paired_difference_error(default, correct):.2f}")


if __name__ == "__main__":
    main()
