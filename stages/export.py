"""export stage: the integer model as ONNX (QLinear and bit-exact integer) and as C99 sources, with their sizes."""
from __future__ import annotations

import json
import logging

from pipeline.export.artifacts import METRICS_FILE, export_integer_model
from pipeline.io import write_json
from pipeline.model_files import load_integer_model
from stages.common import EXPORT_DIR, INTEGER_MODEL, start_stage


def main() -> None:
    start_stage("export")  # validates params.yaml; the stage has no params section of its own
    metrics = export_integer_model(load_integer_model(INTEGER_MODEL), EXPORT_DIR)
    write_json(EXPORT_DIR / METRICS_FILE, metrics)
    logging.info("wrote %s: %s", EXPORT_DIR, json.dumps(metrics))


if __name__ == "__main__":
    main()
