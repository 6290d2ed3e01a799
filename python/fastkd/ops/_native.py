"""Access to the compiled extension ``fastkd._C`` and to Triton, with the reasons when absent.

``import fastkd`` never fails for lack of either: backends that need them report what is missing
when asked for.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

__all__ = [
    "DTYPE_CODES",
    "native",
    "native_error",
    "refuse_native",
    "triton_error",
    "triton_module",
]

# Element type codes shared with csrc/common/dtype.h (enum DType).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@functools.lru_cache(maxsize=None)
def _load_native():
    try:
        return importlib.import_module("fastkd._C"), None
    except ImportError as exc:  # a source checkout without a build, or a broken build
        return None, f"the compiled extension fastkd._C could not be imported ({exc})"


# Why an extension that imported must not be used (a stale build), set by refuse_native.
_refused: str | None = None


def refuse_native(reason: str) -> None:
    """Treats the extension as absent from now on, ``reason`` being what ``native_error``
    reports: its kernels would compute something else than the Python side asks for."""
    global _refused
    _refused = reason


def native():
    """The extension module, or None."""
    return None if _refused else _load_native()[0]


def native_error() -> str | None:
    return _refused or _load_native()[1]


# The oldest Triton whose CPU interpreter was seen running every kernel (3.8.0 and 3.9.0 do;
# 3.2.0, which torch 2.6 installs, fails on loops bounded by a run-time argument). Versions in
# between are untested and refused under the interpreter only: on a GPU Triton compiles.
_OLDEST_INTERPRETER = (3, 8)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@functools.lru_cache(maxsize=None)
def _load_triton():
    try:
        triton = importlib.import_module("triton")
    except ImportError as exc:
        return None, f"triton is not installed ({exc}); pip install 'fastkd[triton]'"
    return triton, None


def triton_module():
    return _load_triton()[0]


def triton_error(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device`` (None if they can)."""
    err = _load_triton()[1]
    if err:
        return err
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        version = getattr(_load_triton()[0], "__version__", "0")
        if _version_tuple(version) < _OLDEST_INTERPRETER:
            return (
                f"Triton {version}'s CPU interpreter is older than the oldest seen running "
                f"fastkd's kernels (3.2's fails on their loops over a run-time vocabulary "
                f"size); {'.'.join(map(str, _OLDEST_INTERPRETER))} and newer can"
            )
        return None
    return (
        f"Triton kernels run on CUDA devices (or on CPU under TRITON_INTERPRET=1, set before "
        f"triton is imported); got device {device}"
    )
