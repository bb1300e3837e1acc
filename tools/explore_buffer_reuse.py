"""Exploration (issue #11, twelfth session): Inductor's buffer-reuse decisions in a model-level compiled step, with
the peak estimates they rest on.

Inductor gives a dead buffer's storage to a later buffer of the same size and dtype (`AllocateLine.plan` in
torch/_inductor/codegen/wrapper.py), which keeps the dead one allocated until then. Where the two are not in adjacent
scheduler nodes it allows that only if its peak estimate (`EfficientPeakEstimate`: the live bytes it computes per
scheduler node, plus the held buffer) stays under its estimate of the graph's peak. This script records, per graph
compiled in one step of `condlora bench`'s model point: the estimate of the graph's peak, the estimate per scheduler
node, and every reuse decision (the dead buffer, the new one, their node indices, the estimate between them, allowed
or not); and copies the generated code (`call()` modules) to compare names with `tools/inductor_liveness.py`.

    python tools/explore_buffer_reuse.py --out DIR [--model roberta-base] [--providers peft_lora "condlora[cuda]"]
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import shutil
import tempfile

import torch

from condlora_kernels.bench import model as bench_model
from condlora_kernels.bench.shapes import LLAMA_2L, ROBERTA_BASE

CASES = {case.name: case for case in (ROBERTA_BASE, LLAMA_2L)}


def instrument(log: list) -> None:
    from torch._inductor.codegen import wrapper

    estimate_init = wrapper.EfficientPeakEstimate.__init__

    def init(self, *args, **kwargs):
        estimate_init(self, *args, **kwargs)
        from torch._inductor.memory import estimate_peak_memory, get_freeable_input_buf
        from torch._inductor.virtualized import V
        from torch.utils._ordered_set import OrderedSet

        nodes = V.graph.scheduler.nodes
        freeable = get_freeable_input_buf(nodes, OrderedSet(V.graph.graph_inputs.keys()))
        _, per_node = estimate_peak_memory(nodes, freeable, OrderedSet(V.graph.get_output_names()))
        log.append({"graph": len(log), "overall_peak": self.overall_peak_memory, "per_node": per_node,
                    "node_names": [node.get_name() for node in nodes], "decisions": []})

    wrapper.EfficientPeakEstimate.__init__ = init
    should_reuse = wrapper.AllocateLine.should_reuse_buffer

    def decide(self, free_line, size):
        allowed = should_reuse(self, free_line, size)
        adjacent = free_line.scheduler_node_index + 1 == self.scheduler_node_index
        estimate = self.wrapper.estimate_peak
        log[-1]["decisions"].append({
            "dead": free_line.node.get_name(), "new": self.node.get_name(), "bytes": size,
            "dead_node": free_line.scheduler_node_index, "new_node": self.scheduler_node_index,
            "adjacent": adjacent, "estimate_between": None if adjacent else estimate.peak_between(free_line, self),
            "overall_estimate": estimate.overall_peak_memory, "allowed": allowed})
        return allowed

    wrapper.AllocateLine.should_reuse_buffer = decide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="roberta-base", choices=sorted(CASES))
    parser.add_argument("--mode", default="compile", choices=["compile", "reduce-overhead"])
    parser.add_argument("--providers", nargs="+", default=["peft_lora", "condlora[cuda]"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log: list = []
    instrument(log)
    case = CASES[args.model]
    base = bench_model.build_model(case, torch.device("cuda"))
    for provider in args.providers:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in provider)
        cache = tempfile.mkdtemp(prefix=f"inductor_{safe}_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a fresh cache: every graph is generated, and found below
        torch._dynamo.reset()
        first = len(log)
        step, _ = bench_model.prepare_point(base, case, "bf16", args.mode, provider, torch.device("cuda"))
        step()
        torch.cuda.synchronize()
        for path in glob.glob(os.path.join(cache, "**", "*.py"), recursive=True):
            if "def call(" in open(path).read():
                shutil.copy(path, os.path.join(args.out, f"{safe}_{os.path.basename(path)}"))
        with open(os.path.join(args.out, f"{safe}_reuse.json"), "w") as f:
            json.dump({"provider": provider, "model": case.name, "mode": args.mode, "torch": torch.__version__,
                       "graphs": log[first:]}, f)
        for graph in log[first:]:
            held = [d for d in graph["decisions"] if d["allowed"] and not d["adjacent"]]
            print(f"{provider} graph {graph['graph']}: {len(graph['node_names'])} nodes, estimated peak "
                  f"{graph['overall_peak'] / 2 ** 20:.1f} MiB; {len(graph['decisions'])} reuse decisions, "
                  f"{len(held)} allowed across nodes")
        del step
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
