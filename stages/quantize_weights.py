"""quantize-weights stage: int8 (or narrower) weights and their scales, and the weight-only-quantized model."""
from __future__ import annotations

import logging

from pipeline.io import save_checkpoint
from pipeline.quant.engine import weight_only_model
from pipeline.quant.model import quantize_model_weights, save_quantized_weights
from stages.common import CHECKPOINT, QUANTIZED_WEIGHTS, WEIGHT_ONLY_CHECKPOINT, load_trained_model, start_stage


def main() -> None:
    all_params = start_stage("quantize-weights")
    params = all_params.quantize_weights
    model, checkpoint = load_trained_model(all_params.train.model, CHECKPOINT)
    options = {"k": params.k} if params.calibrator == "sigma" else {}
    quantized = quantize_model_weights(model, params.bits, params.calibrator, params.granularity, options)
    meta = {"bits": params.bits, "calibrator": params.calibrator, "options": options, "granularity": params.granularity}
    save_quantized_weights(quantized, meta, QUANTIZED_WEIGHTS)
    # BatchNorm is folded in this model, so its state_dict describes a "folded" architecture.
    weight_only = weight_only_model(model, quantized_weights=quantized)
    save_checkpoint(
        WEIGHT_ONLY_CHECKPOINT,
        {key: value for key, value in checkpoint.items() if key != "state_dict"}
        | {"state_dict": weight_only.state_dict(), "batchnorm_folded": True},
    )
    for name, (q_weight, scale) in quantized.items():
        logging.info("%-6s %s int%d weights, scale %s", name, tuple(q_weight.shape), params.bits,
                     f"{float(scale):.3e}" if scale.ndim == 0 else f"{len(scale)} per-channel")


if __name__ == "__main__":
    main()
