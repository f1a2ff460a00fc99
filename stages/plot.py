"""plot stage: distributions with their clipping ranges, accuracy per stage, SQNR, training curves; the results table.

Draws from the earlier stages' artifacts only: no model is run here (the graph stage's file gives the float weights).
"""
from __future__ import annotations

import logging

from pipeline.io import atomic_path, read_json
from pipeline.plots import read_training_curves, write_plots
from pipeline.report import results_markdown
from pipeline.weights_file import load_quantized_weights
from stages.common import (
    METRICS,
    PLOTS_DIR,
    PROFILE,
    QUANTIZED_WEIGHTS,
    RESULTS_TABLE,
    TRAINING_LOG,
    start_stage,
)
from stages.inputs import load_stage_graph


def main() -> None:
    start_stage("plot")  # validates params.yaml; the stage has no params section of its own
    graph = load_stage_graph().graph
    quantized_weights, weight_meta = load_quantized_weights(QUANTIZED_WEIGHTS)
    metrics = read_json(METRICS)
    shares = write_plots(
        graph, quantized_weights, weight_meta, read_json(PROFILE), metrics, read_training_curves(TRAINING_LOG), PLOTS_DIR
    )
    with atomic_path(RESULTS_TABLE) as tmp:
        tmp.write_text(results_markdown({"workspace": metrics}) + "\n")
    for name, share in shares.items():
        logging.info("%-6s %.3f%% of weights clipped", name, 100 * share)
    logging.info("figures and plot data in %s, results table in %s", PLOTS_DIR, RESULTS_TABLE)


if __name__ == "__main__":
    main()
