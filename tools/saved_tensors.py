"""Exploration (issue #11): what a compiled model-level training step saves from forward to backward, per provider,
as Inductor's partitioner decides it, without a GPU and without compiling any kernel.

The step is the bench's (condlora_kernels/bench/model.py, bf16 autocast, mode "compile");
`condlora_kernels.testing.compiled_saved_tensors` wraps Inductor's partition function, lists the backward graph's
inputs (the saved tensors) by shape, stride and dtype, and stops the compilation there. The partitioner works on the traced graph, not on the device's kernels, so CPU
tensors give the same saved set as the GPU run at the same shapes (use condlora[cpu] for the extension's op on the
CPU). benchmarks/NOTES.md, eleventh session: PEFT LoRA's and condlora's sets for RoBERTa-base at 16 x 512 differed
in two bf16 copies of W0, which found the rule of docs/design.md §4 for an x that needs no gradient.

    python tools/saved_tensors.py --providers peft_lora "condlora[cpu]" [--batch 16 --seq 512] [--model roberta-base]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math

import torch

from condlora_kernels.bench import model as bench_model
from condlora_kernels.bench.shapes import MODEL_CASES
from condlora_kernels.testing import compiled_saved_tensors


def saved_set(provider: str, case, device: torch.device) -> collections.Counter:
    """{(shape, stride, dtype, is_input): count} of the tensors the compiled step's forward saves for its backward;
    is_input: a graph input saved as it is (a parameter or the batch: no memory of its own)."""
    base = bench_model.build_model(case, device)
    step, _ = bench_model.prepare_point(base, case, "bf16", "compile", provider, device)
    return collections.Counter(compiled_saved_tensors(step))


def mib(key) -> float:
    """What the saved tensors of this key hold of their own, in MiB (a saved graph input: nothing)."""
    shape, _, dtype, is_input = key
    if is_input:
        return 0.0
    itemsize = torch.empty((), dtype=dtype).element_size()
    return math.prod(shape) * itemsize / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--providers", nargs="+", default=["peft_lora", "condlora[cpu]"])
    parser.add_argument("--model", default="roberta-base", choices=sorted(MODEL_CASES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    case = dataclasses.replace(MODEL_CASES[args.model], batch=args.batch, seq=args.seq)
    sets = {p: saved_set(p, case, torch.device(args.device)) for p in args.providers}
    for p, seen in sets.items():
        print(f"{p}: {sum(seen.values())} saved tensors, {sum(mib(k) * n for k, n in seen.items()):.3f} MiB")
    first, *others = args.providers
    for other in others:
        a, b = sets[first], sets[other]
        print(f"\nwhere {other} differs from {first} (count {first} -> {other}):")
        for key in sorted(set(a) | set(b), key=str):
            if a[key] != b[key]:
                shape, stride, dtype, is_input = key
                print(f"  {a[key]:4d} -> {b[key]:4d}  {shape} stride {stride} {str(dtype)[6:]}"
                      f"{' (graph input)' if is_input else ''}  {(b[key] - a[key]) * mib(key):+.3f} MiB")


if __name__ == "__main__":
    main()
