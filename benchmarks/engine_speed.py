"""Speed of the integer engine against the fp32 model and torch.ao's x86 int8 kernels, interleaved in one run.

For each model (seeded initial weights with randomized BatchNorm statistics by default, or a
trained checkpoint with ``--checkpoint NAME=PATH``), quantized with the pipeline's defaults on
random calibration images, it times over ``--images`` random images, ``--repeats`` rounds
interleaved (fp32, engine, torch.ao int8, then again), on ``--threads`` threads:

- fp32: the PyTorch model in eval mode on normalized float32 images;
- engine: ``run_integer`` on the int8 images (exact: the printed plan says which float or
  integer units each layer uses, and ``layer_plan``'s docstring why that is exact);
- torch.ao int8: FX static PTQ with the x86 qconfig (not bit-exact to this scheme), the anchor.

Prints the best round's seconds of each and the engine's speed relative to fp32 (>= 1.0 means
the engine is at least as fast). Speed does not depend on the image values.

    python -m benchmarks.engine_speed [--models net bnnet resnet20] [--images 10000] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from torch import nn

import stages  # noqa: F401, I001  (first: importing stages pins the CPU kernels before torch loads, as in the pipeline)
from pipeline.graph.capture import capture
from pipeline.io import load_checkpoint
from pipeline.models import build_model, restore_model
from pipeline.profile import calibrate_ranges, profile_activations
from pipeline.quant.build import build_integer_model
from pipeline.quant.engine import quantize_input, run_integer
from pipeline.quant.ops.conv import layer_plan
from pipeline.quant.weights import quantize_model_weights
from pipeline.transforms import SEED_MEAN, SEED_STD, normalize
from tests.model_fixtures import randomize_batchnorm


def _images(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=generator)


def _torch_ao(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calibration[:1],))
        with torch.no_grad():
            prepared(calibration)
        return convert_fx(prepared)


def _timed(run, batches) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            run(batch)
    return time.perf_counter() - started


def measure(name: str, model: nn.Module, images: int, repeats: int) -> dict[str, float]:
    graph = capture(model.eval())
    calibration = _images(500, seed=1)
    stats = profile_activations(graph, calibration, SEED_MEAN, SEED_STD, 250, progress=False)
    ranges = {root: chosen["range"] for root, chosen in calibrate_ranges(stats, "seed").items()}
    integer_model = build_integer_model(graph, ranges, quantize_model_weights(graph))
    for plan in (layer_plan(integer_model, layer) for layer in integer_model.layers()):
        print(f"  {name} {plan['layer']:<22} bound {plan['accumulator_bound']:>10,}  conv {plan['conv']}, "
              f"rescale {plan['rescale']}")
    x = normalize(_images(images, seed=2), SEED_MEAN, SEED_STD)
    x_int8 = quantize_input(x, integer_model.input_scale)
    quantized = _torch_ao(model, normalize(calibration, SEED_MEAN, SEED_STD))
    batch = 1000
    float_batches = x.split(batch)
    runs = {
        "fp32": (model, float_batches),
        "engine": (lambda images_int8: run_integer(integer_model, images_int8), x_int8.split(batch)),
        "torch.ao int8": (quantized, float_batches),
    }
    best = {key: float("inf") for key in runs}
    for _ in range(repeats):
        for key, (run, batches) in runs.items():
            best[key] = min(best[key], _timed(run, batches))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["net", "bnnet", "resnet20"])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="use a trained checkpoint for model NAME")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.images} images, best of {args.repeats}")
    rows = []
    for name in args.models:
        if name in checkpoints:
            model = restore_model(load_checkpoint(checkpoints[name]), name, checkpoints[name])
        else:
            model = build_model(name, seed=0)
            randomize_batchnorm(model, seed=1)
        best = measure(name, model.eval(), args.images, args.repeats)
        rows.append((name, best))
    print(f"\n{'model':<10} {'fp32 s':>8} {'engine s':>9} {'engine/fp32 speed':>18} {'torch.ao s':>11} "
          f"{'torch.ao/fp32':>14}")
    for name, best in rows:
        print(f"{name:<10} {best['fp32']:>8.2f} {best['engine']:>9.2f} {best['fp32'] / best['engine']:>18.2f} "
              f"{best['torch.ao int8']:>11.2f} {best['fp32'] / best['torch.ao int8']:>14.2f}")


if __name__ == "__main__":
    main()
