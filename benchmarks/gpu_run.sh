#!/usr/bin/env bash
# Both GPU checks from a bare checkout, each under a wall-clock limit, everything kept in $OUT:
#
#     OUT=<dir> bash benchmarks/gpu_run.sh [--cpu]
#
# Needs only the machine's python3 with torch (CUDA build) and numpy: not this project's venv
# nor the installed package (the scripts put the repository on sys.path); nvidia-ml-py is
# used when present (the NVML inventory). Runs gpu_probe_check.py (limit PROBE_LIMIT_S, 100 s)
# then gpu_check.py (limit CHECK_LIMIT_S, 330 s: DDP, then FSDP2 'optimizer' and 'full', then
# 'proportional'): under
# 7 1/2 minutes in all. Each script stops itself 15-20 s before its limit and reports what it
# measured; `timeout` kills what is left.
#
# In $OUT (a new temporary directory when OUT is unset): gpu_run.log (all of the output),
# gpu_probe_check.md/.json and gpu_check.md/.json (each check's report, FAILED section
# included, and its measurements). On a GPU the scripts also update benchmarks/RESULTS.md.
# --cpu: both scripts' functional check on simulated devices (no GPU needed).
# GPU_CHECK_ARGS: more arguments for gpu_check.py, e.g. "--plant-failure 1", "--sharding full"
# (FSDP2 'full' only), "--sharding" (no sharded mode).
set -u
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
PROBE_LIMIT_S=${PROBE_LIMIT_S:-100}
CHECK_LIMIT_S=${CHECK_LIMIT_S:-330}
OUT=${OUT:-$(mktemp -d -t gpu_run.XXXXXX)}
export OUT
mkdir -p "$OUT"
# The checks measure the allocator's default behaviour, and every rank is on this machine.
unset PYTORCH_CUDA_ALLOC_CONF PYTORCH_ALLOC_CONF
export GLOO_SOCKET_IFNAME=lo PYTHONUNBUFFERED=1

limited() {  # limited SECONDS SCRIPT ARGS...: the script under a wall-clock limit
    local limit=$1 script=$2
    shift 2
    echo "== $script $* (wall-clock limit ${limit} s)"
    # timeout signals the script's whole process group (its spawned ranks too): TERM,
    # on which the script saves its report, then KILL 15 s later.
    timeout --kill-after=15 "$limit" "$PYTHON" "$script" --time-limit $((limit - 20)) "$@"
    local rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "== $script: stopped at the wall-clock limit of ${limit} s (exit $rc)"
    fi
    return "$rc"
}

main() {
    echo "== gpu_run.sh $* at $(date -u '+%Y-%m-%d %H:%M:%S UTC'), results in $OUT"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=index,name,compute_mode,memory.total,memory.used,driver_version \
            --format=csv || echo "nvidia-smi failed (exit $?)"
    else
        echo "nvidia-smi: not found"
    fi
    "$PYTHON" -c 'import sys, numpy, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available(), "| numpy", numpy.__version__)' ||
        { echo "== $PYTHON cannot import torch and numpy: nothing to run"; return 2; }
    local probe check
    limited "$PROBE_LIMIT_S" benchmarks/gpu_probe_check.py "$@"
    probe=$?
    # shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of words
    limited "$CHECK_LIMIT_S" benchmarks/gpu_check.py "$@" ${GPU_CHECK_ARGS:-}
    check=$?
    echo "== exit status: gpu_probe_check $probe, gpu_check $check; results in $OUT:"
    ls -l "$OUT"
    [ "$probe" -eq 0 ] && [ "$check" -eq 0 ]
}

main "$@" 2>&1 | tee -a "$OUT/gpu_run.log"
exit "${PIPESTATUS[0]}"
