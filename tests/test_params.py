import dataclasses
import sys

import pytest

from pipeline.params import (
    DownloadParams,
    ParamsError,
    ProfileParams,
    QuantizeWeightsParams,
    SensitivityParams,
    TrainParams,
    load_params,
    parse_params,
    read_params_file,
)
from pipeline.quant.calibrators import ACTIVATION_CALIBRATORS, WEIGHT_CALIBRATORS
from pipeline.quant.rounding import ROUNDINGS
from pipeline.quant.settings import (
    ACTIVATION_CALIBRATOR_SETTINGS,
    ROUNDING_NAMES,
    WEIGHT_CALIBRATOR_SETTINGS,
    AdaRoundSettings,
    NoSettings,
    PercentileSettings,
    SigmaSettings,
    WeightCalibration,
    WeightMseSettings,
    WeightQuantization,
)
from tests.project_copy import (
    CLASSES,
    PROJECT_ROOT,
    copy_project,
    run,
    set_params,
    write_image_folder,
)


def test_params_file_is_valid_and_is_the_seed_recipe():
    # The workspace file, which the README's offline step edits: only download.source may differ.
    params = load_params(PROJECT_ROOT / "params.yaml")
    train = params.train
    assert (train.model, train.epochs, train.batch_size, train.optimizer) == ("net", 2, 4, "sgd")
    assert (train.lr, train.momentum, train.augment, train.schedule) == (0.001, 0.9, False, "constant")


def test_the_default_download_source_is_the_official_archive():
    assert DownloadParams().source == "official"
    # This repository's own params.yaml ships with it too; .ci/run checks that before its offline step, since a
    # user's clone may commit another source (the next test).
    assert "grep -qx '  source: official' params.yaml" in (PROJECT_ROOT / ".ci/run").read_text()


def test_a_committed_local_download_source_passes_the_params_tests(tmp_path):
    project = copy_project(tmp_path / "project")
    set_params(project, {"download": {"source": str(write_image_folder(tmp_path / "images", CLASSES, {"test": 1}))}})
    run(["git", "commit", "--quiet", "-am", "my own data source"], project)
    # Exactly the two tests that read params.yaml and the default source (not this one, which would recurse).
    selected = [f"tests/test_params.py::{name}" for name in (
        "test_params_file_is_valid_and_is_the_seed_recipe", "test_the_default_download_source_is_the_official_archive")]
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selected], project, check=False)
    assert result.returncode == 0, result.stdout[-3000:]


def test_missing_sections_take_defaults():
    params = parse_params({})
    assert params.train == TrainParams()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"epochs": -1}}, "train.epochs: value -1 is out of range; allowed: >= 0"),
        ({"train": {"epochs": 0}}, "train.epochs: value 0 trains nothing and 'net' has no weights to import; "
                                   "allowed: >= 1, or 0 with train.weights"),
        ({"train": {"weights": "models/absent.pt"}}, "train.weights: the weights file 'models/absent.pt' does not exist"),
        ({"train": {"weights": "models/example.py"}},
         "train.weights: value 'models/example.py' is not allowed; allowed: a file models/<file> ending in .pt, .pth, "
         ".safetensors"),
        ({"train": {"weights": "data/model.pt"}}, "train.weights: the weights file 'data/model.pt' must be under models/"),
        ({"train": {"model": "models/absent.onnx"}},
         "train.model: the ONNX model file 'models/absent.onnx' does not exist"),
        ({"train": {"mean": [0.5, 0.5]}},
         "train.mean: value [0.5, 0.5] is not allowed; expected a list of 3 numbers, one per channel"),
        ({"train": {"mean": 0.5}}, "train.mean: value 0.5 is not allowed; expected a list of 3 numbers"),
        ({"train": {"mean": [0.5, 1.5, 0.5]}}, "train.mean[1]: value 1.5 is out of range; allowed: <= 1.0"),
        ({"train": {"std": [0.5, 0, 0.5]}}, "train.std[1]: value 0.0 is out of range; allowed: > 0.0"),
        ({"train": {"std": [0.5, "x", 0.5]}}, "train.std[1]: value 'x' has the wrong type; expected float"),
        ({"train": {"lr": -0.1}}, "train.lr: value -0.1 is out of range; allowed: > 0.0"),
        ({"train": {"lr": 0}}, "train.lr: value 0.0 is out of range; allowed: > 0.0"),
        ({"train": {"optimizer": "rmsprop"}}, "train.optimizer: value 'rmsprop' is not allowed; allowed: sgd, adam"),
        ({"train": {"model": "resnet"}},
         "train.model: value 'resnet' is not allowed; allowed: net, bnnet, resnet20, mobilenet, models/<file>.py:"),
        ({"train": {"model": "models/absent.py:build"}}, "train.model: the model file 'models/absent.py' does not exist"),
        ({"train": {"model": "pipeline/models.py:Net"}}, "train.model: the model file 'pipeline/models.py' must be under models/"),
        ({"train": {"nesterov": True, "momentum": 0}}, "train.nesterov: value true needs train.optimizer sgd and train.momentum > 0"),
        ({"train": {"label_smoothing": 1.5}}, "train.label_smoothing: value 1.5 is out of range; allowed: <= 1.0"),
        ({"train": {"device": "tpu"}}, "train.device: value 'tpu' is not allowed; allowed: auto, cpu, cuda"),
        ({"train": {"epochs": "two"}}, "train.epochs: value 'two' has the wrong type; expected int"),
        ({"train": {"epochs": 2.5}}, "train.epochs: value 2.5 has the wrong type; expected int"),
        ({"train": {"augment": 1}}, "train.augment: value 1 has the wrong type; expected bool"),
        ({"train": {"batch_size": True}}, "train.batch_size: value True has the wrong type; expected int"),
        ({"train": {"momentum": 1.5}}, "train.momentum: value 1.5 is out of range; allowed: <= 1.0"),
        ({"train": {"epoch": 3}}, "train.epoch: unknown key; allowed keys: model, weights, epochs, mean, std,"),
        ({"trian": {}}, "trian: unknown section; allowed sections: download, train, graph, profile, sensitivity, quantize_weights, quantize_biases, evaluate"),
        ({"profile": {"calibrator": "kl"}}, "profile.calibrator: value 'kl' is not allowed; allowed: seed, minmax, percentile, mse, entropy"),
        ({"profile": {"percentile": {"percent": 0}}}, "profile.percentile.percent: value 0.0 is out of range; allowed: > 0.0"),
        ({"profile": {"percentile": 99.9}}, "profile.percentile: expected a mapping of keys to values (keys: percent), got 99.9"),
        ({"profile": {"mse": {"num_candidates": 0}}}, "profile.mse.num_candidates: value 0 is out of range; allowed: >= 1"),
        ({"profile": {"entropy": {"bins": 64}}}, "profile.entropy.bins: unknown key; allowed keys: num_quantized_bins"),
        ({"quantize_weights": {"k": 2.5}}, "quantize_weights.k: unknown key; allowed keys: bits, size_budget_bytes, size_budget_fraction, calibrator, granularity, sigma, mse, rounding, adaround, bias_correction, calibration"),
        ({"quantize_weights": {"sigma": {"k": 0}}}, "quantize_weights.sigma.k: value 0.0 is out of range; allowed: > 0.0"),
        ({"quantize_weights": {"rounding": "stochastic"}},
         "quantize_weights.rounding: value 'stochastic' is not allowed; allowed: nearest, adaround"),
        ({"quantize_weights": {"adaround": {"iterations": 0}}},
         "quantize_weights.adaround.iterations: value 0 is out of range; allowed: >= 1"),
        ({"quantize_weights": {"adaround": {"iterations": 1000000000}}},
         "quantize_weights.adaround.iterations: value 1000000000 is out of range; allowed: 1..100000 (Adam steps per "
         "layer; the AdaRound paper's 10000 are ample)"),
        ({"quantize_weights": {"adaround": {"lr": 0}}}, "quantize_weights.adaround.lr: value 0.0 is out of range; allowed: > 0.0"),
        ({"quantize_weights": {"mse": {"num_candidates": 1.5}}},
         "quantize_weights.mse.num_candidates: value 1.5 has the wrong type; expected int"),
        ({"quantize_weights": {"bits": 9}}, "quantize_weights.bits: value 9 is out of range; allowed: <= 8"),
        ({"quantize_weights": {"bits": 1}}, "quantize_weights.bits: value 1 is out of range; allowed: >= 2"),
        ({"quantize_weights": {"bits": {"conv1": 9}}}, "quantize_weights.bits.conv1: value 9 is out of range; allowed: <= 8"),
        ({"quantize_weights": {"bits": {"conv1": "4"}}},
         "quantize_weights.bits.conv1: value '4' has the wrong type; expected int"),
        ({"quantize_weights": {"bits": {}}},
         "quantize_weights.bits: an empty mapping names no layer; give one integer or every layer's name"),
        ({"quantize_weights": {"granularity": "per_row"}}, "quantize_weights.granularity: value 'per_row' is not allowed; allowed: per_tensor, per_channel"),
        ({"quantize_weights": {"calibrator": "entropy"}}, "quantize_weights.calibrator: value 'entropy' is not allowed; allowed: sigma, minmax, mse"),
        ({"download": {"source": None}}, "download.source: value null is not allowed; expected str"),
        ({"train": [1, 2]}, "train: expected a mapping"),
        ({"train": {"seed": 99999999999999999999}},
         "train.seed: value 99999999999999999999 is out of range; allowed: <= 18446744073709551615"),
        ({"profile": {"seed": -1}}, "profile.seed: value -1 is out of range; allowed: >= 0"),
        ({"download": {"source": ""}}, "download.source: value '' is empty; allowed: a non-empty string"),
        ({"download": {"source": "  "}}, "download.source: value '  ' is empty; allowed: a non-empty string"),
        ({"sensitivity": {"bits": [2, 9]}}, "sensitivity.bits[1]: value 9 is out of range; allowed: <= 8"),
        ({"sensitivity": {"bits": [2, 4.5]}}, "sensitivity.bits[1]: value 4.5 has the wrong type; expected int"),
        ({"sensitivity": {"bits": [4]}}, "sensitivity.bits: value [4] is not allowed; expected a list of at least 2 integers"),
        ({"sensitivity": {"bits": 4}}, "sensitivity.bits: value 4 is not allowed; expected a list of at least 2 integers"),
        ({"sensitivity": {"bits": [4, 2, 4]}}, "sensitivity.bits: value [4, 2, 4] repeats a value; allowed: distinct integers"),
        ({"sensitivity": {"num_samples": 0}}, "sensitivity.num_samples: value 0 is out of range; allowed: >= 1"),
        ({"quantize_weights": {"size_budget_bytes": 0}}, "quantize_weights.size_budget_bytes: value 0 is out of range; allowed: >= 1"),
        ({"quantize_weights": {"size_budget_fraction": 0}},
         "quantize_weights.size_budget_fraction: value 0.0 is out of range; allowed: > 0.0"),
        ({"quantize_weights": {"size_budget_fraction": 1.5}},
         "quantize_weights.size_budget_fraction: value 1.5 is out of range; allowed: <= 1.0"),
        ({"quantize_weights": {"size_budget_fraction": 0.5, "size_budget_bytes": 1000}},
         "quantize_weights.size_budget_fraction: value 0.5 is set together with quantize_weights.size_budget_bytes 1000; "
         "allowed: one of them"),
        ({"quantize_weights": {"size_budget_bytes": 1000, "bits": {"conv1": 4}}},
         "quantize_weights.size_budget_bytes: value 1000 chooses each layer's bits among sensitivity.bits, so "
         "quantize_weights.bits must stay 8; got {'conv1': 4}"),
        ({"quantize_weights": {"size_budget_fraction": 0.5, "bits": 4}},
         "quantize_weights.size_budget_fraction: value 0.5 chooses each layer's bits among sensitivity.bits, so "
         "quantize_weights.bits must stay 8; got 4"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(raw, message):
    with pytest.raises(ParamsError) as error:
        parse_params(raw)
    assert message in str(error.value)


def test_the_chosen_calibrator_gets_its_own_settings_and_no_stage_branches():
    profile = parse_params({"profile": {"calibrator": "percentile", "percentile": {"percent": 99.0}}}).profile
    assert profile.calibrator_settings == PercentileSettings(99.0)
    assert parse_params({"profile": {"calibrator": "minmax"}}).profile.calibrator_settings == NoSettings()
    weights = parse_params({"quantize_weights": {"calibrator": "mse", "mse": {"num_candidates": 7}}}).quantize_weights
    assert weights.weight_calibration == WeightCalibration("mse", WeightMseSettings(7), "per_tensor")
    assert parse_params({}).quantize_weights.weight_calibration.settings == SigmaSettings(3.0)
    adaround = parse_params({"quantize_weights": {"rounding": "adaround", "adaround": {"iterations": 50}}}).quantize_weights
    assert (adaround.rounding, adaround.adaround) == ("adaround", AdaRoundSettings(iterations=50))
    assert adaround.weight_quantization == WeightQuantization(8, WeightCalibration(), "adaround",
                                                              AdaRoundSettings(iterations=50))
    assert parse_params({}).quantize_weights.weight_quantization.rounding_settings == NoSettings()


def test_sensitivity_widths_are_a_sorted_list_and_a_budget_is_bytes_or_a_fraction_of_the_int8_size():
    params = parse_params({"sensitivity": {"bits": [8, 2, 5]}, "quantize_weights": {"size_budget_fraction": 0.5}})
    assert params.sensitivity.bits == (2, 5, 8)
    assert params.quantize_weights.size_budget_key == "size_budget_fraction"
    assert params.quantize_weights.size_budget(1001) == 500  # rounded down: the budget is never exceeded
    by_bytes = parse_params({"quantize_weights": {"size_budget_bytes": 700}}).quantize_weights
    assert (by_bytes.size_budget_key, by_bytes.size_budget(1001)) == ("size_budget_bytes", 700)
    default = parse_params({}).quantize_weights
    assert (default.size_budget_key, default.size_budget(1001)) == (None, None)


def test_weight_bits_may_name_a_width_per_layer():
    assert parse_params({"quantize_weights": {"bits": {"conv1": 8, "fc3": 4}}}).quantize_weights.bits == {"conv1": 8, "fc3": 4}
    assert parse_params({"quantize_weights": {"bits": 6}}).quantize_weights.bits == 6


@pytest.mark.parametrize(("section", "registry"), [(ProfileParams, ACTIVATION_CALIBRATORS),
                                                   (SensitivityParams, WEIGHT_CALIBRATORS),
                                                   (QuantizeWeightsParams, WEIGHT_CALIBRATORS)])
def test_every_calibrator_with_options_has_its_settings_in_its_section(section, registry):
    fields = {field.name: field for field in dataclasses.fields(section)}
    for name, entry in registry.items():
        if entry.settings is not NoSettings:
            assert fields[name].default_factory is entry.settings, name
        for calibrator_name in registry:
            section_of_it = section(calibrator=calibrator_name)
            settings = (section_of_it.calibrator_settings if section is ProfileParams
                        else section_of_it.weight_calibration.settings)
            assert type(settings) is registry[calibrator_name].settings


def test_the_calibrator_names_params_validates_are_the_registries_names():
    assert list(ACTIVATION_CALIBRATOR_SETTINGS) == list(ACTIVATION_CALIBRATORS)
    assert list(WEIGHT_CALIBRATOR_SETTINGS) == list(WEIGHT_CALIBRATORS)


def test_the_rounding_names_params_validates_are_the_registrys_names():
    assert list(ROUNDING_NAMES) == list(ROUNDINGS)
    rounding_field = next(field for field in dataclasses.fields(QuantizeWeightsParams) if field.name == "rounding")
    assert rounding_field.metadata["choices"] == ROUNDING_NAMES


def test_the_sensitivity_measures_quantize_weights_quantizer_by_default():
    """Both sections name the weight quantizer (no stage reads another's section): equal by default and in the
    workspace's params.yaml, so a size budget can use the sensitivity."""
    for params in (parse_params({}), load_params(PROJECT_ROOT / "params.yaml")):
        sensitivity, weights = params.sensitivity, params.quantize_weights
        assert sensitivity.weight_calibration == weights.weight_calibration


def test_validating_params_imports_no_torch_and_no_method():
    """params.yaml is validated from names and rules (pipeline.model_spec, pipeline.quant.settings): the check-params
    stage loads neither torch nor the models, calibrators or any other quantization code."""
    script = ("import sys; import stages.check_params; "
              "print(sorted(name for name in sys.modules if name == 'torch' or name.startswith('pipeline.')))")
    loaded = run([sys.executable, "-c", script], PROJECT_ROOT).stdout.strip()
    assert loaded == str(["pipeline.model_spec", "pipeline.normalization", "pipeline.params", "pipeline.quant",
                          "pipeline.quant.settings", "pipeline.validation"])


def test_a_model_file_under_models_or_a_module_factory_is_accepted():
    assert parse_params({"train": {"model": "models/example.py:TinyResNet"}}).train.model == "models/example.py:TinyResNet"
    assert parse_params({"train": {"model": "pipeline.models:ResNet20"}}).train.model == "pipeline.models:ResNet20"


def test_imported_weights_and_an_onnx_model_are_accepted_with_their_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("weights.pt", "weights.safetensors", "net.onnx"):
        (tmp_path / "models" / name).write_bytes(b"checked by the train stage, not here")
    imported = parse_params({"train": {"weights": "models/weights.safetensors", "epochs": 0,
                                       "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616]}}).train
    assert (imported.weights, imported.epochs) == ("models/weights.safetensors", 0)
    assert imported.mean == (0.4914, 0.4822, 0.4465) and imported.std == (0.247, 0.2435, 0.2616)
    assert parse_params({"train": {"weights": "models/weights.pt", "epochs": 3}}).train.epochs == 3  # fine-tuning
    assert parse_params({"train": {"model": "models/net.onnx", "epochs": 0}}).train.model == "models/net.onnx"
    with pytest.raises(ParamsError, match=r"train.weights: value 'models/weights.pt' is set together with the ONNX "
                                          r"model train.model 'models/net.onnx', whose weights are in the file"):
        parse_params({"train": {"model": "models/net.onnx", "weights": "models/weights.pt"}})


def test_integer_is_accepted_for_a_float_param():
    assert parse_params({"train": {"lr": 1}}).train.lr == 1.0


def test_params_are_read_as_dvc_reads_them_yaml_1_2(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as a string and `yes` as true; DVC's ruamel.yaml reads 0.001 and 'yes'.
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-4\n")
    train = load_params(path).train
    assert (train.lr, train.weight_decay) == (0.001, 0.0005)
    path.write_text("train:\n  augment: yes\n")
    with pytest.raises(ParamsError, match="train.augment: value 'yes' has the wrong type; expected bool"):
        load_params(path)


def test_a_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ParamsError, match=r"params.yaml: not valid YAML: "):
        read_params_file(path)


def test_the_largest_seed_torch_takes_is_allowed():
    import torch

    seed = parse_params({"train": {"seed": 2**64 - 1}}).train.seed
    torch.Generator().manual_seed(seed)
