#!/usr/bin/env bash
# One device call of exploration (issue #11): build, the new op's GPU tests, layer-level formulations.
# Usage on the device machine: bash tools/device_probe.sh  (results under $OUT)
set -o pipefail
export PYTHONUNBUFFERED=1 CONDLORA_CUDA_ARCH=9.0 MAX_JOBS=16
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warn | tail -2
python -c "import condlora_kernels.kernels.cpp as c; print('ext', c.LOAD_ERROR, c.WITH_CUDA)"
python -m pytest -q -x -p no:logging tests/test_linear_op.py -k cuda 2>&1 | tail -4 | tee "$OUT/test_linear_op_cuda.txt"
CONDLORA_AUTOTUNE=0 python tools/explore_formulations.py \
  --shapes 8192,768,768,8 4096,768,768,8 8192,4096,4096,16 16384,4096,4096,16 8192,4096,11008,16 8192,4096,4096,64 \
  --json "$OUT/formulations2.json" 2>&1 | grep -v -i warn | tee "$OUT/formulations2.txt"
