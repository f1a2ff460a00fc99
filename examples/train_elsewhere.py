"""A model trained outside the pipeline, by plain PyTorch, saved the three ways the pipeline imports.

Any user's script: nothing of the pipeline is imported. It reads the images the download stage wrote
(``data/dataset.npz``: run ``dvc repro download`` first), normalizes them with CIFAR-10's channel statistics
(not the pipeline's default), trains with SGD and a one-cycle schedule, prints its own test accuracy and writes
``<out>.pt`` (a state_dict), ``<out>.safetensors`` and ``<out>.onnx`` (float, BatchNorm kept as a node).

    python examples/train_elsewhere.py                       # TinyResNet (models/example.py), 2 epochs
    python examples/train_elsewhere.py --arch resnet18 --epochs 5 --out models/resnet18

``--arch resnet18`` is torchvision's ResNet-18 as it is (``models/torchvision_resnet18.py:resnet18``, 11.2M
parameters; its ImageNet stem takes 32x32 images to 8x8 maps, which keeps it quick on a CPU).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for models/
from models.example import TinyResNet  # noqa: E402
from models.torchvision_resnet18 import resnet18  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's channel statistics
ARCHITECTURES = {"tiny": TinyResNet, "resnet18": resnet18}


def normalized(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) -> float32 (N, 3, 32, 32), as torchvision's ToTensor + Normalize(MEAN, STD)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(normalized(images[i:i + 1000])).argmax(1) for i in range(0, len(images), 1000)])
    return 100.0 * float((predicted == torch.from_numpy(labels)).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="tiny")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--data", default="data/dataset.npz")
    parser.add_argument("--out", default="models/tiny_resnet", help="path without suffix")
    args = parser.parse_args()

    data = np.load(args.data)
    train_images, train_labels = data["train_images"], data["train_labels"]
    torch.manual_seed(0)
    model = ARCHITECTURES[args.arch]()
    steps = args.epochs * -(-len(train_labels) // args.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_labels))
        for start in range(0, len(order), args.batch_size):
            batch = order[start:start + args.batch_size].numpy()
            images = normalized(train_images[batch])
            flip = torch.rand(len(batch)) < 0.5  # random horizontal flips
            images[flip] = images[flip].flip(3)
            loss = loss_fn(model(images), torch.from_numpy(train_labels[batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
    model.eval()
    print(f"test accuracy {accuracy(model, data['test_images'], data['test_labels']):.2f}%")

    state_dict = model.state_dict()
    torch.save(state_dict, f"{args.out}.pt")
    save_file({key: value.contiguous() for key, value in state_dict.items()}, f"{args.out}.safetensors")
    # TrainingMode.PRESERVE keeps BatchNorm as its own node (an eval-mode model still exports it for inference), so
    # the pipeline folds it as it folds the state_dict's: the same integer model from either file. The default folds
    # it in float32 here, and the scales then differ in their 9th digit. dynamo=False: the exporter most ONNX files
    # come from (torch warns that it is deprecated, and about constant folding with PRESERVE, which matters only for a
    # model in training mode).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "It is recommended that constant folding be turned off", UserWarning)
        torch.onnx.export(model, (normalized(train_images[:1]),), f"{args.out}.onnx", dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    print(f"wrote {args.out}.pt, {args.out}.safetensors and {args.out}.onnx")


if __name__ == "__main__":
    main()
