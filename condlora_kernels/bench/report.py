"""Results: the environment record, the JSON file, markdown tables (README) and the PNG plot."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
from typing import Optional

import torch

SCHEMA = 1


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


def environment(device: torch.device) -> dict:
    from condlora_kernels import __version__

    env = {"device_type": device.type, "device": device_name(device), "torch": torch.__version__,
           "triton": _version("triton"), "cuda": torch.version.cuda, "transformers": _version("transformers"),
           "peft": _version("peft"), "condlora_kernels": __version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch_default_threads": torch.get_num_threads()}
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


def make_results(device: torch.device, settings, kernel_rows: list, model_rows: list, notes=()) -> dict:
    return {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "environment": environment(device), "settings": settings.as_dict(), "kernel": kernel_rows,
            "model": model_rows, "notes": list(notes)}


def write_json(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
        f.write("\n")


def read_json(path: str) -> dict:
    with open(path) as f:
        results = json.load(f)
    if results.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a condlora bench result of schema {SCHEMA} (got {results.get('schema')!r})")
    return results


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


def model_markdown(rows: list) -> str:
    if not rows:
        return ""
    out = ["| model | precision | provider | step (ms) | examples/s | tokens/s | peak memory (GiB) | trainable "
           "params | vs PEFT LoRA | time / frozen |", "|---" * 10 + "|"]
    notes = {}
    for r in rows:
        if r["status"] != "ok":
            notes.setdefault(r["provider"], f"{r['status']}: {r['reason']}")
            continue
        peak = f"{r['peak_mem_bytes'] / 2**30:.2f}" if r.get("peak_mem_bytes") else "–"
        vs_peft = f"{r['speedup_vs_peft']:.2f}×" if r.get("speedup_vs_peft") else "–"
        vs_frozen = f"{r['ratio_to_frozen']:.2f}×" if r.get("ratio_to_frozen") else "–"
        out.append(f"| {r['model']} ({r['batch']}×{r['seq']}) | {r['precision']} | {r['provider']} | "
                   f"{_fmt_ms(r['median_ms'])} | {r['examples_per_s']:.1f} | {r['tokens_per_s']:,.0f} | {peak} | "
                   f"{r['trainable_params']:,} | {vs_peft} | {vs_frozen} |")
    out.append("")
    out.append("Training step = forward, loss, backward, AdamW step. *vs PEFT LoRA*: examples/s over PEFT LoRA's "
               "(higher is better); *time / frozen*: step time over the frozen model's step with the same backward "
               "through every layer and no adapter (the floor).\n")
    if notes:
        out.append("Not run or failed: " + "; ".join(f"`{p}`: {why}" for p, why in notes.items()) + "\n")
    return "\n".join(out)


def markdown(results: dict) -> str:
    env = results["environment"]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "transformers", "peft") if env.get(k))
    out = [f"Measured on {env['device']} ({versions}; {results['created'][:10]}"
           f"{', quick run' if results['settings'].get('quick') else ''}).\n"]
    if results.get("kernel"):
        out += ["#### Kernel level\n", kernel_markdown(results["kernel"])]
    if results.get("model"):
        out += ["#### Model level (training throughput)\n", model_markdown(results["model"])]
    for note in results.get("notes", []):
        out.append(f"- {note}")
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------


def plot(results: dict, path: str) -> Optional[str]:
    """A PNG: per benchmark mode, ratio to the frozen layer per shape and provider; and model-level
    examples/s relative to PEFT LoRA. Returns None, or why no plot was written (matplotlib missing)."""
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
    model = [r for r in results.get("model", []) if r["status"] == "ok" and r.get("speedup_vs_peft")]
    panels = [m for m in MODE_ORDER if any(r["mode"] == m for r in kernel)] + (["model"] if model else [])
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(11, 3.6 * max(1, len(panels))), squeeze=False)
    env = results["environment"]
    fig.suptitle(f"condlora bench: {env['device']}, torch {env['torch']}, triton {env.get('triton')}", fontsize=11)
    names = list(dict.fromkeys(r["provider"] for r in kernel + model))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}  # one colour per provider
    for ax, panel in zip(axes[:, 0], panels):
        if panel == "model":
            groups = list(dict.fromkeys(f"{r['model']} {r['precision']}" for r in model))
            series = list(dict.fromkeys(r["provider"] for r in model))
            values = {(f"{r['model']} {r['precision']}", r["provider"]): r["speedup_vs_peft"] for r in model}
            _bars(ax, groups, series, values, colors)
            ax.set_ylabel("examples/s vs PEFT LoRA")
            ax.set_title("model level: training throughput relative to PEFT LoRA (higher is better)", fontsize=10)
        else:
            rows = [r for r in kernel if r["mode"] == panel and r["provider"] != "frozen"]
            groups = list(dict.fromkeys(r["shape"] for r in rows))
            series = list(dict.fromkeys(r["provider"] for r in rows))
            values = {(r["shape"], r["provider"]): r["ratio_to_frozen"] for r in rows}
            _bars(ax, groups, series, values, colors)
            ax.set_ylabel("time / frozen F.linear")
            ax.set_title(f"kernel level, {panel} ({dtype}, {timer}): lower is better, 1 is the floor", fontsize=10)
        ax.axhline(1.0, color="black", linewidth=0.8)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _bars(ax, groups, series, values, colors):
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get((group, name), 0.0) for group in groups]
        ax.bar(xs, ys, width, label=name, color=colors[name])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.legend(fontsize=7, ncol=min(4, len(series)))
