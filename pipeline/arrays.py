"""The decoded dataset on disk: CIFAR-10's uint8 arrays in one ``.npz`` (no pickle), and the data errors.

The download stage writes the file (``pipeline.data`` acquires and decodes the source); every later
stage that reads images loads it from here, without the decoders.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.io import atomic_path


class DataError(Exception):
    """A data problem the user can fix; the message names the file and what is wrong."""


class DownloadError(DataError):
    """The official download failed on the network: the one data error that trying again can fix."""

    # The download stage's exit status for it (EX_TEMPFAIL of sysexits.h); the Prefect flow retries only that.
    exit_status = 75


@dataclass(frozen=True)
class CifarArrays:
    """Both splits in source order: an image-folder source comes grouped by class, so take
    subsets with :func:`pipeline.transforms.sample_indices`, never as a prefix."""

    train_images: np.ndarray  # uint8 (N, 32, 32, 3), HWC RGB
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


def save_arrays(arrays: CifarArrays, path: Path) -> None:
    """Save the arrays as an uncompressed .npz (fast to reload), atomically."""
    with atomic_path(path) as tmp:
        # A file object, because np.savez appends ".npz" to a path not ending in it.
        with open(tmp, "wb") as f:
            np.savez(
                f,
                train_images=arrays.train_images,
                train_labels=arrays.train_labels,
                test_images=arrays.test_images,
                test_labels=arrays.test_labels,
                class_names=np.array(arrays.class_names, dtype=str),
            )


def load_arrays(path: Path) -> CifarArrays:
    """Load arrays written by :func:`save_arrays` (no pickle involved)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return CifarArrays(
                train_images=npz["train_images"],
                train_labels=npz["train_labels"],
                test_images=npz["test_images"],
                test_labels=npz["test_labels"],
                class_names=tuple(str(name) for name in npz["class_names"]),
            )
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"{path}: not a readable CIFAR arrays file ({exc}); rerun the download stage."
        ) from exc
