"""download stage: get CIFAR-10, verify it, decode it into uint8 arrays and a manifest."""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.arrays import DataError, DownloadError, save_arrays
from pipeline.data import acquire
from pipeline.io import write_json
from stages.common import ARRAYS, MANIFEST, start_stage

DOWNLOAD_DIR = Path(".cache/downloads")  # the official archive, kept out of DVC's outputs


def main() -> None:
    params = start_stage("download").download
    try:
        arrays, manifest = acquire(params.source, DOWNLOAD_DIR, sha256=params.sha256)
    except DownloadError as error:
        print(f"[download] {error}", file=sys.stderr)
        sys.exit(DownloadError.exit_status)
    except DataError as error:
        sys.exit(f"[download] {error}")
    save_arrays(arrays, ARRAYS)
    write_json(MANIFEST, manifest)


if __name__ == "__main__":
    main()
