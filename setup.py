"""Build script for the optional C++/CUDA extension `condlora_kernels._C`.

Everything else lives in pyproject.toml. The extension is compiled from whatever `csrc/` holds:
  csrc/*.cpp            CPU kernels and the operator schemas (always, when torch is importable)
  csrc/cuda/*.cpp|*.cu  CUDA kernels (only with a CUDA build of torch and nvcc on the machine)

Environment variables:
  CONDLORA_SKIP_EXT=1          build no extension (the package then runs its Triton and reference backends)
  CONDLORA_CUDA_ARCH="8.0;9.0" CUDA architectures to compile for (default 8.0 and 9.0)
  CONDLORA_NO_CUDA=1           compile the CPU sources only, even where CUDA is available
  MAX_JOBS                     parallel compile jobs (default: chosen from cores and memory)

Build with `pip install --no-build-isolation -e .` so the extension is compiled against the torch
that is installed (build isolation would download a second torch to build against).
"""

import glob
import os
import shutil
import sys
import time

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"[condlora_kernels setup] {msg}", file=sys.stderr)


def _default_max_jobs() -> int:
    """One job per core, but no more than one per 2.5 GB of memory (nvcc jobs peak around 2 GB)."""
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        mem_gb = 8.0
    return max(1, min(cores, int(mem_gb / 2.5)))


def _find_cuda_home():
    """The CUDA toolkit root, or None. A root must hold both bin/nvcc and include/cuda_runtime.h: an nvcc on
    the PATH may be a wrapper script (/usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc), whose
    folder's parent is no toolkit, and torch's own guess is made that way."""
    from torch.utils import cpp_extension

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and \
                os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _nvidia_pip_include_dirs(cuda_home):
    """Headers of the `nvidia-*` pip packages that a CUDA build of torch installs (cuBLAS, cuSPARSE, ...).

    A bare CUDA toolkit may lack the cuBLAS/cuSPARSE headers that ATen's CUDA headers include;
    torch's own pip dependencies ship them. csrc/ does not include those ATen headers, so these folders are
    only a safety net: added only where the toolkit lacks cuBLAS, and after the toolkit's own include folder,
    so that the toolkit's cuda_runtime.h (matching nvcc) wins over a pip copy of another CUDA version.
    """
    if os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return []
    dirs = [os.path.join(cuda_home, "include")]
    for site in sys.path:
        nv = os.path.join(site, "nvidia")
        if os.path.isdir(nv):
            dirs += sorted(glob.glob(os.path.join(nv, "*", "include")))
            dirs += sorted(glob.glob(os.path.join(nv, "cu*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _extensions():
    if os.environ.get("CONDLORA_SKIP_EXT", "0") == "1":
        _say("CONDLORA_SKIP_EXT=1: building no extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not importable at build time: building no extension "
             "(install torch first, then `pip install --no-build-isolation -e .`)")
        return [], {}

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpu_sources:
        _say("csrc/ holds no sources: building no extension")
        return [], {}

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    cxx_flags = ["-O3"]  # no -std: torch's BuildExtension picks the standard its headers need (C++17 or C++20)
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template: without -fopenmp in *this* build it runs on one thread. The
        # libgomp.so.1 this links against is the one torch has already loaded (same soname): one thread pool.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    define_macros = []
    cuda_home = _find_cuda_home()
    with_cuda = (
        bool(cuda_sources)
        and torch.version.cuda is not None
        and cuda_home is not None
        and os.environ.get("CONDLORA_NO_CUDA", "0") != "1"
    )
    if with_cuda:
        os.environ.setdefault("CUDA_HOME", cuda_home)
        cpp_extension.CUDA_HOME = cuda_home
        arch = os.environ.get("CONDLORA_CUDA_ARCH", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        ext = cpp_extension.CUDAExtension(
            name="condlora_kernels._C",
            sources=cpu_sources + cuda_sources,
            include_dirs=[os.path.join(HERE, "csrc")] + _nvidia_pip_include_dirs(cuda_home),
            define_macros=define_macros + [("CONDLORA_WITH_CUDA", "1")],
            # no --use_fast_math: the kernels are memory- and integer-bound, and IEEE division and denormals keep
            # them within rounding of the reference
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
        what = f"CPU + CUDA kernels (arch {arch}, nvcc from {cuda_home})"
    else:
        why = ("torch is a CPU build" if torch.version.cuda is None else
               "nvcc was not found" if cuda_home is None else
               "CONDLORA_NO_CUDA=1" if os.environ.get("CONDLORA_NO_CUDA", "0") == "1" else
               "csrc/cuda holds no sources")
        ext = cpp_extension.CppExtension(
            name="condlora_kernels._C",
            sources=cpu_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
        what = f"CPU kernels only ({why})"
    what = f"{what}, torch {torch.__version__}, MAX_JOBS={os.environ['MAX_JOBS']}"
    return [ext], {"build_ext": _build_ext_reporting(cpp_extension.BuildExtension.with_options(use_ninja=True), what)}


def _build_ext_reporting(build_ext, what: str):
    """build_ext that prints one line saying what it built and how long it took (pip runs this file more than
    once per install, so the line is printed by the build itself rather than when the file is read)."""

    class BuildExtReporting(build_ext):
        def run(self):
            start = time.time()
            super().run()
            _say(f"built condlora_kernels._C: {what}, in {time.time() - start:.0f} s")

    return BuildExtReporting


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
