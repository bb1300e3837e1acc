"""Kernels per backend: `triton/` (fused Triton kernels) and `cpp.py` (the C++/CUDA extension `_C`)."""
