"""Kernel-level benchmark: one point (provider, shape, mode, dtype) -> result rows.

A row is one measurement, self-describing as Liger-Kernel's CSV rows are (device name and versions in
each): provider, shape, mode, dtype, timer, median ms, ratio to the frozen layer's same step, TFLOP/s,
GB/s, peak memory, and a status: "ok", "skipped" (cannot run here), "n/a" (not for this shape) or
"error" (it raised: the message is kept and the run goes on).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from condlora_kernels.bench import report
from condlora_kernels.bench.providers import (DTYPES, PROVIDER_NAMES, PROVIDERS, Unavailable, build_step,
                                              byte_count, flop_count, fresh_leaves, make_inputs, rotation_sets)
from condlora_kernels.bench.shapes import MODES, KernelShape, Settings
from condlora_kernels.bench.timing import cudagraph_median_ms, median_ms, peak_memory_bytes


@dataclass
class Point:
    rows: list  # the main row first, then CUDA-graph rows if any
    step: Optional[Callable[[], object]] = None  # the timed step, for pytest-benchmark's own rounds

    @property
    def row(self) -> dict:
        return self.rows[0]


def error_message(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + " ..."


@dataclass
class KernelSuite:
    """Measures points on one device and keeps the rows; the frozen layer's times give the ratios."""

    device: torch.device
    settings: Settings
    rows: list = field(default_factory=list)
    _frozen_ms: dict = field(default_factory=dict)  # (shape, mode, dtype, timer, repeat) -> ms
    _frozen_tried: set = field(default_factory=set)
    _inputs: tuple = (None, None)  # (key, input sets): one shape's inputs at a time, to bound memory

    def __post_init__(self):
        self.device = torch.device(self.device)
        self._env = report.row_environment(self.device)

    def plan(self, providers=PROVIDER_NAMES, modes=MODES) -> list:
        """Every (provider, shape, mode, dtype) of the settings, frozen first in each shape."""
        providers = ["frozen"] + [p for p in providers if p != "frozen"]
        return [(p, shape, mode, dtype) for dtype in self.settings.dtypes for shape in self.settings.shapes
                for p in providers for mode in modes]

    def input_sets(self, shape: KernelShape, dtype: str) -> list:
        key = (shape, dtype)
        if self._inputs[0] != key:
            self._inputs = (None, None)  # free the previous shape's inputs first
            gc.collect()
            torch_dtype = DTYPES[dtype]
            sets = make_inputs(shape, torch_dtype, self.device, rotation_sets(shape, torch_dtype, self.device))
            self._inputs = (key, sets)
        return self._inputs[1]

    def measure(self, provider: str, shape: KernelShape, mode: str, dtype: str) -> Point:
        """Time one point (and its CUDA-graph repeats on launch-bound shapes); append and return its rows."""
        if provider != "frozen" and (shape.key, mode, dtype) not in self._frozen_tried:
            self.measure("frozen", shape, mode, dtype)  # the ratio's denominator
        if provider == "frozen":
            self._frozen_tried.add((shape.key, mode, dtype))
        spec = PROVIDERS[provider]
        row = {"provider": provider, "description": spec.description, "shape": shape.key, "n": shape.n,
               "d_in": shape.d_in, "d_out": shape.d_out, "r": shape.r, "gen_mode": shape.mode, "note": shape.note,
               "mode": mode, "dtype": dtype, "timer": self._main_timer, "repeat": 0, "median_ms": None,
               "ratio_to_frozen": None, "tflops": None, "gbps": None, "peak_mem_bytes": None, "n_input_sets": None,
               "status": "ok", "reason": "", **self._env}
        point = Point([row])
        torch_dtype = DTYPES[dtype]
        try:
            spec.check(shape, self.device, torch_dtype)
            if provider == "paper_code_compiled" and not self.settings.compile:
                raise Unavailable("skipped", "torch.compile provider off in these settings (compile time; "
                                  "`condlora bench --compile` turns it on)")
            sets = self.input_sets(shape, dtype)
            row["n_input_sets"] = len(sets)
            step = build_step(spec, shape, sets, mode)
            step()  # first call: compiles, autotunes, allocates, outside the timing
            self._sync()
            ms = median_ms(step, self.device, self.settings)
            peak = peak_memory_bytes(step, self.device)
        except Unavailable as exc:
            row.update(status=exc.status, reason=exc.reason)
        except Exception as exc:  # recorded as an error row; the run goes on
            row.update(status="error", reason=error_message(exc))
            self._recover()
        else:
            point.step = step
            row.update(self._figures(spec.kind, shape, mode, torch_dtype, ms), peak_mem_bytes=peak)
            self._set_ratio(row)
            if self.settings.cudagraph and shape.launch_bound and self.device.type == "cuda":
                # fresh leaves, first used on the capture stream (providers.fresh_leaves says why)
                point.rows += self._cudagraph_rows(row, lambda: build_step(spec, shape, fresh_leaves(sets), mode),
                                                   spec.kind, shape, mode, torch_dtype)
        self.rows += point.rows
        return point

    @property
    def _main_timer(self) -> str:
        return "do_bench" if self.device.type == "cuda" else "cpu"

    def _figures(self, kind, shape, mode, dtype, ms) -> dict:
        seconds = ms * 1e-3
        return {"median_ms": ms, "tflops": flop_count(kind, shape, mode) / seconds / 1e12,
                "gbps": byte_count(shape, mode, dtype) / seconds / 1e9}

    def _set_ratio(self, row: dict) -> None:
        key = (row["shape"], row["mode"], row["dtype"], row["timer"], row["repeat"])
        if row["provider"] == "frozen":
            self._frozen_ms[key] = row["median_ms"]
        frozen = self._frozen_ms.get(key)
        row["ratio_to_frozen"] = row["median_ms"] / frozen if frozen else None

    def _cudagraph_rows(self, row, make_step, kind, shape, mode, dtype) -> list:
        """The same step replayed from a CUDA graph, repeated: launch overhead gone, and noisy at these sizes."""
        rows = []
        for repeat in range(self.settings.cudagraph_repeats):
            graph_row = dict(row, timer="cudagraph", repeat=repeat, peak_mem_bytes=None)
            try:
                ms = cudagraph_median_ms(make_step, self.settings)
            except Exception as exc:
                graph_row.update(status="error", reason=error_message(exc), median_ms=None, tflops=None, gbps=None,
                                 ratio_to_frozen=None)
                self._recover()
                rows.append(graph_row)
                break  # a step that cannot be captured will not be captured on the next repeat either
            graph_row.update(self._figures(kind, shape, mode, dtype, ms))
            self._set_ratio(graph_row)
            rows.append(graph_row)
        return rows

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _recover(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
