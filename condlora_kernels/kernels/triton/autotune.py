"""Autotuning of the fused kernels' launch configurations, by measurement: the key, the race, the cache.

What is tuned. Each launcher in condlora_linear.py has a heuristic configuration (config.py:
`forward_tile`, `backward_tile`: the output tile BLOCK_M x BLOCK_N x BLOCK_K, GROUP_M, num_warps,
num_stages; for the backward also how many helper programs do the rank-r row work). On the first
eager call for a key the tuner races a short list of candidates (config.py: `forward_candidates`,
`backward_candidates`, drawn from the tile table), the heuristic first, then alternatives that suit
the H100 (227 KiB of shared memory per block, TMA) and the A100 (164 KiB, sm_80, no TMA), and keeps the
fastest, but an alternative replaces the heuristic only when it is at least HEURISTIC_MARGIN faster:
the heuristic tiles come from full sweeps (benchmarks/NOTES.md), a race times each candidate a few
times without flushing L2, and on the H100 a winner by a few percent was as often slower in the suite
(16384 x 4096^2, r=16: tuned 1.19-1.20x of the frozen step against the heuristic's 1.12-1.15x).

Why measuring on the caller's arguments is safe. A race runs a kernel several times on the same
arguments, which is wrong for a kernel that updates memory in place (Triton's @autotune needs
`restore_value` for those). Neither kernel does: both write only into outputs and workspaces that the
launcher allocated for this call, every candidate writes those outputs completely, and the int32
dependency flags the launches share are reset to zero by the kernel itself at exit
(`_exit_and_reset_flags`). A rerun is a plain recomputation. The winner runs last, so the call that
tunes returns exactly what later calls with that configuration return (tiles of different shapes
round differently, and the gradients are meant to be bitwise reproducible).

Key: kernel, device (name, compute capability, SM count), dtype, padded rank, d_in, d_out, the number
of rows rounded up to a power of two (sequence lengths vary: one race per octave, not per length),
and the constexpr switches that change the compiled code (mode, bias, dropout, the gradients needed,
TMA or pointer main loop, dot precision).

Cache: in memory for the process, and a JSON file, `$CONDLORA_CACHE_DIR/autotune.json` or
`~/.cache/condlora_kernels/autotune.json`, holding a format version and the torch and Triton versions
(entries from other versions are ignored: the best tile depends on the compiler). A cached choice is
used only while it is still one of the candidates. A file that cannot be read or written never
breaks a call: one warning, then the tuner goes on in memory. For bitwise reproducibility across
processes keep the file, or turn tuning off.

When nothing is measured (tuning is on by default, for eager CUDA calls):
  - `CONDLORA_AUTOTUNE=0`, or the Triton interpreter (TRITON_INTERPRET=1), or a launch given a fixed
    `config=`: the heuristic (or that config), and the cache is not read either (off means the
    configuration of the code as written, the same in every process);
  - tracing under torch.compile, capturing a CUDA graph, no rows: the cached choice if there is one,
    else the heuristic, and nothing is remembered, so a later eager call still tunes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import triton

from condlora_kernels import timing
from condlora_kernels.kernels.triton import runtime

logger = logging.getLogger(__name__)


class Config(Protocol):
    """A launch configuration (config.ForwardConfig, config.BackwardConfig): compared by value, written
    to the cache file as `as_dict()`, logged as `str()`."""

    def as_dict(self) -> dict: ...


Key = tuple
# How a launcher runs its kernel with one configuration (quiet: no warning when the pipeline is cut).
RunFn = Callable[..., None]
# How long one launch takes, in ms: given a function that launches once.
Timer = Callable[[Callable[[], None]], float]

FORMAT_VERSION = 2  # 2: choices made with HEURISTIC_MARGIN (format 1 entries are raced again)
ENV_SWITCH = "CONDLORA_AUTOTUNE"
ENV_CACHE_DIR = "CONDLORA_CACHE_DIR"
CACHE_FILE_NAME = "autotune.json"

TIMED_RUNS = 7  # per candidate, after one warm-up run that also compiles
TIME_BUDGET_S = 0.5  # timed runs of one candidate stop after this much wall time (at least one run)
HEURISTIC_MARGIN = 0.03  # an alternative must beat the heuristic (the first candidate) by this fraction

# Errors that rule a candidate out of the race rather than fail the call: it does not fit this GPU
# even at one pipeline stage (`runtime.launch` retries with fewer stages first), or this Triton cannot compile
# it. (Triton's own autotuner skips the same.) The heuristic failing is an error as before.
_SKIPPABLE: tuple = tuple(e for e in (triton.runtime.errors.OutOfResources,
                                      getattr(triton.runtime.errors, "PTXASError", None),
                                      triton.compiler.errors.CompilationError) if e is not None)


# ==================================================================================================
# key
# ==================================================================================================


@functools.lru_cache(maxsize=None)
def _device_signature(device_index: int) -> str:
    props = torch.cuda.get_device_properties(device_index)
    return f"{props.name} sm{props.major}{props.minor} {props.multi_processor_count}SMs"


def rows_bucket(n_rows: int) -> int:
    """The number of rows rounded up to a power of two: one race per octave of sequence lengths."""
    return 1 << max(int(n_rows) - 1, 0).bit_length()


def make_key(kernel: str, device: torch.device, dtype: torch.dtype, r_pad: int, d_in: int, d_out: int, n_rows: int,
             **switches: Any) -> Key:
    """The tuning key. `switches` are the constexprs that change the compiled code (names and values).
    Built on every eager launch, so kept cheap: a flat tuple, strings only for the file."""
    device_name = _device_signature(runtime.device_index(device)) if device.type == "cuda" else device.type
    return (kernel, device_name, dtype, r_pad, d_in, d_out, rows_bucket(n_rows), *switches.items())


def key_string(key: Key) -> str:
    """The key as the JSON file stores it, e.g. 'condlora_fwd|NVIDIA H100 80GB HBM3 sm90 132SMs|bfloat16|16|...'."""
    def text(part) -> str:
        if isinstance(part, tuple):
            return f"{part[0]}={part[1]}"
        return str(part).replace("torch.", "") if isinstance(part, torch.dtype) else str(part)

    return "|".join(text(part) for part in key)


# ==================================================================================================
# when to measure
# ==================================================================================================


def enabled() -> bool:
    """Whether tuning and its cache are on at all: not with CONDLORA_AUTOTUNE=0, not under the interpreter
    (which runs config.INTERPRETER_TILE)."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and not runtime.interpreting()


def measurement_blocker(device_type: str, *, tracing: bool, n_rows: int) -> Optional[str]:
    """Why this call may not race candidates (None when it may). Checked only on a cache miss."""
    if not enabled():
        return f"{ENV_SWITCH}=0" if os.environ.get(ENV_SWITCH, "1") == "0" else "TRITON_INTERPRET=1"
    if device_type != "cuda":
        return "not a CUDA device"
    if tracing:  # fake tensors: nothing to run
        return "traced by torch.compile"
    if torch.cuda.is_current_stream_capturing():  # a race would be recorded into the graph
        return "a CUDA graph is being captured"
    if n_rows == 0:
        return "no rows"
    return None


# ==================================================================================================
# timing and the race
# ==================================================================================================


def cuda_event_timer(launch: Callable[[], None]) -> float:
    """Milliseconds per launch: one warm-up launch (it compiles), then the median of up to TIMED_RUNS
    launches, each between two CUDA events, stopping once TIME_BUDGET_S of wall time is spent."""
    return timing.cuda_median_ms(launch, warmup=1, reps=TIMED_RUNS, budget_s=TIME_BUDGET_S)


TIMER: Timer = cuda_event_timer  # tests swap in a fake


def _race(key: Key, candidates: Sequence[Config], run: RunFn, timer: Timer) -> Config:
    """Time every candidate and return the fastest, or the heuristic (candidates[0]) unless an alternative
    beats it by HEURISTIC_MARGIN; the returned configuration runs last (its outputs are the call's)."""
    timings: list[tuple[float, int]] = []
    last_completed = None
    for index, cfg in enumerate(candidates):
        try:
            ms = timer(lambda: run(cfg, quiet=True))
        except _SKIPPABLE as exc:
            if index == 0:  # the heuristic: what runs untuned; its failure is the caller's error
                raise
            logger.debug("condlora autotune: %s dropped %s: %s", key_string(key), cfg, exc)
            continue
        last_completed = index
        timings.append((ms, index))
    best_ms, best = min(timings)
    heuristic_ms = timings[0][0]  # the heuristic ran first; its failure raised above
    if best_ms > heuristic_ms * (1.0 - HEURISTIC_MARGIN):
        best_ms, best = heuristic_ms, 0
    if best != last_completed:
        run(candidates[best])
    if logger.isEnabledFor(logging.DEBUG):
        listed = ", ".join(f"{candidates[i]}: {ms:.4f} ms" for ms, i in timings)
        logger.debug("condlora autotune: %s -> %s (%.4f ms; %s)", key_string(key), candidates[best], best_ms, listed)
    return candidates[best]


def run_tuned(key: Key, heuristic: Config, candidates: Callable[[], Sequence[Config]], run: RunFn, *,
              device_type: str, tracing: bool, n_rows: int, timer: Optional[Timer] = None) -> Config:
    """Launch once through `run` with the configuration for `key`, and return that configuration:
    the remembered choice (in memory, or from the file while it is still among `candidates()`); else,
    where this call may measure, the fastest of `candidates()` (remembered and saved); else `heuristic`.
    The caller checks `enabled()` first (the launchers skip the key's cost when tuning is off)."""
    cfg = _CHOSEN.get(key)
    if cfg is None:
        cfg = _from_file(key, candidates)
    if cfg is None:
        if measurement_blocker(device_type, tracing=tracing, n_rows=n_rows) is None:
            cfg = _race(key, candidates(), run, timer or TIMER)
            with _LOCK:
                _CHOSEN[key] = cfg
            _save(key_string(key), cfg.as_dict())
            return cfg
        cfg = heuristic  # not remembered: the next eager call may tune
    run(cfg)
    return cfg


# ==================================================================================================
# the cache
# ==================================================================================================

_LOCK = threading.Lock()
_CHOSEN: dict[Key, Config] = {}  # this process's choices, each validated against its candidates
_FILE_ENTRIES: dict[str, dict] = {}  # what the cache file held when read (as_dict() form), not yet validated
_FILE_READ_FROM: Optional[Path] = None
_UNWRITABLE: set[Path] = set()  # paths a write failed on: in memory only from then on
_WARNED: set[str] = set()


def cache_path() -> Path:
    base = os.environ.get(ENV_CACHE_DIR)
    return Path(base if base else Path.home() / ".cache" / "condlora_kernels") / CACHE_FILE_NAME


def _versions() -> dict:
    return {"format": FORMAT_VERSION, "torch": torch.__version__, "triton": triton.__version__}


def _warn_once(tag: str, message: str) -> None:
    if tag not in _WARNED:
        _WARNED.add(tag)
        warnings.warn(f"condlora_kernels autotune: {message}", stacklevel=4)


def _read_file(path: Path) -> dict[str, dict]:
    """The entries of the cache file at `path`; {} when it is missing, from other versions, or unreadable
    (then one warning)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        _warn_once(str(path), f"cannot read {path} ({exc}); tuning in memory")
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            raise ValueError("not an autotune cache")
        entries = {k: v for k, v in data["entries"].items() if isinstance(v, dict)}
    except ValueError as exc:
        _warn_once(str(path), f"ignoring the corrupt cache file {path} ({exc}); it is rewritten on the next save")
        return {}
    if any(data.get(name) != value for name, value in _versions().items()):
        return {}  # tuned with other versions: their best tiles need not be ours
    return entries


def _from_file(key: Key, candidates: Callable[[], Sequence[Config]]) -> Optional[Config]:
    """The file's choice for `key` if it is still a candidate (then remembered in memory)."""
    global _FILE_READ_FROM
    path = cache_path()
    with _LOCK:
        if _FILE_READ_FROM != path:
            _FILE_ENTRIES.clear()
            _FILE_ENTRIES.update(_read_file(path))
            _FILE_READ_FROM = path
        entry = _FILE_ENTRIES.get(key_string(key))
    if entry is None:
        return None
    cfg = next((c for c in candidates() if c.as_dict() == entry), None)
    if cfg is None:
        return None
    with _LOCK:
        _CHOSEN[key] = cfg
    logger.debug("condlora autotune: %s -> %s (from %s)", key_string(key), cfg, path)
    return cfg


def _save(key_text: str, entry: dict) -> None:
    """Add one entry to the cache file: read it again (other processes tune too), merge, write a
    temporary file beside it and rename it over (readers never see half a file)."""
    path = cache_path()
    with _LOCK:
        _FILE_ENTRIES[key_text] = entry
        if path in _UNWRITABLE:
            return
        entries = _read_file(path)
        entries[key_text] = entry
        temp_name = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp",
                                             delete=False) as f:
                temp_name = f.name
                json.dump({**_versions(), "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(temp_name, path)
        except OSError as exc:
            _UNWRITABLE.add(path)
            _warn_once(str(path), f"cannot write {path} ({exc}); keeping tuned configurations in memory")
            if temp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp_name)


def cache_info() -> dict:
    """What the tuner knows: the cache file's path, whether it can be written, this process's choices
    (key string -> configuration, as the file stores it) and how many entries were read from the file."""
    with _LOCK:
        path = cache_path()
        return {"enabled": enabled(), "path": str(path), "writable": path not in _UNWRITABLE,
                "chosen": {key_string(k): v.as_dict() for k, v in _CHOSEN.items()},
                "file_entries": len(_FILE_ENTRIES) if _FILE_READ_FROM == path else None}


def clear_cache(remove_file: bool = False) -> None:
    """Forget every choice (the next eager call per key tunes again); with `remove_file`, delete the file."""
    global _FILE_READ_FROM
    with _LOCK:
        _CHOSEN.clear()
        _FILE_ENTRIES.clear()
        _FILE_READ_FROM = None
        _UNWRITABLE.clear()
        _WARNED.clear()
        if remove_file:
            try:
                cache_path().unlink()
            except FileNotFoundError:
                pass
