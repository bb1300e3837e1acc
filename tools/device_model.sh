#!/usr/bin/env bash
# One device call (issue #11): the model level in eager mode for every provider, the host-time and first-step
# levels, and the paper's code in the compiled modes, merged into benchmarks/results/nvidia-h200.json (which holds
# the compiled modes of the other providers from the call before). Each step has its own time limit so that one
# cannot starve the next; the JSON is copied to $OUT after each.
set -o pipefail
export PYTHONUNBUFFERED=1 CONDLORA_CUDA_ARCH=9.0 MAX_JOBS=16 HF_HUB_OFFLINE=1
start=$SECONDS
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warn | tail -2
echo "install: $((SECONDS - start)) s"
bench() {  # bench TIME_LIMIT ARGS...
  local limit=$1; shift
  timeout "$limit" python -m condlora_kernels bench --merge --no-plot --output benchmarks/results "$@" 2>&1 \
    | grep -v -i warn | grep -E "^\||Graphs|Not run|fastest|model |first step" | cut -c1-220
  cp benchmarks/results/nvidia-h200.json "$OUT/"
  echo "elapsed: $((SECONDS - start)) s"
}
bench 150 --only model --model-modes eager --no-first-step
bench 40 --only host
bench 170 --only first-step
bench $((470 - SECONDS + start)) --only model --model-modes compile reduce-overhead --providers paper_code_condlora \
  --no-first-step
