#!/usr/bin/env bash
# The device calls of the seventh session (issue #11), kept as a recipe: `bash tools/device_session7.sh PART`.
# One part per device call (10 minutes at most each), called back to back so that the machine stays warm. Each part
# merges its points into benchmarks/results/nvidia-h200.json and copies it to $OUT; the caller copies it back into
# the tree before the next call (a call starts from the tree as it is here).
#   1: install, the GPU tests of what changed, tools/memory_model.py (RoBERTa compiled), the eager model level and
#      host time
#   2: the compiled modes for frozen, PEFT and both backends
#   3: the paper's code compiled, the first step in fresh processes
#   4: after this session's host-time changes: the GPU tests, the bench test that failed in part 1 (its whole
#      output), host time, and every allocation alive at the compiled RoBERTa step's peak for PEFT and CondLoRA
set -o pipefail
export PYTHONUNBUFFERED=1 CONDLORA_CUDA_ARCH=9.0 MAX_JOBS=16 HF_HUB_OFFLINE=1
start=$SECONDS
python -c "import condlora_kernels._C" 2>/dev/null && pip show -q condlora-kernels >/dev/null 2>&1 \
  || python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warn | tail -2
echo "install: $((SECONDS - start)) s"
bench() {  # bench TIME_LIMIT ARGS...
  local limit=$1; shift
  timeout "$limit" python -m condlora_kernels bench --merge --no-plot --output benchmarks/results "$@" 2>&1 \
    | grep -v -i warn | grep -E "^\||Graphs|Not run|fastest|model |first step|Error" | cut -c1-220
  cp benchmarks/results/nvidia-h200.json "$OUT/"
  echo "elapsed: $((SECONDS - start)) s"
}
case "$1" in
  1)
    timeout 200 python -m pytest -q -rfE -n 4 -p no:cacheprovider tests/test_timing.py tests/test_linear_op.py \
      tests/test_cpp_backend.py "benchmarks/test_bench_model.py::test_compiled_mode_runs" > "$OUT/pytest_gpu_part1.txt" 2>&1
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_gpu_part1.txt" | tail -15
    echo "tests: $((SECONDS - start)) s"
    timeout 170 python tools/memory_model.py --mode compile --json "$OUT/memory_roberta_compile.json" 2>&1 \
      | grep -v -i warn | tee "$OUT/memory_roberta_compile.txt"
    echo "memory: $((SECONDS - start)) s"
    bench $((560 - SECONDS + start)) --only model host --model-modes eager --no-first-step
    ;;
  2)
    bench 570 --only model --model-modes compile reduce-overhead --no-first-step \
      --providers frozen peft_lora "condlora[cuda]" "condlora[triton]"
    ;;
  3)
    bench 170 --only model --model-modes compile reduce-overhead --providers paper_code_condlora --no-first-step
    bench $((570 - SECONDS + start)) --only first-step
    ;;
  4)
    # (as run this session: `| tail -6` and 240 s, which cut the run before its summary; one test failed, unnamed.
    # Keep the whole output and the failures' names, and give the suite more time.)
    timeout 330 python -m pytest -q -rfE -n 8 -p no:cacheprovider tests/ > "$OUT/pytest_gpu_part4.txt" 2>&1
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_gpu_part4.txt" | tail -15
    echo "tests: $((SECONDS - start)) s"
    timeout 70 python -m pytest -q -p no:cacheprovider -x \
      "benchmarks/test_bench_model.py::test_compiled_mode_runs[cuda-inductor]" > "$OUT/bench_test.txt" 2>&1
    tail -30 "$OUT/bench_test.txt" | cut -c1-300
    bench 40 --only host
    timeout $((560 - SECONDS + start)) python tools/memory_model.py --mode compile --providers peft_lora \
      "condlora[cuda]" --json "$OUT/memory_peak_allocations.json" 2>&1 | grep -v -i warn | grep -v "^ *192.00"
    echo "elapsed: $((SECONDS - start)) s"
    ;;
esac
