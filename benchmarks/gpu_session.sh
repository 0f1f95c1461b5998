#!/usr/bin/env bash
# One prepared device session (the `device` tool's `run`): CUDA kNN benchmark, reduced-precision
# pool study, and the paper's tables 2, 5, 7 on the demo data and on magnetic_tile, on the GPU.
# Everything lands in $OUT/results.tgz (refreshed every 20 s, so a timeout still returns work).
# The magnetic tile data travels through a git-excluded link: shared_link -> ../shared.
set -u
RES=/tmp/res; mkdir -p "$RES"
( while true; do tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null; sleep 20; done ) &
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/* \
    > "$RES/pip.log" 2>&1
export PYTHONPATH=/tmp/site:$PWD PATCHLAB_CACHE=/tmp/plcache
log() { echo "[$(date +%T)] $*" | tee -a "$RES/session.log"; }
{ nvidia-smi -L; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } \
    > "$RES/gpu.txt" 2>&1
STAGE=${STAGE:-all}
if [ "$STAGE" = all ] || [ "$STAGE" = a ]; then
  log "knn benchmark 50k"
  timeout 240 python3 benchmarks/knn.py --device cuda --sizes 50000x1024x100 50000x64x10 \
      --backends torch torch-tf32 torch-bf16 keops --keops-limit 60 > "$RES/knn_cuda.txt" 2>&1
  log "demo tables"
  python3 -m patchlab.cli demo-data data/demo > /dev/null
  for t in 2 5 7; do
    python3 -m patchlab.cli reproduce data/demo --table $t --out "$RES/demo" --quiet \
        > "$RES/demo_t$t.log" 2>&1
    log "demo table $t rc=$?"
  done
  log "magnetic table 2"
  python3 -m patchlab.cli reproduce shared_link/data --categories magnetic_tile --table 2 \
      --out "$RES/magnetic_tile" --quiet > "$RES/mt_t2.log" 2>&1
  log "magnetic table 2 rc=$?"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = b ]; then
  for t in 7 5; do
    python3 -m patchlab.cli reproduce shared_link/data --categories magnetic_tile --table $t \
        --out "$RES/magnetic_tile" --quiet > "$RES/mt_t$t.log" 2>&1
    log "magnetic table $t rc=$?"
  done
  log "precision pools"
  timeout 120 python3 benchmarks/precision_pool.py shared_link/data --category magnetic_tile \
      --setting test --device cuda > "$RES/precision_pool.txt" 2>&1
  log "knn benchmark 300k"
  timeout 200 python3 benchmarks/knn.py --device cuda --sizes 300000x1024x100 \
      --backends torch torch-tf32 keops --keops-limit 30 > "$RES/knn_cuda_300k.txt" 2>&1
  log "done"
fi
tar czf "$OUT/results.tgz" -C "$RES" .
