"""Model level: training throughput (examples/s, tokens/s, peak memory) of a transformers model built from
its config, with PEFT LoRA, the paper's code, and this package (each backend that can run).

CPU: a 2-layer tiny RoBERTa and Llama, batch 2 x 64. GPU (marked `gpu`): RoBERTa-base in the paper's
setting (16 x 512, query and value, r=8, alpha=8) in fp32 and bf16, and a 2-layer Llama-7B-like stack.
"""

import pytest
import torch

from condlora_kernels.bench.model import MODEL_PROVIDERS
from condlora_kernels.bench.shapes import LLAMA_2L, LLAMA_TINY, ROBERTA_BASE, ROBERTA_TINY

pytest.importorskip("transformers")

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROUNDS = {"cpu": 2, "cuda": 3}

CASES = [
    pytest.param("cpu", ROBERTA_TINY, "fp32", id="cpu-roberta-tiny-fp32"),
    pytest.param("cpu", LLAMA_TINY, "fp32", id="cpu-llama-tiny-fp32"),
    pytest.param("cuda", ROBERTA_BASE, "fp32", marks=GPU, id="cuda-roberta-base-fp32"),
    pytest.param("cuda", ROBERTA_BASE, "bf16", marks=GPU, id="cuda-roberta-base-bf16"),
    pytest.param("cuda", LLAMA_2L, "bf16", marks=GPU, id="cuda-llama-4096-2L-bf16"),
]


@pytest.mark.parametrize("provider", MODEL_PROVIDERS)
@pytest.mark.parametrize("device,case,precision", CASES)
def test_model_training(bench, model_suite, record_point, device, case, precision, provider):
    bench.group = f"{device} {case.name} {precision}"
    point = model_suite(device).measure(case, precision, provider)
    record_point(bench, point, device, rounds=ROUNDS[device])
