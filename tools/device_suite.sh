#!/usr/bin/env bash
# The suite on one GPU in device calls of at most 10 minutes each, merged into one JSON: `bash tools/device_suite.sh
# PART`. Call the parts back to back so that the machine stays warm (the install and Inductor's caches are kept).
# The suite's parts (1-4) merge their points into $SUITE_DIR/<device>.json (default build/suite, ignored by git:
# one run's JSON, not merged with earlier sessions') and copy it to $OUT. A machine kept warm keeps that ignored
# folder between calls (the twenty-sixth session's run needed no carry); after a cold start, copy the last JSON
# back into $SUITE_DIR here and carry that folder into the next call. Compiled points are primed
# (bench/model.py): each compiles twice, the second time from the caches the first filled.
#   1       install, the eager model level for every provider but +recompute (a setting, not a backend: run it
#           with `points` or the bench's --providers) in 7 alternated rounds (eager steps follow the host's speed,
#           NOTES tenth session; 3 rounds in the twenty-sixth session's run spread ours 27-44 ms on RoBERTa-base),
#           host time, the paper's code compiled (twenty-seventh session, 7 rounds: 400 s with the install, on a
#           machine the call started, the eager rounds and host time done at 244 s; 306 s with 3 rounds)
#   2       RoBERTa-base compiled and under CUDA graphs: frozen, PEFT LoRA and condlora[cuda] (the required target's
#           providers) in 3 alternated rounds, a compiled step on these hosts being bound by the host too (NOTES,
#           twenty-second session). No +recompute round: on RoBERTa-base the default ("auto") recomputes already
#           (twenty-third session: 390 s with the install, on a warm machine)
#   3       the same as 2 for the Llama stack, then condlora[triton] on it in one round, then condlora[triton] on
#           RoBERTa-base compiled in one round (twenty-third session, with the priming's GPU test and
#           condlora[cuda]+recompute on the Llama stack: 524 s, close to the call's limit: the timeouts below drop
#           the last points first)
#   4       the first step in fresh processes, cold and warm caches, then the op's GPU tests (three files). In the
#           twenty-seventh session: first step done at 234 s with the install, tests at 337 s. Parts 1-4 back to
#           back took 1777 s of device time with the cold start in the twenty-third session, a session's whole
#           budget; 1464 s in the twenty-sixth (3 eager rounds, no tests); the whole 1800 s in the twenty-seventh
#           (7 eager rounds, part 4's tests; part 1 400 s, 2 368 s and 3 394 s of wall time, on three machines with
#           one failed start), so a run of the suite leaves no device time for anything else
#   kernel  install, the kernel level at the two shapes of issue #11's kernel targets (RoBERTa-base's 8192 x 768^2,
#           r=8, with its CUDA-graph repeats; 16384 x 4096^2, r=16), bf16, frozen, condlora[cuda], PEFT LoRA, then
#           condlora[triton] (last at each shape: its autotuning is the longest, so that a time limit cuts it first),
#           into the suite's JSON; then tools/explore_eager_host.py on CUDA tensors at width 64 (twenty-eighth
#           session: 175-180 s with the install, the kernel level done at ~105 s)
#   1a, 2a, 2b, 3a  the earlier four-part split, merging into benchmarks/results/<device>.json
#   prepare  install, the generation kernels' GPU tests (tests/test_cuda_prepare.py with the op's two test files)
#           and tools/explore_prepare.py (their GPU time against cuBLAS and the rounding alone), for float32 masters
#           and for bf16 weights: ~150 s after the install in the fourteenth session
#   llama   install, the Llama stack in all three modes for frozen, PEFT LoRA and condlora[cuda], 3 alternated rounds
#           (~120 s after the install in the fourteenth session), into its own JSON (not the suite's)
#   ab TOGGLE  install, the op's GPU tests (the three files of `prepare`), then tools/explore_ab.py with that toggle,
#           eager and compiled, 6 rounds (nineteenth session: ~100 s of tests, ~300 s of A/B after the install)
#   layer TOGGLE  install, one layer's GPU time (CUDA graphs) and host-inclusive time at RoBERTa-base's widths
#           (tools/explore_formulations.py, frozen and cuda), as built and with the branch's switch set, twice each,
#           alternated (twenty-fourth session: ~75 s after the install)
#   points  install, tools/explore_point_memory.py: the bytes first GEMMs keep, then RoBERTa-base's compiled points
#           in the suite's order and reversed (nineteenth session: ~140 s for both orders after the install)
#   tests FILE...   install, those GPU tests with 8 workers, the whole output and the 25 slowest kept in $OUT
#           (the whole tests/ directory needs more than one call: 420 s with 12 workers reached 95%)
set -o pipefail
export PYTHONUNBUFFERED=1 CONDLORA_CUDA_ARCH=9.0 MAX_JOBS=16 HF_HUB_OFFLINE=1
start=$SECONDS
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warn | tail -2
echo "install: $((SECONDS - start)) s"
suite_dir=${SUITE_DIR:-build/suite}
bench_into() {  # bench_into FOLDER TIME_LIMIT ARGS...
  local folder=$1 limit=$2; shift 2
  timeout "$limit" python -m condlora_kernels bench --merge --no-plot --output "$folder" "$@" 2>&1 \
    | grep -v -i warn | grep -E "^\||Graphs|Not run|fastest|model |first step|Error" | cut -c1-220
  cp "$(ls -t "$folder"/*.json | head -1)" "$OUT/"  # the JSON this run merged into
  echo "elapsed: $((SECONDS - start)) s"
}
bench() { bench_into benchmarks/results "$@"; }
gpu_tests() {  # gpu_tests TIME_LIMIT FILE...: those GPU tests with 8 workers, the output and 25 slowest in $OUT
  local limit=$1; shift
  timeout "$limit" python -m pytest -q -rfE -n 8 --durations=25 -p no:cacheprovider "$@" > "$OUT/pytest_gpu.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_gpu.txt" | tail -15 | cut -c1-400
  echo "tests: $((SECONDS - start)) s"
}
compiled_providers=(frozen peft_lora "condlora[cuda]" "condlora[cuda]+recompute" "condlora[triton]")  # 2a, 2b
# every model provider but condlora[cuda]+recompute, for part 1's eager rounds
eager_providers=(frozen peft_lora paper_code_condlora "condlora[cuda]" "condlora[triton]" "condlora[cpu]"
                 "condlora[reference]")
required_providers=(frozen peft_lora "condlora[cuda]")  # the required target's, in 3 rounds in parts 2 and 3
compiled=(--only model --model-modes compile reduce-overhead --no-first-step)  # the compiled model level's options
part=$1; shift
case "$part" in
  1) bench_into "$suite_dir" $((400 - SECONDS + start)) --only model host --model-modes eager --no-first-step --rounds 7 \
       --providers "${eager_providers[@]}"
     bench_into "$suite_dir" $((575 - SECONDS + start)) "${compiled[@]}" --providers paper_code_condlora ;;
  2) bench_into "$suite_dir" $((585 - SECONDS + start)) "${compiled[@]}" --models roberta-base --rounds 3 \
       --providers "${required_providers[@]}" ;;
  3) bench_into "$suite_dir" $((360 - SECONDS + start)) "${compiled[@]}" --models llama-4096-2L --rounds 3 \
       --providers "${required_providers[@]}"
     bench_into "$suite_dir" $((450 - SECONDS + start)) "${compiled[@]}" --models llama-4096-2L \
       --providers "condlora[triton]"
     bench_into "$suite_dir" $((585 - SECONDS + start)) "${compiled[@]}" --models roberta-base \
       --providers "condlora[triton]" ;;
  4) bench_into "$suite_dir" $((400 - SECONDS + start)) --only first-step
     # after the suite's last points, so that a run short of device time loses these first: the op's GPU tests of
     # the code the run measured (~100 s)
     gpu_tests $((590 - SECONDS + start)) tests/test_cpp_backend.py tests/test_linear_op.py \
       tests/test_recompute_weight_cast.py ;;
  kernel)  # issue #11's kernel-level targets (report.KERNEL_LIMITS), then the eager step's host time on CUDA tensors
    bench_into "$suite_dir" $((420 - SECONDS + start)) --only kernel --dtypes bf16 \
      --shapes 8192,768,768,8 16384,4096,4096,16 --providers frozen "condlora[cuda]" peft_lora "condlora[triton]"
    timeout $((590 - SECONDS + start)) python tools/explore_eager_host.py --device cuda --model roberta-12L-w64 \
      --rounds 5 --steps 30 --json "$OUT/eager_host_cuda.json" 2>&1 | grep -v -i warn | cut -c1-200
    echo "kernel: $((SECONDS - start)) s" ;;
  1a) bench $((570 - SECONDS + start)) --only model host --model-modes eager --no-first-step --rounds 3 ;;
  2a|2b) bench $((570 - SECONDS + start)) "${compiled[@]}" \
       --models "$([ "$part" = 2a ] && echo roberta-base || echo llama-4096-2L)" --providers "${compiled_providers[@]}" ;;
  3a) bench 170 "${compiled[@]}" --providers paper_code_condlora
      bench $((570 - SECONDS + start)) --only first-step ;;
  llama)
    timeout $((570 - SECONDS + start)) python -m condlora_kernels bench --only model --no-first-step --no-plot \
      --models llama-4096-2L --model-modes eager compile reduce-overhead --rounds 3 \
      --providers frozen peft_lora "condlora[cuda]" --output "$OUT/llama" 2>&1 \
      | grep -v -i warn | grep -E "^\||fastest|Error" | cut -c1-220
    echo "llama: $((SECONDS - start)) s"
    ;;
  prepare)
    gpu_tests 200 tests/test_cuda_prepare.py tests/test_linear_op.py tests/test_cpp_backend.py
    timeout 100 python tools/explore_prepare.py --json "$OUT/explore_prepare.json"
    timeout 100 python tools/explore_prepare.py --weights bf16 --json "$OUT/explore_prepare_bf16_weights.json"
    echo "prepare: $((SECONDS - start)) s"
    ;;
  ab)
    gpu_tests 200 tests/test_cuda_prepare.py tests/test_linear_op.py tests/test_cpp_backend.py
    timeout $((580 - SECONDS + start)) python tools/explore_ab.py --toggle "$1" --rounds 6 --json "$OUT/ab.json" 2>&1 \
      | grep -v -i warn | cut -c1-300
    echo "ab: $((SECONDS - start)) s"
    ;;
  layer)
    for variant in new old new old; do
      echo "== $variant"
      # shellcheck disable=SC2046  (the switch is set for the old variant only)
      env $([ "$variant" = old ] && echo "$1=1") timeout 60 python tools/explore_formulations.py \
        --shapes 8192,768,768,8 2048,768,768,8 --names frozen cuda --json "$OUT/layer_${variant}_$SECONDS.json" 2>&1 \
        | grep -E "^(cuda|frozen|[0-9])"
    done
    echo "layer: $((SECONDS - start)) s"
    ;;
  points)
    timeout 60 python tools/explore_point_memory.py once --json "$OUT/once.json" 2>&1 | grep -v -i warn
    for order in 'frozen peft_lora condlora[cuda]' 'condlora[cuda] peft_lora frozen'; do
      first=${order%% *}  # the first provider, without brackets (files so named do not come back)
      # shellcheck disable=SC2086  (the order is a list of provider names)
      timeout $((580 - SECONDS + start)) python tools/explore_point_memory.py points --mode compile --order $order \
        --json "$OUT/points_${first//[\[\]]/_}first.json" 2>&1 | grep -v -i warn | grep -E "^(frozen|peft|condlora)"
    done
    echo "points: $((SECONDS - start)) s"
    ;;
  tests)
    gpu_tests $((570 - SECONDS + start)) "$@"
    ;;
  *) echo "usage: bash tools/device_suite.sh 1|2|3|4|kernel|1a|2a|2b|3a|llama|prepare|ab TOGGLE|layer TOGGLE|points|tests FILE..." >&2; exit 2 ;;
esac
