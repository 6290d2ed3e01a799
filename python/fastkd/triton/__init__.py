"""Triton kernels, one file per op family (imported lazily: triton is optional)."""
