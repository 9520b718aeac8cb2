#!/usr/bin/env bash
# Installs what the pipeline needs on a fresh Debian machine (run as root, or with sudo).
#   bash scripts/install.sh          the library, workflow and demo
#   bash scripts/install.sh --test   the same plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# espeak-ng renders the demo corpus and the planted model's speech.
if ! command -v espeak-ng >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng >/dev/null
fi
# torch first, pinned, so that the project's range is satisfied by the CPU build on disk
# instead of pulling a multi-GB CUDA build. On a GPU node install your CUDA torch first.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
python -m pip install -q -e ".${extra}"
