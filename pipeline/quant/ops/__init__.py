"""The integer ops, one module each, and their registry.

- ``base``: ``TensorInfo``, ``Requantize``, the ``IntegerOp`` record and the build context;
- ``rescale``: applying a ``Requantize`` (int64, or float64 where exact); ``geometry``: window sizes;
- one module per op: ``conv`` (conv2d and linear, depthwise included), ``add``, ``avgpool``, ``concat``,
  ``maxpool``, ``clamp`` (a standalone ReLU/ReLU6), ``reshape`` (flatten), ``leaky_relu``, ``hardswish``;
- ``registry``: every op by node type.

Nothing is re-exported here: importers name the module they use.
"""
