#!/usr/bin/env bash
# One prepared device session (the `device` tool's `run`), sized to end by $BUDGET seconds:
#   1. the CUDA tests (tests/test_cuda.py), beside
#   2. the paper's tables 5, 7 and 2 on magnetic_tile, one process chain per blind setting
#      (mix, test, ano run side by side on the one GPU; within a chain table 5 first, whose
#      K = 200 self-kNN table then serves tables 7 and 2, which run side by side),
#   3. the reduced-precision pool study on real features, once the ano chain is done,
#   4. the CUDA kNN benchmark, only once every chain is done (timings need a quiet GPU).
# Everything lands in $OUT/results.tgz, refreshed every 15 s, so a timeout still returns work.
# The magnetic tile data travels through a git-excluded link, shared_link -> ../shared, and
# the pykeops sdists in .whl/: run with carry ["shared_link/data/magnetic_tile", ".whl"].
# Per-setting CSVs are joined afterwards with patchlab.reproduce.combine (docs/results.md).
BUDGET=${BUDGET:-510}
. "$(dirname "$0")/device_session.sh"  # left, log, $RES archived to $OUT/results.tgz
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/* \
    >"$RES/pip.log" 2>&1
export PYTHONPATH=/tmp/site:$PWD PATCHLAB_CACHE=/tmp/plcache PYTHONUNBUFFERED=1
log "start"
DATA=${DATA:-shared_link/data} CATEGORY=${CATEGORY:-magnetic_tile} DEVICE=${DEVICE:-cuda}
rep() { # table setting
    python3 -m patchlab.cli reproduce "$DATA" --categories "$CATEGORY" \
        --table "$1" --settings "$2" --device "$DEVICE" --out "$RES/mt_$2" --quiet \
        >"$RES/mt_t$1_$2.log" 2>&1
    log "table $1 $2 rc=$?"
}
chain() { # setting
    rep 5 "$1"
    rep 7 "$1" &
    rep 2 "$1"
    wait
}
for s in ano test mix; do
    chain $s &
    eval "CHAIN_$s=$!"
done
python3 -m pytest -q -o addopts=-ra -p no:cacheprovider tests/test_cuda.py >"$RES/test_cuda.log" 2>&1
log "cuda tests rc=$?"

wait "$CHAIN_ano"
log "ano chain done"
timeout $(($(left) - 60)) python3 benchmarks/precision_pool.py "$DATA" --category "$CATEGORY" \
    --setting ano --device "$DEVICE" --max-patches 200000 --pools 0 8 32 128 \
    >"$RES/precision_pool.txt" 2>&1 &
POOL=$!
while kill -0 "$CHAIN_test" 2>/dev/null || kill -0 "$CHAIN_mix" 2>/dev/null; do
    if [ "$(left)" -le 5 ]; then
        log "deadline: chains still running"
        break
    fi
    sleep 2
done
wait "$POOL"
log "chains done, $(left) s left"
bench() { # seconds, then knn.py arguments
    local t=$1
    shift
    if [ "$(left)" -gt 20 ]; then
        timeout $((t < $(left) - 5 ? t : $(left) - 5)) python3 benchmarks/knn.py --device "$DEVICE" "$@" \
            >>"$RES/knn_cuda.txt" 2>&1
        log "knn benchmark $* rc=$?"
    fi
}
bench 90 --sizes 50000x1024x100 --backends torch torch-tf32 torch-bf16
bench 100 --sizes 300000x1024x100 --backends torch torch-tf32
bench 90 --sizes 50000x64x10 50000x1024x100 --backends torch keops --keops-limit 30
log "done"
pkill -f patchlab.cli 2>/dev/null
