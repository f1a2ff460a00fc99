"""Training on in-memory uint8 tensors (evaluation: ``pipeline.evaluation``).

The dataset stays as uint8 (N, 32, 32, 3) on the training device; each batch is
normalized (and optionally augmented) with tensor operations there. No
per-sample Python transforms, no DataLoader: for small CIFAR models the Python
overhead of a per-sample loader dominates the step time.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from pipeline.models import batch_layout
from pipeline.params import TrainParams
from pipeline.progress import progress_items
from pipeline.transforms import SEED_MEAN, SEED_STD, normalize

CROP_PADDING = 4  # pixels, the usual CIFAR random-crop padding
# Steps between checks for a non-finite loss. Reading a flag back from a GPU waits for it to finish
# its queued work, so the flag is read every so often, not at every step; the step it names is exact.
DIVERGENCE_CHECK_STEPS = 200


# The EpochRecord fields the train stage logs as curves, per epoch; timing is left out, so equal runs
# log equal curves.
CURVES = ("loss", "accuracy", "lr")


class DivergedError(RuntimeError):
    """Training produced a non-finite loss (NaN or infinity); the message names the epoch and step."""

    def __init__(self, epoch: int, step: int, steps_per_epoch: int, lr: float) -> None:
        super().__init__(
            f"training diverged: the loss is not finite (NaN or infinity) at epoch {epoch}, step "
            f"{step} of {steps_per_epoch}; no checkpoint written. Lower train.lr (now {lr}) "
            "or use train.schedule: onecycle"
        )
        self.epoch, self.step, self.steps_per_epoch = epoch, step, steps_per_epoch

    def summary(self) -> dict[str, int | dict[str, int]]:
        """What the metrics file records of the failed run: the epochs that completed and where the loss
        broke (steps counted from 1 within the epoch)."""
        return {
            "epochs_completed": self.epoch - 1,
            "diverged": {"epoch": self.epoch, "step": self.step, "steps_per_epoch": self.steps_per_epoch},
        }


@dataclasses.dataclass(frozen=True)
class EpochRecord:
    epoch: int
    loss: float  # mean cross-entropy over the epoch's training batches
    accuracy: float  # percent of training images classified correctly during the epoch
    lr: float  # learning rate at the end of the epoch
    seconds: float


def resolve_device(device: str) -> torch.device:
    """Map the ``train.device`` param to a torch device; ``auto`` uses CUDA when present."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: value 'cuda' requested but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(device)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per image, on uint8 (B, H, W, C)."""
    batch, height, width, _ = images.shape
    device = images.device
    padded = nn.functional.pad(images, (0, 0, CROP_PADDING, CROP_PADDING, CROP_PADDING, CROP_PADDING))
    # Random draws on the CPU generator keep runs identical across devices for a given seed.
    top = torch.randint(0, 2 * CROP_PADDING + 1, (batch,), generator=generator).to(device)
    left = torch.randint(0, 2 * CROP_PADDING + 1, (batch,), generator=generator).to(device)
    flip = (torch.rand(batch, generator=generator) < 0.5).to(device)
    rows = top[:, None] + torch.arange(height, device=device)  # (B, H)
    cols = left[:, None] + torch.arange(width, device=device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    index = torch.arange(batch, device=device)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)


def _make_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    # fused=True updates all parameters in one kernel (CPU and CUDA). At batch size 4 the
    # per-tensor update ops of the default implementation are a measurable share of each step.
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay,
            nesterov=params.nesterov, fused=True,
        )
    return torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay, fused=True)


def _make_scheduler(optimizer: torch.optim.Optimizer, params: TrainParams, steps_per_epoch: int):
    if params.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=params.lr, epochs=params.epochs, steps_per_epoch=steps_per_epoch
        )
    return None


def train_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    params: TrainParams,
    mean: Sequence[float] = SEED_MEAN,
    std: Sequence[float] = SEED_STD,
    progress: bool | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> list[EpochRecord]:
    """Train ``model`` in place on uint8 images (N, 32, 32, 3) and int64 labels; returns one record per epoch.

    Deterministic on the CPU: the same params, data and thread count give the same weights bit for bit.
    ``progress=None`` shows a bar only when stderr is a terminal. ``on_epoch`` receives each epoch's
    record as soon as the epoch ends (the train stage logs it there, for live curves).
    """
    device = resolve_device(params.device)
    if device.type == "cpu":
        torch.set_num_threads(params.threads)
    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    model.to(device).train()
    images, labels = images.to(device), labels.to(device)
    count = len(labels)
    steps_per_epoch = (count + params.batch_size - 1) // params.batch_size
    optimizer = _make_optimizer(model, params)
    scheduler = _make_scheduler(optimizer, params, steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)
    layout = batch_layout(model)
    history = []
    for epoch in range(1, params.epochs + 1):
        started = time.perf_counter()
        order = torch.randperm(count, generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        first_bad_step = torch.full((), -1, dtype=torch.long, device=device)  # -1: every loss so far finite
        for step in progress_items(range(steps_per_epoch), f"epoch {epoch}/{params.epochs}", progress, every_item=False):
            batch_index = order[step * params.batch_size : (step + 1) * params.batch_size]
            # index_select, not images[batch_index]: the same rows, at a quarter of advanced indexing's cost.
            batch = images.index_select(0, batch_index)
            if params.augment:
                batch = augment(batch, generator)
            inputs, targets = normalize(batch, mean, std, layout), labels.index_select(0, batch_index)
            optimizer.zero_grad(set_to_none=True)
            logits = model(inputs)
            loss = loss_fn(logits, targets)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            # Accumulate on the device: a .item() per step would synchronize every batch.
            loss_sum.add_(loss.detach(), alpha=len(targets))
            correct.add_((logits.argmax(1) == targets).sum())
            first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss.detach()), step, first_bad_step)
            if (step + 1) % DIVERGENCE_CHECK_STEPS == 0 or step + 1 == steps_per_epoch:
                _raise_if_diverged(int(first_bad_step), epoch, steps_per_epoch, params)
        record = EpochRecord(
            epoch=epoch,
            loss=loss_sum.item() / count,
            accuracy=100.0 * correct.item() / count,
            lr=optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - started,
        )
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    model.eval()
    return history


def _raise_if_diverged(first_bad_step: int, epoch: int, steps_per_epoch: int, params: TrainParams) -> None:
    if first_bad_step >= 0:
        raise DivergedError(epoch, first_bad_step + 1, steps_per_epoch, params.lr)
