"""Results: the environment record, the JSON file, markdown tables (README), the targets of issue #11 checked
against a result, and the PNG plot.

A result holds one list of rows per level, each row self-describing (device and versions in each):
"kernel" (kernels.py), "model" (model.py), "host" (host.py) and "first_step" (first_step.py).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import warnings
from typing import Optional

import torch

from condlora_kernels.bench.shapes import LLAMA_2L, MODEL_MODES, ROBERTA_BASE, condlora_provider

SCHEMA = 2  # 2: model rows per mode (eager, compile, reduce-overhead) with ratio_to_peft; host and first_step rows
GiB = 2 ** 30
MiB = 2 ** 20


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU" + (f" ({platform.processor()})" if platform.processor() else "")


def row_environment(device: torch.device) -> dict:
    """What every row carries: the device and the versions that decide the numbers."""
    return {"device": device_name(device), "torch": torch.__version__, "triton": _version("triton")}


def auto_backend(device: torch.device) -> Optional[str]:
    """The backend that `backend="auto"` picks here for the benchmarks' tensors (bf16 on GPU, fp32 on CPU)."""
    from condlora_kernels.ops.backends import select_backend

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warning: the name says it
        try:
            return select_backend("auto", torch.empty(0, device=device, dtype=dtype)).name
        except Exception:  # a benchmark record never fails on this
            return None


def environment(device: torch.device) -> dict:
    from condlora_kernels import __version__

    env = {"device_type": device.type, "device": device_name(device), "torch": torch.__version__,
           "triton": _version("triton"), "cuda": torch.version.cuda, "transformers": _version("transformers"),
           "peft": _version("peft"), "condlora_kernels": __version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch_default_threads": torch.get_num_threads(), "auto_backend": auto_backend(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(capability=f"{props.major}.{props.minor}", gpu_memory_bytes=props.total_memory,
                   allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return env


def device_slug(results: dict) -> str:
    """File name of a result: the device name in lower case, e.g. nvidia-h100-80gb-hbm3, or cpu."""
    name = results["environment"]["device"]
    if results["environment"]["device_type"] != "cuda":
        name = "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def make_results(device: torch.device, settings, kernel_rows=(), model_rows=(), notes=(), host_rows=(),
                 first_step_rows=(), env: Optional[dict] = None) -> dict:
    """The result document; `env`: environment(device), where the caller has it already (it reads package
    metadata and device properties)."""
    return {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "environment": env if env is not None else environment(device), "settings": settings.as_dict(),
            "kernel": list(kernel_rows),
            "model": list(model_rows), "host": list(host_rows), "first_step": list(first_step_rows),
            "notes": list(notes)}


def write_json(results: dict, path: str) -> None:
    """Written whole or not at all (a temporary file renamed over the old one): the suite rewrites its JSON
    after every point, and a run stopped by a time limit must not leave half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    """A result file, checked for what the report and --merge read (ValueError naming the file otherwise)."""
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as exc:  # a missing file, a folder, not JSON
        raise ValueError(f"{path}: cannot be read as a condlora bench result ({type(exc).__name__}: {exc})") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path}: not a condlora bench result (a JSON {type(results).__name__}, not an object)")
    if results.get("schema") == 1:
        results = _upgrade_schema_1(results)
    if results.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a condlora bench result of schema {SCHEMA} (got {results.get('schema')!r})")
    missing = [key for key in ("environment", "created", "settings") if key not in results]
    if missing or not isinstance(results["environment"], dict):
        raise ValueError(f"{path}: a condlora bench result lacks {missing or ['environment (an object)']}")
    for level in ROW_KEYS:
        rows = results.get(level, [])
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "status" in r for r in rows):
            raise ValueError(f"{path}: its {level!r} rows must be a list of objects with a status")
    return results


def _upgrade_schema_1(results: dict) -> dict:
    """Schema 1 had eager model rows only (mode "train step"), with examples/s over PEFT's (`speedup_vs_peft`)."""
    for row in results.get("model", []):
        speedup = row.pop("speedup_vs_peft", None)
        row.update(mode="eager", ratio_to_peft=1 / speedup if speedup else None)
        row.setdefault("first_step_s", None)
    results.setdefault("host", [])
    results.setdefault("first_step", [])
    results["schema"] = SCHEMA
    return results


def fill_model_ratios(rows: list) -> None:
    """Each ok row's step time over the frozen model's and over PEFT LoRA's of the same model, precision and
    mode, where those were measured (None otherwise)."""
    ms = {(r["model"], r["precision"], r["mode"], r["provider"]): r["median_ms"] for r in rows if r["status"] == "ok"}
    for row in rows:
        if row["status"] == "ok":
            frozen, peft = (ms.get((row["model"], row["precision"], row["mode"], p)) for p in ("frozen", "peft_lora"))
            row["ratio_to_frozen"] = row["median_ms"] / frozen if frozen else None
            row["ratio_to_peft"] = row["median_ms"] / peft if peft else None


# What identifies a row of each level: a run in parts (`condlora bench --merge`) replaces the rows it measured again.
ROW_KEYS = {
    "kernel": ("provider", "shape", "mode", "dtype", "timer", "repeat"),
    "model": ("model", "precision", "mode", "provider", "dropout"),
    "host": ("device_type", "provider"),
    "first_step": ("model", "precision", "provider"),
}


def merge_results(old: dict, new: dict) -> dict:
    """`new` plus the rows of `old` (same device) that `new` did not measure again; model ratios taken again."""
    if old["environment"].get("device") != new["environment"].get("device"):
        raise ValueError(f"--merge: the existing result is from {old['environment'].get('device')!r}, this run "
                         f"from {new['environment'].get('device')!r}; write to another --output")
    merged = dict(new, notes=list(dict.fromkeys(old.get("notes", []) + new.get("notes", []))))
    for level, keys in ROW_KEYS.items():
        fresh = {tuple(r.get(k) for k in keys) for r in new.get(level, [])}
        merged[level] = [r for r in old.get(level, []) if tuple(r.get(k) for k in keys) not in fresh] + \
            list(new.get(level, []))
    earlier = old.get("runs") or [{"created": old["created"], "settings": old["settings"]}]
    merged["runs"] = earlier + [{"created": new["created"], "settings": new["settings"]}]
    fill_model_ratios(merged["model"])
    return merged


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------

MODE_ORDER = ("forward", "backward", "forward+backward")


def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "–"
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _cell(rows_by_mode: dict, value) -> str:
    parts = []
    for mode in MODE_ORDER:
        row = rows_by_mode.get(mode)
        if row is None:
            parts.append("–")
        elif row["status"] == "ok":
            parts.append(value(row))
        else:
            parts.append({"n/a": "n/a", "skipped": "–", "error": "err"}.get(row["status"], row["status"]))
    if all(p == parts[0] for p in parts) and parts[0] in ("n/a", "–", "err"):
        return parts[0]
    return " / ".join(parts)


def kernel_markdown(rows: list) -> str:
    """One table per (dtype, timer): a row per shape (and per repeat of CUDA-graph timings), a column per
    provider with its ratio to the frozen layer, forward / backward / forward+backward."""
    if not rows:
        return ""
    out, notes = [], {}
    providers = list(dict.fromkeys(r["provider"] for r in rows if r["provider"] != "frozen"))
    # drop providers that did not run anywhere (unavailable backends): their reason goes to the notes
    shown = [p for p in providers if any(r["provider"] == p and r["status"] in ("ok", "error") for r in rows)]
    for r in rows:
        if r["status"] in ("skipped", "error"):
            notes.setdefault(r["provider"], f"{r['status']}: {r['reason']}")
    for dtype, timer in dict.fromkeys((r["dtype"], r["timer"]) for r in rows):
        group = [r for r in rows if r["dtype"] == dtype and r["timer"] == timer]
        label = {"do_bench": "median of triton do_bench (CUDA events, L2 flushed)",
                 "cudagraph": "median of do_bench_cudagraph (launch overhead removed), repeated runs",
                 "cpu": "median of time.perf_counter"}.get(timer, timer)
        out.append(f"**{dtype}, {label}.** Cells: time / time of the frozen `F.linear` step, "
                   "forward / backward / forward+backward (1.00× is the floor).\n")
        out.append("| N, d_in, d_out, r | frozen (ms) | " + " | ".join(shown) + " |")
        out.append("|---" * (2 + len(shown)) + "|")
        for shape, repeat in dict.fromkeys((r["shape"], r["repeat"]) for r in group):
            cell_rows = [r for r in group if r["shape"] == shape and r["repeat"] == repeat]
            by = {p: {r["mode"]: r for r in cell_rows if r["provider"] == p} for p in ["frozen"] + shown}
            name = shape.replace(" r", ", r=").replace("x", ", ")
            if timer == "cudagraph":
                name += f" (run {repeat + 1})"
            frozen = _cell(by["frozen"], lambda r: _fmt_ms(r["median_ms"]))
            cells = [_cell(by[p], lambda r: f"{r['ratio_to_frozen']:.2f}×" if r["ratio_to_frozen"] else "?")
                     for p in shown]
            out.append(f"| {name} | {frozen} | " + " | ".join(cells) + " |")
        out.append("")
    if notes:
        out.append("Not run or failed: " + "; ".join(f"`{p}`: {why}" for p, why in notes.items()) + "\n")
    return "\n".join(out)

def _not_run_notes(rows: list, where) -> str:
    """One line naming each (provider, status, reason) that did not give a time, and where it happened."""
    notes = {}
    for r in rows:
        if r["status"] != "ok":
            notes.setdefault((r["provider"], r["status"], r["reason"]), []).append(where(r))
    if not notes:
        return ""
    return "Not run or failed: " + "; ".join(f"`{p}` ({', '.join(dict.fromkeys(at))}): {status}: {why}"
                                             for (p, status, why), at in notes.items()) + "\n"


def _ratio(value: Optional[float]) -> str:
    return f"{value:.2f}×" if value else "–"


def _gib(value: Optional[int]) -> str:
    return "–" if not value else f"{value / GiB:.2f}"


def _seconds(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _table(rows: list, header: list, cells, legend: str, where, extra: str = "") -> str:
    """A markdown table of the ok rows (`cells(row)`: its cells), the legend, `extra`, and a line naming the
    rows that did not run (`where(row)`: where that was)."""
    if not rows:
        return ""
    out = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    out += ["| " + " | ".join(cells(r)) + " |" for r in rows if r["status"] == "ok"]
    out += ["", legend + "\n"] + [text + "\n" for text in (extra, _not_run_notes(rows, where).rstrip()) if text]
    return "\n".join(out)


def model_markdown(rows: list) -> str:
    compiled = {}
    for r in rows:
        if r.get("graphs_compiled") is not None:
            compiled.setdefault(f"{r['model']} {r['precision']} {r['mode']}", []).append(
                f"{r['provider']} {r['graphs_compiled']} ({r['graph_breaks']})")
    graphs = ("Graphs Dynamo compiled per point (graph breaks in brackets; graphs beyond breaks + 1 suggest "
              "recompilations): " + "; ".join(f"{where}: {', '.join(counts)}" for where, counts in compiled.items())
              + ".") if compiled else ""
    return _table(
        rows, ["model", "mode", "provider", "step (ms)", "examples/s", "× frozen (same mode)",
               "× PEFT LoRA (same mode)", "peak memory (GiB)", "steady peak (GiB)", "first step (s)", "host mm (µs)"],
        lambda r: [f"{r['model']} {r['batch']}×{r['seq']} {r['precision']}", r["mode"], r["provider"],
                   _fmt_ms(r["median_ms"]), f"{r['examples_per_s']:.1f}", _ratio(r.get("ratio_to_frozen")),
                   _ratio(r.get("ratio_to_peft")),
                   _gib(r.get("peak_mem_bytes")), _gib(r.get("step_peak_mem_bytes")), _seconds(r.get("first_step_s")),
                   _host_mm(r)],
        "Training step = forward, loss, backward, AdamW step; median of the timed steps. Both ratios are step "
        "times, **lower is better**: *× frozen* over the frozen model's step in the same mode (no adapter, backward "
        "through every layer: 1.00× is the floor); *× PEFT LoRA* over PEFT LoRA's step in the same mode (below "
        "1.00× trains faster than PEFT). *Peak memory*: CUDA memory allocated at the point's peak, above what was "
        "allocated before it, over the whole point (first step, compilation and CUDA graph recording included; "
        "a compiled point is measured after an untimed run of the same point filled the compile caches, as on "
        "every run after a machine's first: `--prime-compile`, the first compilation's peak is the JSON's "
        "`first_compile_peak_mem_bytes`); *steady peak*: the same over the timed steps only. *first step*: wall "
        "time of the point's first step in the benchmark's process (compilation and autotuning included, with the "
        "caches the earlier points filled; the cold and warm figures in fresh processes are in the first-step "
        "table). *host mm*: the host time of one tiny "
        "`torch.mm` on the device just before the timed steps (`host_mm_us`): a step bound by the host follows it. "
        "With `--rounds`, a point's step time and host mm are the medians over its rounds.",
        lambda r: f"{r['model']} {r['precision']} {r['mode']}", graphs)


def _host_mm(row: dict) -> str:
    us = row.get("host_mm_us")
    rounds = len(row.get("round_ms") or ())
    return "–" if us is None else f"{us:.1f}" + (f" ({rounds} rounds)" if rounds > 1 else "")


def first_step_markdown(rows: list) -> str:
    return _table(
        rows, ["model", "provider", "cold first step (s)", "warm first step (s)", "cold process (s)",
               "warm process (s)"],
        lambda r: [f"{r['model']} {r['precision']}", r["provider"]] + [
            _seconds(r[key]) for key in ("cold_s", "warm_s", "cold_process_s", "warm_process_s")],
        "Eager mode, each in a fresh process. *Cold*: empty autotune (`CONDLORA_CACHE_DIR`), Triton "
        "(`TRITON_CACHE_DIR`) and Inductor (`TORCHINDUCTOR_CACHE_DIR`) caches; *warm*: a second process with the "
        "caches the cold one filled. *First step*: wall time of the first training step (forward, backward, AdamW "
        "step, synchronised); *process*: the process's whole wall time (interpreter start, imports, model build, "
        "first step).",
        lambda r: f"{r['model']} {r['precision']}")


def host_markdown(rows: list) -> str:
    return _table(
        rows, ["tensors", "layer (backend)", "shape", "host time per forward+backward (µs)", "× frozen nn.Linear"],
        lambda r: [r["device_type"].upper(), r["layer"] + (f" ({r['backend']})" if r.get("backend") else ""),
                   r["shape"], f"{r['us_per_call']:.1f}", _ratio(r["ratio_to_frozen"])],
        "Median over batches of calls by the host clock (host.py): at this size only overhead counts, and on CUDA "
        "the GPU idles, so the wall time per call is host time. The frozen `nn.Linear`'s input requires grad (its "
        "backward computes dx); the CondLoRA layer's backward computes dx and dθ.",
        lambda r: r["device_type"])


# --------------------------------------------------------------------------------------------------
# Targets (issue #11, item 2): what a result says about each
# --------------------------------------------------------------------------------------------------

TARGET_MODELS = (ROBERTA_BASE.name, LLAMA_2L.name)
TARGET_PRECISION = "bf16"
FROZEN_LIMITS = {(ROBERTA_BASE.name, "eager"): 1.15, (LLAMA_2L.name, "eager"): 1.05}  # step over the frozen model's
COMPILED_LIMIT = 1.05  # the same in the compiled modes, both models
HOST_LIMITS = {"cpu": 2.0, "cuda": 3.0}  # host time of the layer over a frozen nn.Linear's
FIRST_STEP_MARGINS_S = {"cold_s": 10.0, "warm_s": 1.0}  # over PEFT LoRA's first step, RoBERTa-base
# One layer over the frozen layer's same step, bf16: (shape, mode, timer, limit). RoBERTa-base's layer under CUDA
# graphs, where the launches are gone and GPU time is left; the large shape held at the figures issue #11 started
# from (1.10× forward, 1.15× forward+backward on the H200).
KERNEL_LIMITS = (("8192x768x768 r8", "forward+backward", "cudagraph", 1.6),
                 ("16384x4096x4096 r16", "forward", "do_bench", 1.10),
                 ("16384x4096x4096 r16", "forward+backward", "do_bench", 1.15))


def _all_met(values: list) -> Optional[bool]:
    """False if any is False, else None if any is None (not measured), else True."""
    return False if False in values else None if None in values or not values else True


def _ours(rows: dict, provider: Optional[str], key: str) -> Optional[dict]:
    """The CondLoRA row of a point: `provider`'s, or the condlora[<backend>] row with the smallest `key` (the
    backends with their default settings: not the +recompute rows)."""
    if provider is not None:
        return rows.get(provider)
    ours = [r for p, r in rows.items() if condlora_provider(p) is not None and not condlora_provider(p)[1]
            and r.get(key) is not None]
    return min(ours, key=lambda r: r[key]) if ours else None


def targets(results: dict) -> list:
    """[(target, measured, met)] for each target of issue #11 that a result can show; met is None where the
    result has no such measurement (a CPU run has none of the GPU models). The model and first-step targets
    are checked for the best CondLoRA backend of each point (the fastest condlora[<backend>]), for the backend
    that `backend="auto"` picks (the environment's auto_backend), and the model targets also for that backend with
    recompute_weight_cast where the result has it (condlora[<auto>]+recompute). The kernel-level targets are
    checked like the first step's, for the best CondLoRA backend and the auto one."""
    auto = results["environment"].get("auto_backend")
    scopes = [("best CondLoRA", None)] + ([(f"condlora[{auto}] (auto)", f"condlora[{auto}]")] if auto else [])
    model = [r for r in results.get("model", []) if r["precision"] == TARGET_PRECISION and r["status"] == "ok"]
    recompute = f"condlora[{auto}]+recompute"
    model_scopes = scopes + ([(recompute, recompute)] if any(r["provider"] == recompute for r in model) else [])
    out = []
    for scope, provider in model_scopes:
        vs_peft, vs_frozen = [], []
        for name in TARGET_MODELS:
            for mode in MODEL_MODES:
                rows = {r["provider"]: r for r in model if r["model"] == name and r["mode"] == mode}
                ours, peft, frozen = _ours(rows, provider, "median_ms"), rows.get("peft_lora"), rows.get("frozen")
                vs_peft.append(_vs_peft(f"{name} {mode}: {scope} faster than PEFT LoRA, peak memory not higher",
                                        ours, peft))
                limit = FROZEN_LIMITS.get((name, mode), COMPILED_LIMIT)
                label = f"{name} {mode}: {scope} step ≤ {limit:.2f}× frozen"
                if ours is None or frozen is None:
                    vs_frozen.append((label, "not measured", None))
                else:
                    ratio = ours["median_ms"] / frozen["median_ms"]
                    vs_frozen.append((label, f"{ours['provider']}: {ratio:.2f}×", ratio <= limit))
        met = [m for _, _, m in vs_peft]
        out.append((f"{scope} faster than PEFT LoRA in every mode on both models, peak memory not higher (required)",
                    f"{met.count(True)} of {len(met)} points met, {met.count(None)} not measured", _all_met(met)))
        out += vs_peft + vs_frozen
    out += _host_targets(results.get("host", []))
    out += _first_step_targets(results.get("first_step", []), scopes)
    out += _kernel_targets(results.get("kernel", []), scopes)
    return out


def _vs_peft(label: str, ours: Optional[dict], peft: Optional[dict]) -> tuple:
    if ours is None or peft is None:
        return label, "not measured", None
    faster = ours["median_ms"] < peft["median_ms"]
    measured = f"{ours['provider']}: {ours['median_ms'] / peft['median_ms']:.2f}× PEFT's step time"
    if ours.get("peak_mem_bytes") is None or peft.get("peak_mem_bytes") is None:
        return label, measured + ", peak memory not measured", (None if faster else False)
    # in MiB with a decimal: the two peaks can differ by a few MiB in 5 GiB
    measured += f", peak {ours['peak_mem_bytes'] / MiB:.1f} vs {peft['peak_mem_bytes'] / MiB:.1f} MiB"
    if ours["peak_mem_bytes"] > peft["peak_mem_bytes"]:  # how much of the excess is the allocator's block rounding
        measured += (f" (+{ours['peak_mem_bytes'] - peft['peak_mem_bytes']:,} bytes; requested by the tensors: "
                     + _signed_bytes(ours.get("peak_requested_bytes"), peft.get("peak_requested_bytes"))
                     + "; reserved: " + _signed_bytes(ours.get("peak_reserved_bytes"), peft.get("peak_reserved_bytes"))
                     + ")")
    return label, measured, faster and ours["peak_mem_bytes"] <= peft["peak_mem_bytes"]


def _signed_bytes(ours: Optional[int], peft: Optional[int]) -> str:
    return "not measured" if ours is None or peft is None else f"{ours - peft:+,} bytes"


def _host_targets(rows: list) -> list:
    out = []
    for device_type, limit in HOST_LIMITS.items():
        label = f"host time of FusedCondLoRALinear fwd+bwd, {device_type} tensors: ≤ {limit:g}× frozen nn.Linear's"
        ours = [r for r in rows if r["device_type"] == device_type and r["provider"] != "frozen"
                and r["status"] == "ok"]
        if not ours or ours[0].get("ratio_to_frozen") is None:
            out.append((label, "not measured", None))
            continue
        r = ours[0]
        frozen_us = r["us_per_call"] / r["ratio_to_frozen"]
        out.append((label, f"{r['backend']}: {r['us_per_call']:.0f} µs vs {frozen_us:.0f} µs "
                           f"({r['ratio_to_frozen']:.2f}×)", r["ratio_to_frozen"] <= limit))
    return out


def _first_step_targets(rows: list, scopes: list) -> list:
    rows = {r["provider"]: r for r in rows if r["model"] == TARGET_MODELS[0] and r["precision"] == TARGET_PRECISION
            and r["status"] == "ok"}
    out = []
    for scope, provider in scopes:
        for key, margin in FIRST_STEP_MARGINS_S.items():
            cache = key[:-2]  # "cold" / "warm"
            label = f"{TARGET_MODELS[0]} first step, {cache} caches: {scope} ≤ PEFT LoRA's + {margin:g} s"
            ours, peft = _ours(rows, provider, key), rows.get("peft_lora")
            if ours is None or peft is None:
                out.append((label, "not measured", None))
                continue
            out.append((label, f"{ours['provider']}: {ours[key]:.1f} s vs PEFT {peft[key]:.1f} s",
                        ours[key] <= peft[key] + margin))
    return out


def _kernel_targets(rows: list, scopes: list) -> list:
    """KERNEL_LIMITS per scope. A CUDA-graph point is timed in repeats, each over the frozen layer's same repeat:
    the median of its repeats' ratios is the figure."""
    out = []
    for scope, provider in scopes:
        for shape, mode, timer, limit in KERNEL_LIMITS:
            label = (f"kernel level, {shape}, {mode}{' under CUDA graphs' if timer == 'cudagraph' else ''}: "
                     f"{scope} ≤ {limit:g}× frozen")
            ratios = {}
            for r in rows:
                if (r["shape"], r["mode"], r["timer"], r["dtype"], r["status"]) == \
                        (shape, mode, timer, TARGET_PRECISION, "ok") and r.get("ratio_to_frozen") is not None:
                    ratios.setdefault(r["provider"], []).append(r["ratio_to_frozen"])
            points = {p: {"provider": p, "ratio": statistics.median(v), "repeats": len(v)} for p, v in ratios.items()}
            ours = _ours(points, provider, "ratio")
            if ours is None:
                out.append((label, "not measured", None))
                continue
            repeats = f" (median of {ours['repeats']} repeats)" if ours["repeats"] > 1 else ""
            out.append((label, f"{ours['provider']}: {ours['ratio']:.2f}×{repeats}", ours["ratio"] <= limit))
    return out


def targets_markdown(results: dict) -> str:
    out = ["| target (issue #11) | measured | met |", "|---|---|---|"]
    for target, measured, met in targets(results):
        out.append(f"| {target} | {measured} | {'–' if met is None else 'yes' if met else 'no'} |")
    out.append("")
    out.append("bf16 on the GPU. *best CondLoRA*: the fastest condlora[<backend>] provider of each point; *(auto)*: "
               "the backend that `backend=\"auto\"` picks on this machine; *+recompute*: that backend with "
               "`recompute_weight_cast=True` (the default is \"auto\"). –: not measured in this result.\n")
    return "\n".join(out)


def markdown(results: dict, with_targets: bool = True) -> str:
    env = results["environment"]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "transformers", "peft") if env.get(k))
    out = [f"Measured on {env['device']} ({versions}; {results['created'][:10]}"
           f"{', quick run' if results['settings'].get('quick') else ''}).\n"]
    sections = [("kernel", "Kernel level", kernel_markdown), ("model", "Model level (training step)", model_markdown),
                ("first_step", "Time to first step, fresh processes", first_step_markdown),
                ("host", "Host time per call", host_markdown)]
    for level, title, table in sections:
        if results.get(level):
            out += [f"#### {title}\n", table(results[level])]
    if with_targets:
        out += ["#### Targets\n", targets_markdown(results)]
    for note in results.get("notes", []):
        out.append(f"- {note}")
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------


def plot(results: dict, path: str) -> Optional[str]:
    """A PNG, one panel each: per kernel benchmark mode, time over the frozen layer's per shape and provider;
    per model mode, step time over the frozen model's per model and provider; host time per call. Every bar
    carries its value; legends sit below their panel. Returns None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and CI
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: matplotlib is not installed ({exc})"

    kernel = [r for r in results.get("kernel", []) if r["status"] == "ok" and r["repeat"] == 0 and r["ratio_to_frozen"]]
    if kernel:  # the first dtype and the main timer only, to stay readable
        dtype, timer = kernel[0]["dtype"], kernel[0]["timer"]
        kernel = [r for r in kernel if r["dtype"] == dtype and r["timer"] == timer]
    model = [r for r in results.get("model", []) if r["status"] == "ok" and r.get("ratio_to_frozen")]
    host = [r for r in results.get("host", []) if r["status"] == "ok"]
    panels = [("kernel", m) for m in MODE_ORDER if any(r["mode"] == m for r in kernel)] + \
             [("model", m) for m in MODEL_MODES if any(r["mode"] == m for r in model)] + \
             ([("host", "")] if host else [])
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(12, 4.6 * max(1, len(panels))), squeeze=False)
    env = results["environment"]
    fig.suptitle(f"condlora bench: {env['device']}, torch {env['torch']}, triton {env.get('triton')}", fontsize=11)
    names = list(dict.fromkeys([r["provider"] for r in kernel + model] + [r["layer"] for r in host]))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}  # one colour per provider
    for ax, (level, mode) in zip(axes[:, 0], panels):
        if level == "kernel":
            rows = [r for r in kernel if r["mode"] == mode and r["provider"] != "frozen"]
            _bars(ax, rows, lambda r: r["shape"], lambda r: r["provider"], lambda r: r["ratio_to_frozen"], colors)
            ax.set_ylabel("time / frozen F.linear")
            ax.set_title(f"kernel level, {mode} ({dtype}, {timer}): lower is better, 1 is the floor", fontsize=10)
        elif level == "model":
            rows = [r for r in model if r["mode"] == mode and r["provider"] != "frozen"]
            _bars(ax, rows, lambda r: f"{r['model']} {r['precision']}", lambda r: r["provider"],
                  lambda r: r["ratio_to_frozen"], colors)
            ax.set_ylabel("step time / frozen model's")
            ax.set_title(f"model level, {mode}: training step time over the frozen model's in {mode} mode "
                         "(lower is better, 1 is the floor)", fontsize=10)
        else:
            _bars(ax, host, lambda r: f"{r['device_type'].upper()} tensors", lambda r: r["layer"],
                  lambda r: r["us_per_call"], colors, fmt="{:.0f}")
            ax.set_ylabel("µs per call")
            ax.set_title("host time of one forward+backward at 8 x 64, r=4 (lower is better)", fontsize=10)
        if level != "host":
            ax.axhline(1.0, color="black", linewidth=0.8)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None


def _bars(ax, rows, group_of, series_of, value_of, colors, fmt="{:.2f}"):
    """Grouped bars, each labelled with its value; the legend below the axes, where it covers nothing."""
    groups = list(dict.fromkeys(group_of(r) for r in rows))
    series = list(dict.fromkeys(series_of(r) for r in rows))
    values = {(group_of(r), series_of(r)): value_of(r) for r in rows}
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get((group, name), math.nan) for group in groups]  # nan: no bar, no label
        bars = ax.bar(xs, ys, width, label=name, color=colors[name])
        ax.bar_label(bars, labels=["" if math.isnan(y) else fmt.format(y) for y in ys], fontsize=6, rotation=90,
                     padding=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.margins(y=0.18)  # room above the tallest bar for its label
    ax.legend(fontsize=7, ncol=min(5, max(1, len(series))), loc="upper center", bbox_to_anchor=(0.5, -0.12),
              frameon=False)
