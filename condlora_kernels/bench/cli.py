"""`condlora bench` (also `python -m condlora_kernels bench`): kernel and model benchmarks on this machine.

    condlora bench --output benchmarks/results            full run on the GPU (or small shapes on CPU)
    condlora bench --quick --output /tmp/bench            about a minute
    condlora bench --markdown benchmarks/results/nvidia-h100-80gb-hbm3.json    README tables from a result

Writes <output>/<device>.json (every row, with device name and versions) and <device>.png, and prints
the tables of ratios. Providers that cannot run here are recorded as skipped rows, providers that raise
as error rows; neither stops the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

from condlora_kernels.bench import report
from condlora_kernels.bench.kernels import KernelSuite
from condlora_kernels.bench.model import MODEL_PROVIDERS, ModelSuite
from condlora_kernels.bench.providers import PROVIDER_NAMES
from condlora_kernels.bench.shapes import MODES, Settings
from condlora_kernels.bench.timing import torch_threads

TARGET_SPEEDUP = 1.2  # issue 5: CondLoRA with this package >= 1.2x PEFT LoRA's examples/s, paper setting, bf16


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="condlora bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes, shorter timings: about a minute")
    parser.add_argument("--output", default="condlora-bench", help="directory for the JSON and PNG (created)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--only", choices=("kernel", "model"), help="run only one level")
    parser.add_argument("--providers", nargs="+", metavar="NAME",
                        help=f"kernel providers (default all: {' '.join(PROVIDER_NAMES)}) and model providers "
                             f"({' '.join(MODEL_PROVIDERS)}); frozen is always run")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="kernel benchmark modes")
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16", "fp16"),
                        help="kernel dtypes (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--shapes", nargs="+", metavar="N,D_IN,D_OUT,R",
                        help="kernel shapes to keep, among the settings' (e.g. 8192,768,768,8)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="include the torch.compile provider (default: on for a full GPU run)")
    parser.add_argument("--cudagraph", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the launch-bound shapes under CUDA graphs (default: on, on GPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads for a CPU run (default: 1 with --quick, "
                                                    "else torch's default)")
    parser.add_argument("--dropout", type=float, default=0.0, help="adapter dropout at model level (default 0)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    parser.add_argument("--markdown", metavar="RESULTS_JSON",
                        help="print the README tables of a results JSON and exit (runs nothing)")
    return parser.parse_args(argv)


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="condlora bench", unit="point", file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # tqdm is an optional dependency: a plain counter instead
        return _PlainProgress(total)


class _PlainProgress:
    def __init__(self, total):
        self.total, self.n = total, 0

    def set_postfix_str(self, text):
        self.text = text

    def update(self, n=1):
        self.n += n
        print(f"[{self.n}/{self.total}] {self.text}", file=sys.stderr)

    def close(self):
        pass


def _settings(args, device: torch.device) -> Settings:
    settings = Settings.for_device(device.type, quick=args.quick)
    if args.dtypes:
        settings.dtypes = tuple(args.dtypes)
    if args.threads is not None:
        settings.cpu_threads = args.threads
    if args.compile is not None:
        settings.compile = args.compile
    if args.cudagraph is not None:
        settings.cudagraph = args.cudagraph
    if args.shapes:
        wanted = {tuple(int(v) for v in s.split(",")) for s in args.shapes}
        known = settings.shapes
        settings.shapes = tuple(s for s in known if (s.n, s.d_in, s.d_out, s.r) in wanted)
        if not settings.shapes:
            raise SystemExit(f"--shapes {args.shapes} matches none of {[s.key for s in known]}")
    return settings


def summary_lines(results: dict) -> list:
    """The headline: this package against PEFT LoRA in the paper setting (bf16), and the error count."""
    lines = []
    for precision in ("bf16", "fp32"):
        rows = [r for r in results.get("model", []) if r["status"] == "ok" and r["model"] == "roberta-base"
                and r["precision"] == precision]
        ours = [r for r in rows if r["provider"].startswith("condlora[") and r.get("speedup_vs_peft")]
        if ours:
            best = max(ours, key=lambda r: r["speedup_vs_peft"])
            verdict = ("met" if best["speedup_vs_peft"] >= TARGET_SPEEDUP else "not met") if precision == "bf16" else ""
            lines.append(f"roberta-base {precision}, paper setting: fastest CondLoRA ({best['provider']}) runs "
                         f"{best['speedup_vs_peft']:.2f}x PEFT LoRA's examples/s"
                         + (f" (target >= {TARGET_SPEEDUP}x: {verdict})" if verdict else ""))
    errors = [r for r in results.get("kernel", []) + results.get("model", []) if r["status"] == "error"]
    if errors:
        lines.append(f"{len(errors)} point(s) raised; their messages are in the JSON (status 'error')")
    return lines


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `condlora bench -- --quick`: the separator that the top-level parser passes on
        argv = argv[1:]
    args = parse_args(argv)
    if args.markdown:
        print(report.markdown(report.read_json(args.markdown)), end="")
        return 0

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("condlora bench: --device cuda, but no CUDA device is available", file=sys.stderr)
            return 2
    settings = _settings(args, device)
    kernel_providers = [p for p in (args.providers or PROVIDER_NAMES) if p in PROVIDER_NAMES]
    model_providers = [p for p in (args.providers or MODEL_PROVIDERS) if p in MODEL_PROVIDERS]
    unknown = set(args.providers or ()) - set(PROVIDER_NAMES) - set(MODEL_PROVIDERS)
    if unknown:
        print(f"condlora bench: unknown providers {sorted(unknown)}", file=sys.stderr)
        return 2

    kernels = KernelSuite(device, settings)
    models = ModelSuite(device, settings, dropout=args.dropout)
    notes = []
    kernel_plan = [] if args.only == "model" else kernels.plan(kernel_providers, args.modes)
    model_plan = [] if args.only == "kernel" else models.plan(model_providers)
    if model_plan and not _has("transformers"):
        notes.append("model level skipped: transformers is not installed")
        model_plan = []

    print(f"condlora bench on {report.device_name(device)}: {len(kernel_plan)} kernel points, "
          f"{len(model_plan)} model points{' (quick)' if settings.quick else ''}", file=sys.stderr)
    bar = _progress(len(kernel_plan) + len(model_plan))
    with warnings.catch_warnings(), torch_threads(settings.cpu_threads if device.type == "cpu" else None):
        warnings.simplefilter("ignore")  # library chatter (PEFT, transformers) would break the progress bar
        for provider, shape, mode, dtype in kernel_plan:
            bar.set_postfix_str(f"{provider} {shape.key} {mode} {dtype}")
            kernels.measure(provider, shape, mode, dtype)
            bar.update()
        for case, precision, provider in model_plan:
            bar.set_postfix_str(f"{provider} {case.name} {precision}")
            models.measure(case, precision, provider)
            bar.update()
    bar.close()

    results = report.make_results(device, settings, kernels.rows, models.rows, notes)
    os.makedirs(args.output, exist_ok=True)
    stem = os.path.join(args.output, report.device_slug(results) + ("-quick" if settings.quick else ""))
    report.write_json(results, stem + ".json")
    written = [stem + ".json"]
    if not args.no_plot:
        why_not = report.plot(results, stem + ".png")
        if why_not:
            print(f"condlora bench: {why_not}", file=sys.stderr)
        else:
            written.append(stem + ".png")
    print(report.markdown(results))
    for line in summary_lines(results):
        print(line)
    print("wrote " + ", ".join(written))
    return 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
