"""The PTQ comparison benchmark on tiny data: this project's settings, AdaRound, bias correction, the torch.ao and NNCF peers."""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch

from benchmarks import ptq_compare
from pipeline.arrays import CifarArrays, save_arrays
from pipeline.io import save_checkpoint, write_json
from pipeline.models import build_model
from pipeline.quant.ranges import ActivationFormat
from pipeline.quant.settings import AdaRoundSettings, CalibrationImages
from pipeline.transforms import SEED_MEAN, SEED_STD


@pytest.fixture
def tiny_run(tmp_path, synthetic_images):
    """A random Net checkpoint, 64 training and 64 test images, 16 of the training ones as calibration images."""
    images, labels = synthetic_images
    arrays = CifarArrays(images.numpy(), labels.numpy(), images.numpy(), labels.numpy(), tuple("abcdefghij"))
    save_arrays(arrays, tmp_path / "dataset.npz")
    model = build_model("net", seed=0)
    save_checkpoint(tmp_path / "model.pt", {"model": "net", "state_dict": model.state_dict(),
                                            "mean": list(SEED_MEAN), "std": list(SEED_STD)})
    write_json(tmp_path / "profile.json", {"split": "train", "indices": list(range(0, 64, 4))})
    return tmp_path


def _inputs(folder) -> ptq_compare.Inputs:
    model, mean, std, _ = ptq_compare.load_model(str(folder / "model.pt"), None)
    arrays = np.load(folder / "dataset.npz")
    images, labels = torch.from_numpy(arrays["train_images"]), torch.from_numpy(arrays["train_labels"]).long()
    return ptq_compare.Inputs(model, mean, std, calibration=images[::4], held_out=images[1::4],
                              held_out_labels=labels[1::4], test=images, test_labels=labels, threads=1)


def test_learned_rows_run_on_the_chosen_settings_weights(tiny_run):
    inputs = _inputs(tiny_run)
    settings = [ptq_compare.Setting("minmax", "minmax", "per_channel")]
    fp32_held_out = torch.zeros(len(inputs.held_out), dtype=torch.long)
    results, ranges = ptq_compare.run_ours(inputs, settings, 4, True, fp32_held_out)
    chosen = ptq_compare.rank(results)[0]
    learned = ptq_compare.run_learned(inputs, chosen.setting, ranges[chosen.setting.activation], 4, fp32_held_out,
                                      ["adaround", "bias correction"], AdaRoundSettings(iterations=20, batch_size=4),
                                      CalibrationImages(num_samples=8))
    assert list(learned) == ["bias correction", "adaround", "adaround + bias correction"]
    for result in learned.values():
        assert result.setting == chosen.setting
        assert 0.0 <= result.held_out <= 100.0 and 0.0 <= result.test <= 100.0


def test_four_bit_run_with_the_fx_peer_prints_the_table(tiny_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [
        "ptq_compare", "--checkpoint", str(tiny_run / "model.pt"), "--data", str(tiny_run / "dataset.npz"),
        "--profile", str(tiny_run / "profile.json"), "--bits", "4", "--validation", "16",
        "--activation-calibrators", "minmax", "--weight-calibrators", "minmax", "--skip", "onnxruntime", "pt2e", "nncf",
        "--mixed-precision", "--sensitivity-images", "8",
    ])
    ptq_compare.main()
    out = capsys.readouterr().out
    assert re.search(r"\| torch\.ao FX static PTQ, x86 qconfig, weights 4-bit per-channel min-max +\| \d+\.\d\d \| "
                     r"-?\d+\.\d\d \| \d+\.\d\d \|", out)  # test accuracy, drop and the drop's standard error
    assert re.search(r"\| fp32 \(PyTorch, eval mode\) +\| \d+\.\d\d \| 0\.00 \| 0\.00 \|", out)
    assert "could not run" not in out
    assert "this project, chosen on held-out: act minmax, w minmax" in out
    assert "this project, the chosen setting, mixed precision at the uniform 4-bit size: act minmax, w minmax" in out


def test_four_bit_activations_with_equalization_reach_this_project_and_the_fx_peer(tiny_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [
        "ptq_compare", "--checkpoint", str(tiny_run / "model.pt"), "--data", str(tiny_run / "dataset.npz"),
        "--profile", str(tiny_run / "profile.json"), "--bits", "4", "--validation", "16", "--activation-bits", "4",
        "--unsigned-activations", "--equalize", "--activation-calibrators", "minmax", "--weight-calibrators", "minmax",
        "--skip", "onnxruntime", "pt2e", "nncf",
    ])
    ptq_compare.main()
    out = capsys.readouterr().out
    assert "4-bit unsigned (full-range) where non-negative activations" in out
    assert re.search(r"\| this project, the chosen setting \+ equalization: act minmax, w minmax per_\w+ +\| \d.*"
                     r"\| 4 layer pairs \|", out)
    assert re.search(r"\| torch\.ao FX static PTQ, x86 qconfig, weights 4-bit per-channel min-max, activations 4-bit "
                     r"histogram +\| \d", out)
    assert "could not run" not in out


def test_the_activation_format_reaches_every_integer_model(tiny_run, monkeypatch):
    inputs = _inputs(tiny_run)
    inputs.activation_format = ActivationFormat(4, unsigned=True)
    fp32_held_out = torch.zeros(len(inputs.held_out), dtype=torch.long)
    setting = ptq_compare.Setting("minmax", "minmax", "per_tensor")
    built, build = [], ptq_compare.build_integer_model
    monkeypatch.setattr(ptq_compare, "build_integer_model", lambda *args, **kwargs: built.append(build(*args, **kwargs))
                        or built[-1])
    ptq_compare.run_ours(inputs, [setting], 4, True, fp32_held_out)
    ptq_compare.run_equalized(inputs, setting, 4, fp32_held_out)
    assert len(built) == 2
    for model in built:
        widths = {(tensor.bits, tensor.signed) for tensor in model.tensors.values() if tensor.bits != 32}
        assert widths == {(4, True), (4, False)}  # the input signed, the post-ReLU tensors unsigned


@pytest.mark.parametrize(("bits", "activation_bits"), [(3, 8), (8, 6)])
def test_the_nncf_peer_names_the_widths_it_has(tiny_run, bits, activation_bits):
    inputs = _inputs(tiny_run)
    inputs.activation_format = ActivationFormat(activation_bits)
    with pytest.raises(ValueError, match=rf"8 or 4 bits, not weights {bits} / activations {activation_bits}"):
        ptq_compare.nncf_peer(inputs, bits)


@pytest.mark.parametrize(("bits", "label"), [
    ("8", r"NNCF quantize, defaults"),
    ("4", r"NNCF quantize, defaults, weights 4-bit per-channel \(-8\.\.7\), activations 4-bit, target NPU"),
])
def test_a_run_with_the_nncf_peer_prints_its_row(tiny_run, monkeypatch, capsys, bits, label):
    pytest.importorskip("nncf", reason="NNCF is in the bench extra only")
    monkeypatch.setattr(sys, "argv", [
        "ptq_compare", "--checkpoint", str(tiny_run / "model.pt"), "--data", str(tiny_run / "dataset.npz"),
        "--profile", str(tiny_run / "profile.json"), "--bits", bits, "--activation-bits", bits, "--validation", "16",
        "--activation-calibrators", "minmax", "--weight-calibrators", "minmax", "--skip", "fx", "onnxruntime", "pt2e",
    ])
    ptq_compare.main()
    out = capsys.readouterr().out
    assert re.search(rf"\| {label} +\| \d+\.\d\d \|.*\| nncf \d", out)
    assert "could not run" not in out
