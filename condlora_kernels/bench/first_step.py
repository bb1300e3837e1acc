"""Time to first step in fresh processes, cold and warm caches (`condlora bench --first-step`).

For each provider, two subprocesses train one eager step of the settings' first-step case (RoBERTa-base in
bf16 on GPU) and report its wall time:

    cold   empty caches: the autotuner's (CONDLORA_CACHE_DIR), Triton's (TRITON_CACHE_DIR) and Inductor's
           (TORCHINDUCTOR_CACHE_DIR), each a new temporary directory
    warm   a second process with the same directories, as the cold one left them

what a user meets on the first run of a new machine and on every later run. Each process also reports
its whole wall time (interpreter start, imports, model build, first step). The in-process first step of
every model point (model.py's `first_step_s`) comes after earlier points filled the caches; this does not.
Two processes per provider, each ~5-10 s of interpreter start, imports and model build before its step:
1-3 minutes on a GPU for all providers (estimated), so on by default only in a full GPU run.

`python -m condlora_kernels.bench.first_step CASE PRECISION PROVIDER DEVICE` is the child: it prints
one JSON line, {"first_step_s": ..., "caches": the cache directories it saw}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from condlora_kernels.bench import report
from condlora_kernels.bench.kernels import error_message
from condlora_kernels.bench.model import (MODEL_PROVIDERS, build_model, prepare_point, provider_unavailable,
                                          timed_first_step)
from condlora_kernels.bench.shapes import MODEL_CASES, RECOMPUTE_SUFFIX, ModelCase, Settings

CACHE_VARIABLES = ("CONDLORA_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")


def first_step_plan(providers) -> list:
    """The model providers whose first step is timed, in MODEL_PROVIDERS' order: not the +recompute variants, a
    setting of the backward that changes nothing the first step pays for (compiling, autotuning)."""
    return [p for p in MODEL_PROVIDERS if p in providers and not p.endswith(RECOMPUTE_SUFFIX)]


def measure_first_steps(device: torch.device, settings: Settings, providers) -> list:
    """One row per provider: the first step's wall time in a cold and then a warm fresh process."""
    case, precision = settings.first_step_case
    env = report.row_environment(device)
    rows = []
    for provider in providers:
        row = {"provider": provider, "model": case.name, "precision": precision, "mode": "eager", "cold_s": None,
               "warm_s": None, "cold_process_s": None, "warm_process_s": None, "status": "ok", "reason": "", **env}
        rows.append(row)
        reason = provider_unavailable(provider, device, precision)
        if reason is not None:
            row.update(status="skipped", reason=reason)
            continue
        try:
            with tempfile.TemporaryDirectory(prefix="condlora-first-step-") as root:
                caches = {name: os.path.join(root, name.lower()) for name in CACHE_VARIABLES}
                for temperature in ("cold", "warm"):
                    first_step_s, process_s = run_child(case, precision, provider, device, caches,
                                                        settings.first_step_timeout_s)
                    row.update({f"{temperature}_s": first_step_s, f"{temperature}_process_s": process_s})
        except Exception as exc:  # recorded as an error row; the run goes on
            row.update(status="error", reason=error_message(exc))
    return rows


def run_child(case: ModelCase, precision: str, provider: str, device: torch.device, caches: dict,
              timeout_s: float) -> tuple:
    """Run the child in a fresh interpreter with these cache directories: (its first step's wall time, the
    process's wall time), in seconds."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, **caches)  # the child imports this very package, wherever it was found
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "condlora_kernels.bench.first_step", case.name, precision, provider, str(device)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    process_s = time.perf_counter() - started
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"first-step process exited with {done.returncode}: {tail}")
    result = json.loads(lines[-1])
    if result["caches"] != caches:  # the figure would not be the cold or warm one it claims to be
        raise RuntimeError(f"first-step process saw cache directories {result['caches']}, not {caches}")
    return result["first_step_s"], process_s


def child(argv) -> dict:
    """In the fresh process: build the case's model, put the provider on it, time one eager training step."""
    case_name, precision, provider, device_name = argv
    device = torch.device(device_name)
    case = MODEL_CASES[case_name]
    step, _ = prepare_point(build_model(case, device), case, precision, "eager", provider, device)
    return {"first_step_s": timed_first_step(step, device), "caches": {name: os.environ.get(name)
                                                                        for name in CACHE_VARIABLES}}


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")  # library chatter; stdout carries the one JSON line
    print(json.dumps(child(sys.argv[1:])))
