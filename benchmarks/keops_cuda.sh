#!/usr/bin/env bash
# KeOps on CUDA, one prepared device call (issue 20): make pykeops run on the lent GPU, then
# measure it against patchlab's torch path at 152-d and 1024-d. Sized to end by $BUDGET s.
#
# Here, before the call (the device machine reaches no index):
#   pip download --no-deps --no-binary :all: -d .whl pykeops keopscore
# then run with carry [".whl"] (the sdists, under 1 MB).
#
# pykeops 2.3 segfaulted on the first CUDA kernel it generated on that image (CUDA 13, driver
# 580; docs/performance.md). Each attempt below changes one suspect and runs KeOps' own
# smallest example; the first that passes is used for the benchmark:
#   a. as installed (system CUDA headers and NVRTC), with a fresh KEOPS_CACHE_FOLDER;
#   b. NVRTC and headers from the nvidia-* wheels torch itself brought (CUDA_PATH at them);
#   c. b with the CUDA runtime of those wheels first on LD_LIBRARY_PATH.
# A crash is recorded with gdb's backtrace (where in pykeops/NVRTC it dies).
BUDGET=${BUDGET:-420}
. "$(dirname "$0")/device_session.sh" # left, log, $RES archived to $OUT/results.tgz
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/* \
    >"$RES/pip.log" 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
NV=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))" 2>/dev/null)/nvidia
log "nvidia wheels: $(ls "$NV" 2>/dev/null | tr '\n' ' ')"
probe() { # name: KeOps' smallest CUDA reduction, backtrace on a crash
    local name=$1
    export KEOPS_CACHE_FOLDER=/tmp/keops-$name
    rm -rf "$KEOPS_CACHE_FOLDER"
    timeout 120 gdb -q -batch -ex run -ex bt --args python3 -c "
import torch, pykeops
from pykeops.torch import LazyTensor
x = LazyTensor(torch.randn(1000, 1, 3, device='cuda'))
y = LazyTensor(torch.randn(1, 2000, 3, device='cuda'))
print('KeOps on CUDA:', ((x - y) ** 2).sum(2).argKmin(5, dim=1).shape)
" >"$RES/keops_$name.log" 2>&1
    grep -q "KeOps on CUDA:" "$RES/keops_$name.log"
}
ok=""
if probe a_as_installed; then
    ok=a
else
    export CUDA_PATH=$NV/cuda_nvrtc CUDA_HOME=$NV/cuda_runtime
    export CPATH=$NV/cuda_runtime/include:$NV/cuda_nvrtc/include${CPATH:+:$CPATH}
    if probe b_wheel_nvrtc; then
        ok=b
    else
        export LD_LIBRARY_PATH=$NV/cuda_runtime/lib:$NV/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        probe c_wheel_runtime && ok=c
    fi
fi
log "KeOps on CUDA: ${ok:-no attempt ran} ($(ls "$RES"/keops_*.log | xargs -n1 basename | tr '\n' ' '))"
if [ -n "$ok" ] && [ "$(left)" -gt 60 ]; then
    timeout $(($(left) - 20)) python3 benchmarks/knn.py --device cuda --check 0 \
        --cases mixture:50000x152x25 mixture:50000x1024x100 --backends torch keops \
        >"$RES/knn_keops_cuda.txt" 2>&1
    log "benchmark rc=$?"
fi
log "done"
