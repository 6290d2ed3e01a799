"""Backend names, availability and the choice made by ``backend="auto"``."""

from __future__ import annotations

import torch

from ._native import native, native_error, triton_error

__all__ = ["BACKENDS", "available_backends", "backend_error", "resolve_backend"]

BACKENDS = ("torch", "cpu", "triton", "cuda")

# Preference of backend="auto" per op and device type, best first. Set from the benchmark
# harness (`fastkd bench`): on CPU the C++ kernel beats torch eager and torch.compile; on CUDA
# see benchmarks/results/ for the CUDA-vs-Triton comparison.
AUTO_ORDER = {
    "kd_loss": {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")},
    # The row kernel of the chunked lm_head + loss: the same kernels as kd_loss.
    "fused_linear_kd_loss": {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")},
    # Sampling: the native kernels first (the same draws on every backend).
    "sample_teacher": {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")},
    "sparse_kd_loss": {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")},
    # Batched Sinkhorn: one thread (CPU) or one CTA (CUDA) per problem.
    "sinkhorn": {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")},
    # sample_teacher(method="priority"): a native kernel on CPU, plain PyTorch elsewhere.
    "priority_sample": {"cpu": ("cpu", "torch"), "cuda": ("torch",)},
    # uld_loss (sorted-probability L1): a native kernel on CPU; on CUDA torch.sort and a
    # Triton kernel over the sorted rows, first for its bounded memory (the plain-PyTorch
    # reference keeps tens of bytes per element); its speed on a GPU is not yet measured.
    "uld_loss": {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")},
}

# Ops with a Triton kernel.
_TRITON_OPS = {"kd_loss", "fused_linear_kd_loss", "sample_teacher", "sparse_kd_loss", "sinkhorn",
               "uld_loss"}

# Native entry point each op needs, per backend.
_NATIVE_SYMBOL = {
    ("kd_loss", "cpu"): "kd_loss_forward_cpu",
    ("kd_loss", "cuda"): "kd_loss_forward_cuda",
    ("fused_linear_kd_loss", "cpu"): "kd_loss_forward_cpu",
    ("fused_linear_kd_loss", "cuda"): "kd_loss_forward_cuda",
    ("sample_teacher", "cpu"): "sample_teacher_cpu",
    ("sample_teacher", "cuda"): "sample_teacher_cuda",
    ("sparse_kd_loss", "cpu"): "sparse_kd_loss_forward_cpu",
    ("sinkhorn", "cpu"): "sinkhorn_cpu",
    ("sinkhorn", "cuda"): "sinkhorn_cuda",
    ("priority_sample", "cpu"): "priority_sample_cpu",
    ("uld_loss", "cpu"): "uld_loss_forward_cpu",
}


def backend_error(op: str, backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device``; None when it can."""
    if op not in AUTO_ORDER:
        raise ValueError(f"unknown op {op!r}; known: {sorted(AUTO_ORDER)}")
    if backend == "torch":
        return None
    if backend == "triton":
        if op not in _TRITON_OPS:
            return f"fastkd has no Triton kernel for {op}"
        return triton_error(device)
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return f"backend {backend!r} runs on {backend} tensors; got device {device}"
        if backend == "cuda" and not torch.cuda.is_available():
            return "backend 'cuda' needs a CUDA device, and torch.cuda.is_available() is False"
        mod = native()
        if mod is None:
            return native_error()
        symbol = _NATIVE_SYMBOL.get((op, backend))
        if symbol is None:
            return f"fastkd has no {backend} kernel for {op}"
        if not hasattr(mod, symbol):
            if backend == "cuda":
                return ("fastkd was built without CUDA kernels (no nvcc at build time, or "
                        "FASTKD_CUDA=OFF); rebuild with nvcc on PATH")
            return f"the extension lacks {symbol}; rebuild fastkd"
        return None
    raise ValueError(f"unknown backend {backend!r}; choose from {('auto',) + BACKENDS}")


def available_backends(op: str, device: str | torch.device) -> list[str]:
    """Backends that can run ``op`` on ``device`` here, in ``auto``'s order of preference."""
    if op not in AUTO_ORDER:
        raise ValueError(f"unknown op {op!r}; known: {sorted(AUTO_ORDER)}")
    device = torch.device(device)
    order = AUTO_ORDER[op].get(device.type, ("torch",))
    rest = [b for b in BACKENDS if b not in order]
    return [b for b in (*order, *rest) if backend_error(op, b, device) is None]


@torch.compiler.assume_constant_result
def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """The backend to run: ``auto`` resolved, or the one asked for, checked.

    A constant for torch.compile: availability does not change while a program runs.
    """
    if backend == "auto":
        for name in AUTO_ORDER[op].get(device.type, ("torch",)):
            if backend_error(op, name, device) is None:
                return name
        return "torch"
    err = backend_error(op, backend, device)
    if err:
        raise RuntimeError(f"fastkd {op}: backend {backend!r} cannot run here: {err}")
    return backend
