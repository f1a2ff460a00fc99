"""CPU determinism: which kernel-dispatch knobs change the trained weights, and what pinning them costs.

On the CPU three libraries pick their kernels from the processor's instruction
sets at run time: ATen's own vectorized kernels (reductions, softmax, the fused
SGD step, the weight init), oneDNN (the convolutions) and MKL (``sgemm`` for the
Linear layers, and for the convolutions when oneDNN is off). A kernel built for
AVX-512 sums in another order than its AVX2 twin, so two x86 machines that
differ in instruction sets can train different weights from the same commit,
params and data. Each knob below is read when its library loads, so every
setting runs in a fresh subprocess:

1. Weights: ``pipeline.train.train_model`` trains ``Net`` (the default recipe:
   SGD lr 0.001 momentum 0.9, fused, batch 4, 1 thread) on seeded random uint8
   images under each setting; it prints a hash of the initial and of the final
   state_dict bytes, the final loss, the largest weight difference from the
   unpinned default, and a hash of ``Net``'s logits (batches of 4 and 256) for
   fixed weights and inputs, i.e. whether inference alone changes.
2. Speed: images per second of the unpinned default against the pinned
   settings, ``Net`` and ``BNNet`` at batch 4 and 128, medians over
   interleaved rounds (this machine's speed drifts).
3. Evidence: with ``ONEDNN_VERBOSE=1`` and ``MKL_VERBOSE=1``, which
   implementation and ISA each convolution (forward, backward data, backward
   weights) and each ``sgemm`` used, unpinned and pinned.

The "simulated AVX2-only" settings cap every library at AVX2 as an AVX2-only
machine would; a pin that holds across machines must give the same hash with
and without them. That simulates the instruction sets only, not another
vendor's or cache size's kernel choices.

    python -m benchmarks.cpu_determinism [--images 2000] [--epochs 2] [--bnnet-images 400] [--rounds 5]
                                         [--parts weights,speed,verbose]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from pipeline.models import build_model
from pipeline.params import TrainParams
from pipeline.train import train_model
from pipeline.transforms import normalize

# Capped at AVX2 everywhere: ATen's vectorized kernels, oneDNN's JIT kernels and MKL's CNR branch.
# MKL honours branches other than AUTO and COMPATIBLE on Intel CPUs only (elsewhere it falls back to
# AUTO without a warning), so COMPATIBLE (SSE2) is the one MKL branch that is the same on every x86 CPU.
# The pins the stages apply (stages.CPU_KERNEL_PINS; not imported, since importing stages would set them
# in this process and so in every child; tests/test_train.py checks the two are equal).
PIN = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE"}
PIN_INTEL_ONLY = {**PIN, "MKL_CBWR": "AVX2"}  # AVX2 branch: faster, but reproducible on Intel CPUs only
# What an AVX2-only CPU would pick. MKL_ENABLE_INSTRUCTIONS is for Intel CPUs: on an AMD EPYC it changed no
# sgemm result, even at SSE4_2, so there only ATen and oneDNN are simulated.
AVX2_ONLY_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

# (name, extra environment, child flags). "default" is the unpinned baseline every row is compared with.
SETTINGS = [
    ("default", {}, []),
    ("ATEN_CPU_CAPABILITY=default", {"ATEN_CPU_CAPABILITY": "default"}, []),
    ("ATEN_CPU_CAPABILITY=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}, []),
    ("ATEN_CPU_CAPABILITY=avx512", {"ATEN_CPU_CAPABILITY": "avx512"}, []),
    ("ONEDNN_MAX_CPU_ISA=AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, []),
    ("ONEDNN_MAX_CPU_ISA=AVX512_CORE", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, []),
    ("MKL_CBWR=AUTO", {"MKL_CBWR": "AUTO"}, []),
    ("MKL_CBWR=COMPATIBLE", {"MKL_CBWR": "COMPATIBLE"}, []),
    ("MKL_CBWR=AVX2", {"MKL_CBWR": "AVX2"}, []),
    ("MKL_CBWR=AVX512", {"MKL_CBWR": "AVX512"}, []),
    ("MKL_ENABLE_INSTRUCTIONS=AVX2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, []),
    ("mkldnn.enabled=False", {}, ["--no-mkldnn"]),
    ("threads=2", {}, ["--threads", "2"]),
    ("set_flush_denormal(True)", {}, ["--flush-denormal"]),
    ("simulated AVX2-only machine", AVX2_ONLY_MACHINE, []),
    ("PIN", PIN, []),
    ("PIN on simulated AVX2-only", {**AVX2_ONLY_MACHINE, **PIN}, []),
    ("PIN_INTEL_ONLY", PIN_INTEL_ONLY, []),
    ("PIN_INTEL_ONLY on sim. AVX2-only", {**AVX2_ONLY_MACHINE, **PIN_INTEL_ONLY}, []),
    ("PIN + mkldnn off", PIN, ["--no-mkldnn"]),
    ("PIN + mkldnn off on sim. AVX2-only", {**AVX2_ONLY_MACHINE, **PIN}, ["--no-mkldnn"]),
]
BNNET_SETTINGS = ["default", "ATEN_CPU_CAPABILITY=avx2", "ONEDNN_MAX_CPU_ISA=AVX2", "ONEDNN_MAX_CPU_ISA=AVX512_CORE",
                  "MKL_CBWR=COMPATIBLE", "simulated AVX2-only machine", "PIN", "PIN on simulated AVX2-only",
                  "PIN_INTEL_ONLY", "PIN_INTEL_ONLY on sim. AVX2-only"]
SPEED_SETTINGS = ["default", "PIN", "PIN_INTEL_ONLY", "PIN + mkldnn off"]
# (model, batch size, images per timed epoch): about a second or two each on one core.
SPEED_CONFIGS = [("net", 4, 2000), ("net", 128, 4000), ("bnnet", 4, 400), ("bnnet", 128, 768)]
KNOBS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
         "ONEDNN_VERBOSE", "MKL_VERBOSE")


def random_images(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded uint8 (N, 32, 32, 3) images and int64 labels; integer draws, so the same on every CPU."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 10, (count,), generator=generator)


def digest(state: dict[str, torch.Tensor]) -> str:
    """First 12 hex digits of the sha256 of every tensor's name and bytes, in state_dict order."""
    sha = hashlib.sha256()
    for name, tensor in state.items():
        sha.update(name.encode())
        sha.update(tensor.detach().contiguous().numpy().tobytes())
    return sha.hexdigest()[:12]


# ---- child side: runs under the setting's environment ----------------------------------------------------


def child_train(args: argparse.Namespace) -> dict:
    """Train build_model(args.model, seed=0); hash init, result and inference on the parent's fixed tensors."""
    torch.set_num_threads(args.threads)  # inference at the same thread count as the training below
    fixed = torch.load(args.fixed, weights_only=True)
    init = build_model(args.model, seed=0)
    result = {"capability": torch.backends.cpu.get_cpu_capability(), "init": digest(init.state_dict())}
    # Inference alone: the parent's fixed weights (made under its own setting) on fixed inputs.
    probe = build_model(args.model)
    probe.load_state_dict(fixed["weights"])
    probe.eval()
    with torch.no_grad():
        logits = torch.cat([probe(fixed["inputs"][i : i + 4]) for i in range(0, 256, 4)] + [probe(fixed["inputs"])])
    result["forward"] = digest({"logits": logits})
    images, labels = random_images(args.images)
    params = TrainParams(model=args.model, epochs=args.epochs, batch_size=4, device="cpu", threads=args.threads)
    history = train_model(init, images, labels, params, progress=False)
    state = init.state_dict()
    result.update(final=digest(state), loss=history[-1].loss, seconds=sum(r.seconds for r in history),
                  subnormal_weights=sum(int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())
                                        for t in state.values() if t.is_floating_point()))
    torch.save(state, args.out)
    return result


def child_speed(args: argparse.Namespace) -> dict:
    """Images per second of one train_model epoch per (model, batch) config, after a short warm-up."""
    rates = {}
    for model, batch_size, count in SPEED_CONFIGS:
        images, labels = random_images(count)
        params = TrainParams(model=model, epochs=1, batch_size=batch_size, device="cpu", threads=1)
        train_model(build_model(model, seed=0), images[: 2 * batch_size], labels[: 2 * batch_size], params,
                    progress=False)  # warm-up: oneDNN JIT-compiles its kernels on first use
        started = time.perf_counter()
        train_model(build_model(model, seed=0), images, labels, params, progress=False)
        rates[f"{model}/{batch_size}"] = count / (time.perf_counter() - started)
    return rates


def child_verbose(args: argparse.Namespace) -> dict:
    """One training step and one inference pass of Net at batch 4 and 128; the libraries log to stdout."""
    torch.set_num_threads(1)
    for batch_size in (4, 128):
        model = build_model("net", seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, fused=True)
        images, labels = random_images(batch_size)
        inputs = normalize(images, (0.5,) * 3, (0.5,) * 3)
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        with torch.no_grad():
            model.eval()(inputs)
    return {}


# ---- parent side ------------------------------------------------------------------------------------------


def run_child(mode: str, env: dict[str, str], flags: list[str], capture_all: bool = False) -> tuple[dict, str]:
    """Run this module as a child in a fresh interpreter; returns its JSON result (and its whole output)."""
    full_env = {k: v for k, v in os.environ.items() if k not in KNOBS}  # the parent's own knobs don't leak in
    full_env.update(env, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "benchmarks.cpu_determinism", "--child", mode, *flags]
    done = subprocess.run(command, env=full_env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child {mode} {env} {flags} failed:\n{done.stderr[-3000:]}")
    marker = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(marker[-1][7:]), (done.stdout + done.stderr if capture_all else "")


def weights_table(model: str, settings: list, images: int, epochs: int, folder: Path) -> None:
    # Fixed weights and inputs for the inference check, made here once.
    fixed = folder / f"fixed_{model}.pt"
    torch.save({"weights": build_model(model, seed=1).state_dict(),
                "inputs": normalize(random_images(256, seed=1)[0], (0.5,) * 3, (0.5,) * 3)}, fixed)
    print(f"\n{model}: batch 4, {epochs} epoch(s) on {images} seeded random images, 1 thread unless noted; "
          f"'same' = bit-identical to default")
    print(f"{'setting':<36} {'ATen':>7} {'init':>12} {'final weights':>13} {'final loss':>11} "
          f"{'same':>4} {'max|dw|':>8} {'forward':>12} {'same':>4} {'train s':>7}")
    baseline, base_state = None, None
    for index, (name, env, flags) in enumerate(settings):
        out = folder / f"{model}_{index}.pt"
        result, _ = run_child("train", env, [*flags, "--model", model, "--images", str(images),
                                             "--epochs", str(epochs), "--fixed", str(fixed), "--out", str(out)])
        state = torch.load(out, weights_only=True)
        if baseline is None:
            baseline, base_state = result, state
        max_diff = max(float((state[k].double() - base_state[k].double()).abs().max()) for k in state)
        print(f"{name:<36} {result['capability']:>7} {result['init']:>12} {result['final']:>13} "
              f"{result['loss']:>11.6f} {'yes' if result['final'] == baseline['final'] else 'NO':>4} "
              f"{max_diff:>8.1e} {result['forward']:>12} "
              f"{'yes' if result['forward'] == baseline['forward'] else 'NO':>4} {result['seconds']:>7.2f}",
              flush=True)
    print(f"(subnormal weights in the default result: {baseline['subnormal_weights']})")


def weights_tables(args: argparse.Namespace) -> None:
    print("1. Trained weights and inference per setting")
    with tempfile.TemporaryDirectory() as folder:
        weights_table("net", SETTINGS, args.images, args.epochs, Path(folder))
        if args.bnnet_images:
            weights_table("bnnet", [s for s in SETTINGS if s[0] in BNNET_SETTINGS], args.bnnet_images, 1, Path(folder))


def speed_table(args: argparse.Namespace) -> None:
    settings = {name: (env, flags) for name, env, flags in SETTINGS if name in SPEED_SETTINGS}
    rates: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(args.rounds):  # interleaved: one child per setting per round
        for name, (env, flags) in settings.items():
            rates[name].append(run_child("speed", env, flags)[0])
    print(f"\n2. Training speed, images/s (median of {args.rounds} interleaved rounds, 1 thread); "
          f"ratio = median over rounds of setting/default within a round")
    print(f"{'setting':<20} " + " ".join(f"{m + '/' + str(b):>20}" for m, b, _ in SPEED_CONFIGS))
    for name in settings:
        cells = []
        for key in (f"{m}/{b}" for m, b, _ in SPEED_CONFIGS):
            median = statistics.median(r[key] for r in rates[name])
            ratio = statistics.median(r[key] / d[key] for r, d in zip(rates[name], rates["default"]))
            cells.append(f"{median:>8.0f} i/s {ratio:>6.2f}x")
        print(f"{name:<20} " + " ".join(f"{c:>20}" for c in cells))


def verbose_summary(name: str, env: dict[str, str], flags: list[str]) -> None:
    """The ISA each library reports and how many calls each (primitive, direction, implementation) got."""
    _, output = run_child("verbose", {**env, "ONEDNN_VERBOSE": "1", "MKL_VERBOSE": "1"}, flags, capture_all=True)
    kernels: Counter[str] = Counter()
    print(f"\n  [{name}] {' '.join(f'{k}={v}' for k, v in env.items()) or 'no knobs set'} {' '.join(flags)}")
    for line in output.splitlines():
        fields = line.split(",")
        if line.startswith("onednn_verbose") and ",info,cpu,isa:" in line:
            print(f"    oneDNN {fields[-1]}")
        elif line.startswith("onednn_verbose") and len(fields) > 12 and fields[3] == "exec" and fields[5] != "reorder":
            kernels[f"oneDNN {fields[5]} {fields[7]}: {fields[6]}"] += 1  # e.g. convolution backward_data: jit:avx2
        elif line.startswith("MKL_VERBOSE oneMKL"):
            print(f"    {line[12:].split(' for ')[0]}: {line.split(' architecture ')[-1]}")
        elif line.startswith("MKL_VERBOSE S"):  # MKL_VERBOSE SGEMM(T,N,120,4,400,...) 12.3us CNR:OFF ...
            kernels[f"MKL {line.split()[1].split('(')[0]}: {line.split()[3]}"] += 1
    for kernel, count in kernels.items():
        print(f"    {count:>4} calls  {kernel}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="training images for the Net weights table")
    parser.add_argument("--epochs", type=int, default=2, help="epochs for the Net weights table")
    parser.add_argument("--bnnet-images", type=int, default=400, help="training images (1 epoch) for BNNet; 0: skip")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds for the speed table")
    parser.add_argument("--parts", default="weights,speed,verbose", help="comma-separated parts to run")
    # Child-only flags (the parent passes them to its subprocesses).
    parser.add_argument("--child", choices=("train", "speed", "verbose"), help=argparse.SUPPRESS)
    parser.add_argument("--no-mkldnn", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--flush-denormal", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="net", help=argparse.SUPPRESS)
    parser.add_argument("--fixed", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.backends.mkldnn.enabled = not args.no_mkldnn
        torch.set_flush_denormal(args.flush_denormal)
        result = {"train": child_train, "speed": child_speed, "verbose": child_verbose}[args.child](args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    print(f"torch {torch.__version__}, ATen {torch.backends.cpu.get_cpu_capability()}, "
          f"MKL {torch.backends.mkl.is_available()}, oneDNN {torch.backends.mkldnn.is_available()}, "
          f"default threads {torch.get_num_threads()} on {os.cpu_count()} CPUs")
    parts = args.parts.split(",")
    if "weights" in parts:
        weights_tables(args)
    if "speed" in parts:
        speed_table(args)
    if "verbose" in parts:
        print("\n3. Kernels used by one training step + one inference pass of Net at batch 4 and 128:")
        for name in ("default", "PIN", "PIN_INTEL_ONLY", "PIN + mkldnn off"):
            env, flags = next((e, f) for n, e, f in SETTINGS if n == name)
            verbose_summary(name, env, flags)


if __name__ == "__main__":
    main()
