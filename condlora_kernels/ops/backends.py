"""Backends of the CondLoRA op, and how `backend="auto"` picks one.

A backend is a pair of functions over 2-D activations with the signatures of
`reference.condlora_forward` and `reference.condlora_backward`:

    forward(x2d, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, mode)      -> ForwardOutputs
    backward(grad_y, x2d, weight, theta_a, theta_b, u, lora_a, lora_b,
             scaling, dropout_p, seed, mode, needs)                                     -> BackwardOutputs

plus `unavailable_reason(x)`, which says why it cannot run on these inputs (None when it can). Each
backend module exposes an object with these three attributes (`BACKEND_IMPLS` below names it).
The one autograd Function in `condlora_linear.py` drives all of them, so the chain rule is written once.

    reference  plain torch ops (this file): runs anywhere, the correctness yardstick
    triton     fused Triton kernels (kernels/triton), CUDA tensors; CPU tensors only under TRITON_INTERPRET=1
    cuda       C++/CUDA extension `condlora_kernels._C` (csrc/), CUDA tensors
    cpu        C++ extension `condlora_kernels._C` (csrc/), CPU tensors

`auto` takes cuda (the extension's op), then triton, on CUDA tensors and cpu on CPU tensors; where none of them can run it
uses the reference and warns once, saying why. `CONDLORA_BACKEND=<name>` overrides `auto`.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Optional

import torch

from condlora_kernels import reference
from condlora_kernels._validation import FLOAT_DTYPES

BACKEND_NAMES = ("reference", "triton", "cuda", "cpu")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on these inputs (the message says why)."""


class CondLoRAFallbackWarning(UserWarning):
    """`backend="auto"` found no fused backend and runs the (slower) reference."""


class Backend:
    """A named pair of forward/backward implementations, imported on first use from `module:attribute`.

    `native` backends (cpu, cuda) also run the whole layer as the extension's op `condlora_C::linear` (`linear`),
    whose checks, autocast, dropout seed and autograd are in C++: one call from Python per forward and none per
    backward (docs/design.md §4). The others go through the autograd Function of condlora_linear.py."""

    def __init__(self, name: str, location: str, native: bool = False):
        self.name = name
        self.native = native
        self._location = location
        self._impl = None
        self._import_error: Optional[str] = None
        self._linear: Optional[Callable] = None

    @property
    def linear(self) -> Optional[Callable]:
        """torch.ops.condlora_C.linear.default, looked up once, when the backend loads: it is on every call's path,
        and a lookup memoised during a torch.compile trace would be guarded on (a recompilation once it is set)."""
        return self._linear

    def _load(self):
        if self._impl is None and self._import_error is None:
            module_name, attribute = self._location.split(":")
            try:
                self._impl = getattr(importlib.import_module(module_name), attribute)
            except Exception as exc:  # a missing extension or a broken Triton install: report, don't crash
                self._import_error = f"{type(exc).__name__}: {exc}"
            if self.native and self._impl is not None:
                self._linear = native_linear_op()
        return self._impl

    def unavailable_reason(self, x: torch.Tensor) -> Optional[str]:
        impl = self._load()
        if impl is None:
            return f"the {self.name} backend could not be loaded ({self._import_error})"
        return impl.unavailable_reason(x)

    @property
    def forward(self) -> Callable:
        return self._load().forward

    @property
    def backward(self) -> Callable:
        return self._load().backward


class ReferenceBackend:
    """The reference backend: the math of reference.py in plain torch ops, traceable by torch.compile."""

    forward = staticmethod(reference.condlora_forward)
    backward = staticmethod(reference.condlora_backward)

    @staticmethod
    def unavailable_reason(x: torch.Tensor) -> Optional[str]:
        return None


BACKEND_IMPLS = {
    "reference": "condlora_kernels.ops.backends:ReferenceBackend",
    "triton": "condlora_kernels.kernels.triton.condlora_linear:TritonBackend",
    "cuda": "condlora_kernels.kernels.cpp:CudaBackend",
    "cpu": "condlora_kernels.kernels.cpp:CpuBackend",
}
BACKENDS = {name: Backend(name, location, native=name in ("cpu", "cuda")) for name, location in BACKEND_IMPLS.items()}


def native_linear_op() -> Optional[Callable]:
    """torch.ops.condlora_C.linear.default where the extension loaded, else None."""
    if BACKENDS["cpu"]._load() is None:
        return None
    from condlora_kernels.kernels import cpp

    return torch.ops.condlora_C.linear.default if cpp.LOAD_ERROR is None else None



def preload_backends() -> None:
    """Import now the backends that `backend="auto"` can pick on this machine, rather than on first use:
    torch.compile cannot trace an import, so a model compiled before any eager call would break its graph
    there (an error under fullgraph=True). The C++ extension loads in milliseconds; Triton's module takes
    about a second, so only where a GPU is. The reference is the fallback of them all."""
    for name in ("reference", "cpu", "cuda") + (("triton",) if torch.cuda.is_available() else ()):
        BACKENDS[name]._load()


_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, CondLoRAFallbackWarning, stacklevel=4)


def check_backend_name(name: str) -> str:
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {name!r}")
    return name


def select_backend(requested: str, x: torch.Tensor) -> Backend:
    """Resolve `requested` ("auto" or a backend name) to a backend that can run on x."""
    check_backend_name(requested)
    if requested == "auto":
        override = os.environ.get("CONDLORA_BACKEND", "auto")
        if override not in ("", "auto"):
            if override not in BACKEND_NAMES:
                raise ValueError(f"CONDLORA_BACKEND must be 'auto' or one of {BACKEND_NAMES}, got {override!r}")
            requested = override
    if requested != "auto":
        backend = BACKENDS[requested]
        reason = backend.unavailable_reason(x)
        if reason is not None:
            raise BackendUnavailableError(f"backend={requested!r} cannot run here: {reason}")
        return backend

    # On CUDA the extension's op first: on the H200 it was as fast as the Triton kernels or faster at every
    # benchmarked shape of a training step (8192 x 768^2 r=8, Llama-7B-like projections, r=64) within the
    # run-to-run spread, and its host cost per call is the lowest (benchmarks/NOTES.md, docs/design.md §4).
    candidates = ("cuda", "triton") if x.device.type == "cuda" else ("cpu",)
    reasons = []
    for name in candidates:
        reason = BACKENDS[name].unavailable_reason(x)
        if reason is None:
            return BACKENDS[name]
        reasons.append(f"{name}: {reason}")
    _warn_once(f"condlora_kernels: no fused backend can run on {x.device.type} tensors of dtype {x.dtype} "
               f"({'; '.join(reasons)}); using the reference backend, which is slower")
    return BACKENDS["reference"]


# resolve_backend's choices, under two kinds of key: (request, CONDLORA_BACKEND, device, dtype, autocast dtype), and
# (request, CONDLORA_BACKEND, device type) once the extension's backend is chosen for that device type: it runs
# every floating dtype, under autocast or not (its op casts), and refuses other dtypes itself with a TypeError, so a
# call on that route needs neither x's dtype nor the autocast state
_RESOLVED: dict = {}


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for this device type (False for meta, which autocast does not know: asking raises).
    Not torch.amp.is_autocast_available: Dynamo before torch 2.14 cannot trace it (a graph break per call)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def _choose(requested: str, x: torch.Tensor) -> Backend:
    """select_backend on the dtype the kernels will see: the autocast dtype under autocast."""
    device_type = x.device.type
    autocast = torch.get_autocast_dtype(device_type) if autocast_on(device_type) else None
    cast = autocast is not None and x.dtype != torch.float64 and x.is_floating_point()
    return select_backend(requested, torch.empty(0, device=x.device, dtype=autocast) if cast else x)


def resolve_backend(requested: str, x: torch.Tensor) -> Backend:
    """select_backend for a call, remembered in `_RESOLVED`: the per-call cost is one dictionary lookup by (request,
    CONDLORA_BACKEND, device type) where the extension's backend was chosen for the device type (a layer's eager
    call is host-bound: every step of this path counts, benchmarks/NOTES.md), else two. Bad names are refused on
    every call, before the lookup. While torch.compile traces, the choice is made without the dictionary (a traced
    lookup would make Dynamo guard on it, and the first eager call that fills it would then recompile the graph)."""
    if torch.compiler.is_compiling():
        return _choose(requested, x)
    override = os.environ.get("CONDLORA_BACKEND", "")
    device = x.device
    route = (requested, override, device.type)
    backend = _RESOLVED.get(route)
    if backend is not None:
        return backend
    autocast = torch.get_autocast_dtype(device.type) if autocast_on(device.type) else None
    key = (requested, override, device, x.dtype, autocast)
    backend = _RESOLVED.get(key)
    if backend is None:
        backend = _RESOLVED[key] = _choose(requested, x)
        if backend.native and x.is_floating_point():
            _RESOLVED[route] = backend
    return backend


def available_backends(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """{backend name: None if it can run on `device`/`dtype`, else the reason it cannot}. On a device this machine
    does not have ("cuda" without a GPU, "cuda:3" on a machine with one), every backend gets that as its reason."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must name a torch device ('cpu', 'cuda', 'cuda:1', ...), got {device!r}") from exc
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (torch.float32, torch.bfloat16, ...), got {dtype!r}")
    if dtype not in FLOAT_DTYPES:
        return dict.fromkeys(BACKENDS, f"the op takes floating tensors (float16, bfloat16, float32, float64), got "
                                       f"{dtype}")
    try:
        probe = torch.empty(0, device=device, dtype=dtype)
    except (RuntimeError, AssertionError) as exc:  # no driver, no such device index, a torch built without CUDA
        reason = f"no tensor can be made on {device} here ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})"
        return dict.fromkeys(BACKENDS, reason)
    return {name: backend.unavailable_reason(probe) for name, backend in BACKENDS.items()}
