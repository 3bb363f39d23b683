#!/usr/bin/env bash
# Packs what benchmarks/gpu_check.sh needs on the device machine, which reaches no network and sees no ../shared:
#   .device_data/kumar  6 Kumar images (+ labels, split.csv)                      ~11 MB
#   .device_data/bbbc039  20 + 4 BBBC039 training + validation images, masks (the adapt step's source) ~8 MB
#   .whl/               wheels (Python 3.12, manylinux) of our dependencies that its image lacks,
#                       at the versions installed here                            ~19 MB
# Both are git-ignored; name them in the device call's carry: [".device_data", ".whl"] (64 MiB limit in all).
set -euo pipefail
DATA=${1:-../shared/data}
rm -rf .device_data .whl && mkdir -p .device_data/kumar/images .device_data/kumar/labels .whl
cp "$DATA/kumar/split.csv" .device_data/kumar/
for f in $(ls "$DATA/kumar/images" | sort | head -6); do
  cp "$DATA/kumar/images/$f" .device_data/kumar/images/
  cp "$DATA/kumar/labels/${f%.tif}.png" .device_data/kumar/labels/ 2>/dev/null || true
done
mkdir -p .device_data/bbbc039/images .device_data/bbbc039/masks .device_data/bbbc039/splits
head -20 "$DATA/bbbc039/splits/train.txt" > .device_data/bbbc039/splits/train.txt
head -4 "$DATA/bbbc039/splits/val.txt" > .device_data/bbbc039/splits/val.txt
for s in $(cat .device_data/bbbc039/splits/*.txt | sed 's/\.[a-z]*$//'); do
  cp "$DATA/bbbc039/images/$s.tif" .device_data/bbbc039/images/
  cp "$DATA/bbbc039/masks/$s.png" .device_data/bbbc039/masks/
done
# not in the device image (../.library/device/KINDS.md lists it), with their own needs; pinned to this machine's
# (imagecodecs, 26 MB, stays behind: the benchmark slide is then deflate-compressed and read by OpenSlide, which
# sees only level 0 of its SubIFD pyramid, so the tissue mask costs ~5.5 ms/tile there; packed, imagecodecs made
# tiffslide read the mosaic through the device's own tifffile, which failed: "No group found in ZarrTiffStore";
# dask.distributed's needs stay behind too)
PKGS="annotated-types dask deprecated donfig geojson google-crc32c locket numcodecs ome-zarr
      ome-zarr-models openslide-bin openslide-python partd pydantic pydantic-core pydantic-zarr shapely tiffslide
      typing-inspection zarr lazy-importer inspect2 orjson py-spy"  # (py-spy: gpu_check.sh's profile step)
failed=""
for p in $PKGS; do
  v=$(python3 -m pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}' || true)
  [ -n "$v" ] || continue  # not needed by what this machine runs
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d .whl "$p==$v" 2>/dev/null || failed="$failed $p==$v"
done
[ -z "$failed" ] || echo "no Python 3.12 wheel found for:$failed" >&2
du -sh .device_data .whl
