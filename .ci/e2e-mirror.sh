#!/usr/bin/env bash
# A real `dvc repro` in a temporary clone, with the offline CIFAR-10 mirror as the
# download source and a shortened recipe (1 epoch); asserts accuracy.fp32 is well above
# chance, full int8 within 1 point of it, and 0 C logit mismatches on the 10,000 test images.
set -euo pipefail
project=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone --quiet "$project" "$work/clone"
cd "$work/clone"
export PATH="$project/.venv/bin:$PATH" DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
# ../shared beside the clone, as beside the project, so the README's mirror path resolves.
mkdir -p "$work/shared" && ln -s "$(cd "$project/../shared/data" && pwd)" "$work/shared/data"
# The README's offline step, word for word, then a 1-epoch recipe.
sed -i "s|^  source: official|  source: $(realpath ../shared/data/cifar10-jpeg.tar.gz)|" params.yaml
sed -i 's|^  epochs: 2$|  epochs: 1|' params.yaml
grep -q '^  epochs: 1$' params.yaml && grep -q "^  source: $(realpath ../shared/data/cifar10-jpeg.tar.gz)$" params.yaml
start=$(date +%s)
dvc repro
echo "dvc repro took $(( $(date +%s) - start )) s"
dvc metrics show
python - <<'PY'
import json
metrics = json.load(open("data/metrics.json"))
accuracy, mismatches = metrics["accuracy"], metrics["mismatches"]
fp32, integer = accuracy["fp32"], accuracy["integer"]
print(f"accuracy: {accuracy}")
print(f"C vs Python engine: {mismatches['c_logits']} of {metrics['test_images']} test images with different int32 logits")
assert fp32 > 30.0, f"accuracy.fp32 = {fp32}% is not well above chance (10%)"
assert abs(fp32 - integer) <= 1.0, f"integer {integer}% is more than 1 point from fp32 {fp32}%"
assert mismatches["c_logits"] == 0, f"{mismatches['c_logits']} C logit mismatches (must be 0)"
assert mismatches["onnx_integer_logits"] == 0, f"{mismatches['onnx_integer_logits']} integer ONNX mismatches"
print(f"OK: fp32 {fp32}%, integer {integer}%, 0 C logit mismatches, after 1 epoch on the mirror")
PY
