"""Exploration (issue #11, twelfth session): the bench's model-level points with Inductor's buffer reuse on (its
default) and off, each setting in a process of its own, in the suite's provider order (frozen first, so that what a
process allocates once is paid by the frozen point in both settings).

Inductor can keep a dead buffer allocated until a later buffer of the same size takes its storage
(`torch._inductor.config.allow_buffer_reuse`); benchmarks/NOTES.md, twelfth session, found one such reuse across our
compiled RoBERTa peak. This measures what the peaks and step times are without any reuse. Writes one bench JSON per
setting under --out (reuse_True/, reuse_False/) and prints the bench's tables.

    python tools/buffer_reuse_ab.py --out DIR [--models roberta-base] [--modes compile]
                                    [--providers frozen peft_lora "condlora[cuda]"]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

POINTS = r"""
import sys
import torch._inductor.config as config
config.allow_buffer_reuse = sys.argv[1] == "True"
from condlora_kernels.bench.cli import main
main(sys.argv[2:])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", nargs="+", default=["roberta-base"])
    parser.add_argument("--modes", nargs="+", default=["compile"])
    parser.add_argument("--providers", nargs="+", default=["frozen", "peft_lora", "condlora[cuda]"])
    args = parser.parse_args()
    for reuse in ("True", "False"):
        bench_args = ["--only", "model", "--models", *args.models, "--model-modes", *args.modes, "--no-first-step",
                      "--no-plot", "--providers", *args.providers, "--output", os.path.join(args.out, f"reuse_{reuse}")]
        print(f"allow_buffer_reuse={reuse}", flush=True)
        subprocess.run([sys.executable, "-c", POINTS, reuse, *bench_args], check=True)


if __name__ == "__main__":
    main()
