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
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None and shutil.which("nvcc"):
        home = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))
    return home


def _nvidia_pip_include_dirs():
    """Headers of the `nvidia-*` pip packages that a CUDA build of torch installs (cuBLAS, cuSPARSE, ...).

    A bare CUDA toolkit may lack the cuBLAS/cuSPARSE headers that ATen's CUDA headers include;
    torch's own pip dependencies ship them.
    """
    dirs = []
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
    cxx_flags = ["-O3", "-std=c++17"]
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
            include_dirs=[os.path.join(HERE, "csrc")] + _nvidia_pip_include_dirs(),
            define_macros=define_macros + [("CONDLORA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
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
        )
        what = f"CPU kernels only ({why})"
    _say(f"building condlora_kernels._C: {what}, torch {torch.__version__}, MAX_JOBS={os.environ['MAX_JOBS']}")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
