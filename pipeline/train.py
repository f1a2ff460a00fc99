"""Training and evaluation on in-memory uint8 tensors.

The dataset stays as uint8 (N, 32, 32, 3) on the training device; each batch is
normalized (and optionally augmented) with tensor operations there. No
per-sample Python transforms, no DataLoader: for small CIFAR models the Python
overhead of a per-sample loader dominates the step time.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from pipeline.models import MODELS
from pipeline.params import TrainParams
from pipeline.progress import progress_items

# The seed's normalization: per channel (x / 255 - 0.5) / 0.5, i.e. pixels to [-1, 1].
SEED_MEAN = (0.5, 0.5, 0.5)
SEED_STD = (0.5, 0.5, 0.5)
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


def normalize(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W), per-channel ``(x / 255 - mean) / std``.

    The same float operations, in the same order, as torchvision's ``ToTensor`` + ``Normalize``; contiguous
    NCHW as they give, unless ``memory_format`` asks for another layout (see ``batch_layout``).
    """
    mean_t, std_t = _channel_constants(tuple(mean), tuple(std), images.device)
    # The conversion copy writes the asked layout directly: no extra pass over the batch.
    return images.permute(0, 3, 1, 2).float(memory_format=memory_format).div_(255).sub_(mean_t).div_(std_t)


def batch_layout(model: nn.Module) -> torch.memory_format:
    """The memory layout of the batches ``model`` is given: channels-last for the built-in models, contiguous
    NCHW (what torchvision gives) for any other.

    A convolution gives its output its input's layout, so on channels-last batches every feature map of the
    model is channels-last, and a user's ``x.view(x.size(0), -1)`` after a conv fails on it. The built-in
    models flatten with ``flatten`` and ``mean`` only, and channels-last makes their oneDNN convolutions
    faster on a CPU (resnet20 trains 1.2x faster at batch 128 on one thread; net the same either way, and
    bit for bit as the reference run). The exact classes, not subclasses: a subclass may override ``forward``.
    """
    return torch.channels_last if type(model) in MODELS.values() else torch.contiguous_format


@functools.lru_cache(maxsize=8)
def _channel_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per device, not at every step: at batch size 4 that is a measurable share of the step.
    return (
        torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
        torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1),
    )


def normalized_batches(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    desc: str,
    progress: bool | None = None,
    device: torch.device | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Iterator[torch.Tensor]:
    """uint8 images (N, H, W, C) as normalized float batches (B, C, H, W) on ``device``, in order, in
    ``memory_format``.

    A progress bar labelled ``desc`` counts the batches; ``progress=None`` shows it only when
    stderr is a terminal.
    """
    for start in progress_items(range(0, len(images), batch_size), desc, progress, every_item=False):
        yield normalize(images[start : start + batch_size].to(device), mean, std, memory_format)


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


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float] = SEED_MEAN,
    std: Sequence[float] = SEED_STD,
    batch_size: int = 1000,
    progress: bool | None = None,
) -> torch.Tensor:
    """Predicted class per uint8 image (N, 32, 32, 3), as an int64 tensor on the CPU.

    ``progress=None`` shows a bar only when stderr is a terminal.
    """
    model.eval()
    # A model with no parameters (QuantizedNet holds integer buffers) runs on the CPU.
    device = next(model.parameters(), torch.empty(0)).device
    batches = normalized_batches(images, mean, std, batch_size, "predict", progress, device, batch_layout(model))
    predictions = [model(batch).argmax(1).cpu() for batch in batches]
    return torch.cat(predictions)


def accuracy_report(predictions: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Overall and per-class accuracy in percent."""
    correct = predictions == labels
    per_class = {
        name: 100.0 * correct[labels == index].float().mean().item() if (labels == index).any() else None
        for index, name in enumerate(class_names)
    }
    return {"accuracy": 100.0 * correct.float().mean().item(), "per_class": per_class}


def test_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: Sequence[float] = SEED_MEAN,
    std: Sequence[float] = SEED_STD,
) -> float:
    """The seed's ``test_model``: test accuracy in percent."""
    return 100.0 * (predict(model, images, mean, std) == labels).float().mean().item()


test_model.__test__ = False  # a library function, not a pytest test
