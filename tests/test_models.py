import pytest
import torch
from torch import nn

from pipeline.model_spec import MODEL_NAMES
from pipeline.models import (
    MODELS,
    BNNet,
    CheckpointError,
    ModelSpecError,
    Net,
    ResNet20,
    build_model,
    check_class_scores,
    restore_model,
)


def test_net_is_the_seed_architecture():
    net = Net()
    assert [(name, type(module).__name__) for name, module in net.named_children()] == [
        ("conv1", "Conv2d"), ("relu1", "ReLU"), ("pool1", "MaxPool2d"),
        ("conv2", "Conv2d"), ("relu2", "ReLU"), ("pool2", "MaxPool2d"),
        ("flatten", "Flatten"),
        ("fc1", "Linear"), ("relu3", "ReLU"), ("fc2", "Linear"), ("relu4", "ReLU"), ("fc3", "Linear"),
    ]
    assert (net.conv1.in_channels, net.conv1.out_channels, net.conv1.kernel_size) == (3, 6, (5, 5))
    assert (net.conv2.in_channels, net.conv2.out_channels, net.conv2.kernel_size) == (6, 16, (5, 5))
    assert [(layer.in_features, layer.out_features) for layer in (net.fc1, net.fc2, net.fc3)] == [
        (400, 120), (120, 84), (84, 10)
    ]
    assert sum(p.numel() for p in net.parameters()) == 62006
    # The seed's state_dict keys load unchanged.
    assert set(net.state_dict()) == {f"{layer}.{kind}" for layer in ("conv1", "conv2", "fc1", "fc2", "fc3") for kind in ("weight", "bias")}


def test_the_names_params_validates_are_the_built_in_models():
    assert tuple(MODELS) == MODEL_NAMES


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_maps_a_batch_to_ten_logits(name):
    model = build_model(name).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_bnnet_has_batchnorm_and_only_known_layer_types():
    model = BNNet()
    kinds = {type(module) for module in model.children()}
    assert nn.BatchNorm2d in kinds
    assert kinds <= {nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear}


def test_unknown_model_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown model 'vgg'; allowed: \['bnnet', 'mobilenet', 'net', 'resnet20'\]"):
        build_model("vgg")


def test_resnet20_is_the_cifar_resnet_with_projection_shortcuts():
    model = ResNet20()
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    assert len(convs) == 19 + 2 and sum(p.numel() for p in model.parameters()) == 272474
    assert [conv.out_channels for conv in convs if conv.kernel_size == (1, 1)] == [32, 64]  # option B


def test_mobilenet_has_depthwise_convolutions_and_relu6():
    model = build_model("mobilenet")
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())


def test_a_factory_in_a_models_file_builds_with_the_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 10))\n"
    )
    first, second = build_model("models/mine.py:build", seed=3), build_model("models/mine.py:build", seed=3)
    assert torch.equal(first[1].weight, second[1].weight)
    assert isinstance(build_model("pipeline.models:Net"), Net)
    with pytest.raises(ModelSpecError, match=r"'models/mine.py' has no callable 'missing'"):
        build_model("models/mine.py:missing")


def test_a_module_that_cannot_be_imported_is_one_line_naming_it():
    with pytest.raises(ModelSpecError) as error:
        build_model("pipeline.no_such_module:make")
    assert str(error.value) == ("train.model 'pipeline.no_such_module:make': cannot import pipeline.no_such_module: "
                                "ModuleNotFoundError: No module named 'pipeline.no_such_module'")


def test_checking_the_class_scores_leaves_the_mode_and_the_batchnorm_statistics_as_they_were():
    model = build_model("bnnet", seed=0)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    check_class_scores(model, "bnnet", torch.zeros(1, 3, 32, 32), 10, "data/dataset.npz")
    assert model.training
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    with pytest.raises(ModelSpecError) as error:
        check_class_scores(model, "bnnet", torch.zeros(1, 3, 32, 32), 3, "data/dataset.npz")
    assert str(error.value) == ("train.model 'bnnet' outputs 10 classes per image; the dataset data/dataset.npz has "
                                "3 classes: the model's last layer must have 3 outputs")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_seeded_models_start_from_the_same_weights_and_leave_the_global_rng_alone(name):
    state = torch.random.get_rng_state()
    first, second = build_model(name, seed=5), build_model(name, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    other = build_model(name, seed=6)
    assert not torch.equal(first.state_dict()[next(iter(first.state_dict()))], other.state_dict()[next(iter(other.state_dict()))])


def _checkpoint(name: str) -> dict:
    return {"model": name, "state_dict": build_model(name, seed=0).state_dict()}


def test_restore_model_gives_the_checkpoint_weights():
    checkpoint = _checkpoint("net")
    model = restore_model(checkpoint, "net", "data/model.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), checkpoint["state_dict"].values()))


def test_a_checkpoint_of_another_model_than_the_params_name_is_an_error():
    with pytest.raises(CheckpointError, match=r"data/model.pt: holds a 'bnnet' model but train.model is 'net'; rerun"):
        restore_model(_checkpoint("bnnet"), "net", "data/model.pt")


def test_weights_of_another_architecture_are_an_error_naming_the_model():
    checkpoint = {"model": "net", "state_dict": build_model("bnnet").state_dict()}  # a mislabelled file
    with pytest.raises(CheckpointError, match=r"data/model.pt: its weights do not fit the 'net' architecture \("
                                              r".*Missing key\(s\) in state_dict: \"conv1.bias\""):
        restore_model(checkpoint, "net", "data/model.pt")


def test_non_finite_weights_are_an_error_naming_each_tensor():
    checkpoint = _checkpoint("net")
    checkpoint["state_dict"]["conv2.weight"][0, 0, 0, 0] = float("nan")
    checkpoint["state_dict"]["fc3.bias"][1] = float("inf")
    with pytest.raises(CheckpointError, match=r"data/model.pt: non-finite values \(NaN or infinity\) in "
                                              r"conv2.weight, fc3.bias; the training run diverged"):
        restore_model(checkpoint, "net", "data/model.pt")


def test_a_file_that_is_not_a_pipeline_checkpoint_is_an_error():
    with pytest.raises(CheckpointError, match="not a checkpoint of this pipeline"):
        restore_model({"conv1.weight": torch.zeros(1)}, "net", "other.pt")
