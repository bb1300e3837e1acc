#!/usr/bin/env bash
# One device call: build, every test on the GPU, the exhaustive autotune candidates, and a short look at the
# small-layer and model-level timings of the extension's op. Results under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 CONDLORA_CUDA_ARCH=9.0 MAX_JOBS=16
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warn | tail -2
python -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)" | tee "$OUT/versions.txt"
python -m pytest -q -n 8 -p no:cacheprovider tests 2>&1 | tail -25 | tee "$OUT/pytest_gpu.txt"
CONDLORA_TEST_ALL_CANDIDATES=1 python -m pytest -q -n 4 tests/test_triton_autotune.py -k every_candidate 2>&1 | tail -3 | tee -a "$OUT/pytest_gpu.txt"
python -m pytest -q -s tests/test_gpu_hardening.py -k loss_curve 2>&1 | grep -E "fp32 loss|passed|failed" | tee -a "$OUT/pytest_gpu.txt"
CONDLORA_AUTOTUNE=0 python tools/explore_formulations.py --shapes 8192,768,768,8 8192,4096,4096,16 \
  --json "$OUT/formulations3.json" 2>&1 | grep -v -i warn | tail -14
python tools/explore_model.py --models roberta-base --modes eager reduce-overhead --providers frozen peft_lora "condlora[cuda]" \
  --json "$OUT/model3.json" 2>&1 | grep -v -i warn | tail -8
