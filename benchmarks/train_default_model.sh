#!/usr/bin/env bash
# Reproduces the bundled default weights: wsiseg adapt with configs/kumar_lite.yaml, BBBC039 (source, labelled)
# -> the 16 Kumar *train* images (target, unlabelled: their labels are never read), on the CPU.
# Usage: benchmarks/train_default_model.sh [SHARED_DATA_DIR] [OUT_DIR]
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-runs/kumar_lite}
TARGET=$(mktemp -d)
awk -F, '$2=="train"{print $1}' "$DATA/kumar/split.csv" | while read -r s; do
  ln -s "$(realpath "$DATA/kumar/images/$s.tif")" "$TARGET/$s.tif"
done
wsiseg adapt --source "$DATA/bbbc039" --target "$TARGET" --target-mpp 0.25 --out "$OUT" \
  --config configs/kumar_lite.yaml --device "${DEVICE:-cpu}"
echo "weights: $OUT/model.safetensors"
