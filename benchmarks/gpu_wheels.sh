#!/usr/bin/env bash
# Wheels the lent GPU machine lacks for benchmarks/gpu_check.py, downloaded into .whl/ (ignored by
# git; the device tool carries it with `carry: [".whl"]`). The machine has torch 2.11.0+cu130 on
# Python 3.12 and most of what fastcache_fx needs (scipy, safetensors, scikit-learn, matplotlib,
# tqdm, huggingface_hub, transformers...), but no diffusers and nothing can be fetched there.
# diffusers 0.42.1 needs importlib_metadata beside what is there (its Requires-Dist, checked
# against the machine's package list in the device docs); torchao for the quantized section.
# docs/torch-and-gpu.md has the command.
#
#   bash benchmarks/gpu_wheels.sh          # then: device run, carry [".whl"], the command of docs/torch-and-gpu.md
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
grep -qxF "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
mkdir -p .whl
for spec in "diffusers==${DIFFUSERS:-0.42.1}" "importlib_metadata==10.2.0" "torchao==${TORCHAO:-0.18.0}"; do
  PIP_CONFIG_FILE=/dev/null python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "$spec"
done
ls -la .whl
for w in .whl/diffusers-*.whl; do
  echo "Requires-Dist of $w (all but importlib_metadata are on the lent machine):"
  unzip -p "$w" '*/METADATA' | grep ^Requires-Dist | grep -v "extra ==" || true
done
