#!/usr/bin/env bash
# Copies the part of ../shared/data that the GPU checks need (Kumar images, labels, split; the sample slide) into
# .device_data/ (git-ignored, ~60 MB), so that the device tool can carry it: the shared data beside a checkout does
# not travel. Then: benchmarks/gpu_check.sh (run there with carry [".device_data"]).
set -euo pipefail
DATA=${1:-../shared/data}
rm -rf .device_data && mkdir -p .device_data/kumar .device_data/slides
cp -r "$DATA/kumar/images" "$DATA/kumar/labels" "$DATA/kumar/split.csv" .device_data/kumar/
cp "$DATA/slides/cmu_small_region.svs" .device_data/slides/ 2>/dev/null || true
du -sh .device_data
