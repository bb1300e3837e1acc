"""Exploration (issue #11): the peak of memory in one graph of Inductor's generated code, read statically, and what is
alive at it; with two files (PEFT LoRA's and ours, say), the difference by kind.

Input: the Python module Inductor generates for a graph (its `call()`), e.g. the files `tools/memory_model.py
--code-dir DIR` keeps from a GPU run, or a CPU compile's `TORCHINDUCTOR_CACHE_DIR`. The walk counts, line by line:
`empty_strided_*` buffers; extern kernels' outputs (sized by the `assert_tensor_metadata` that follows them, allocated
at the call); storage reuses (`bufM = ...; del bufN  # reuse`) as renames; `del` as frees. Graph inputs are not
counted (allocated before the call), so the figure is the graph's own allocations. Unlike a trace of the allocator,
this names each alive buffer by its role (the op that made it) at the instant of the peak, and lists the buffers
that are dead there but kept allocated for a later buffer that takes their storage.

    python tools/inductor_liveness.py FORWARD_FILE [OTHER_FORWARD_FILE]

benchmarks/NOTES.md, eleventh session: on CPU (RoBERTa-base, 2 x 512, bf16 autocast) the forward's peak is in the
last layer's attention for both PEFT LoRA and condlora[cpu], ours 3.0 MiB above, from one float32 head-layout
tensor more; the bf16 activations alive are equal in number. The CPU plan is not the GPU's (the GPU trace had one
bf16 activation more instead): the GPU's generated code is the one to read.
"""

from __future__ import annotations

import argparse
import collections
import re

ITEMSIZE = {"torch.bfloat16": 2, "torch.float16": 2, "torch.float32": 4, "torch.float64": 8, "torch.int64": 8,
            "torch.int32": 4, "torch.int8": 1, "torch.uint8": 1, "torch.bool": 1}


# the dtype taken for an output whose check prints none (assert_size_stride): the autocast compute dtype
ASSUMED_DTYPE = "torch.bfloat16"


def _ints(text: str) -> tuple:
    return tuple(int(v) for v in text.strip().strip("()").split(",") if v.strip())


def _storage_bytes(shape: tuple, stride: tuple, dtype: str) -> int:
    if any(s == 0 for s in shape):
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(shape, stride))) * ITEMSIZE[dtype]


def call_lines(path: str) -> list:
    source = open(path).read()
    key = "def call(self, args):" if "def call(self, args):" in source else "def call(args):"
    return [line.strip() for line in source[source.index(key):].split("\n")]


def peak_of(path: str) -> tuple:
    """(peak bytes, {buffer: (bytes, kind)} alive at it, the line that reached it)."""
    lines = call_lines(path)
    # extern kernels with several outputs: bufK = bufT[i]; each output's size from its assert_tensor_metadata
    parent, size, kind = {}, {}, {}
    for line in lines:
        m = re.match(r"(buf\d+) = (buf\d+)\[(\d+)\]", line)
        if m:
            parent[m.group(1)] = m.group(2)
        m = re.match(r"assert_tensor_metadata\((buf\d+), (\([^)]*\)), (\([^)]*\)), (torch\.\w+), '([^']*)'", line)
        if m:
            size[m.group(1)] = _storage_bytes(_ints(m.group(2)), _ints(m.group(3)), m.group(4))
            kind[m.group(1)] = f"{m.group(2)} {m.group(4)} [{m.group(5).split('.')[-2]}]"
        # older torch (2.11) checks an extern kernel's outputs with assert_size_stride, which prints no dtype
        m = re.match(r"assert_size_stride\((buf\d+), (\([^)]*\)), (\([^)]*\)), '([^']*)'", line)
        if m and m.group(1) not in size:
            size[m.group(1)] = _storage_bytes(_ints(m.group(2)), _ints(m.group(3)), ASSUMED_DTYPE)
            kind[m.group(1)] = f"{m.group(2)} {ASSUMED_DTYPE}? [{m.group(4).split('.')[-2]}]"
    outputs = collections.defaultdict(list)
    for child, call in parent.items():
        outputs[call].append(child)
    alive, total, peak, at_peak, peak_line, peak_index = {}, 0, 0, {}, "", 0
    for index, line in enumerate(lines):
        m = re.match(r"(buf\d+) = empty_strided_\w+\((\([^)]*\)), (\([^)]*\)), (torch\.\w+)\)", line)
        if m:
            alive[m.group(1)] = (_storage_bytes(_ints(m.group(2)), _ints(m.group(3)), m.group(4)),
                                 f"{m.group(2)} {m.group(4)}")
            total += alive[m.group(1)][0]
        elif line.endswith("# reuse"):  # a later buffer takes a dead one's storage
            target, source = line.split(" = ")[0], re.search(r"del (\w+)", line).group(1)
            if source in alive:
                alive[target] = alive.pop(source)
            continue
        else:
            m = re.match(r"(buf\d+) = (torch\.ops\.[\w.]+|extern_kernels\.[\w.]+)\(", line)
            if m:  # an extern kernel allocates its outputs when it runs
                for out in outputs.get(m.group(1)) or ([m.group(1)] if m.group(1) in size else []):
                    alive[out] = (size[out], kind[out])
                    total += size[out]
        for name in re.findall(r"del (buf\d+)", line):
            if name in alive:
                total -= alive.pop(name)[0]
        if total > peak:
            peak, at_peak, peak_line, peak_index = total, dict(alive), line, index
    return peak, at_peak, peak_line, _held_for_reuse(lines, peak_index, at_peak)


def _held_for_reuse(lines: list, peak_index: int, at_peak: dict) -> list:
    """[(buffer, bytes, the line that takes its storage)] for the buffers alive at the peak whose next mention after
    it is a later buffer taking their storage (`bufM = ...(bufN...); del bufN  # reuse`): dead, but kept allocated
    across the peak for that reuse, by Inductor's buffer reuse (its peak estimate decides; benchmarks/NOTES.md,
    twelfth session)."""
    held = []
    for name, (nbytes, _) in at_peak.items():
        pattern = re.compile(rf"\b{name}\b")
        for line in lines[peak_index + 1:]:
            if pattern.search(line):
                if line.endswith("# reuse") and f"del {name}" in line:
                    held.append((name, nbytes, line))
                break
    return held


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+")
    parser.add_argument("--top", type=int, default=16)
    args = parser.parse_args()
    kinds = []
    for path in args.files:
        peak, alive, line, held = peak_of(path)
        counts = collections.Counter(alive.values())
        # the difference compares shapes and dtypes, whichever op made the buffer (an extern output's "[op]" and an
        # assumed dtype's "?" dropped), so that one op's output and another's same-sized buffer count as one kind
        kinds.append(collections.Counter((nbytes, what.split(" [")[0].rstrip("?")) for nbytes, what in alive.values()))
        print(f"{path}: peak {peak / 2 ** 20:.2f} MiB, reached at: {line[:110]}")
        for (nbytes, what), n in sorted(counts.items(), key=lambda item: -item[0][0] * item[1])[:args.top]:
            print(f"  {n:4d} x {nbytes / 2 ** 20:8.3f} MiB  {what}")
        for name, nbytes, reuse in held:
            print(f"  dead at the peak, kept for a later reuse: {name} ({nbytes / 2 ** 20:.3f} MiB), then {reuse[:90]}")
    if len(kinds) == 2:
        a, b = kinds
        print("\nalive at the peak, second file against the first:")
        for key in sorted(set(a) | set(b), key=lambda k: -k[0]):
            if a[key] != b[key]:
                print(f"  {a[key]:4d} -> {b[key]:4d}  {key[0] / 2 ** 20:8.3f} MiB  {key[1]}  "
                      f"{(b[key] - a[key]) * key[0] / 2 ** 20:+.3f} MiB")


if __name__ == "__main__":
    main()
