"""sinkhorn_solve: the Sinkhorn solver as a torch custom op (``fastkd::sinkhorn_solve``).

Its backends' registration (C++ CPU, CUDA, Triton, plain PyTorch), the launcher that runs one
of them, the fake kernel, and the backend a batch of problems gets (``kernel_backend``).
``fastkd.sinkhorn`` (``solver.py``) and ``sinkhorn_loss`` run it. The iteration every backend
follows is stated in csrc/common/sinkhorn_args.h and, in plain PyTorch, in
``reference/sinkhorn.py``.
"""

from __future__ import annotations

import torch

from ..ops._launch import launch_native
from ..ops._native import DTYPE_CODES
from ..ops._op_args import register_named_fake
from ..ops._registry import (
    accepts,
    native_backend,
    reference_backend,
    register_op,
    resolve_backend,
    supports,
    triton_backend,
)
from ..reference.sinkhorn import sinkhorn_reference
from .problem import Problem

__all__ = ["kernel_backend", "launch_sinkhorn", "sinkhorn_solve"]

# Batched Sinkhorn: one thread (CPU) or one CTA (CUDA) per problem. A streamed feature cost is
# solved by plain PyTorch ops only.
register_op(
    "sinkhorn",
    [
        reference_backend(streams_features=True),
        native_backend("cpu", "sinkhorn_cpu"),
        native_backend("cuda", "sinkhorn_cuda"),
        triton_backend("sinkhorn"),
    ],
    auto={"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")},
)

# Entries per problem from which backend "auto" hands a batch of few problems on a GPU to the
# torch backend (see _few_large_problems_on_gpu).
_LARGE_PROBLEM_ENTRIES = 1 << 20


def launch_sinkhorn(
    cost,
    log_a,
    log_b,
    n_sizes,
    m_sizes,
    eps_start,
    init_g,
    *,
    eps,
    kappa,
    max_iters,
    check_every,
    tol,
    return_plan,
    backend,
):
    """Runs one backend; returns (f, g, iters, err, eps_final, transport, mass, plan)."""
    if backend == "torch":
        s = sinkhorn_reference(
            cost,
            log_a,
            log_b,
            eps=eps,
            max_iters=max_iters,
            tol=tol,
            check_every=check_every,
            eps_start=eps_start,
            kappa=kappa,
            n_sizes=n_sizes,
            m_sizes=m_sizes,
            init_g=init_g,
            return_plan=return_plan,
        )
        plan = s.plan if return_plan else s.f.new_empty(0)
        return s.f, s.g, s.iters, s.err, s.eps.to(s.f.dtype), s.transport, s.mass, plan
    batch, n, m = cost.shape
    device = cost.device
    f = torch.empty(batch, n, dtype=torch.float32, device=device)
    g = torch.zeros(batch, m, dtype=torch.float32, device=device)
    if init_g is not None:
        g.copy_(init_g.expand(batch, m))
    iters = torch.empty(batch, dtype=torch.int32, device=device)
    err, eps_final, transport, mass = (
        torch.empty(batch, dtype=torch.float32, device=device) for _ in range(4)
    )
    plan = torch.empty(batch, n, m, dtype=torch.float32, device=device) if return_plan else None
    log_a = log_a.float().contiguous()
    log_b = log_b.float().contiguous()
    if batch == 0:
        return (
            f,
            g,
            iters,
            err,
            eps_final,
            transport,
            mass,
            (plan if return_plan else f.new_empty(0)),
        )
    if backend == "triton":
        from ..triton.sinkhorn import sinkhorn_forward

        sinkhorn_forward(
            cost,
            log_a,
            log_b,
            n_sizes,
            m_sizes,
            eps_start,
            f,
            g,
            iters,
            err,
            transport,
            mass,
            eps_final,
            plan,
            eps=eps,
            kappa=kappa,
            max_iters=max_iters,
            check_every=check_every,
            tol=tol,
            warm_start=init_g is not None,
        )
    else:
        fields = dict(
            cost=cost,
            cost_dtype=DTYPE_CODES[cost.dtype],
            stride_b=cost.stride(0),
            stride_i=cost.stride(1),
            stride_j=cost.stride(2),
            log_a=log_a,
            log_b=log_b,
            n_sizes=n_sizes,
            m_sizes=m_sizes,
            eps_start=eps_start,
            batch=batch,
            n=n,
            m=m,
            eps=eps,
            kappa=kappa,
            max_iters=max_iters,
            check_every=check_every,
            tol=tol,
            warm_start=init_g is not None,
            f=f,
            g=g,
            iters=iters,
            err=err,
            transport=transport,
            mass=mass,
            eps_final=eps_final,
            plan=plan,
        )
        launch_native("sinkhorn", backend, device, args="SinkhornArgs", **fields)
    return f, g, iters, err, eps_final, transport, mass, plan if return_plan else f.new_empty(0)


@torch.library.custom_op("fastkd::sinkhorn_solve", mutates_args=())
def sinkhorn_solve(
    cost: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    n_sizes: torch.Tensor | None,
    m_sizes: torch.Tensor | None,
    eps_start: torch.Tensor | None,
    init_g: torch.Tensor | None,
    eps: float,
    kappa: float,
    max_iters: int,
    check_every: int,
    tol: float,
    return_plan: bool,
    backend: str,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """(f [B, n], g [B, m], iters [B] int32, err [B], eps_final [B], transport [B], mass [B],
    plan [B, n, m] or empty) of every problem of ``cost [B, n, m]``."""
    return launch_sinkhorn(
        cost,
        log_a,
        log_b,
        n_sizes,
        m_sizes,
        eps_start,
        init_g,
        eps=eps,
        kappa=kappa,
        max_iters=max_iters,
        check_every=check_every,
        tol=tol,
        return_plan=return_plan,
        backend=backend,
    )


def _fake_solve(a):
    batch, n, m = a.cost.shape
    dtype = (
        torch.float64
        if (supports("sinkhorn", a.backend, "float64") and a.cost.dtype == torch.float64)
        else torch.float32
    )
    vec = [a.cost.new_empty(batch, dtype=dtype) for _ in range(4)]
    plan = a.cost.new_empty((batch, n, m) if a.return_plan else (0,), dtype=dtype)
    return (
        a.cost.new_empty(batch, n, dtype=dtype),
        a.cost.new_empty(batch, m, dtype=dtype),
        a.cost.new_empty(batch, dtype=torch.int32),
        vec[0],
        vec[1],
        vec[2],
        vec[3],
        plan,
    )


register_named_fake(sinkhorn_solve, _fake_solve)


def _few_large_problems_on_gpu(c: torch.Tensor) -> bool:
    """True for a batch too small to occupy a GPU's SMs with problems too large for one SM.

    The CUDA and Triton kernels give each problem one CTA (program): a single 4096 x 4096
    problem, such as sinkd_loss's batch-level one, runs on one SM of a hundred-odd and reads
    its 64 MB cost at that SM's bandwidth every half-iteration, while the torch backend spreads
    each half-iteration over the whole GPU. Below about 1M entries per problem a kernel's
    half-iteration should take microseconds, less than the torch backend's launches. The
    threshold comes from that argument, not from a measurement; benchmarks/gpu_check.sh times
    the batch-1 4096 x 4096 case on every backend.
    """
    if c.device.type != "cuda":
        return False
    batch, n, m = c.shape
    sms = torch.cuda.get_device_properties(c.device).multi_processor_count
    return 4 * batch < sms and n * m >= _LARGE_PROBLEM_ENTRIES


def kernel_backend(p: Problem, backend: str) -> str:
    c = p.cost
    name = resolve_backend(
        "sinkhorn",
        backend,
        c.device,
        dtypes=(c.dtype,),
        prefer_reference=_few_large_problems_on_gpu(c),
    )
    if not accepts("sinkhorn", name, dtypes=(c.dtype,)):
        raise ValueError(
            f"backend {name!r} takes float32/bfloat16/float16 costs; got {c.dtype}; "
            f"use backend='torch'"
        )
    return name
