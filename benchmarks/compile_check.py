"""Compile the Triton kernels for a GPU target without a GPU (ptxas ships with Triton): catches
compile errors and reports registers, spills and shared memory per configuration.

    python benchmarks/compile_check.py [--arch 90] [--dtype bf16]
"""

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from condlora_kernels.kernels.triton import condlora_linear as tk


def _signature(kernel, dtype: str, wsp: str):
    """Argument types: pointers to `dtype` data, int32/fp32 scalars; workspace pointers `wsp`."""
    ptr_types = {
        "flags_ptr": "*i32", "seed_ptr": "*i64",
        "part_a_ptr": wsp, "part_b_ptr": wsp, "part_db_ptr": wsp, "grad_a_ptr": wsp, "grad_b_ptr": wsp,
    }
    floats = {"scaling", "keep_scale", "zero"}
    sig = {}
    for name in kernel.arg_names:
        if name in kernel.constexprs_names if hasattr(kernel, "constexprs_names") else False:
            continue
        if name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, f"*{dtype}")
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


# What the JIT specializes at a launch with large aligned shapes (d_in = d_out = 4096, N = 16384, r = 16):
# unit strides become the constant 1, pointers and the other sizes and strides are known multiples of 16.
UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_yn", "stride_dyn", "stride_dxk"}
NOT_DIV16 = {"num_programs", "scaling", "keep_scale", "drop_threshold", "num_slots", "zero",
             "x_desc", "w_desc", "y_desc", "dy_desc", "dx_desc", "num_helpers"}


def compile_one(kernel, constexprs: dict, dtype: str, arch: int, num_warps: int, num_stages: int):
    const_names = [p.name for p in kernel.params if p.is_constexpr]
    sig = {k: v for k, v in _signature(kernel, dtype, "*fp32").items() if k not in const_names}
    constexprs = dict(constexprs)
    constexprs.setdefault("USE_TMA", False)  # the pointer path: tensor-descriptor arguments need a GPU to build
    for name in UNIT_STRIDES & set(sig):
        sig[name] = "constexpr"
        constexprs[name] = 1
    for name in const_names:
        sig[name] = "constexpr"
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]]
             for n, t in sig.items() if t != "constexpr" and n not in NOT_DIV16 and t != "fp32"}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    t0 = time.time()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    secs = time.time() - t0
    # registers and spills: ask ptxas (shipped with Triton) to assemble the PTX again, verbosely
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    arch_flag = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    out = subprocess.run([ptxas, "-v", f"--gpu-name={arch_flag}", f.name, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    ttgir = compiled.asm["ttgir"]
    return {"async_copies": ttgir.count("async_copy_global_to_local"), "regs": int(regs.group(1)) if regs else None,
            "spill_st": int(spill.group(1)) if spill else None, "spill_ld": int(spill.group(2)) if spill else None,
            "smem": compiled.metadata.shared, "secs": round(secs, 1)}


def _report(label, kernel, const, dtype, arch, warps, stages):
    try:
        r = compile_one(kernel, const, dtype, arch, warps, stages)
        flag = "" if not r["spill_st"] else "  <-- spills"
        print(f"{label}: {r}{flag}", flush=True)
        return True
    except Exception as exc:  # report and go on: the point is to see every failure
        print(f"{label}: FAILED {type(exc).__name__}: {str(exc)[:1500]}", flush=True)
        return False


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="only the configurations the launchers pick for bf16")
    args = ap.parse_args(argv)
    ok = True
    # (dtype, R_PAD, forward config, backward config) as the launchers choose them
    choices = []
    for dtype, torch_dtype in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")):
        import torch
        tdt = getattr(torch, torch_dtype)
        for r_pad in (16, 64, 256):
            if args.quick and (dtype != "bf16" or r_pad == 64):
                continue
            fwd = tk._fwd_config(16384, 4096, r_pad, tdt)
            for dropout in (False, True):
                bwd = tk._bwd_config(16384, 4096, r_pad, tdt, dropout)
                choices.append((dtype, tdt, r_pad, dropout, fwd, bwd))
    for dtype, tdt, r_pad, dropout, fwd, bwd in choices:
        dot = "ieee" if dtype == "fp32" else "tf32"
        split = dtype == "fp32"
        for paper in (True, False):
            const = dict(MODE_PAPER=paper, HAS_BIAS=True, HAS_DROPOUT=dropout, BLOCK_M=fwd["BLOCK_M"],
                         BLOCK_N=fwd["BLOCK_N"], BLOCK_K=fwd["BLOCK_K"], GROUP_M=fwd["GROUP_M"], GEN_BLOCK=64,
                         R_PAD=r_pad, DOT_PRECISION=dot, SPLIT_ACC=split, FLAG_BLOCK=128, **tk._helper_loop(tdt, r_pad))
            label = (f"fwd {dtype} r_pad={r_pad} {fwd['BLOCK_M']}x{fwd['BLOCK_N']}x{fwd['BLOCK_K']} "
                     f"w{fwd['num_warps']} s{fwd['num_stages']} paper={paper} dropout={dropout}")
            ok &= _report(label, tk._condlora_fwd_kernel, const, dtype, args.arch, fwd["num_warps"], fwd["num_stages"])
        needs_list = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]
        for need_dx, need_dtheta, need_dbias in needs_list:
            if args.quick and (need_dx, need_dtheta, need_dbias) != (True, True, True):
                continue
            const = dict(MODE_PAPER=True, HAS_DROPOUT=dropout, NEED_DX=need_dx, NEED_DTHETA=need_dtheta,
                         NEED_DBIAS=need_dbias, BLOCK_M=bwd["BLOCK_M"], BLOCK_N=bwd["BLOCK_N"],
                         BLOCK_K=bwd["BLOCK_K"], GROUP_M=bwd["GROUP_M"], RED_BLOCK=64, DT_BLOCK=64, R_PAD=r_pad,
                         DOT_PRECISION=dot, F32_DOT_PRECISION="tf32" if dtype != "fp32" else "ieee",
                         SPLIT_ACC=split, FLATTEN=True, FLAG_BLOCK=128, **tk._helper_loop(tdt, r_pad))
            label = (f"bwd {dtype} r_pad={r_pad} {bwd['BLOCK_M']}x{bwd['BLOCK_N']}x{bwd['BLOCK_K']} "
                     f"w{bwd['num_warps']} s{bwd['num_stages']} dropout={dropout} "
                     f"needs(dx,dtheta,db)={need_dx:d}{need_dtheta:d}{need_dbias:d}")
            ok &= _report(label, tk._condlora_bwd_kernel, const, dtype, args.arch, bwd["num_warps"], bwd["num_stages"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
