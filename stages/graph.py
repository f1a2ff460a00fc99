"""graph stage: the trained model's float graph, written once for every later stage (pipeline.graph.file).

Traced with torch.fx, BatchNorm folded, ReLUs fused (``pipeline.graph.capture``), and cross-layer equalized with
``graph.equalize``. The model is rebuilt from the checkpoint, which records its architecture, so the stage reads
no other section's params. The file also holds the trained model's own calls (``pipeline.graph.trace``), which
the profile stage replays to calibrate on exactly what the trained model computes.
"""
from __future__ import annotations

import logging
import sys

from pipeline.graph.capture import capture
from pipeline.graph.file import GraphFile, save_graph_file
from pipeline.graph.nodes import UnsupportedModelError
from pipeline.graph.trace import record_trace
from pipeline.quant.equalization import equalize
from stages.common import GRAPH, start_stage
from stages.trained_model import load_trained_model


def main() -> None:
    params = start_stage("graph").graph
    model, checkpoint = load_trained_model()
    try:
        graph = capture(model)
        original = record_trace(graph.traced)
    except UnsupportedModelError as error:
        sys.exit(f"[graph] the model cannot be quantized: {error}")
    if params.equalize:
        equalized = equalize(graph)
        logging.info("cross-layer equalization: %d layer pairs (%s), %d sweeps%s", len(equalized.pairs),
                     ", ".join(f"{pair.first}->{pair.second}" for pair in equalized.pairs) or "none",
                     equalized.iterations, "" if equalized.converged else ", not converged")
        # Between the pairs the trained model's tensors are not the equalized graph's: profile runs the graph.
        graph, original = equalized.graph, None
    source = {key: value for key, value in checkpoint.items() if key != "state_dict"}
    save_graph_file(GRAPH, GraphFile(graph, source, params.equalize, original))
    logging.info("%s: %d nodes, %d layers (%s)%s", GRAPH, len(graph.nodes), len(graph.layers()), source["model"],
                 ", equalized" if params.equalize else "")


if __name__ == "__main__":
    main()
