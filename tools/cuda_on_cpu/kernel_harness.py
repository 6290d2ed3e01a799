"""Python side of the CPU execution of fastkd's CUDA kernels: loads the library that
``build_kernels.py`` makes and calls its entry points through ctypes.

``Harness.native_module(real)`` returns a stand-in for the extension module ``fastkd._C`` whose
CPU kernel entries (``kd_loss_forward_cpu``, ``sample_teacher_cpu``, ``sinkhorn_cpu`` and their
argument structs; the row kernels of fused_linear_logprobs and fused_linear_topk) run the CUDA
launchers instead, with the same fields; everything else is the
real module's. Installed as what ``fastkd.ops._launch`` calls (``native``), it makes fastkd's
public functions with ``backend="cpu"`` execute the CUDA kernels, so that they are checked through
the very code paths that feed them on a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

import torch

from build_kernels import build

__all__ = ["CudaKernelError", "Harness", "load"]


class CudaKernelError(RuntimeError):
    """A CUDA launcher returned an error, or a kernel's execution failed (deadlock, misuse of a
    collective, out-of-range shared memory, fault), with the harness's description."""


_P, _I64, _I32, _F32, _U64 = (
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_int,
    ctypes.c_float,
    ctypes.c_uint64,
)
_BUF = [ctypes.c_char_p, ctypes.c_size_t]

# (name, ctypes type) of each field, in the order of the bindings' constructors.
KD_FIELDS = [
    ("student", _P),
    ("student_dtype", _I32),
    ("s_outer", _I64),
    ("s_inner", _I64),
    ("teacher", _P),
    ("teacher_dtype", _I32),
    ("t_outer", _I64),
    ("t_inner", _I64),
    ("inner_rows", _I64),
    ("n_rows", _I64),
    ("vocab", _I64),
    ("grad_vocab", _I64),
    ("labels", _P),
    ("grad", _P),
    ("loss", _P),
    ("divergence", _I32),
    ("temperature", _F32),
    ("softcap", _F32),
    ("soft_weight", _F32),
    ("hard_weight", _F32),
    ("grad_scale", _F32),
    ("ignore_index", _I64),
    ("log_wp", _F32),
    ("log_wq", _F32),
    ("w_p", _F32),
    ("w_q", _F32),
]
SINKHORN_FIELDS = [
    ("cost", _P),
    ("cost_dtype", _I32),
    ("stride_b", _I64),
    ("stride_i", _I64),
    ("stride_j", _I64),
    ("log_a", _P),
    ("log_b", _P),
    ("n_sizes", _P),
    ("m_sizes", _P),
    ("eps_start", _P),
    ("batch", _I64),
    ("n", _I64),
    ("m", _I64),
    ("eps", _F32),
    ("kappa", _F32),
    ("max_iters", _I32),
    ("check_every", _I32),
    ("tol", _F32),
    ("warm_start", ctypes.c_bool),
    ("f", _P),
    ("g", _P),
    ("iters", _P),
    ("err", _P),
    ("transport", _P),
    ("mass", _P),
    ("eps_final", _P),
    ("plan", _P),
]
SAMPLE_TEACHER_FIELDS = [
    ("logits", _P),
    ("dtype", _I32),
    ("outer_stride", _I64),
    ("inner_stride", _I64),
    ("inner_rows", _I64),
    ("n_rows", _I64),
    ("vocab", _I64),
    ("temperature", _F32),
    ("num_samples", _I32),
    ("seed", _U64),
    ("token_offset", _I64),
    ("ids", _P),
    ("weights", _P),
    ("logprobs", _P),
    ("invalid", _P),
]
LOGPROB_ROWS_FIELDS = [
    ("logits", _P),
    ("row_stride", _I64),
    ("n_rows", _I64),
    ("vocab", _I64),
    ("targets", _P),
    ("row_grads", _P),
    ("logprob", _P),
    ("lse", _P),
    ("entropy", _P),
    ("temperature", _F32),
    ("ignore_index", _I64),
    ("grad_scale", _F32),
]
TOPK_ROWS_FIELDS = [
    ("logits", _P),
    ("row_stride", _I64),
    ("n_rows", _I64),
    ("vocab", _I64),
    ("k", _I64),
    ("ids", _P),
    ("logprobs", _P),
    ("log_tail", _P),
    ("lse", _P),
    ("temperature", _F32),
]


class Harness:
    """The loaded library: device settings, kernel entry points, the launch record."""

    def __init__(self, library: Path):
        self.library = Path(library)
        lib = ctypes.CDLL(str(library))
        self._lib = lib
        lib.cuda_on_cpu_configure.argtypes = [ctypes.c_char_p, ctypes.c_longlong]
        lib.cuda_on_cpu_setting.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_longlong)]
        lib.cuda_on_cpu_take_failure.argtypes = _BUF
        lib.cuda_on_cpu_take_failure.restype = ctypes.c_size_t
        lib.cuda_on_cpu_launch_count.restype = ctypes.c_longlong
        lib.cuda_on_cpu_last_launch.argtypes = [ctypes.POINTER(ctypes.c_longlong), *_BUF]
        lib.cuda_on_cpu_selftest.argtypes = [ctypes.c_char_p, _P, _P, _I32, _I32, _I32]
        lib.fastkd_args_size.argtypes = [ctypes.c_char_p]
        lib.fastkd_args_size.restype = ctypes.c_size_t
        for maker, fields in (
            ("fastkd_make_kd_args", KD_FIELDS),
            ("fastkd_make_sinkhorn_args", SINKHORN_FIELDS),
            ("fastkd_make_sample_teacher_args", SAMPLE_TEACHER_FIELDS),
            ("fastkd_make_logprob_rows_args", LOGPROB_ROWS_FIELDS),
            ("fastkd_make_topk_rows_args", TOPK_ROWS_FIELDS),
        ):
            getattr(lib, maker).argtypes = [_P, *(t for _, t in fields), *_BUF]
        entries = (
            "fastkd_kd_loss_forward_cuda",
            "fastkd_sinkhorn_cuda",
            "fastkd_sample_teacher_cuda",
            "fastkd_fused_linear_logprobs_cuda",
            "fastkd_fused_linear_topk_cuda",
        )
        for entry in entries:
            getattr(lib, entry).argtypes = [_P]
            getattr(lib, entry).restype = ctypes.c_char_p

    # ---- settings and records ----------------------------------------------------------------

    def configure(self, **settings: int) -> None:
        """Sets device and harness settings (names: see ``g_settings`` in runtime.cpp)."""
        for name, value in settings.items():
            if self._lib.cuda_on_cpu_configure(name.encode(), int(value)) != 0:
                raise ValueError(f"unknown cuda_on_cpu setting {name!r}")

    def setting(self, name: str) -> int:
        value = ctypes.c_longlong()
        if self._lib.cuda_on_cpu_setting(name.encode(), ctypes.byref(value)) != 0:
            raise ValueError(f"unknown cuda_on_cpu setting {name!r}")
        return value.value

    @contextlib.contextmanager
    def settings(self, **settings: int):
        """``configure(**settings)`` for the ``with`` block, then the previous values; kernel
        attributes set by cudaFuncSetAttribute are forgotten on both ends."""
        before = {name: self.setting(name) for name in settings}
        self.configure(**settings)
        self._lib.cuda_on_cpu_reset_attributes()
        try:
            yield self
        finally:
            self.configure(**before)
            self._lib.cuda_on_cpu_reset_attributes()

    def take_failure(self) -> str:
        """The description of the first failed launch since the last call ('' if none)."""
        buf = ctypes.create_string_buffer(8192)
        self._lib.cuda_on_cpu_take_failure(buf, len(buf))
        return buf.value.decode(errors="replace")

    def launch_count(self) -> int:
        return self._lib.cuda_on_cpu_launch_count()

    def last_launch(self) -> dict:
        """Geometry of the latest launch: grid, block, cluster (3-tuples), dynamic_smem, kernel."""
        values = (ctypes.c_longlong * 10)()
        name = ctypes.create_string_buffer(1024)
        self._lib.cuda_on_cpu_last_launch(values, name, len(name))
        v = list(values)
        return dict(
            grid=tuple(v[0:3]),
            block=tuple(v[3:6]),
            cluster=tuple(v[6:9]),
            dynamic_smem=v[9],
            kernel=name.value.decode(errors="replace"),
        )

    def _check(self, error: bytes | None, what: str) -> None:
        failure = self.take_failure()
        if error is not None or failure:
            message = error.decode(errors="replace") if error is not None else "launch succeeded"
            raise CudaKernelError(f"{what}: {message}" + (f"\n{failure}" if failure else ""))

    # ---- kernels ----------------------------------------------------------------------------

    def selftest(
        self,
        name: str,
        inputs: torch.Tensor,
        outputs: int,
        *,
        blocks: int,
        threads: int,
        smem: int = 0,
    ) -> torch.Tensor:
        """Runs the self-test kernel ``name`` (selftest.cu) on float32 ``inputs``; returns its
        ``outputs`` float32 results. Raises CudaKernelError when the launch fails."""
        inputs = inputs.to(torch.float32).contiguous()
        out = torch.full((outputs,), float("nan"), dtype=torch.float32)
        self.take_failure()
        rc = self._lib.cuda_on_cpu_selftest(
            name.encode(), inputs.data_ptr(), out.data_ptr(), blocks, threads, smem
        )
        if rc < 0:
            raise ValueError(f"no self-test kernel {name!r}")
        failure = self.take_failure()
        if rc != 0 or failure:
            raise CudaKernelError(f"{name}: error {rc}\n{failure}")
        return out

    def _args(self, maker: str, struct: str, fields: list, values: dict) -> ctypes.Array:
        missing = [name for name, _ in fields if name not in values]
        extra = sorted(set(values) - {name for name, _ in fields})
        if missing or extra:
            raise TypeError(f"{struct}: missing fields {missing}, unknown fields {extra}")
        buf = ctypes.create_string_buffer(self._lib.fastkd_args_size(struct.encode()))
        err = ctypes.create_string_buffer(512)
        ordered = [values[name] for name, _ in fields]
        if getattr(self._lib, maker)(buf, *ordered, err, len(err)) != 0:
            raise ValueError(err.value.decode())
        return buf

    def kd_loss_args(self, **fields) -> ctypes.Array:
        return self._args("fastkd_make_kd_args", "KdLossArgs", KD_FIELDS, fields)

    def sinkhorn_args(self, **fields) -> ctypes.Array:
        return self._args("fastkd_make_sinkhorn_args", "SinkhornArgs", SINKHORN_FIELDS, fields)

    def sample_teacher_args(self, **fields) -> ctypes.Array:
        return self._args(
            "fastkd_make_sample_teacher_args", "SampleTeacherArgs", SAMPLE_TEACHER_FIELDS, fields
        )

    def logprob_rows_args(self, **fields) -> ctypes.Array:
        return self._args(
            "fastkd_make_logprob_rows_args", "LogprobRowsArgs", LOGPROB_ROWS_FIELDS, fields
        )

    def topk_rows_args(self, **fields) -> ctypes.Array:
        return self._args("fastkd_make_topk_rows_args", "TopkRowsArgs", TOPK_ROWS_FIELDS, fields)

    def kd_loss_forward(self, args: ctypes.Array) -> None:
        self.take_failure()
        self._check(self._lib.fastkd_kd_loss_forward_cuda(args), "fastkd CUDA kd_loss")

    def sinkhorn(self, args: ctypes.Array) -> None:
        self.take_failure()
        self._check(self._lib.fastkd_sinkhorn_cuda(args), "fastkd CUDA sinkhorn")

    def sample_teacher(self, args: ctypes.Array) -> None:
        self.take_failure()
        self._check(self._lib.fastkd_sample_teacher_cuda(args), "fastkd CUDA sample_teacher")

    def fused_linear_logprobs(self, args: ctypes.Array) -> None:
        self.take_failure()
        self._check(
            self._lib.fastkd_fused_linear_logprobs_cuda(args), "fastkd CUDA fused_linear_logprobs"
        )

    def fused_linear_topk(self, args: ctypes.Array) -> None:
        self.take_failure()
        self._check(self._lib.fastkd_fused_linear_topk_cuda(args), "fastkd CUDA fused_linear_topk")

    def native_module(self, real):
        """A stand-in for ``fastkd._C`` (``real``) whose CPU kernels of kd_loss, sample_teacher,
        sinkhorn, fused_linear_logprobs and fused_linear_topk run the CUDA kernels here."""
        return _EmulatedNative(self, real)


class _EmulatedNative:
    def __init__(self, harness: Harness, real):
        self._harness = harness
        self._real = real

    def KdLossArgs(self, **fields):  # noqa: N802 (the extension's class name)
        return self._harness.kd_loss_args(**fields)

    def SinkhornArgs(self, **fields):  # noqa: N802
        return self._harness.sinkhorn_args(**fields)

    def kd_loss_forward_cpu(self, args, num_threads):
        self._harness.kd_loss_forward(args)

    def sinkhorn_cpu(self, args, num_threads):
        self._harness.sinkhorn(args)

    def sample_teacher_cpu(self, *, num_threads, **fields):
        self._harness.sample_teacher(self._harness.sample_teacher_args(**fields))

    def LogprobRowsArgs(self, **fields):  # noqa: N802
        return self._harness.logprob_rows_args(**fields)

    def TopkRowsArgs(self, **fields):  # noqa: N802
        return self._harness.topk_rows_args(**fields)

    def fused_linear_logprobs_cpu(self, args, num_threads):
        self._harness.fused_linear_logprobs(args)

    def fused_linear_topk_cpu(self, args, num_threads):
        self._harness.fused_linear_topk(args)

    def __getattr__(self, name):
        return getattr(self._real, name)


def load(out: Path | None = None) -> Harness:
    """Builds (or finds in the cache) the library and loads it."""
    return Harness(build(out))
