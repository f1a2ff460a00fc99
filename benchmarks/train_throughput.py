"""Training throughput: the in-memory uint8 tensor loop against a per-sample DataLoader.

The baseline is what the seed did (torchvision's CIFAR10 dataset style): a
Dataset that turns each stored image into a PIL image and applies
``ToTensor`` + ``Normalize``, batched by a ``DataLoader``. Both loops train the
same ``Net`` with the same optimizer for the same number of images, in this
run, and the script prints images per second and their ratio. It also times a
no-op ``dvc repro`` when the pipeline has already run here.

    python -m benchmarks.train_throughput [--images 4000] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from pipeline.models import Net
from pipeline.params import TrainParams
from pipeline.train import SEED_MEAN, SEED_STD, train_model

ARRAYS = Path("data/dataset.npz")


class PerSampleDataset(Dataset):
    """uint8 HWC images served one PIL image at a time through torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(SEED_MEAN, SEED_STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(inputs), targets).backward()
    optimizer.step()


def per_sample_loader_rate(images: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
    """Images per second through DataLoader(PerSampleDataset) (num_workers=0, as the seed)."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    loader = DataLoader(PerSampleDataset(images, labels), batch_size=batch_size, shuffle=True)
    started = time.perf_counter()
    for inputs, targets in loader:
        _step(model, optimizer, inputs, targets)
    return len(labels) / (time.perf_counter() - started)


def in_memory_rate(images: np.ndarray, labels: np.ndarray, batch_size: int, threads: int) -> float:
    """Images per second through pipeline.train.train_model, the train stage's own loop (one epoch)."""
    params = TrainParams(epochs=1, batch_size=batch_size, device="cpu", threads=threads)
    started = time.perf_counter()
    train_model(Net(), torch.from_numpy(images), torch.from_numpy(labels), params, progress=False)
    return len(labels) / (time.perf_counter() - started)


def noop_repro_seconds() -> float | None:
    """Wall time of `dvc repro` when nothing changed, or None where the pipeline has not run."""
    if not Path("dvc.lock").exists():
        return None
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", DO_NOT_TRACK="1")
    subprocess.run(["dvc", "repro"], env=env, check=True, capture_output=True)  # settle anything stale first
    started = time.perf_counter()
    output = subprocess.run(["dvc", "repro"], env=env, check=True, capture_output=True, text=True).stdout
    seconds = time.perf_counter() - started
    if "Running stage" in output:
        raise RuntimeError("the second dvc repro ran a stage; the pipeline is not reproducible here")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000, help="training images per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (params.yaml train.threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if ARRAYS.exists():
        data = np.load(ARRAYS)
        images, labels, source = data["train_images"][: args.images], data["train_labels"][: args.images], str(ARRAYS)
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, args.images).astype(np.int64)
        source = "synthetic (run the download stage for real images)"
    print(f"images: {len(labels)} from {source}; torch {torch.__version__}, {args.threads} thread(s)")
    print(f"{'batch':>5}  {'per-sample DataLoader':>22}  {'in-memory loop':>15}  {'speed-up':>8}")
    for batch_size in (4, 128):
        baseline = per_sample_loader_rate(images, labels, batch_size)
        ours = in_memory_rate(images, labels, batch_size, args.threads)
        print(f"{batch_size:>5}  {baseline:>16.0f} img/s  {ours:>9.0f} img/s  {ours / baseline:>7.2f}x")
    seconds = noop_repro_seconds()
    print("no-op dvc repro:", "skipped (no dvc.lock here yet)" if seconds is None else f"{seconds:.2f} s")


if __name__ == "__main__":
    main()
