"""Command line: `python -m condlora_kernels` (or `condlora`).

    condlora [check]      self-check: every backend that can run here against the float64 reference
    condlora bench ...    benchmarks (see `condlora bench --help`)
    condlora finetune ... PEFT LoRA and CondLoRA side by side on a real model and data (`condlora finetune --help`)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from condlora_kernels._argparse import ArgumentParser


def _check_cases(device: str):
    dtypes = [torch.float32, torch.float64] if device == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
    shapes = [("paper", 37, 48, 48, 4), ("general", 37, 40, 56, 3)]
    for dtype in dtypes:
        for mode, n, d_in, d_out, r in shapes:
            for dropout_p in (0.0, 0.1):
                yield dtype, mode, n, d_in, d_out, r, dropout_p


def self_check() -> int:
    """Run each backend's forward and backward against the reference; print a table; 0 when all pass."""
    import condlora_kernels
    from condlora_kernels.ops.backends import BACKEND_NAMES, BACKENDS
    from condlora_kernels.testing import backend_vs_reference, make_problem

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"condlora_kernels {condlora_kernels.__version__}, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA device"))
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    rows, failures = [], 0
    for device in devices:
        for name in BACKEND_NAMES:
            if name == "reference":
                continue
            if name == "triton" and device == "cpu" and not interpret:
                rows.append((name, device, "-", "skipped", "CPU tensors need TRITON_INTERPRET=1"))
                continue
            reason = BACKENDS[name].unavailable_reason(torch.empty(0, device=device))
            if reason is not None:
                rows.append((name, device, "-", "unavailable", reason[:90]))
                continue
            for dtype, mode, n, d_in, d_out, r, p in _check_cases(device):
                if name == "triton" and device == "cpu" and dtype == torch.float64:
                    continue
                problem = make_problem(n, d_in, d_out, r, mode=mode, dtype=dtype, device=device)
                try:
                    results = backend_vs_reference(name, problem, dropout_p=p)
                    bad = [msg for ok, msg in results if not ok]
                    worst = max(results, key=lambda item: float(item[1].split("error ")[1].split()[0]))[1]
                except Exception as exc:  # a crash is a failure; report it and go on
                    bad, worst = [f"{type(exc).__name__}: {exc}"], ""
                failures += bool(bad)
                case = f"{str(dtype).replace('torch.', '')} {mode} N={n} {d_in}->{d_out} r={r} p={p}"
                rows.append((name, device, case, "FAIL" if bad else "ok", (bad[0] if bad else worst)[:90]))
    widths = [max(len(str(row[i])) for row in rows + [("backend", "device", "case", "status", "detail")])
              for i in range(5)]
    for row in [("backend", "device", "case", "status", "detail (worst output)")] + rows:
        print("  ".join(str(col).ljust(w) for col, w in zip(row, widths)))
    print(f"reference backend: always available; {failures} failing case(s)")
    return 1 if failures else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the rest is the bench CLI's (argparse.REMAINDER would reject `bench --quick`)
        from condlora_kernels.bench.cli import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["finetune"]:
        from condlora_kernels.finetune.cli import main as finetune_main

        return finetune_main(argv[1:])
    parser = ArgumentParser(prog="condlora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("check", help="check every available backend against the reference (default)")
    sub.add_parser("bench", help="run the kernel and model benchmarks (`condlora bench --help`)")
    sub.add_parser("finetune", help="fine-tune a real model with PEFT LoRA and CondLoRA side by side "
                                    "(`condlora finetune --help`)")
    parser.parse_args(argv)
    return self_check()


if __name__ == "__main__":
    sys.exit(main())
