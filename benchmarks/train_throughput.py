"""Training throughput: the train stage's in-memory uint8 loop against per-sample DataLoaders.

Three loops train ``Net`` on the same images for one epoch each:

- ``ImageFolder``: the torchvision-style baseline the project is measured
  against. The images are written once as PNG files (lossless, so every loop
  sees the same pixels) in an ``<class>/<image>.png`` tree, and
  ``torchvision.datasets.ImageFolder`` decodes one file per sample through
  ``ToTensor`` + ``Normalize``, batched by a ``DataLoader`` (``num_workers=0``),
  stepping the seed's ``SGD(lr=0.001, momentum=0.9)``.
- ``per-sample array``: the same, but each sample is a PIL image made from
  uint8 arrays already in memory (what torchvision's ``CIFAR10`` dataset and the
  seed did): no file decode, so the stricter baseline.
- ``in-memory loop``: ``pipeline.train.train_model``, the train stage's own loop.

This machine's speed drifts (shared cores), so the loops run interleaved for
several rounds and the script prints each loop's median rate and the median of
the per-round speed-ups. It also times no-op ``dvc repro`` runs where the
pipeline has already run here.

    python -m benchmarks.train_throughput [--images 1024] [--rounds 11] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from pipeline.arrays import load_arrays
from pipeline.models import Net
from pipeline.params import TrainParams
from pipeline.train import train_model
from pipeline.transforms import SEED_MEAN, SEED_STD, sample_indices
from stages.common import ARRAYS

SEED_TRANSFORM = transforms.Compose([transforms.ToTensor(), transforms.Normalize(SEED_MEAN, SEED_STD)])


class PerSampleArrayDataset(Dataset):
    """uint8 HWC images served one PIL image at a time through torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return SEED_TRANSFORM(Image.fromarray(self.images[index])), int(self.labels[index])


def write_image_folder(images: np.ndarray, labels: np.ndarray, root: Path) -> None:
    """PNG files in ``root/<label>/<index>.png``; ImageFolder's sorted class folders give back the labels."""
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:06d}.png")


def seed_loop_rate(dataset: Dataset, batch_size: int) -> float:
    """Images per second through DataLoader(dataset) and the seed's SGD step, one epoch."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    started = time.perf_counter()
    for inputs, targets in loader:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return len(dataset) / (time.perf_counter() - started)


def in_memory_rate(images: torch.Tensor, labels: torch.Tensor, batch_size: int, threads: int) -> float:
    """Images per second through pipeline.train.train_model, the train stage's own loop (one epoch)."""
    params = TrainParams(epochs=1, batch_size=batch_size, device="cpu", threads=threads)
    started = time.perf_counter()
    train_model(Net(), images, labels, params, progress=False)
    return len(labels) / (time.perf_counter() - started)


def interleaved_rates(loops: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each loop's rate per round, the loops run one after another within a round."""
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(rounds):
        for name, loop in loops.items():
            rates[name].append(loop())
    return rates


def median_speedup(ours: list[float], baseline: list[float]) -> float:
    """Median over rounds of ours/baseline, each ratio taken within one round."""
    return statistics.median(mine / theirs for mine, theirs in zip(ours, baseline))


def noop_repro_seconds(runs: int) -> list[float] | None:
    """Wall times of `dvc repro` when nothing changed, or None where the pipeline has not run."""
    if not Path("dvc.lock").exists():
        return None
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", DO_NOT_TRACK="1")
    _dvc_repro(env)  # settle anything stale first
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        output = _dvc_repro(env)
        times.append(time.perf_counter() - started)
        if "Running stage" in output:
            raise SystemExit("a second dvc repro ran a stage; the pipeline is not reproducible here")
    return times


def _dvc_repro(env: dict[str, str]) -> str:
    result = subprocess.run(["dvc", "repro"], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"dvc repro failed (exit {result.returncode}), so no no-op time:\n{result.stderr.strip()}")
    return result.stdout


def load_images(count: int) -> tuple[np.ndarray, np.ndarray, str]:
    """A seeded random subset of the training split: a prefix of an image-folder source is a single class."""
    if ARRAYS.exists():
        arrays = load_arrays(ARRAYS)
        if count > len(arrays.train_labels):
            raise SystemExit(f"--images: value {count} is out of range; allowed: 1..{len(arrays.train_labels)} "
                             f"(training images in {ARRAYS})")
        indices = sample_indices(len(arrays.train_labels), count, seed=0)
        return arrays.train_images[indices], arrays.train_labels[indices], f"{ARRAYS} (random subset)"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, count).astype(np.int64)
    return images, labels, "synthetic (run the download stage for real images)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="training images per loop and round")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds per batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (params.yaml train.threads)")
    parser.add_argument("--repro-runs", type=int, default=5, help="no-op dvc repro runs to time")
    args = parser.parse_args()
    if args.images < 1:
        parser.error(f"--images: value {args.images} is out of range; allowed: >= 1")
    torch.set_num_threads(args.threads)
    images, labels, source = load_images(args.images)
    print(f"images: {len(labels)} from {source}; torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds, medians")
    with tempfile.TemporaryDirectory() as folder:
        write_image_folder(images, labels, Path(folder))
        image_folder = datasets.ImageFolder(folder, transform=SEED_TRANSFORM)
        array_dataset = PerSampleArrayDataset(images, labels)
        image_tensor, label_tensor = torch.from_numpy(images), torch.from_numpy(labels)
        print(f"{'batch':>5}  {'ImageFolder':>11}  {'per-sample array':>16}  {'in-memory loop':>14}  "
              f"{'vs ImageFolder':>14}  {'vs array':>8}")
        for batch_size in (4, 128):
            rates = interleaved_rates(
                {
                    "folder": lambda: seed_loop_rate(image_folder, batch_size),
                    "array": lambda: seed_loop_rate(array_dataset, batch_size),
                    "ours": lambda: in_memory_rate(image_tensor, label_tensor, batch_size, args.threads),
                },
                args.rounds,
            )
            medians = {name: statistics.median(values) for name, values in rates.items()}
            print(f"{batch_size:>5}  {medians['folder']:>7.0f} i/s  {medians['array']:>12.0f} i/s  "
                  f"{medians['ours']:>10.0f} i/s  {median_speedup(rates['ours'], rates['folder']):>13.2f}x  "
                  f"{median_speedup(rates['ours'], rates['array']):>7.2f}x")
    times = noop_repro_seconds(args.repro_runs)
    if times is None:
        print("no-op dvc repro: skipped (no dvc.lock here yet)")
    else:
        print(f"no-op dvc repro: median {statistics.median(times):.2f} s over {len(times)} runs "
              f"(min {min(times):.2f} s, max {max(times):.2f} s)")


if __name__ == "__main__":
    main()
