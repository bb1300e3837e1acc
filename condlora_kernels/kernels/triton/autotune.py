"""Autotuning of the fused kernels' launch configurations, by measurement.

What is tuned. Each launcher in condlora_linear.py has a heuristic configuration (`_fwd_config`,
`_bwd_config`: the output tile BLOCK_M x BLOCK_N x BLOCK_K, GROUP_M, num_warps, num_stages; for the
backward also how many helper programs do the rank-r row work). On the first eager call for a key
the tuner races a short list of candidates, the heuristic first, then alternatives that suit the H100
(227 KiB of shared memory per block, TMA) and the A100 (164 KiB, sm_80, no TMA), and keeps the fastest,
but an alternative replaces the heuristic only when it is at least HEURISTIC_MARGIN faster: the
heuristic tiles come from full sweeps (benchmarks/NOTES.md), a race times each candidate a few times
without flushing L2, and on the H100 a winner by a few percent was as often slower in the suite
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
  - `CONDLORA_AUTOTUNE=0`, or the Triton interpreter (TRITON_INTERPRET=1), or a configuration override
    in condlora_linear.py (FWD_CONFIG_OVERRIDE, BWD_CONFIG_OVERRIDE, HELPERS_OVERRIDE): the heuristic,
    and the cache is not read either (off means the configuration of the code as written, the same in
    every process);
  - tracing under torch.compile, capturing a CUDA graph, no rows: the cached choice if there is one,
    else the heuristic, and nothing is remembered, so a later eager call still tunes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import triton

logger = logging.getLogger(__name__)

# A launch configuration: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages (the keys of the
# heuristics' dicts), and for the backward HELPER_SCALE, a factor on the heuristic's helper count.
Config = dict
Key = tuple
# How a launcher runs its kernel with one configuration (quiet: no warning when the pipeline is cut).
RunFn = Callable[..., None]
# How long one launch takes, in ms: given a function that launches once.
Timer = Callable[[Callable[[], None]], float]

FORMAT_VERSION = 2  # 2: choices made with HEURISTIC_MARGIN (format 1 entries are raced again)
ENV_SWITCH = "CONDLORA_AUTOTUNE"
ENV_CACHE_DIR = "CONDLORA_CACHE_DIR"
CACHE_FILE_NAME = "autotune.json"

MAX_CANDIDATES = 5
HELPER_SCALES = (0.5, 1.5)  # the backward's helper-count variants, around the heuristic's count
TIMED_RUNS = 7  # per candidate, after one warm-up run that also compiles
TIME_BUDGET_S = 0.5  # timed runs of one candidate stop after this much wall time (at least one run)
HEURISTIC_MARGIN = 0.03  # an alternative must beat the heuristic (the first candidate) by this fraction

# Errors that rule a candidate out of the race rather than fail the call: it does not fit this GPU
# even at one pipeline stage (`_launch` retries with fewer stages first), or this Triton cannot compile
# it. (Triton's own autotuner skips the same.) The heuristic failing is an error as before.
_SKIPPABLE: tuple = tuple(e for e in (triton.runtime.errors.OutOfResources,
                                      getattr(triton.runtime.errors, "PTXASError", None),
                                      triton.compiler.errors.CompilationError) if e is not None)


# ==================================================================================================
# candidates
# ==================================================================================================


def tile(block_m: int, block_n: int, block_k: int, stages: int, warps: int, group_m: int = 8) -> Config:
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=warps,
                num_stages=stages)


def smem_lower_bound(cfg: Config, elem_size: int, helper_loop: dict) -> int:
    """Shared memory a configuration takes at least: the larger of the main loop's pipeline and the
    helper loop's (x rows of the U and V tiles, BLOCK_M x HELPER_BLOCK_K), each at num_stages - 1
    buffers (Triton 3.6-3.8 keep num_stages - 1 on sm_80, num_stages on sm_90). A lower bound: a
    candidate above the GPU's limit cannot fit; one below may still not, and `_launch` then retries
    with fewer stages (or the race drops it)."""
    main = max(1, cfg["num_stages"] - 1) * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"]
    helper = max(1, helper_loop["HELPER_STAGES"] - 1) * cfg["BLOCK_M"] * helper_loop["HELPER_BLOCK_K"]
    return max(main, helper) * elem_size


# Each pool lists its case's heuristic first, then the alternatives; tests/test_triton_autotune.py runs
# every entry on the GPU (bf16 below rank 64 by default, the other pools with
# CONDLORA_TEST_ALL_CANDIDATES=1). From compiling them for sm_80 and sm_90 and racing them on an H100: below
# rank 64 the helper loop's x rows (BLOCK_M x 128 columns, 4 stages) set the shared memory (144 KiB on
# the H100, 108 KiB on sm_80 at BLOCK_M = 128), so a 256-row forward tile fits neither GPU (272 KiB on
# the H100), and the 256-row backward tile the H100 only; backward tiles with 4 warps spill registers.


def forward_pool(dtype: torch.dtype, r_pad: int) -> list[Config]:
    """Alternatives for the forward's Y tiles, in the order the heuristic tells the cases apart:
    ranks of 128 and more keep small tiles and short pipelines (their u and B operands take shared
    memory), float32 keeps BLOCK_K = 32, ranks of 64 keep 128 x 256 to two stages. 128 x 256 x 64 and
    (rank 64, short helper loop) 256 x 128 x 64 are the Hopper tiles, 128 x 128 x 32 in 4 stages with
    4 warps the A100-sized one."""
    if r_pad >= 128:
        return [tile(128, 128, 64, 2, 8), tile(128, 128, 32, 3, 8), tile(64, 128, 64, 2, 4), tile(128, 64, 64, 2, 4)]
    if dtype == torch.float32:
        return [tile(128, 128, 32, 3, 8), tile(128, 128, 32, 4, 8), tile(128, 64, 32, 4, 4), tile(64, 128, 32, 4, 4)]
    if r_pad >= 64:
        return [tile(128, 256, 64, 2, 8), tile(128, 128, 64, 3, 8), tile(256, 128, 64, 2, 8), tile(128, 128, 64, 4, 8),
                tile(128, 128, 32, 4, 4)]
    return [tile(128, 256, 64, 3, 8), tile(128, 128, 64, 3, 8), tile(128, 128, 64, 4, 8), tile(128, 128, 32, 4, 4)]


def backward_pool(dtype: torch.dtype, r_pad: int, has_dropout: bool) -> list[Config]:
    """Alternatives for the backward's DX tiles. As the forward, and: a dropout epilogue holds a second
    float32 tile in registers, so with dropout no tile is larger than 128 x 128; the A100-sized tile
    keeps 8 warps (fewer registers per thread)."""
    if r_pad >= 128:
        return [tile(64, 128, 32, 2, 8), tile(64, 128, 32, 3, 8), tile(128, 128, 32, 2, 8), tile(64, 64, 64, 2, 4)]
    if dtype == torch.float32:
        return [tile(128, 128, 32, 3, 8), tile(128, 128, 32, 4, 8), tile(64, 128, 32, 4, 4), tile(128, 64, 32, 4, 4)]
    large = [] if has_dropout else [tile(128, 256, 64, 2 if r_pad >= 64 else 3, 8)]
    if r_pad >= 64:
        return [tile(128, 128, 64, 2, 8), tile(128, 128, 64, 3, 8), *large, tile(128, 128, 32, 4, 8)]
    wide = [] if has_dropout else [tile(256, 128, 64, 3, 8)]
    return [tile(128, 128, 64, 3, 8), *large, tile(128, 128, 64, 4, 8), *wide, tile(128, 128, 32, 4, 8)]


def _shortlist(first: Sequence[Config], pool: Sequence[Config], dtype: torch.dtype, helper_loop: dict,
               smem_limit: int) -> list[Config]:
    """`first` (the heuristic, kept whatever its size: it is what runs without tuning), then the pool
    entries not yet listed that can fit, up to MAX_CANDIDATES."""
    elem_size = torch.empty(0, dtype=dtype).element_size()
    chosen = list(first)
    for cfg in pool:
        if len(chosen) >= MAX_CANDIDATES:
            break
        if cfg not in chosen and smem_lower_bound(cfg, elem_size, helper_loop) <= smem_limit:
            chosen.append(cfg)
    return chosen


def forward_candidates(heuristic: Config, dtype: torch.dtype, r_pad: int, helper_loop: dict,
                       smem_limit: int) -> list[Config]:
    """The forward's race: the heuristic first, then alternatives from `forward_pool`. `helper_loop` is
    the launcher's HELPER_BLOCK_K and HELPER_STAGES."""
    return _shortlist([dict(heuristic)], forward_pool(dtype, r_pad), dtype, helper_loop, smem_limit)


def backward_candidates(heuristic: Config, dtype: torch.dtype, r_pad: int, has_dropout: bool, helper_loop: dict,
                        smem_limit: int, helpers_at: Callable[[Config], int]) -> list[Config]:
    """The backward's race: the heuristic tile with the heuristic helper count, then the same tile with
    HELPER_SCALES times as many helpers (where the count differs: it is bounded by the row blocks and
    the programs), then other tiles with the heuristic's count. `helpers_at(cfg)` is the helper count
    a configuration launches with."""
    base = dict(heuristic, HELPER_SCALE=1.0)
    first, counts = [base], {helpers_at(base)}
    for scale in HELPER_SCALES:
        variant = dict(heuristic, HELPER_SCALE=scale)
        if helpers_at(variant) not in counts:  # helper count is a runtime argument: no extra compile
            counts.add(helpers_at(variant))
            first.append(variant)
    pool = [dict(cfg, HELPER_SCALE=1.0) for cfg in backward_pool(dtype, r_pad, has_dropout)]
    return _shortlist(first, pool, dtype, helper_loop, smem_limit)


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one block may use on this GPU (opt-in maximum: 227 KiB on an H100)."""
    return _smem_limit(_device_index(device))


# ==================================================================================================
# key
# ==================================================================================================


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


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
    device_name = _device_signature(_device_index(device)) if device.type == "cuda" else device.type
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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def enabled() -> bool:
    """Whether tuning and its cache are on at all: not with CONDLORA_AUTOTUNE=0, not under the interpreter
    (which runs INTERPRETER_CONFIG)."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and not _interpreting()


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
    launch()
    torch.cuda.synchronize()
    times = []
    started = time.perf_counter()
    for _ in range(TIMED_RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if time.perf_counter() - started > TIME_BUDGET_S:
            break
    return statistics.median(times)


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
        listed = ", ".join(f"{_short(candidates[i])}: {ms:.4f} ms" for ms, i in timings)
        logger.debug("condlora autotune: %s -> %s (%.4f ms; %s)", key_string(key), _short(candidates[best]), best_ms,
                     listed)
    return candidates[best]


def _short(cfg: Config) -> str:
    text = (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} g{cfg['GROUP_M']} w{cfg['num_warps']} "
            f"s{cfg['num_stages']}")
    return text + (f" h*{cfg['HELPER_SCALE']:g}" if "HELPER_SCALE" in cfg else "")


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
            _save(key_string(key), cfg)
            return cfg
        cfg = heuristic  # not remembered: the next eager call may tune
    run(cfg)
    return cfg


# ==================================================================================================
# the cache
# ==================================================================================================

_LOCK = threading.Lock()
_CHOSEN: dict[Key, Config] = {}  # this process's choices, each validated against its candidates
_FILE_ENTRIES: dict[str, Config] = {}  # what the cache file held when read, not yet validated
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


def _read_file(path: Path) -> dict[str, Config]:
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
        cfg = _FILE_ENTRIES.get(key_string(key))
    if cfg is None or cfg not in list(candidates()):
        return None
    with _LOCK:
        _CHOSEN[key] = cfg
    logger.debug("condlora autotune: %s -> %s (from %s)", key_string(key), _short(cfg), path)
    return cfg


def _save(key_text: str, cfg: Config) -> None:
    """Add one entry to the cache file: read it again (other processes tune too), merge, write a
    temporary file beside it and rename it over (readers never see half a file)."""
    path = cache_path()
    with _LOCK:
        _FILE_ENTRIES[key_text] = cfg
        if path in _UNWRITABLE:
            return
        entries = _read_file(path)
        entries[key_text] = cfg
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
    (key string -> configuration) and how many entries were read from the file."""
    with _LOCK:
        path = cache_path()
        return {"enabled": enabled(), "path": str(path), "writable": path not in _UNWRITABLE,
                "chosen": {key_string(k): dict(v) for k, v in _CHOSEN.items()},
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
