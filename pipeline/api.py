"""The seed's Python API, for notebooks: ``from pipeline.api import *``.

Seed name -> what it is now:

- ``Net``: ``pipeline.models.Net`` (same layers, same state_dict keys)
- ``train_model(net, images, labels, params)``: ``pipeline.train.train_model`` on uint8 tensors
- ``test_model(net, images, labels)``: ``pipeline.models.test_model``, accuracy in percent
- ``quantize_layer_weights(weight, bits=8, calibrator="sigma")``: ``pipeline.quant.weights``; returns (int8 weight, scale)
- activation profiling hooks: ``profile_activations(capture(net), images, mean, std)`` observes every
  tensor a rescaling node reads (``pipeline.profile``), grouped by shared scale
- ``quantize_model_biases``: ``build_integer_model(graph, ranges, quantize_model_weights(graph))`` quantizes
  the biases with everything else (``pipeline.quant.build``)
- ``QuantizedNet(integer_model)``: ``pipeline.quant.engine``; ``forward`` runs the integer engine.
"""
from pipeline.arrays import load_arrays
from pipeline.graph.capture import capture
from pipeline.models import Net, test_model
from pipeline.params import TrainParams
from pipeline.plots import plot_activation_distribution, plot_weight_distribution
from pipeline.profile import calibrate_ranges, profile_activations
from pipeline.quant.build import build_integer_model
from pipeline.quant.calibrators import activation_range
from pipeline.quant.engine import QuantizedNet
from pipeline.quant.weights import quantize_layer_weights, quantize_model_weights
from pipeline.train import train_model
from pipeline.transforms import SEED_MEAN, SEED_STD, normalize

__all__ = [
    "Net",
    "QuantizedNet",
    "SEED_MEAN",
    "SEED_STD",
    "TrainParams",
    "activation_range",
    "build_integer_model",
    "calibrate_ranges",
    "capture",
    "load_arrays",
    "normalize",
    "plot_activation_distribution",
    "plot_weight_distribution",
    "profile_activations",
    "quantize_layer_weights",
    "quantize_model_weights",
    "test_model",
    "train_model",
]
