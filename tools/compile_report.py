"""Compile the fused Triton kernels for a GPU target without a GPU (ptxas ships with Triton) and report
registers, spills, shared memory and async copies per configuration: the tiles the heuristics pick
(config.forward_tile, config.backward_tile), with the constexprs the launchers pass
(config.forward_meta, config.backward_meta). Catches compile errors on machines without the GPU.

The JIT's specialisations of a launch with large aligned shapes are reproduced (d_in = d_out = 4096,
N = 16384): unit strides become the constant 1, pointers and the other sizes and strides known
multiples of 16; without them the report would not show the real pipelining. Pointer main loops only
(tensor descriptors are built from GPU tensors).

    python tools/compile_report.py [--arch 90] [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from condlora_kernels.kernels.triton import config, runtime
from condlora_kernels.kernels.triton.condlora_linear import condlora_backward_kernel, condlora_forward_kernel

N_ROWS, D = 16384, 4096
TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
WORKSPACES = {"part_a_ptr", "part_b_ptr", "part_db_ptr", "grad_a_ptr", "grad_b_ptr"}  # float32
FLOATS = {"scaling", "keep_scale", "zero"}
UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_yn", "stride_dyn", "stride_dxk"}
NOT_DIVISIBLE_BY_16 = {"num_programs", "num_helpers", "lookahead", "num_slots", "drop_threshold"}


def signature(kernel, dtype: str) -> tuple[dict, dict]:
    """(argument types, constexprs the JIT would specialise) of `kernel` for `dtype` data."""
    types, constants = {}, {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr or name in UNIT_STRIDES:
            types[name] = "constexpr"
            if name in UNIT_STRIDES:
                constants[name] = 1
        elif name.endswith("_ptr") or name.endswith("_desc"):  # descriptors: placeholders without USE_TMA
            element = "fp32" if name in WORKSPACES else dtype
            types[name] = {"flags_ptr": "*i32", "seed_ptr": "*i64"}.get(name, f"*{element}")
        else:
            types[name] = "fp32" if name in FLOATS else "i32"
    return types, constants


def compile_one(kernel, meta: dict, dtype: str, arch: int) -> dict:
    meta = dict(meta)
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
    types, constants = signature(kernel, dtype)
    constants.update(meta)
    names = [param.name for param in kernel.params]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name, kind in types.items()
             if kind not in ("constexpr", "fp32") and name not in NOT_DIVISIBLE_BY_16}
    source = ASTSource(fn=kernel, signature=types, attrs=attrs,
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    started = time.time()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.time() - started
    # registers and spills: ask ptxas (shipped with Triton) to assemble the PTX again, verbosely
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    arch_flag = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    out = subprocess.run([ptxas, "-v", f"--gpu-name={arch_flag}", f.name, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {"regs": int(regs.group(1)) if regs else None, "spill_st": int(spill.group(1)) if spill else None,
            "spill_ld": int(spill.group(2)) if spill else None, "smem": compiled.metadata.shared,
            "async_copies": compiled.asm["ttgir"].count("async_copy_global_to_local"), "secs": round(seconds, 1)}


def report(label: str, kernel, meta: dict, dtype: str, arch: int) -> bool:
    try:
        result = compile_one(kernel, meta, dtype, arch)
    except Exception as exc:  # report and go on: the point is to see every failure
        print(f"{label}: FAILED {type(exc).__name__}: {str(exc)[:1500]}", flush=True)
        return False
    print(f"{label}: {result}{'  <-- spills' if result['spill_st'] else ''}", flush=True)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--quick", action="store_true", help="bf16 at ranks 16 and 256, all gradients only")
    args = parser.parse_args(argv)
    if runtime.interpreting():
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 1
    ok = True
    for torch_dtype, dtype in TRITON_DTYPES.items():
        for r_pad in (16, 64, 256):
            if args.quick and (torch_dtype != torch.bfloat16 or r_pad == 64):
                continue
            for dropout in (False, True):
                tile = config.forward_tile(N_ROWS, D, r_pad, torch_dtype)
                for paper in (True, False):
                    switches = config.forward_switches(paper_mode=paper, has_bias=True, has_dropout=dropout,
                                                       use_tma=False, dtype=torch_dtype)
                    ok &= report(f"fwd {dtype} r_pad={r_pad} {tile} paper={paper} dropout={dropout}",
                                 condlora_forward_kernel, config.forward_meta(tile, switches, torch_dtype, r_pad),
                                 dtype, args.arch)
                tile = config.backward_tile(N_ROWS, D, r_pad, torch_dtype, dropout)
                for needs in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
                    if args.quick and needs != (True, True, True):
                        continue
                    switches = config.backward_switches(paper_mode=True, has_dropout=dropout, use_tma=False,
                                                        need_dx=needs[0], need_dtheta=needs[1], need_dbias=needs[2],
                                                        dtype=torch_dtype)
                    ok &= report(f"bwd {dtype} r_pad={r_pad} {tile} dropout={dropout} "
                                 f"needs(dx,dtheta,db)={''.join(str(int(n)) for n in needs)}",
                                 condlora_backward_kernel, config.backward_meta(tile, switches, torch_dtype, r_pad),
                                 dtype, args.arch)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
