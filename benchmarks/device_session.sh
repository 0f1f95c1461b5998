# Sourced by the one-call device scripts (gpu_tables.sh, gpu_session.sh): a budget clock, a
# results folder archived to $OUT every 15 s (so a call cut at its time limit still returns
# what was finished) and once more on any exit, a timestamped log, and the machine's GPU,
# cores and torch in $RES/gpu.txt.
#   BUDGET=480 . benchmarks/device_session.sh    # then: left, log, $RES
set -u
START=$(date +%s)
END=$((START + ${BUDGET:-480}))
left() { echo $((END - $(date +%s))); }  # seconds of the budget left
RES=/tmp/res
mkdir -p "$RES"
pack() { # $1: a name of its own for the partial archive, renamed into place when complete
    tar czf "$OUT/.results-$1.tgz" -C "$RES" . 2>/dev/null && mv "$OUT/.results-$1.tgz" "$OUT/results.tgz"
}
(while true; do pack loop; sleep 15; done) &
TAR=$!
# on any exit (an early failure too): stop the loop and its tar, then one last archive
trap 'pkill -P $TAR; kill $TAR; wait $TAR 2>/dev/null; pack final; rm -f "$OUT"/.results-*.tgz' EXIT
log() { echo "[$(($(date +%s) - START)) s] $*" | tee -a "$RES/session.log"; }
{
    nvidia-smi -L
    nproc
    python3 -c "import torch, numpy; print(torch.__version__, numpy.__version__, torch.cuda.get_device_name())"
} >"$RES/gpu.txt" 2>&1
