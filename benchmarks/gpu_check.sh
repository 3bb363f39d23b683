#!/usr/bin/env bash
# The GPU checks in one prepared run (predictor throughput, end-to-end tiles/s, CUDA correctness, peak memory), for a lent card:
#   here:   benchmarks/pack_device.sh
#   there:  run(command="bash benchmarks/gpu_check.sh", carry=[".device_data", ".whl"], timeout_s=600)
# Steps (default: default tta r101 cpuside; or name some: bash benchmarks/gpu_check.sh r101 tests):
#   r101    throughput.py, R101 random init, fp16, batch 128, 100 detections/tile: stock baseline, backbone ceiling,
#           per stage, and wsiseg run end to end on an E2E_R101 px slide (default 6000) <= 200 s
#   tests   tests/segmenters/test_predictor.py with CUDA (fast path == simple path in fp32/fp16/bf16)       <= 90 s
#   default throughput.py with the bundled default weights (PDAM-lite, score >= 0.5), fp16, + end to end with
#           no tile workers, then with 4, and 4 and 8 with the predict process (segment_slide's GPU default: 4;
#           same features checked)                                                                     <= 180 s
#   nms     the fast path's NMS: sequential nms calls of 4096 boxes vs the matrix (fixed-point) NMS, the CUDA
#           default (RPN and box-head stages, same instances checked; R101 and default)                    <= 150 s
#   nmschunks  the sequential NMS with chunks of 512..16384 boxes per call (how 4096 was chosen)              <= 150 s
#   e2ebest throughput.py, bundled default, fp16, with the fastest NMS of step nms, + end to end              <= 120 s
#   tta     throughput.py, bundled default, fp16, with --tta 4 --semantic-fusion (the accurate setting), + end
#           to end                                                                                   <= 100 s
#   cpuside cpu_side.py: the CPU side alone (replayed predictions), 0 vs 8 tile workers                  <= 90 s
#   gil     the bundled model end to end with 4 tile workers at the switch interval $SWITCH (default 0.0001 s;
#           segment_slide's is 0.0005): does the predicting thread get the GIL back sooner              <= 60 s
# Environment: E2E (default 8000) and E2E_R101 (6000) slide sizes; SWEEP (default 4,4p,8p) the tile-worker counts
# of step default (N+ / N-: the zarr painter process on / off; a final p: --predict-process, e.g. 4p or 4+p);
# R101_SWEEP (default none) those of step r101;
# CPUSIDE (default "0 8") the tile-worker counts of step cpuside.
#   train   train_speed.py: seconds per iteration of the paper's R101 training (configs/pdam_r101.yaml)  <= 110 s
#   e2ebig  the bundled model end to end on an E2E_BIG px slide (default 16000: 6,889 tiles, where the start-up
#           costs less) with BIG_WORKERS tile workers (default 8) and the sweep BIG_SWEEP (default 4)     <= 120 s
#   bigtile the bundled model end to end on the E2E_BIG px slide with BIG_TILE px tiles (default 768, batches of
#           BIG_TILE_BATCH, default 16: about the pixels of e2ebig's 128 tiles of 256 px) and BIG_WORKERS tile
#           workers: the same slide in fewer, larger tiles, each with the proposals of its area; compare its
#           mpx_per_s with e2ebig's                                                                       <= 120 s
#   profile the bundled model end to end (4 tile workers, then 4 with the predicting process) under py-spy (packed
#           by pack_device.sh when installed here), every process and thread, idle included: prof.txt.gz  <= 150 s
#   prof    gpu_profile.py: the fast path alone and beside two spinning Python threads (the lock as in a run), for
#           the bundled model and R101 (random init, 100 detections/tile), variants base (the backbone as a CUDA
#           graph, the default) and eager; a torch.profiler table of base; trace_default.json.gz            <= 150 s
#   graphs  the bundled model end to end (E2E px, 4 tile workers), with the backbone eager, then as a graph  <= 100 s
#   batches the bundled model end to end at batch 64 (wsiseg run's GPU default), 128 and 256: on an E2E px slide with
#           4 tile workers and on an E2E_BIG px one with BIG_WORKERS                                      <= 200 s
#   adapt   wsiseg adapt's default recipe (finetune) on the card, one round, the 6 packed Kumar images as the target
#           and 20 BBBC039 images as the source: its per-stage seconds (adapt_record.json), the rates behind
#           the GPU estimate of adapt.recipes                                                          <= 240 s
# Writes logs and JSON figures to $OUT (or gpu_out/), and all of them packed in $OUT/00_all.tgz. Card, CPU, driver
# and torch are printed first. Exits 1 when a step failed or ran out of time (each step is still run), naming those
# steps on the last line.
# SMOKE=1: the same steps and options at toy sizes on whatever device there is (no fp16, batches and tile counts of 2,
# small slides, no time limits; the packed wheels and data are left alone: this machine's own are used), so a broken
# option shows here before device time is spent (tests/benchmarks/test_gpu_check.py).
set -uo pipefail
OUT=${OUT:-gpu_out}
STEPS=${*:-default tta r101 cpuside}
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  AMP=none BATCH=2 TILES=2 STOCK=2 CPUSIDE_SIZE=1000 TRAIN_ITERS="--iters 2 --warmup 1"
  E2E=${E2E:-800} E2E_R101=${E2E_R101:-0} E2E_BIG=${E2E_BIG:-1000}
  ADAPT_SET="--set source.n_crops=4 --set cyclegan.iterations=2 --set cyclegan.crop=64 --set train.iterations=2
             --set target.tiles_per_slide=2 --set report_tiles=2" ADAPT_N=2
  limit() { shift; "$@"; }
else
  AMP=fp16 BATCH=128 TILES= STOCK= CPUSIDE_SIZE=6000 TRAIN_ITERS="--iters 40 --warmup 10"
  E2E=${E2E:-8000} E2E_R101=${E2E_R101:-6000} E2E_BIG=${E2E_BIG:-16000}
  ADAPT_SET= ADAPT_N=6
  limit() { timeout "$@"; }
fi
# tiles N: N on the card, $TILES in a smoke run; likewise stock N for the stock paths
tiles() { echo "--tiles ${TILES:-$1}"; }
stock() { echo "--stock-tiles ${STOCK:-$1}"; }
FAILED=""
mkdir -p "$OUT"
if [ -d .whl ] && [ "$SMOKE" != 1 ]; then  # the dependencies the device image lacks (no network there)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# The device image ships no compiled bytecode and writes none beside its packages, so every fresh interpreter compiled
# torch and our modules again: the predicting process took ~10 s to start there (a py-spy profile, 2026-12-04), more
# than an 8000 px slide's work. A user's install has its bytecode; here it is compiled once, into a writable cache.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/wsiseg_pycache}
python3 -c "import wsiseg.segmenters.rcnn, wsiseg.wsi.run, wsiseg.parallel.tiles, wsiseg.parallel.predict, wsiseg.export.zarr_labels, wsiseg.export.geojson" || true
if [ -d .device_data ] && [ "$SMOKE" != 1 ]; then export WSISEG_SHARED_DATA=${WSISEG_SHARED_DATA:-$PWD/.device_data}; fi
DATA=${WSISEG_SHARED_DATA:-$PWD/../shared/data}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  echo "cpus $(nproc): $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
} 2>&1 | tee "$OUT/card.txt"
for step in $STEPS; do
  echo "=== $step $(date +%T)"
  bad=0
  case $step in
    r101) limit 170 python3 benchmarks/throughput.py --config r101 --amp $AMP --batch $BATCH $(tiles 1024) --dets 100 \
            $(stock 64) --e2e "$E2E_R101" --e2e-workers-sweep "${R101_SWEEP:-}" --json "$OUT/throughput_r101_fp16.json" 2>&1 | tee "$OUT/throughput_r101_fp16.txt" || bad=1 ;;
    tests) limit 90 python3 -m pytest -q -p no:cacheprovider tests/segmenters/test_predictor.py 2>&1 | tee "$OUT/pytest_predictor.txt" || bad=1 ;;
    default) limit 180 python3 benchmarks/throughput.py --weights wsiseg/weights/default.safetensors --min-score 0.5 \
            --amp $AMP --batch $BATCH $(tiles 1024) $(stock 128) --e2e "$E2E" --e2e-workers-sweep "${SWEEP:-4,4p,8p}" \
            --json "$OUT/throughput_default_fp16.json" 2>&1 | tee "$OUT/throughput_default_fp16.txt" || bad=1 ;;
    nms) limit 90 python3 benchmarks/throughput.py --config r101 --amp $AMP --batch $BATCH $(tiles 512) --dets 100 \
            --skip-stock --nms-sweep 4096,matrix --json "$OUT/nms_r101.json" 2>&1 | tee "$OUT/nms_r101.txt" || bad=1
         limit 60 python3 benchmarks/throughput.py --weights wsiseg/weights/default.safetensors --min-score 0.5 \
            --amp $AMP --batch $BATCH $(tiles 1024) --skip-stock --nms-sweep 4096,matrix \
            --json "$OUT/nms_default.json" 2>&1 | tee "$OUT/nms_default.txt" || bad=1 ;;
    tta) limit 100 python3 benchmarks/throughput.py --weights wsiseg/weights/default.safetensors --min-score 0.5 \
            --amp $AMP --batch $BATCH $(tiles 1024) --skip-stock --tta 4 --semantic-fusion --e2e "$E2E" \
            --json "$OUT/throughput_default_tta.json" 2>&1 | tee "$OUT/throughput_default_tta.txt" || bad=1 ;;
    cpuside) for w in ${CPUSIDE:-0 8}; do limit 45 python3 benchmarks/cpu_side.py --size "$CPUSIDE_SIZE" --tile-workers $w 2>&1 \
            | tee "$OUT/cpu_side_w$w.txt" || bad=1; done ;;
    gil) WSISEG_SWITCH_INTERVAL=${SWITCH:-0.0001} limit 60 python3 benchmarks/throughput.py \
            --weights wsiseg/weights/default.safetensors --min-score 0.5 --amp $AMP --batch $BATCH $(tiles 512) --skip-stock \
            --e2e "$E2E" --tile-workers 4 --json "$OUT/gil.json" 2>&1 | tee "$OUT/gil.txt" || bad=1 ;;
    nmschunks) limit 120 python3 benchmarks/throughput.py --config r101 --amp $AMP --batch $BATCH $(tiles 512) --dets 100 \
            --skip-stock --nms-sweep 16384,8192,4096,2048,1024,512 --json "$OUT/nms_chunks_r101.json" 2>&1 | tee "$OUT/nms_chunks_r101.txt" || bad=1
         limit 60 python3 benchmarks/throughput.py --weights wsiseg/weights/default.safetensors --min-score 0.5 \
            --amp $AMP --batch $BATCH $(tiles 1024) --skip-stock --nms-sweep 16384,8192,4096,2048,1024,512 \
            --json "$OUT/nms_chunks_default.json" 2>&1 | tee "$OUT/nms_chunks_default.txt" || bad=1 ;;
    e2ebest) best=$(python3 -c "import json; s=json.load(open('$OUT/nms_default.json'))['nms_sweep']; print(max(s, key=lambda c: s[c]['tiles_per_s']))") || bad=1
         echo "best nms setting (default model): $best"
         if [ "$best" = matrix ]; then nmsarg="--nms-method matrix"; else nmsarg="--nms-method sequential --nms-chunk $best"; fi
         limit 120 python3 benchmarks/throughput.py --weights wsiseg/weights/default.safetensors --min-score 0.5 \
            --amp $AMP --batch $BATCH $(tiles 2048) --skip-stock $nmsarg --e2e "$E2E" \
            --json "$OUT/e2e_default_best.json" 2>&1 | tee "$OUT/e2e_default_best.txt" || bad=1 ;;
    prof) limit 100 python3 benchmarks/gpu_profile.py --weights wsiseg/weights/default.safetensors --min-score 0.5 \
            --amp $AMP --batch $BATCH $(tiles 1024) --variants base,eager \
            --trace "$OUT/trace_default.json" --json "$OUT/prof_default.json" 2>&1 | tee "$OUT/prof_default.txt" || bad=1
         gzip -f "$OUT/trace_default.json" || true
         limit 100 python3 benchmarks/gpu_profile.py --config r101 --dets 100 --amp $AMP --batch $BATCH $(tiles 512) \
            --variants "base$([ "$SMOKE" = 1 ] || echo ,eager)" --json "$OUT/prof_r101.json" 2>&1 | tee "$OUT/prof_r101.txt" || bad=1 ;;
    graphs) for g in --no-cuda-graphs ""; do limit 75 python3 benchmarks/throughput.py --weights wsiseg/weights/default.safetensors \
            --min-score 0.5 --amp $AMP --batch $BATCH $(tiles 256) --skip-stock --e2e "$E2E" --tile-workers 4 $g \
            --json "$OUT/e2e_graphs${g:+_off}.json" 2>&1 | tee "$OUT/e2e_graphs${g:+_off}.txt" || bad=1; done ;;
    batches) limit 80 python3 benchmarks/throughput.py --weights wsiseg/weights/default.safetensors --min-score 0.5 \
            --amp $AMP --batch 64 $(tiles 128) --skip-stock --e2e "$E2E" --tile-workers 4 --e2e-batch-sweep 128,256 \
            --json "$OUT/e2e_batches.json" 2>&1 | tee "$OUT/e2e_batches.txt" || bad=1
         limit 110 python3 benchmarks/throughput.py --weights wsiseg/weights/default.safetensors --min-score 0.5 \
            --amp $AMP --batch 64 $(tiles 128) --skip-stock --e2e "$E2E_BIG" --tile-workers "${BIG_WORKERS:-8}" \
            --e2e-batch-sweep 128,256 --json "$OUT/e2e_batches_big.json" 2>&1 | tee "$OUT/e2e_batches_big.txt" || bad=1 ;;
    adapt) ADAPT_OUT=$(mktemp -d /tmp/wsiseg_adapt.XXXXXX)  # a fresh run's, its own (another may run beside it)
         limit 240 python3 -m wsiseg.cli adapt --source "$DATA/bbbc039" --target $(ls -d "$DATA"/kumar/images/*.tif | head -"$ADAPT_N") --target-mpp 0.25 \
            --out "$ADAPT_OUT" --quiet --set rounds=1 $ADAPT_SET 2>&1 | tee "$OUT/adapt.txt" || bad=1
         for f in $(find "$ADAPT_OUT" -name '.*.done' | sort); do echo "stage marker $f: $(cat "$f")"; done \
            | tee -a "$OUT/adapt.txt"  # each finished stage's seconds, also when the run ran out of time
         cp "$ADAPT_OUT/adapt_record.json" "$OUT/adapt_record.json" || bad=1
         rm -rf "$ADAPT_OUT" ;;
    e2ebig) limit 120 python3 benchmarks/throughput.py --weights wsiseg/weights/default.safetensors --min-score 0.5 \
            --amp $AMP --batch $BATCH $(tiles 128) --skip-stock --e2e "$E2E_BIG" --tile-workers "${BIG_WORKERS:-8}" \
            --e2e-workers-sweep "${BIG_SWEEP:-4}" --json "$OUT/e2e_big.json" 2>&1 | tee "$OUT/e2e_big.txt" || bad=1 ;;
    bigtile) limit 120 python3 benchmarks/throughput.py --weights wsiseg/weights/default.safetensors --min-score 0.5 \
            --amp $AMP --batch "${BIG_TILE_BATCH:-$([ "$SMOKE" = 1 ] && echo 2 || echo 16)}" $(tiles 128) --skip-stock \
            --e2e "$E2E_BIG" --e2e-tile "${BIG_TILE:-768}" --tile-workers "${BIG_WORKERS:-8}" \
            --json "$OUT/e2e_bigtile.json" 2>&1 | tee "$OUT/e2e_bigtile.txt" || bad=1 ;;
    profile) spy=$(command -v py-spy || echo /tmp/site/bin/py-spy)
         limit 150 "$spy" record --subprocesses --nonblocking --idle --rate 100 --format raw -o /tmp/wsiseg_prof.txt -- \
            python3 benchmarks/throughput.py --weights wsiseg/weights/default.safetensors --min-score 0.5 --amp $AMP \
            --batch $BATCH $(tiles 256) --skip-stock --e2e "$E2E" --tile-workers 4 --e2e-workers-sweep 4p \
            --json "$OUT/profile_e2e.json" > "$OUT/profile_e2e.txt" 2>&1 || bad=1
         gzip -c /tmp/wsiseg_prof.txt > "$OUT/prof.txt.gz" || bad=1 ;;
    train) limit 110 python3 benchmarks/train_speed.py --config configs/pdam_r101.yaml $TRAIN_ITERS \
            --json "$OUT/train_speed_r101.json" 2>&1 | tee "$OUT/train_speed_r101.txt" || bad=1 ;;
    *) echo "unknown step $step"; bad=1 ;;
  esac
  [ "$bad" = 0 ] || FAILED="$FAILED $step"
done
echo "=== done $(date +%T)"
# the device tool brings back at most 8 files: everything, packed, first in name order (the figures also lie beside it)
tar czf "$OUT/00_all.tgz" -C "$OUT" --exclude 00_all.tgz . 2>/dev/null || true
if [ -n "$FAILED" ]; then echo "=== failed:$FAILED"; exit 1; fi
