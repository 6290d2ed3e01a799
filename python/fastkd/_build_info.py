"""fastkd.build_info(): what this installation compiled and can import."""

from __future__ import annotations

import torch

from .ops._native import native, native_error, triton_module

__all__ = ["build_info"]


def build_info() -> dict:
    """Compiled kernels and versions.

    Keys: ``version``, ``torch``, ``cpu_kernels`` (bool), ``cpu_isa`` (level picked at run time),
    ``cpu_isa_builds``, ``cuda_kernels`` (bool), ``cuda_archs`` (list of compute capabilities
    compiled), ``cuda_compiler``, ``cuda_available`` (a device is visible now), ``triton``
    (version or None), ``compiler``, ``extension_error`` (why fastkd._C did not import, or None).
    """
    from . import __version__

    mod = native()
    info = dict(mod.BUILD_INFO) if mod is not None else {}
    triton = triton_module()
    archs = info.get("cuda_archs", "")
    return {
        "version": __version__,
        "torch": torch.__version__,
        "cpu_kernels": mod is not None,
        "cpu_isa": info.get("cpu_isa"),
        "cpu_isa_builds": list(info.get("cpu_isa_builds", ())),
        "cuda_kernels": bool(info.get("cuda", False)),
        "cuda_archs": [a for a in archs.split(",") if a],
        "cuda_compiler": info.get("cuda_compiler_version") or None,
        "cuda_available": torch.cuda.is_available(),
        "triton": getattr(triton, "__version__", None) if triton is not None else None,
        "compiler": info.get("compiler"),
        "extension_error": native_error(),
    }
