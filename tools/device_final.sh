#!/usr/bin/env bash
# The last device call of the session: compute-sanitizer over a GPU test subset (issue #13), the learning-rate
# sweep on the real data (issue #12), and the model-level training step of RoBERTa-base (issue #11).
# Each step has its own time limit so that one cannot starve the next. Results under $OUT.
# The sweep reads .carry/ (the model as fp16 safetensors with its tokenizer, and the data file): that folder is
# git-ignored, so the device call must name it in `carry` (the first run of this script did not, and lost the sweep).
set -o pipefail
export PYTHONUNBUFFERED=1 CONDLORA_CUDA_ARCH=9.0 MAX_JOBS=16 HF_HUB_OFFLINE=1
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warn | tail -2
# memcheck: the extension's kernels (every dtype: prepare, token reductions, dropout) and the Triton kernels;
# racecheck (shared memory): the same at one shape
timeout 110 compute-sanitizer --tool memcheck --print-limit 10 python -m pytest -q -p no:cacheprovider \
  tests/test_linear_op.py tests/test_triton_backend.py \
  -k "(cuda and matches_reference and general-45) or (gpu_against_reference and general-37)" 2>&1 \
  | grep -E "ERROR SUMMARY|passed|failed" | tail -4 | tee "$OUT/sanitizer.txt"
timeout 70 compute-sanitizer --tool racecheck --print-limit 10 python -m pytest -q -p no:cacheprovider \
  tests/test_linear_op.py tests/test_triton_backend.py \
  -k "(cuda and matches_reference and dtype3 and general-45) or (gpu_against_reference and bfloat16-general-37 and 0.1)" \
  2>&1 | grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed|failed" | tail -4 | tee -a "$OUT/sanitizer.txt"
timeout 150 python tools/lr_sweep.py --model .carry/minilm --data .carry/data/rotten_tomatoes_corpus_full.csv.bz2 \
  --lora-lrs 5e-4 1e-3 2e-3 5e-3 --condlora-lrs 1e-3 2e-3 5e-3 1e-2 2e-2 --reference-lrs 5e-3 --seeds 0 1 \
  --parallel 8 --time-limit 130 --output "$OUT/sweep" 2>&1 | grep -v -i warn | tail -25
timeout 140 python tools/explore_model.py --models roberta-base --modes eager reduce-overhead \
  --providers frozen peft_lora "condlora[cuda]" --steps 10 --json "$OUT/model_final.json" 2>&1 | grep -v -i warn | tail -8
