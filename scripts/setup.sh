#!/usr/bin/env bash
# Set up a development environment in .venv: system packages for the GUI tests (when run as
# root with apt-get), the CPU build of PyTorch first (so pip never pulls a multi-GB CUDA
# build), then pseudohealthy itself with its napari and dev extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 \
libxcb-cursor0 libdbus-1-3 libfontconfig1"

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && ! command -v xvfb-run >/dev/null 2>&1; then
    echo "== installing system packages for Qt under Xvfb"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT_PACKAGES >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PYTHON" -m venv .venv
fi
echo "== installing Python packages into .venv"
# pip, without the notices some machines' pip configuration prints for absent local indexes
pip_install() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2); }
pip_install --upgrade pip
# The CPU wheel of torch 2.13.0 first: with torch already present, nothing pulls a CUDA build.
# On a machine with a GPU, install the CUDA build of your choice before running this script.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    pip_install "torch==2.13.0"
fi
pip_install -e ".[all]"
echo "== environment ready: $(.venv/bin/python -c 'import torch, pseudohealthy; print("pseudohealthy", pseudohealthy.__version__, "torch", torch.__version__)')"
