"""What every stage does first: logging, offline settings, validated params."""
from __future__ import annotations

import logging
import sys

from pipeline.params import Params, ParamsError, load_params

PARAMS_FILE = "params.yaml"


def start_stage(name: str) -> Params:
    """Set up logging and validate all of params.yaml before the stage does any work."""
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s")
    try:
        return load_params(PARAMS_FILE)
    except ParamsError as error:
        sys.exit(f"[{name}] invalid {PARAMS_FILE}: {error}")
