#!/usr/bin/env bash
# Every GPU check of issues 3 and 6 in one run of at most ~8 minutes, for the device tool:
#   here:   benchmarks/pack_device.sh
#   there:  run(command="bash benchmarks/gpu_check.sh", carry=[".device_data", ".whl"], timeout_s=600)
# Writes its logs and JSON figures to $OUT (or gpu_out/). Card, driver and torch are printed first.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then  # the dependencies the device image lacks (no network there)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export WSISEG_SHARED_DATA=${WSISEG_SHARED_DATA:-$PWD/.device_data}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/card.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/card.txt"
# 1. CUDA equivalence tests (fast path == simple path, fp16/bf16) and the rest of the predictor tests
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_predictor.py 2>&1 | tee "$OUT/pytest_predictor.txt"
# 2. the issue-6 figure: R101 fp16, batch 128, stock baseline, backbone ceiling, per stage, end to end on a slide
timeout 300 python3 benchmarks/throughput.py --config r101 --amp fp16 --batch 128 --tiles 2048 --dets 100 \
  --stock-tiles 128 --e2e 12000 --json "$OUT/throughput_r101_fp16.json" 2>&1 | tee "$OUT/throughput_r101_fp16.txt"
# 3. the lite config on the same card (what the bundled model costs there)
timeout 120 python3 benchmarks/throughput.py --config lite --amp fp16 --batch 128 --tiles 2048 --dets 50 \
  --stock-tiles 128 --json "$OUT/throughput_lite_fp16.json" 2>&1 | tee "$OUT/throughput_lite_fp16.txt"
