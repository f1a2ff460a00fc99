"""check-params stage: validate all of params.yaml whenever any of it changes.

Each other stage validates params.yaml too, but DVC runs a stage only when a key it reads
changes: a misspelled section (``trian:``) changes no such key, so without this stage
`dvc repro` would report "up to date" and `dvc exp run -S +trian.epochs=5` would succeed.
This stage depends on the whole file and writes nothing.
"""
from __future__ import annotations

import logging

from stages.common import PARAMS_FILE, start_stage


def main() -> None:
    start_stage("check-params")  # exits naming the bad key on any error
    logging.info("%s is valid", PARAMS_FILE)


if __name__ == "__main__":
    main()
