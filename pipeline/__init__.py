"""Post-training integer quantization of CIFAR-10 CNNs: the importable library the DVC stages run.

- ``arrays``, ``data``: the dataset arrays on disk; acquire, verify and decode CIFAR-10 into them;
- ``transforms``: normalization, and the index sampling of calibration and held-out images;
- ``models``, ``model_spec``: the built-in CNNs by name and ``models/<file>.py:<factory>`` specs; their names;
- ``train``: training on in-memory uint8 tensors;
- ``params``, ``validation``: ``params.yaml`` read once into typed, validated sections, and the value rules;
- ``graph``: the float graph (nodes, capture, BatchNorm folding and activation fusion, float run, its file);
- ``profile``: activation statistics on calibration images;
- ``quant``: ranges, calibrators, weight methods, one module per integer op, the integer graph, its builder
  and engine;
- ``model_files``, ``weights_file``, ``io``: the integer model and the quantized weights on disk, and atomic
  writes, JSON, checkpoints;
- ``export``, ``export_layout``: C99 and ONNX exports of the integer model, compiled; their file names;
- ``evaluation``: predictions, accuracies, the exports' agreement, per-layer SQNR, model sizes;
- ``plots``, ``report``: the figures and DVC plot data, and the results table;
- ``progress``: progress bars on a terminal, log lines off it;
- ``api``: the seed's Python API, for notebooks.

Stages in ``stages/`` are thin wrappers around this package: they read ``params.yaml`` through
``params`` and pass every function its settings as arguments. Nothing here parses a command line:
the Prefect flows, the dvc and git commands and the command lines are in ``orchestration/``.
"""
