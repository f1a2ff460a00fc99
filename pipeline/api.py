"""The seed's Python API, for notebooks: ``from pipeline.api import *``.

Seed name -> what it is now:

- ``Net``: ``pipeline.models.Net`` (same layers, same state_dict keys)
- ``train_model(net, images, labels, params)``: ``pipeline.train.train_model`` on uint8 tensors
- ``test_model(net, images, labels)``: ``pipeline.train.test_model``, accuracy in percent
- ``quantize_layer_weights(weight, bits=8, calibrator="sigma")``: ``pipeline.quant.model``; returns (int8 weight, scale)
- ``register_activation_profiling_hooks(net)``: ``pipeline.quant.observers``; returns (observers, hook handles)
- ``quantize_model_biases(net, input_scales, weight_scales)``: ``pipeline.quant.model``; int32 biases by layer
- ``QuantizedNet(integer_model)``: ``pipeline.quant.engine``; ``forward`` runs the integer engine.
  The seed built it from a float ``Net``; now ``QuantizedNet(build_integer_model(net, ranges))``.
"""
from pipeline.data import load_arrays
from pipeline.models import Net
from pipeline.params import TrainParams
from pipeline.plots import plot_activation_distribution, plot_weight_distribution
from pipeline.quant.calibrators import activation_range
from pipeline.quant.engine import QuantizedNet
from pipeline.quant.model import build_integer_model, quantize_layer_weights, quantize_model_biases
from pipeline.quant.observers import register_activation_profiling_hooks
from pipeline.train import SEED_MEAN, SEED_STD, normalize, test_model, train_model

__all__ = [
    "Net",
    "QuantizedNet",
    "SEED_MEAN",
    "SEED_STD",
    "TrainParams",
    "activation_range",
    "build_integer_model",
    "load_arrays",
    "normalize",
    "plot_activation_distribution",
    "plot_weight_distribution",
    "quantize_layer_weights",
    "quantize_model_biases",
    "register_activation_profiling_hooks",
    "test_model",
    "train_model",
]
