#!/usr/bin/env bash
# The checks that need a CUDA device, in one run, each step under its own time limit so that one hang cannot eat
# the rest: the environment, the one-command GPU report (benchmarks/gpu.py: verify, the attention op, inference and
# training speed; its table also to gpu.txt, its results to gpu.json), `ddetr verify` of every reference file with
# the Triton kernels and with the reference backend on the GPU, the op tests with compiled (not interpreted) Triton
# kernels, the attention and training-step benchmarks, and the demo (train, evaluate, predict) on the GPU.
# Everything goes to one log; the attention benchmark also to msda.json.
#
#     bash tools/gpu_check.sh [OUTPUT_FOLDER]          # default: gpu_check (or $OUT where that is set)
#     PYTHON=.venv/bin/python bash tools/gpu_check.sh
#     GPU_CHECK_STEPS="verify-triton op-tests" bash tools/gpu_check.sh      # only these steps
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
log="$out/gpu_check.log"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
failed=()

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then
        return
    fi
    start=$(date +%s)
    echo "== $name: $*" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$log"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

step environment 60 "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
step gpu-report 540 bash -c "set -o pipefail; \"$py\" benchmarks/gpu.py --device cuda --json \"$out/gpu.json\" \
| tee \"$out/gpu.txt\""
step verify-triton 120 "$py" -m deformable_detr verify tests/reference --device cuda --backend triton
step op-tests 150 "$py" -m pytest -q -p no:cacheprovider tests/test_ops.py -k triton
step msda-benchmark 120 bash -c "\"$py\" benchmarks/msda.py --device cuda --backends triton --json > \"$out/msda.json\" \
&& \"$py\" -c 'import json, sys; sys.path.insert(0, \"benchmarks\"); import msda; \
print(msda.format_table(json.load(open(\"$out/msda.json\"))))'"
step train-step 150 "$py" benchmarks/train_step.py --device cuda
step demo 240 "$py" -m deformable_detr demo --device cuda --num_workers 8 --no_progress --output_dir "${TMPDIR:-/tmp}/ddetr_gpu_check_demo"
step verify-reference 120 "$py" -m deformable_detr verify tests/reference --device cuda --backend reference

grep -h "AP50\|^ *Average Precision  (AP) @\[ IoU=0.50:0.95 | area=   all" "$log" | tail -n 3
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]} (details in $log)"
    exit 1
fi
echo "all GPU checks passed (log: $log)"
