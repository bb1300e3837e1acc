#!/usr/bin/env bash
# One GPU session on the device machine (torch and triton preinstalled, no registry): install, GPU tests,
# kernel measurements. Results land in $OUT.
# Usage: bash benchmarks/gpu_session.sh [build] [tests] [cpp] [gputests] [probes] [hostprobe] [cudaexplore] [compile] [alltests] [gemm] [helpers]
#        [explore] [explore-full] [profile] [benchpytest] [bench]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (pytest-xdist, ...)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# the Triton autotuner's cache: carried in (carry [".autotune_cache"]) and brought back under $OUT
export CONDLORA_CACHE_DIR=${CONDLORA_CACHE_DIR:-$PWD/.autotune_cache}
want() { [[ " $* " == *" $STEP "* ]]; }
steps="$*"
skip_ext=1  # the extension build (~1-2 min) only for the steps that use it
for s in $steps; do case $s in build|cpp|gputests|probes|hostprobe|cudaexplore|alltests|benchpytest|bench) skip_ext=0 ;; esac; done
start=$(date +%s)
CONDLORA_SKIP_EXT=$skip_ext python3 -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { tail -30 "$OUT/install.log"; exit 1; }
grep "condlora_kernels setup" "$OUT/install.log"
echo "install: $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for STEP in $steps; do
  t0=$(date +%s)
  case $STEP in
    tests) timeout 300 python3 -m pytest tests/test_triton_backend.py -q -n 8 -p no:cacheprovider 2>&1 | tee "$OUT/pytest_triton.log" | tail -15 ;;
    cpp) timeout 300 python3 -m pytest tests/test_cpp_backend.py -q -n 8 -p no:cacheprovider 2>&1 | tee "$OUT/pytest_cpp.log" | tail -15 ;;
    compile) TORCHDYNAMO_VERBOSE=1 timeout 200 python3 -m pytest tests/test_triton_backend.py -q -x -k "compile or opcheck" -p no:cacheprovider > "$OUT/compile.log" 2>&1; tail -3 "$OUT/compile.log" ;;
    alltests) timeout 400 python3 -m pytest tests -q -n 8 -p no:cacheprovider 2>&1 | tee "$OUT/pytest_all.log" | tail -15 ;;
    explore) timeout 400 python3 benchmarks/triton_explore.py --quick --out "$OUT/explore.json" 2>&1 | tee "$OUT/explore.log" | tail -12 ;;
    explore-full) timeout 500 python3 benchmarks/triton_explore.py --out "$OUT/explore.json" 2>&1 | tee "$OUT/explore.log" | tail -12 ;;
    gemm) timeout 300 python3 benchmarks/triton_explore.py --gemm-sweep --out "$OUT/gemm_sweep.json" 2>&1 | tee "$OUT/gemm.log" | grep -E "^GEMM|Error" ;;
    helpers) timeout 300 python3 benchmarks/triton_explore.py --helpers --out "$OUT/helpers.json" 2>&1 | tee "$OUT/helpers.log" | grep -E "^HELPERS|Error" ;;
    profile) timeout 120 python3 benchmarks/triton_explore.py --profile 2>&1 | tee "$OUT/profile.log" | head -60 ;;
    gputests) timeout 470 python3 -m pytest tests/test_cpp_backend.py tests/test_triton_backend.py tests/test_triton_autotune.py \
                -q -n 12 -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15 ;;
    hostprobe) timeout 300 python3 benchmarks/host_probe.py ${HOSTPROBE_ARGS:---model} 2>&1 | tee "$OUT/host_probe.log" | grep -E "^HOST|^MODEL|^TOP|Error" ;;
    probes) timeout 200 python3 benchmarks/capture_probe.py frozen "condlora[triton]" "condlora[cuda]" 2>&1 | grep -E "PROBE|Error" ;;
    cudaexplore) timeout 300 python3 benchmarks/cuda_explore.py --skip-capture --out "$OUT/cuda_explore.json" 2>&1 | tee "$OUT/cuda_explore.log" | grep -E "^CUDA|Error" ;;
    benchpytest) CONDLORA_BENCH_QUICK=1 timeout ${BENCHPYTEST_TIMEOUT:-500} python3 -m pytest benchmarks -m gpu -q -p no:cacheprovider --benchmark-json="$OUT/pytest_benchmarks.json" 2>&1 | tee "$OUT/pytest_benchmarks.log" | tail -25 ;;
    bench) timeout ${BENCH_TIMEOUT:-420} python3 -m condlora_kernels bench --output "$OUT/bench" ${BENCH_ARGS:-} \
             --providers frozen lora peft_lora paper_code paper_code_compiled paper_code_condlora "condlora[triton]" "condlora[cuda]" \
             2>&1 | tee "$OUT/bench.log" | tail -60 ;;
  esac
  echo "step $STEP: $(( $(date +%s) - t0 )) s"
done
[ -d "$CONDLORA_CACHE_DIR" ] && cp -r "$CONDLORA_CACHE_DIR" "$OUT/autotune_cache"
true
