"""`condlora bench` (also `python -m condlora_kernels bench`): kernel, model, host-time and first-step benchmarks.

    condlora bench --output benchmarks/results             full run on the GPU (or small cases on CPU)
    condlora bench --only model --output benchmarks/results          the model level (the headline)
    condlora bench --only model --model-modes eager --merge ...      a part, added to the existing JSON
    condlora bench --only host first-step --merge ...                two short levels
    condlora bench --quick --output /tmp/bench             a short run (see --quick)
    condlora bench --markdown benchmarks/results/nvidia-h200.json    README tables and targets of a result

Levels: kernel (one layer, every provider, forward / backward / both), model (training steps of RoBERTa-base
and a Llama-style stack in eager, torch.compile and reduce-overhead modes), host (host time per call of the
layer against nn.Linear at a tiny shape), first-step (the first training step in fresh processes, cold and
warm caches; part of the model level, on by default in a full GPU run only: 1-3 minutes).

Writes <output>/<device>.json (every row, with device name and versions; rewritten after every point, so a run
stopped by a time limit keeps what it measured) and <device>.png, prints the
tables, one summary line per model and mode, and the targets of issue #11 with what this run measured.
Providers that cannot run here are recorded as skipped rows, providers that raise as error rows; neither
stops the run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import warnings

import torch

from condlora_kernels._argparse import ArgumentParser
from condlora_kernels.bench import report
from condlora_kernels.bench.first_step import first_step_plan, measure_first_steps
from condlora_kernels.bench.host import HostSuite
from condlora_kernels.bench.kernels import KernelSuite
from condlora_kernels.bench.model import MODEL_PROVIDERS, ModelSuite
from condlora_kernels.bench.providers import PROVIDER_NAMES
from condlora_kernels.bench.shapes import MODEL_MODES, MODES, Settings
from condlora_kernels.bench.timing import torch_threads

LEVELS = ("kernel", "model", "host", "first-step")
QUICK_HELP = ("fewer shapes and model cases, shorter timings. CPU: the kernel level at two tiny shapes, the tiny "
              "models in eager mode, host time: 8-13 s on a 2-core VM (measured). GPU: the kernel level at three "
              "shapes, RoBERTa-base bf16 in eager and reduce-overhead modes, host time, no first-step processes: "
              "estimated 5-10 minutes on an H200, most of it compiling RoBERTa-base (not yet measured)")


def parse_args(argv):
    parser = ArgumentParser(prog="condlora bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    parser.add_argument("--output", default="condlora-bench", help="directory for the JSON and PNG (created)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--only", nargs="+", choices=LEVELS, metavar="LEVEL",
                        help=f"run these levels only ({', '.join(LEVELS)}; model includes first-step where that is "
                             "on)")
    parser.add_argument("--providers", nargs="+", metavar="NAME",
                        help=f"kernel providers (default all: {' '.join(PROVIDER_NAMES)}) and model providers "
                             f"({' '.join(MODEL_PROVIDERS)}); frozen is always run. Named here, condlora[reference] "
                             "runs in every model mode (by default: eager only)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="kernel benchmark modes")
    parser.add_argument("--model-modes", nargs="+", choices=MODEL_MODES,
                        help="model-level modes (default: all three on a full GPU run, eager and reduce-overhead "
                             "with --quick on GPU, eager on CPU, where inductor takes about a minute per model)")
    parser.add_argument("--first-step", action=argparse.BooleanOptionalAction, default=None,
                        help="time the first training step of the first-step case (RoBERTa-base bf16 on GPU) in "
                             "fresh processes with cold and warm caches, per provider (default: on for a full "
                             "GPU run only: two processes per provider, 1-3 minutes in all)")
    parser.add_argument("--prime-compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile each compiled model point once, untimed, before measuring it, so that its "
                             "peak memory counts the training step and not the first compilation's autotuning "
                             "(default: on for GPU runs; the first compilation's figures stay in the JSON)")
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16", "fp16"),
                        help="kernel dtypes (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--shapes", nargs="+", metavar="N,D_IN,D_OUT,R",
                        help="kernel shapes to keep, among the settings' (e.g. 8192,768,768,8)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="include the kernel level's torch.compile provider (default: on for a full GPU run)")
    parser.add_argument("--cudagraph", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the launch-bound shapes under CUDA graphs (default: on, on GPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads for a CPU run (default: 1 with --quick, "
                                                    "else torch's default)")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="model cases to keep, among the settings' (e.g. roberta-base llama-4096-2L)")
    parser.add_argument("--rounds", type=int, metavar="R",
                        help="model level: measure each model and mode's providers R times, in turn, and report per "
                             "point the median of the rounds (a step bound by the host follows the host's speed, "
                             "which can drift within a run; default 1)")
    parser.add_argument("--dropout", type=float, default=0.0, help="adapter dropout at model level (default 0)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    parser.add_argument("--merge", action="store_true",
                        help="add this run's rows to the existing <output>/<device>.json (same device), replacing "
                             "the rows measured again: a full run in parts (--only, --model-modes)")
    parser.add_argument("--markdown", metavar="RESULTS_JSON",
                        help="print the README tables and the targets of a results JSON and exit (runs nothing)")
    return parser.parse_args(argv)


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="condlora bench", unit="point", file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # tqdm is an optional dependency: a plain counter instead
        return _PlainProgress(total)


class _PlainProgress:
    def __init__(self, total):
        self.total, self.n, self.text = total, 0, ""

    def set_postfix_str(self, text):
        self.text = text

    def update(self, n=1):
        self.n += n
        print(f"[{self.n}/{self.total}] {self.text}", file=sys.stderr)

    def write(self, text):
        print(text, file=sys.stderr)

    def close(self):
        pass


class InputError(Exception):
    """A bad option or input file: main prints it on one line and returns 2, before any point is measured."""


def _shape(text: str) -> tuple:
    """N,D_IN,D_OUT,R: four integers >= 1."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise InputError(f"--shapes: {text!r} is not four integers >= 1, N,D_IN,D_OUT,R (e.g. 8192,768,768,8)")
    return shape


def _settings(args, device: torch.device) -> Settings:
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    if not 0.0 <= args.dropout < 1.0:
        raise InputError(f"--dropout must be in [0, 1), got {args.dropout}")
    settings = Settings.for_device(device.type, quick=args.quick)
    if args.dtypes:
        settings.dtypes = tuple(args.dtypes)
    if args.threads is not None:
        settings.cpu_threads = args.threads
    if args.compile is not None:
        settings.compile = args.compile
    if args.cudagraph is not None:
        settings.cudagraph = args.cudagraph
    if args.model_modes:
        settings.model_modes = tuple(m for m in MODEL_MODES if m in args.model_modes)
    if args.first_step is not None:
        settings.first_step = args.first_step
    if args.prime_compile is not None:
        settings.prime_compile = args.prime_compile
    if args.rounds is not None:
        if args.rounds < 1:
            raise InputError(f"--rounds must be >= 1, got {args.rounds}")
        settings.model_rounds = args.rounds
    if args.providers:  # what is named runs in every mode
        settings.eager_only_providers = tuple(p for p in settings.eager_only_providers if p not in args.providers)
    if args.shapes:
        wanted = {_shape(text) for text in args.shapes}
        known = settings.shapes
        settings.shapes = tuple(s for s in known if (s.n, s.d_in, s.d_out, s.r) in wanted)
        if not settings.shapes:
            raise InputError(f"--shapes {' '.join(args.shapes)} matches none of this run's shapes: "
                             f"{' '.join(f'{s.n},{s.d_in},{s.d_out},{s.r}' for s in known)}")
    if args.models:
        known_cases = settings.model_cases
        settings.model_cases = tuple((case, p) for case, p in known_cases if case.name in args.models)
        if not settings.model_cases:
            raise InputError(f"--models {args.models} matches none of {[case.name for case, _ in known_cases]}")
    return settings


def _levels(args, settings: Settings) -> set:
    levels = set(args.only or ("kernel", "model", "host"))
    if "model" in levels and settings.first_step:
        levels.add("first-step")
    return levels


def summary_lines(results: dict) -> list:
    """Per model, precision and mode: the fastest CondLoRA provider against PEFT LoRA and the frozen model;
    then the error count."""
    lines = []
    rows = [r for r in results.get("model", []) if r["status"] == "ok"]
    for model, precision, mode in dict.fromkeys((r["model"], r["precision"], r["mode"]) for r in rows):
        point = [r for r in rows if (r["model"], r["precision"], r["mode"]) == (model, precision, mode)]
        ours = [r for r in point if r["provider"].startswith("condlora[")]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["median_ms"])
        vs = [f"{best[key]:.2f}× {name}'s" for key, name in (("ratio_to_peft", "PEFT LoRA"), ("ratio_to_frozen",
                                                                                           "frozen")) if best[key]]
        lines.append(f"{model} {precision} {mode}: fastest CondLoRA {best['provider']} {best['median_ms']:.1f} ms/step"
                     + (f" = {', '.join(vs)} step time" if vs else ""))
    errors = [r for level in report.ROW_KEYS for r in results.get(level, []) if r["status"] == "error"]
    if errors:
        lines.append(f"{len(errors)} point(s) raised; their messages are in the JSON (status 'error')")
    return lines


def target_lines(results: dict) -> list:
    """The targets this run measured, met or missed, and how many it could not (the markdown lists them all)."""
    checked = report.targets(results)
    lines = ["Targets (issue #11):"] + [f"  {'met   ' if met else 'MISSED'} {target}: {measured}"
                                        for target, measured, met in checked if met is not None]
    unmeasured = sum(met is None for _, _, met in checked)
    if unmeasured:
        lines.append(f"  {unmeasured} of {len(checked)} targets not measured in this run (`--markdown` lists them)")
    return lines


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `condlora bench -- --quick`: the separator that the top-level parser passes on
        argv = argv[1:]
    args = parse_args(argv)
    try:
        return _run(args)
    except InputError as exc:
        print(f"condlora bench: {exc}", file=sys.stderr)
        return 2


def _read_result(path: str, option: str) -> dict:
    try:
        return report.read_json(path)
    except ValueError as exc:
        raise InputError(f"{option} {exc}") from None


def _run(args) -> int:
    """main's body: 0, 1 when a point of this run raised (its message is in the JSON), InputError before any work."""
    if args.markdown:
        print(report.markdown(_read_result(args.markdown, "--markdown")), end="")
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

    levels = _levels(args, settings)
    kernels = KernelSuite(device, settings)
    models = ModelSuite(device, settings, dropout=args.dropout)
    hosts = HostSuite(settings)
    notes = []
    kernel_plan = kernels.plan(kernel_providers, args.modes) if "kernel" in levels else []
    model_plan = models.plan(model_providers) if "model" in levels else []
    first_step_providers = first_step_plan(model_providers) if "first-step" in levels else []
    host_devices = (["cpu"] + (["cuda"] if device.type == "cuda" else [])) if "host" in levels else []
    if (model_plan or first_step_providers) and importlib.util.find_spec("transformers") is None:
        notes.append("model level skipped: transformers is not installed")
        model_plan, first_step_providers = [], []

    print(f"condlora bench on {report.device_name(device)}: {len(kernel_plan)} kernel points, {len(model_plan)} "
          f"model points ({', '.join(settings.model_modes)}), {len(host_devices)} host-time devices, "
          f"{len(first_step_providers)} first-step providers{' (quick)' if settings.quick else ''}", file=sys.stderr)
    first_step_rows = []
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise InputError(f"--output {args.output} is a file, not a folder")
    env = report.environment(device)  # once: the JSON is rewritten after every point
    stem = os.path.join(args.output, report.device_slug({"environment": env}) + ("-quick" if settings.quick else ""))
    previous = _read_result(stem + ".json", "--merge") if args.merge and os.path.exists(stem + ".json") else None
    if previous is not None and previous["environment"].get("device") != env.get("device"):
        raise InputError(f"--merge: {stem}.json is from {previous['environment'].get('device')!r}, this run from "
                         f"{env.get('device')!r}; write to another --output")
    os.makedirs(args.output, exist_ok=True)

    def save() -> dict:
        """Write what is measured so far, after every point: a run stopped by a time limit keeps its rows."""
        results = report.make_results(device, settings, kernels.rows, models.rows, notes, hosts.rows, first_step_rows,
                                      env=env)
        if previous is not None:
            results = report.merge_results(previous, results)
        report.write_json(results, stem + ".json")
        return results

    bar = _progress(len(kernel_plan) + len(model_plan) + len(host_devices) + len(first_step_providers))
    last = ""
    with warnings.catch_warnings(), torch_threads(settings.cpu_threads if device.type == "cpu" else None):
        warnings.simplefilter("ignore")  # library chatter (PEFT, transformers) would break the progress bar
        for provider, shape, mode, dtype in kernel_plan:
            bar.set_postfix_str(f"{provider} {shape.key} {mode} {dtype}")
            kernels.measure(provider, shape, mode, dtype)
            save()
            bar.update()
        for case, precision, mode, provider in model_plan:
            bar.set_postfix_str(f"{case.name} {precision} {mode} {provider}{last}")
            started = time.perf_counter()
            row = models.measure(case, precision, mode, provider).row
            took = time.perf_counter() - started  # this round's (row["point_s"] adds up the rounds)
            if row["status"] != "skipped":  # one line per point: how long each took (the time budget of a run)
                bar.write(f"  model {case.name} {precision} {mode} {provider}: {row['status']}, {took:.1f} s")
            last = f" (previous point {took:.1f} s)"
            save()
            bar.update()
        for device_type in host_devices:
            bar.set_postfix_str(f"host time, {device_type} tensors")
            hosts.measure(device_type)
            save()
            bar.update()
        for provider in first_step_providers:  # one provider at a time, each saved: 2 fresh processes each
            bar.set_postfix_str(f"first step in fresh processes, cold and warm: {provider}")
            started = time.perf_counter()
            first_step_rows.extend(measure_first_steps(device, settings, [provider]))
            bar.write(f"  first step {provider}, cold and warm processes: {time.perf_counter() - started:.1f} s")
            save()
            bar.update()
    bar.close()

    results = save()
    written = [stem + ".json"]
    if not args.no_plot:
        why_not = report.plot(results, stem + ".png")
        if why_not:
            print(f"condlora bench: {why_not}", file=sys.stderr)
        else:
            written.append(stem + ".png")
    print(report.markdown(results, with_targets=False))  # the targets come last, as lines
    for line in summary_lines(results) + target_lines(results):
        print(line)
    print("wrote " + ", ".join(written))
    raised = [r for rows in (kernels.rows, models.rows, hosts.rows, first_step_rows) for r in rows
              if r["status"] == "error"]
    return 1 if raised else 0  # the rows are written either way; a script sees that this run had errors


if __name__ == "__main__":
    sys.exit(main())
