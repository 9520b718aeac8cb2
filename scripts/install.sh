#!/usr/bin/env bash
# Installs what the pipeline needs on a fresh Debian machine (run as root, or with sudo).
#   bash scripts/install.sh          the library, workflow and demo
#   bash scripts/install.sh --test   the same plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# espeak-ng renders the demo corpus and the planted model's speech.
apt_pkgs=""
command -v espeak-ng >/dev/null 2>&1 || apt_pkgs="espeak-ng"
# --test: Chromium for the listening-kit browser test, and a real single-node SLURM (slurm-wlm
# 22.05 + munge) for tests/test_slurm.py, which starts and stops the daemons itself through
# scripts/slurm_local.sh (no systemd needed).
if [ "${1:-}" = "--test" ]; then
    { command -v sbatch && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ]; } >/dev/null 2>&1 \
        || apt_pkgs="$apt_pkgs slurm-wlm"
    [ -x /usr/sbin/munged ] || apt_pkgs="$apt_pkgs munge"
    # headless Chromium drives the listening kit in tests/test_human_workflow.py (DevTools protocol)
    command -v chromium >/dev/null 2>&1 || apt_pkgs="$apt_pkgs chromium"
fi
if [ -n "$apt_pkgs" ]; then
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $apt_pkgs >/dev/null
fi
# torch first, pinned, so that the project's range is satisfied by the CPU build on disk
# instead of pulling a multi-GB CUDA build. On a GPU node install your CUDA torch first.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
python -m pip install -q -e ".${extra}"
# Kimi-Audio's vocoder class (esn_core/models/kimi_detokenizer.py). --no-deps: at inference it
# needs only torch, huggingface_hub and librosa (all here already); its declared training
# deps (pesq, nnAudio, auraloss, tensorboard, ninja) are not used.
python -m pip install -q --no-deps "bigvgan==2.4.1"
