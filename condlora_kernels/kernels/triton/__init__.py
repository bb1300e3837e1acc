"""Fused Triton kernels (imported lazily by ops/backends.py: importing triton is slow)."""
