"""The input normalization a model was trained with, as plain numbers (no torch here: params.py validates it).

A model sees ``x = (pixel / 255 - mean[c]) / std[c]`` per channel c (``pipeline.transforms.normalize``). The seed's
normalization maps pixels to [-1, 1]; a model trained elsewhere usually used the dataset's channel statistics
instead (``train.mean`` / ``train.std``), and quantizing it with the wrong one is the most common silent failure of
post-training quantization: the calibration ranges and every accuracy are then measured on inputs it never saw.
"""
from __future__ import annotations

# The seed's normalization: per channel (x / 255 - 0.5) / 0.5, i.e. pixels to [-1, 1].
SEED_MEAN = (0.5, 0.5, 0.5)
SEED_STD = (0.5, 0.5, 0.5)
