#!/usr/bin/env bash
# Install varscale into .venv (CPU machine; torch/torchvision pinned in pyproject.toml).
#   bash install.sh          python packages only (enough for the tests)
#   bash install.sh --data   also the default data set (Debian package dataset-fashion-mnist)
set -euo pipefail
cd "$(dirname "$0")"
if [[ "${1:-}" == "--data" && ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get install -y -q dataset-fashion-mnist || { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; }
fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m pip check
