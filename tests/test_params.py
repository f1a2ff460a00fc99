import pytest

from pipeline.params import ParamsError, TrainParams, load_params, parse_params


def test_committed_params_file_is_valid_and_is_the_seed_recipe():
    params = load_params("params.yaml")
    assert params.download.source == "official"
    train = params.train
    assert (train.model, train.epochs, train.batch_size, train.optimizer) == ("net", 2, 4, "sgd")
    assert (train.lr, train.momentum, train.augment, train.schedule) == (0.001, 0.9, False, "constant")


def test_missing_sections_take_defaults():
    params = parse_params({})
    assert params.train == TrainParams()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"epochs": 0}}, "train.epochs: value 0 is out of range; allowed: >= 1"),
        ({"train": {"lr": -0.1}}, "train.lr: value -0.1 is out of range; allowed: > 0.0"),
        ({"train": {"lr": 0}}, "train.lr: value 0.0 is out of range; allowed: > 0.0"),
        ({"train": {"optimizer": "rmsprop"}}, "train.optimizer: value 'rmsprop' is not allowed; allowed: sgd, adam"),
        ({"train": {"model": "resnet"}}, "train.model: value 'resnet' is not allowed; allowed: net, bnnet"),
        ({"train": {"device": "tpu"}}, "train.device: value 'tpu' is not allowed; allowed: auto, cpu, cuda"),
        ({"train": {"epochs": "two"}}, "train.epochs: value 'two' has the wrong type; expected int"),
        ({"train": {"epochs": 2.5}}, "train.epochs: value 2.5 has the wrong type; expected int"),
        ({"train": {"augment": 1}}, "train.augment: value 1 has the wrong type; expected bool"),
        ({"train": {"batch_size": True}}, "train.batch_size: value True has the wrong type; expected int"),
        ({"train": {"momentum": 1.5}}, "train.momentum: value 1.5 is out of range; allowed: <= 1.0"),
        ({"train": {"epoch": 3}}, "train.epoch: unknown key; allowed keys: model, epochs,"),
        ({"trian": {}}, "trian: unknown section; allowed sections: download, train, profile, quantize_weights, evaluate"),
        ({"profile": {"calibrator": "kl"}}, "profile.calibrator: value 'kl' is not allowed; allowed: seed, minmax, percentile, mse, entropy"),
        ({"profile": {"percentile": 0}}, "profile.percentile: value 0.0 is out of range; allowed: > 0.0"),
        ({"quantize_weights": {"bits": 9}}, "quantize_weights.bits: value 9 is out of range; allowed: <= 8"),
        ({"quantize_weights": {"bits": 1}}, "quantize_weights.bits: value 1 is out of range; allowed: >= 2"),
        ({"quantize_weights": {"granularity": "per_row"}}, "quantize_weights.granularity: value 'per_row' is not allowed; allowed: per_tensor, per_channel"),
        ({"quantize_weights": {"calibrator": "entropy"}}, "quantize_weights.calibrator: value 'entropy' is not allowed; allowed: sigma, minmax, mse"),
        ({"download": {"source": None}}, "download.source: value null is not allowed; expected str"),
        ({"train": [1, 2]}, "train: expected a mapping"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(raw, message):
    with pytest.raises(ParamsError) as error:
        parse_params(raw)
    assert message in str(error.value)


def test_integer_is_accepted_for_a_float_param():
    assert parse_params({"train": {"lr": 1}}).train.lr == 1.0
