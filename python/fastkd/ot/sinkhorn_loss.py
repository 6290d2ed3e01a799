"""sinkhorn_loss: the entropic OT value of a batch of problems, differentiable w.r.t. the cost
(or the features of a named cost) and the marginals.

The default gradient is a custom op whose backward rebuilds the plan from the saved potentials
(envelope theorem: O(n + m) saved per problem, not the plan); ``grad="unrolled"`` differentiates
through the plain-PyTorch iterations instead.
"""

from __future__ import annotations

import torch

from ..ops._op_args import OpArgs, register_named_fake
from ..ops._registry import supports
from ..reference.sinkhorn import log_weights, plan_from_potentials, sinkhorn_reference, valid_mask
from .features import solve_streamed, streamed_ot_value
from .problem import Problem, check_options, max_abs_cost, prepare_problem, streamed_cost
from .solver import dual_objective, kernel_backend, launch_sinkhorn

__all__ = ["GRADS", "VALUES", "sinkhorn_loss", "sinkhorn_loss_envelope"]

VALUES = ("objective", "transport")
GRADS = ("envelope", "unrolled")


@torch.library.custom_op("fastkd::sinkhorn_loss_envelope", mutates_args=())
def sinkhorn_loss_envelope(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    n_sizes: torch.Tensor | None,
    m_sizes: torch.Tensor | None,
    eps_start: torch.Tensor | None,
    eps: float,
    kappa: float,
    max_iters: int,
    check_every: int,
    tol: float,
    value: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [B], f [B, n], g [B, m], eps_final [B]): the value of every problem and the
    potentials its backward rebuilds the plan from."""
    f, g, _, _, e, transport, mass, _ = launch_sinkhorn(
        cost,
        log_weights(a),
        log_weights(b),
        n_sizes,
        m_sizes,
        eps_start,
        None,
        eps=eps,
        kappa=kappa,
        max_iters=max_iters,
        check_every=check_every,
        tol=tol,
        return_plan=False,
        backend=backend,
    )
    loss = transport if value == "transport" else dual_objective(a, b, f, g, mass, e)
    return loss.to(f.dtype), f, g, e


def _fake_envelope(args):
    batch, n, m = args.cost.shape
    dtype = (
        torch.float64
        if (supports("sinkhorn", args.backend, "float64") and args.cost.dtype == torch.float64)
        else torch.float32
    )
    return (
        args.cost.new_empty(batch, dtype=dtype),
        args.cost.new_empty(batch, n, dtype=dtype),
        args.cost.new_empty(batch, m, dtype=dtype),
        args.cost.new_empty(batch, dtype=dtype),
    )


register_named_fake(sinkhorn_loss_envelope, _fake_envelope)
_ENVELOPE_ARGS = OpArgs(sinkhorn_loss_envelope)


def _loss_setup_context(ctx, inputs, output):
    args = _ENVELOPE_ARGS.bind(inputs)
    cost, a, b, n_sizes, m_sizes = args.cost, args.a, args.b, args.n_sizes, args.m_sizes
    ctx.value = args.value
    _, f, g, e = output
    ctx.save_for_backward(cost, a, b, n_sizes, m_sizes, f, g, e)
    ctx.mark_non_differentiable(f, g, e)


def _loss_backward(ctx, grad_loss, grad_f, grad_g, grad_e):
    # Envelope theorem: at the optimum, d/dC = P, d/da_i = f_i + e (sum b - 1) and
    # d/db_j = g_j + e (sum a - 1) (derivatives of the dual value; the potentials' constant
    # shift leaves mass-preserving directions unchanged). With value="transport" the plan is
    # held fixed: d/dC = P and no gradient to the marginals.
    cost, a, b, n_sizes, m_sizes, f, g, e = ctx.saved_tensors
    batch, n, m = cost.shape
    go = grad_loss.to(f.dtype)
    grad_cost = grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        rows = valid_mask(n_sizes, batch, n, cost.device)
        cols = valid_mask(m_sizes, batch, m, cost.device)
        inside = rows[:, :, None] & cols[:, None, :]
        c = torch.where(inside, cost.to(f.dtype), 0.0)
        plan = plan_from_potentials(
            c, f, g, log_weights(a.to(f.dtype)), log_weights(b.to(f.dtype)), e
        )
        grad_cost = (go[:, None, None] * torch.where(inside, plan, 0.0)).to(cost.dtype)
    if ctx.value == "objective":
        if ctx.needs_input_grad[1]:
            grad_a = (go[:, None] * (f + (e * (b.to(f.dtype).sum(1) - 1))[:, None])).to(a.dtype)
            grad_a = torch.where(valid_mask(n_sizes, batch, n, a.device), grad_a, 0.0)
        if ctx.needs_input_grad[2]:
            grad_b = (go[:, None] * (g + (e * (a.to(f.dtype).sum(1) - 1))[:, None])).to(b.dtype)
            grad_b = torch.where(valid_mask(m_sizes, batch, m, b.device), grad_b, 0.0)
    return grad_cost, grad_a, grad_b, *(None,) * (len(_ENVELOPE_ARGS) - 3)


sinkhorn_loss_envelope.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def _unrolled_value(p: Problem, *, eps, max_iters, tol, check_every, eps_start, kappa, value):
    """The value, differentiable through the iterations (the plain-PyTorch loop under
    autograd)."""
    loop = dict(
        eps=eps,
        max_iters=max_iters,
        tol=tol,
        check_every=check_every,
        eps_start=eps_start,
        kappa=kappa,
    )
    if p.cost is None:
        s = solve_streamed(
            streamed_cost(p),
            log_weights(p.a),
            log_weights(p.b),
            init_g=None,
            return_plan=False,
            **loop,
        )
    else:
        s = sinkhorn_reference(
            p.cost, log_weights(p.a), log_weights(p.b), n_sizes=p.n_sizes, m_sizes=p.m_sizes, **loop
        )
    if value == "transport":
        return s.transport
    return dual_objective(p.a, p.b, s.f, s.g, s.mass, s.eps.to(s.f.dtype))


def sinkhorn_loss(
    cost,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float = 0.1,
    max_iters: int = 1000,
    tol: float = 1e-6,
    eps_scaling: float | None = None,
    check_every: int = 10,
    n_sizes=None,
    m_sizes=None,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    value: str = "objective",
    grad: str = "envelope",
    validate: bool = True,
    stream_cost: bool | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Entropic OT value of every problem, differentiable w.r.t. the cost (or the features
    ``x``, ``y`` of a named cost) and the marginals.

    Arguments as ``sinkhorn``, plus:
        value: ``"objective"`` (default): the entropic objective
            OT_eps = <P, C> + eps KL(P || a b^T), computed as the dual value
            sum a f + sum b g - eps (sum P - sum a sum b) at the final potentials;
            ``"transport"``: <P, C> alone (SinKD's and MultiLevelOT's loss).
        grad: ``"envelope"`` (default): gradients from the saved potentials, O(n + m) memory
            per problem: dOT_eps/dC = P, dOT_eps/da = f + eps (sum b - 1) (exact at
            convergence), dOT_eps/db likewise; for ``value="transport"`` the plan is held
            fixed (d/dC = P, nothing to a, b), as SinKD and POT's envelope mode do.
            ``"unrolled"``: autograd through every iteration of the plain-PyTorch solver
            (memory grows with the iterations; any backend argument is ignored).

    Returns:
        ``[B]`` (or a scalar for an ``[n, m]`` cost): float32 (float64 for a float64 cost), in
        the units of the cost times mass.
    """
    if value not in VALUES:
        raise ValueError(f"value must be one of {VALUES}; got {value!r}")
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}; got {grad!r}")
    check_options(eps, max_iters, tol, check_every, eps_scaling)
    p = prepare_problem(cost, a, b, n_sizes, m_sizes, x, y, validate, stream_cost, backend)
    kappa = 0.5 if eps_scaling is None else float(eps_scaling)
    loop = dict(
        eps=float(eps),
        max_iters=int(max_iters),
        tol=float(tol),
        check_every=int(check_every),
        kappa=kappa,
    )
    if p.cost is None:
        ops = streamed_cost(p)
        with torch.no_grad():
            eps_start = None if eps_scaling is None else ops.max_abs_cost()
    else:
        eps_start = (
            None if eps_scaling is None else max_abs_cost(p.cost.detach(), p.n_sizes, p.m_sizes)
        )
    if grad == "unrolled":
        loss = _unrolled_value(p, eps_start=eps_start, value=value, **loop)
    elif p.cost is None:
        loss = streamed_ot_value(
            ops, p.a, p.b, value=value, objective_fn=dual_objective, eps_start=eps_start, **loop
        )
    else:
        loss = sinkhorn_loss_envelope(
            p.cost,
            p.a,
            p.b,
            p.n_sizes,
            p.m_sizes,
            eps_start,
            loop["eps"],
            kappa,
            loop["max_iters"],
            loop["check_every"],
            loop["tol"],
            value,
            kernel_backend(p, backend),
        )[0]
    return loss[0] if p.single else loss
