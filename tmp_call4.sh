export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CONDLORA_CUDA_ARCH=9.0 MAX_JOBS=16
start=$SECONDS
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warn | tail -2
echo "install: $((SECONDS - start)) s"
timeout 220 python tools/memory_model.py --model roberta-base --mode compile --providers frozen peft_lora "condlora[cuda]" --steps 2 --trace-first --json $OUT/mem_first.json > $OUT/mem_first.txt 2>&1
grep -v -i "warn\|softmax\|split the\|important use" $OUT/mem_first.txt | grep -E "first step|steady peak|^ " | cut -c1-200 | head -60
echo "memory: $((SECONDS - start)) s"
timeout $((560 - SECONDS + start)) python tools/profile_model.py --model llama-4096-2L --mode compile --providers frozen peft_lora "condlora[cuda]" --top 25 > $OUT/profile_llama_compile.txt 2>&1
echo "profile: $((SECONDS - start)) s"
