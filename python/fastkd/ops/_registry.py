"""The op registry: which backends run each op, what each of them can do, and ``auto``'s choice.

Every op declares its backends once, by a ``register_op`` call at the top of its own module; the
availability checks (``backend_error``, ``available_backends``), ``backend="auto"`` resolution
(``resolve_backend``), the ops' capability decisions, the benchmark harness and the tests all read
that declaration. Code outside this module asks for a capability (``backend_spec(op,
name).skips_unneeded_grad``, ``accepts(...)``) rather than comparing backend names; only the
launchers, which are a backend's own code path, dispatch on the name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._native import DTYPE_CODES, native, native_error, triton_error

__all__ = [
    "AUTO",
    "BACKENDS",
    "FUSED_DTYPES",
    "REFERENCE",
    "BackendSpec",
    "OpSpec",
    "accepts",
    "available_backends",
    "backend_error",
    "backend_spec",
    "check_backend_name",
    "constant_for_compile",
    "interpreted",
    "kernel_backends",
    "native_backend",
    "ops",
    "reference_backend",
    "register_op",
    "resolve_backend",
    "supports",
    "triton_backend",
]

# Every backend name, in the order available_backends lists those outside an op's auto order.
BACKENDS = ("torch", "cpu", "triton", "cuda")
AUTO = "auto"
# The plain-PyTorch reference: every op has it, on every device.
REFERENCE = "torch"

# The element types of the kernels (csrc/common/dtype.h).
FUSED_DTYPES = tuple(DTYPE_CODES)

# Where each kind of backend runs: the plain-PyTorch reference on any device, a native kernel
# of fastkd._C on the device type named after it, Triton on CUDA (and on CPU in its
# interpreter, which tests keep to small cases and benchmarks do not time).
_NATIVE_DEVICE = {"cpu": "cpu", "cuda": "cuda"}
_TRITON_INTERPRETED_ON = ("cpu",)


@dataclass(frozen=True)
class BackendSpec:
    """One backend of one op and what its kernel can do.

    Attributes:
        name: the backend's name, one of ``BACKENDS``.
        devices: device types it runs on; None for any (the plain-PyTorch reference).
        dtypes: floating-point input dtypes it takes; None for any.
        native_symbol: the entry point of ``fastkd._C`` it launches (native backends).
        triton_module: the module of ``fastkd.triton`` holding its kernel (Triton backends).
        interpreted_on: device types where it runs in an interpreter (Triton on CPU under
            TRITON_INTERPRET=1): correct but orders of magnitude slower.
        is_reference: the plain-PyTorch reference, which ``auto`` falls back to for inputs no
            kernel takes.
        skips_unneeded_grad: the kernel writes no gradient when none is wanted, so the gradient
            buffer may be empty then (the CPU loss kernels; the GPU kernels always write one).
        grad_may_alias_input: the gradient buffer may be the student's logits themselves: the
            kernel reads a row's logits before it writes that row's gradient (not the sparse
            Triton kernel, which re-reads the ids' logits afterwards).
        teacher_grad: a teacher that requires grad gets its gradient (the fused kernels give
            the teacher none, so they refuse one that asks for it).
        float64: float64 inputs run in float64 and give float64 outputs (the kernels compute
            in float32 and do not take float64 at all).
        streams_features: solves a transport problem whose cost is streamed from features
            instead of formed as a tensor (sinkhorn).
    """

    name: str
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = FUSED_DTYPES
    native_symbol: str | None = None
    triton_module: str | None = None
    interpreted_on: tuple[str, ...] = ()
    is_reference: bool = False
    skips_unneeded_grad: bool = False
    grad_may_alias_input: bool = False
    teacher_grad: bool = False
    float64: bool = False
    streams_features: bool = False

    @property
    def needs_triton(self) -> bool:
        """Runs Triton kernels (tests mark such cases ``triton``)."""
        return self.triton_module is not None


def reference_backend(**capabilities) -> BackendSpec:
    """The ``torch`` backend: plain PyTorch on any device and dtype, float64 in float64, the
    teacher's gradient where it asks for one."""
    return BackendSpec(
        REFERENCE,
        devices=None,
        dtypes=None,
        is_reference=True,
        teacher_grad=True,
        float64=True,
        **capabilities,
    )


def native_backend(name: str, symbol: str, **capabilities) -> BackendSpec:
    """A native backend (``cpu`` or ``cuda``) launching ``fastkd._C.<symbol>``."""
    return BackendSpec(name, devices=(_NATIVE_DEVICE[name],), native_symbol=symbol, **capabilities)


def triton_backend(module: str, **capabilities) -> BackendSpec:
    """The ``triton`` backend, its kernel in ``fastkd.triton.<module>``."""
    return BackendSpec(
        "triton",
        devices=("cuda", *_TRITON_INTERPRETED_ON),
        triton_module=module,
        interpreted_on=_TRITON_INTERPRETED_ON,
        **capabilities,
    )


@dataclass(frozen=True)
class OpSpec:
    """An op's backends by name and ``auto``'s preference per device type, best first (device
    types not listed: the reference only)."""

    name: str
    backends: dict[str, BackendSpec]
    auto: dict[str, tuple[str, ...]]


_OPS: dict[str, OpSpec] = {}


def register_op(name: str, backends: list[BackendSpec], auto: dict[str, tuple[str, ...]]) -> OpSpec:
    """Declares op ``name``: its ``backends`` (the reference among them) and ``auto``'s
    preference per device type, every name in it one of ``backends``."""
    if REFERENCE not in {spec.name for spec in backends}:
        raise ValueError(f"op {name!r} needs the reference backend {REFERENCE!r}")
    table = {spec.name: spec for spec in backends}
    unknown = {spec.name for spec in backends} - set(BACKENDS)
    if unknown or len(table) != len(backends):
        raise ValueError(
            f"op {name!r}: backends must be distinct names from {BACKENDS}; got "
            f"{[spec.name for spec in backends]}"
        )
    for device_type, order in auto.items():
        if not set(order) <= set(table):
            raise ValueError(
                f"op {name!r}: auto order {order} on {device_type} names a backend "
                f"the op does not declare"
            )
    spec = OpSpec(name, table, dict(auto))
    _OPS[name] = spec
    return spec


def ops() -> dict[str, OpSpec]:
    """Every registered op by name."""
    return dict(_OPS)


def _op(op: str) -> OpSpec:
    spec = _OPS.get(op)
    if spec is None:
        raise ValueError(f"unknown op {op!r}; known: {sorted(_OPS)}")
    return spec


def backend_spec(op: str, backend: str) -> BackendSpec:
    """The declaration of ``backend`` for ``op`` (ValueError if the op has no such backend)."""
    spec = _op(op).backends.get(backend)
    if spec is None:
        raise ValueError(f"op {op!r} has no backend {backend!r}")
    return spec


def supports(op: str, backend: str, capability: str) -> bool:
    """Whether ``backend`` of ``op`` has ``capability`` (a boolean field of ``BackendSpec``);
    for ``auto``, whether some backend it may choose has it; False for a backend the op does
    not declare or a name that is no backend (those raise later, when resolved)."""
    table = _op(op).backends
    if backend == AUTO:
        return any(getattr(spec, capability) for spec in table.values())
    spec = table.get(backend)
    return spec is not None and bool(getattr(spec, capability))


def accepts(op: str, backend: str, *, dtypes=(), teacher_grad: bool = False) -> bool:
    """Whether ``backend`` of ``op`` takes inputs of ``dtypes`` (and, with ``teacher_grad``, a
    teacher that asks for its gradient)."""
    spec = backend_spec(op, backend)
    if spec.dtypes is not None and any(dtype not in spec.dtypes for dtype in dtypes):
        return False
    return spec.teacher_grad or not teacher_grad


def interpreted(op: str, backend: str, device: str | torch.device) -> bool:
    """Whether ``backend`` of ``op`` runs in an interpreter on ``device`` (slow)."""
    return torch.device(device).type in backend_spec(op, backend).interpreted_on


def check_backend_name(backend) -> None:
    """Raises ValueError unless ``backend`` is ``"auto"`` or one of ``BACKENDS`` (what an op
    takes as its ``backend`` argument)."""
    if backend != AUTO and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {(AUTO,) + BACKENDS}")


def backend_error(op: str, backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device``; None when it can."""
    table = _op(op).backends
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {(AUTO,) + BACKENDS}")
    if backend == REFERENCE:
        return None
    spec = table.get(backend)
    if backend not in _NATIVE_DEVICE:
        if spec is None:
            return f"fastkd has no Triton kernel for {op}"
        return triton_error(device)
    home = _NATIVE_DEVICE[backend]
    if device.type != home:
        return f"backend {backend!r} runs on {home} tensors; got device {device}"
    if home == "cuda" and not torch.cuda.is_available():
        return "backend 'cuda' needs a CUDA device, and torch.cuda.is_available() is False"
    mod = native()
    if mod is None:
        return native_error()
    if spec is None:
        return f"fastkd has no {backend} kernel for {op}"
    if not hasattr(mod, spec.native_symbol):
        if home == "cuda":
            return (
                "fastkd was built without CUDA kernels (no nvcc at build time, or "
                "FASTKD_CUDA=OFF); rebuild with nvcc on PATH"
            )
        return f"the extension lacks {spec.native_symbol}; rebuild fastkd"
    return None


def _preference(op: str, device: torch.device) -> tuple[str, ...]:
    return _op(op).auto.get(device.type, (REFERENCE,))


def available_backends(op: str, device: str | torch.device) -> list[str]:
    """Backends that can run ``op`` on ``device`` here, in ``auto``'s order of preference."""
    _op(op)
    device = torch.device(device)
    order = _preference(op, device)
    rest = [b for b in BACKENDS if b not in order]
    return [b for b in (*order, *rest) if backend_error(op, b, device) is None]


def kernel_backends(
    op: str, device: str | torch.device, *, interpreted_ok: bool = True
) -> list[str]:
    """``available_backends`` without the reference (what benchmarks time as fastkd's own
    kernels, and tests hold to the reference), and without interpreted ones unless
    ``interpreted_ok``."""
    return [
        b
        for b in available_backends(op, device)
        if not backend_spec(op, b).is_reference
        and (interpreted_ok or not interpreted(op, b, device))
    ]


def constant_for_compile(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo``, which
    that function does first: 2.5 s of the 5.5 s an ``import fastkd`` took (2 cores, torch
    2.13), paid by every process whether it compiles or not. The decorator sets one attribute,
    which torch.compile reads when it traces a call of ``fn``; a test holds the two to the same
    result."""
    fn._dynamo_marked_constant = True
    return fn


@constant_for_compile
def _runs_here(op: str, backend: str, device: torch.device) -> bool:
    # A constant for torch.compile: availability does not change while a program runs.
    return backend_error(op, backend, device) is None


# auto's choices by their inputs. A call of a small loss spent 16 us choosing (8 x 64 fp32 logits,
# 2 cores: 308 us in all against 292 us with the earlier fixed tables); a lookup costs < 1 us.
_AUTO_CHOICES: dict[tuple, str] = {}


@constant_for_compile
def _auto_choice(
    op: str, device: torch.device, dtypes: tuple, teacher_grad: bool, prefer_reference: bool
) -> str:
    # A constant for torch.compile, and memoized: availability does not change while a program
    # runs, except when the extension is refused (native_error() is in the key).
    key = (op, device, dtypes, teacher_grad, prefer_reference, native_error())
    choice = _AUTO_CHOICES.get(key)
    if choice is None:
        choice = REFERENCE
        for name in _preference(op, device):
            spec = backend_spec(op, name)
            if prefer_reference and not spec.is_reference:
                continue
            if accepts(op, name, dtypes=dtypes, teacher_grad=teacher_grad) and _runs_here(
                op, name, device
            ):
                choice = name
                break
        _AUTO_CHOICES[key] = choice
    return choice


def resolve_backend(
    op: str,
    backend: str,
    device: torch.device,
    *,
    dtypes=(),
    teacher_grad: bool = False,
    prefer_reference: bool = False,
) -> str:
    """The backend to run: ``auto`` resolved, or the one asked for, checked.

    ``auto`` takes the first backend of the op's preference on ``device`` that is available
    and ``accepts`` the inputs (``dtypes``, ``teacher_grad``), the reference when
    ``prefer_reference`` (the caller knows the kernels to be slower on this problem) or when
    none is. A backend asked for by name is only checked for availability: the op raises its
    own error when it does not accept the inputs.
    """
    if backend == AUTO:
        return _auto_choice(op, device, tuple(dtypes), teacher_grad, prefer_reference)
    if backend not in BACKENDS or not _runs_here(op, backend, device):
        err = backend_error(op, backend, device)
        raise RuntimeError(f"fastkd {op}: backend {backend!r} cannot run here: {err}")
    return backend
