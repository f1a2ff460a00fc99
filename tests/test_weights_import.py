"""Importing weights trained elsewhere: every accepted format loads bit for bit, every bad file is refused with a
message naming it, and a pickle of arbitrary objects runs none of its code."""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from pipeline.io import save_checkpoint
from pipeline.weights_import import (
    WEIGHTS_SUFFIXES,
    ImportedWeights,
    WeightsFileError,
    file_sha256,
    fit_weights,
    read_weights_file,
)


class Small(nn.Module):
    """A conv, a BatchNorm (its buffers, num_batches_tracked among them) and a linear layer: 4x4 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def seeded(seed: int) -> Small:
    with torch.random.fork_rng(devices=[]):  # other tests' random numbers stay as they were
        torch.manual_seed(seed)
        return Small().eval()


def trained() -> Small:
    """A model whose every tensor differs from a fresh one's, as if trained (BatchNorm's statistics too)."""
    model = seeded(1)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.rand(value.shape, generator=generator) + 0.1)  # positive: running_var must be
        model.bn.num_batches_tracked.fill_(7)
    return model


def fresh() -> Small:
    return seeded(2)


def assert_same_model(model: nn.Module, reference: nn.Module) -> None:
    state, reference_state = model.state_dict(), reference.state_dict()
    assert list(state) == list(reference_state)
    for name, value in state.items():
        assert value.dtype == reference_state[name].dtype and torch.equal(value, reference_state[name]), name
    images = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))


def save_torch(path: Path, content: object, **kwargs: object) -> Path:
    torch.save(content, path, **kwargs)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(WeightsFileError) as raised:
        read_weights_file(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and "rerun" not in message
    return message


def misfit(state_dict: dict[str, torch.Tensor]) -> str:
    model = fresh()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(WeightsFileError) as raised:
        fit_weights(model, state_dict, "models/w.pt")
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())  # nothing loaded
    message = str(raised.value)
    assert message.startswith("models/w.pt: does not fit the model: ") and "\n" not in message
    return message


@pytest.mark.parametrize(
    ("name", "save"),
    [
        ("model.pt", lambda path, sd: save_torch(path, sd)),
        ("model.pth", lambda path, sd: save_torch(path, sd)),
        ("legacy.pth", lambda path, sd: save_torch(path, sd, _use_new_zipfile_serialization=False)),
        ("model.safetensors", lambda path, sd: safetensors.torch.save_file(dict(sd), path)),
        ("lightning.ckpt.pt", lambda path, sd: save_torch(path, {"state_dict": sd, "epoch": 3})),
    ],
)
def test_a_state_dict_loads_bit_for_bit(tmp_path, name, save):
    reference = trained()
    path = tmp_path / name
    save(path, reference.state_dict())
    weights = read_weights_file(path)
    assert weights.format == ("safetensors" if name.endswith(".safetensors") else "state_dict")
    assert weights.checkpoint is None
    assert weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    model = fresh()
    fit_weights(model, weights.state_dict, str(path))
    assert_same_model(model, reference)


def test_a_checkpoint_of_this_pipeline_loads_with_its_metadata(tmp_path):
    reference = trained()
    metadata = {"model": "net", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "class_names": ["a", "b"]}
    save_checkpoint(tmp_path / "model.pt", metadata | {"state_dict": reference.state_dict()})
    weights = read_weights_file(tmp_path / "model.pt")
    assert isinstance(weights, ImportedWeights)
    assert weights.format == "checkpoint" and weights.checkpoint == metadata
    assert weights.sha256 == hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()
    model = fresh()
    fit_weights(model, weights.state_dict, "model.pt")
    assert_same_model(model, reference)


def test_half_precision_weights_load_exactly_and_rounding_ones_are_refused():
    reference = trained()
    halves = {name: value.half() if value.is_floating_point() else value
              for name, value in reference.state_dict().items()}
    model = fresh()
    fit_weights(model, halves, "w.pt")
    for name, value in model.state_dict().items():
        assert value.dtype == reference.state_dict()[name].dtype and torch.equal(value, halves[name].to(value.dtype))
    # float64 that float32 holds exactly is taken; one that float32 would round is not.
    exact = reference.state_dict() | {"fc.bias": reference.fc.bias.detach().double()}
    fit_weights(fresh(), exact, "w.pt")
    rounding = exact | {"fc.bias": torch.tensor([0.1, 0.2], dtype=torch.float64)}
    assert misfit(rounding).endswith("1 whose values the model's dtype would change: fc.bias (float64 -> float32)")


@pytest.mark.parametrize("name", ["w.pt", "w.safetensors"])
def test_a_file_without_batchnorm_counters_loads_and_keeps_the_models_own(tmp_path, name):
    state_dict = trained().state_dict()  # torch.save keeps its module versions, BatchNorm's 2 among them
    del state_dict["bn.num_batches_tracked"]
    if name.endswith(".pt"):
        torch.save(state_dict, tmp_path / name)
    else:
        safetensors.torch.save_file(dict(state_dict), tmp_path / name)
    model = fresh()
    fit_weights(model, read_weights_file(tmp_path / name).state_dict, name)
    assert model.bn.num_batches_tracked.item() == 0
    for key, value in state_dict.items():
        assert torch.equal(model.state_dict()[key], value), key
    # Not named among missing tensors either, when others are missing.
    del state_dict["fc.bias"]
    assert misfit(state_dict).endswith(": 1 missing from the file: fc.bias")


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dumps"])
def test_a_pickle_of_other_objects_is_refused_without_running_it(tmp_path, suffix, writer):
    marker = tmp_path / "code-ran"
    path = tmp_path / f"evil{suffix}"
    if writer == "torch.save":
        torch.save({"w": torch.zeros(2), "payload": MarkerMaker(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"payload": MarkerMaker(marker)}))
    message = refusal(path)
    assert not marker.exists()
    refused = (f"it holds Python objects other than tensors and plain data (here {__name__}.create_marker), which "
               "only a loader that runs code could read" if writer == "torch.save" else
               "not tensors and plain data as torch.save writes them")
    assert message == (f"{path}: refused without running any of its code: {refused}; save `model.state_dict()` with "
                       "torch.save, or with safetensors.torch.save_file")
    # The control: a loader that runs code would have created the marker.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def create_marker(path: str) -> None:
    Path(path).touch()


class MarkerMaker:
    """Unpickling it calls create_marker: a stand-in for code a malicious file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return create_marker, (self.marker,)


def test_a_whole_module_saved_with_torch_save_is_refused(tmp_path):
    message = refusal(save_torch(tmp_path / "model.pt", trained()))
    assert f"(here {__name__}.Small)" in message


def test_truncated_and_foreign_files_are_refused(tmp_path):
    reference = trained().state_dict()
    whole = save_torch(tmp_path / "whole.pt", reference).read_bytes()
    (tmp_path / "half.pt").write_bytes(whole[: len(whole) // 2])
    assert "not a PyTorch checkpoint, or a truncated or corrupted one (RuntimeError: " in refusal(tmp_path / "half.pt")
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    assert "not a PyTorch checkpoint, or a truncated or corrupted one" in refusal(tmp_path / "notes.pt")
    safetensors.torch.save_file(dict(reference), tmp_path / "whole.safetensors")
    whole = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "half.safetensors").write_bytes(whole[: len(whole) // 2])
    message = refusal(tmp_path / "half.safetensors")
    assert "not a safetensors file, or a truncated or corrupted one (SafetensorError: " in message
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "whole.pt").read_bytes())
    assert "not a safetensors file" in refusal(tmp_path / "model.safetensors")


def test_a_file_holding_no_state_dict_says_what_it_holds(tmp_path):
    reference = trained().state_dict()
    tutorial = {"epoch": 4, "model_state_dict": reference, "optimizer_state_dict": {"state": {}}, "loss": 0.5}
    message = refusal(save_torch(tmp_path / "tutorial.pt", tutorial))
    assert message == (
        f"{tmp_path / 'tutorial.pt'}: holds a dict of 4 entries ('epoch': an int, 'model_state_dict': a dict of "
        f"{len(reference)} entries, 'optimizer_state_dict': a dict of 1 entry, 'loss': a float), not a state_dict "
        "(names to tensors); its entry 'model_state_dict' is one: save that entry alone; "
        "save `model.state_dict()` with torch.save, or with safetensors.torch.save_file"
    )
    many = {f"t{index}": torch.zeros(1) for index in range(7)} | {"step": 3}
    message = refusal(save_torch(tmp_path / "mixed.pt", many))
    assert "holds a dict of 8 entries ('step': an int, 7 tensors ('t0', 't1', 't2', 't3', 't4', and 2 more))" in message
    assert "holds a list of 2 items, not a state_dict" in refusal(save_torch(tmp_path / "list.pt", [1, 2]))
    assert "holds a float32 tensor of shape (2, 3)," in refusal(save_torch(tmp_path / "one.pt", torch.zeros(2, 3)))
    assert "holds an empty dict," in refusal(save_torch(tmp_path / "empty.pt", {}))
    safetensors.torch.save_file({}, tmp_path / "empty.safetensors")
    assert refusal(tmp_path / "empty.safetensors").endswith(": holds no tensors; save `model.state_dict()` with "
                                                            "torch.save, or with safetensors.torch.save_file")


def test_wrong_suffix_missing_file_and_folder_are_refused(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    assert refusal(tmp_path / "model.bin").endswith(
        ": a weights file must end in .pt, .pth or .safetensors; this one has the suffix '.bin'")
    assert refusal(tmp_path / "absent.pt") == f"{tmp_path / 'absent.pt'}: no such file"
    (tmp_path / "folder.pt").mkdir()
    assert refusal(tmp_path / "folder.pt") == f"{tmp_path / 'folder.pt'}: not a file"
    assert WEIGHTS_SUFFIXES == (".pt", ".pth", ".safetensors")


def test_missing_and_unexpected_names_are_listed_with_a_count():
    state_dict = dict(trained().state_dict())
    del state_dict["fc.weight"], state_dict["conv.bias"]
    state_dict |= {f"extra{index}.weight": torch.zeros(1) for index in range(8)}
    assert misfit(state_dict).endswith(
        ": 2 missing from the file: conv.bias, fc.weight; 8 not in the model: extra0.weight, extra1.weight, "
        "extra2.weight, extra3.weight, extra4.weight, and 3 more"
    )


def test_a_shape_mismatch_names_the_tensor_and_both_shapes():
    state_dict = trained().state_dict() | {"fc.weight": torch.zeros(3, 64), "bn.weight": torch.ones(5)}
    assert misfit(state_dict).endswith(": 2 of another shape: bn.weight: file (5,) vs model (4,), "
                                       "fc.weight: file (3, 64) vs model (2, 64)")


def test_non_finite_and_non_tensor_values_are_named_all_at_once():
    state_dict = trained().state_dict()
    state_dict["conv.weight"][0, 0, 0, 0] = float("nan")
    state_dict["fc.bias"][1] = float("inf")
    state_dict["bn.bias"] = [0.0, 0.0, 0.0, 0.0]
    del state_dict["bn.weight"]
    assert misfit(state_dict).endswith(": 1 missing from the file: bn.weight; 1 not tensors: bn.bias (list); "
                                       "2 with NaN or infinity: conv.weight, fc.bias")


def test_names_behind_a_wrappers_prefix_get_a_hint():
    wrapped = {f"module.{name}": value for name, value in trained().state_dict().items()}
    assert misfit(wrapped).endswith("; every name in the file starts with 'module.' (a wrapper's): "
                                    "remove that prefix from the names")


# torch.ao (whose state_dicts hold such tensors) warns that quantized tensors are deprecated.
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantized_sparse_and_meta_tensors_are_refused_not_loaded():
    state_dict = trained().state_dict() | {
        "conv.weight": torch.quantize_per_tensor(torch.zeros(4, 3, 3, 3), 0.1, 0, torch.qint8),
        "fc.weight": torch.zeros(2, 64).to_sparse(),
        "bn.weight": torch.zeros(4, device="meta"),
    }
    assert misfit(state_dict).endswith(
        ": 3 not dense float or integer tensors (save the float model's state_dict, before quantizing it): "
        "conv.weight (qint8, quantized), bn.weight (float32, meta, no values), fc.weight (float32, sparse_coo)")


def test_a_users_dict_with_a_model_name_is_a_state_dict_not_a_pipeline_checkpoint(tmp_path):
    path = tmp_path / "mine.pt"
    torch.save({"model": "resnet18", "state_dict": trained().state_dict(), "epoch": 30}, path)
    imported = read_weights_file(path)
    assert (imported.format, imported.checkpoint) == ("state_dict", None)
