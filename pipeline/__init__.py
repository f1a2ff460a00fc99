"""Post-training int8 quantization of CIFAR-10 CNNs: the importable library.

Stages in ``stages/`` are thin wrappers around this package; nothing here reads
``params.yaml`` or parses command lines.
"""
