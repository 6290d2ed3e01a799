"""sinkhorn benchmark: fastkd's batched log-domain Sinkhorn against plain PyTorch, POT and GeomLoss.

Every implementation solves the same B entropic OT problems: squared Euclidean costs between two
random point clouds per problem (as OT distillation losses compare feature sets), uniform
marginals. Only a forward exists (``fastkd.sinkhorn`` returns no gradient), so the timed step is
the solve alone, from a ready cost (GeomLoss, which takes points, forms its costs inside).
Besides the time, the table reports each solver's mean iterations and the fraction of problems
whose plan meets fastkd's stopping rule, and checks under it that the peers solve the same
problem: the transport cost <P, C> and the entropic objective of the first problem.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch

from ..ot import pairwise_cost, sinkhorn
from ..ops._registry import kernel_backends
from .harness import Impl, Result, format_table, measure

__all__ = ["PEERS", "SinkhornCase", "point_clouds", "run_sinkhorn_case"]

# Peer families `--peers` chooses from: the plain-PyTorch solver, POT's sinkhorn_log looped over
# the batch (float64 and float32), POT's batched solver, GeomLoss (debiased and not).
PEERS = ("torch", "pot", "pot-batch", "geomloss")

_TORCH = "plain PyTorch batched (fastkd[torch])"
_POT_REF = "POT sinkhorn_log loop f64"
_POT_BATCH = "POT solve_batch (torch f32)"
_GEOM_DEBIASED = "GeomLoss S_eps debiased"
_GEOM_OT = "GeomLoss OT_eps (debias=False)"
_COLS = ("time / fastkd best", "iters (mean)", "converged")


@dataclass(frozen=True)
class SinkhornCase:
    batch: int = 4096
    n: int = 64
    m: int = 64
    dim: int = 8
    eps: float = 0.05
    tol: float = 1e-6
    max_iters: int = 1000
    eps_scaling: float | None = None
    dtype: str = "float32"
    device: str = "cpu"
    pot_limit: int = 256  # problems POT's Python loop solves; its time is scaled to the batch
    peers: tuple[str, ...] = PEERS

    def title(self) -> str:
        scaling = "" if self.eps_scaling is None else f" eps_scaling={self.eps_scaling}"
        return (
            f"sinkhorn B={self.batch} n={self.n} m={self.m} d={self.dim} eps={self.eps}"
            f"{scaling} tol={self.tol:g} max_iters={self.max_iters} {self.dtype} on "
            f"{self.device}"
        )


def point_clouds(
    case: SinkhornCase, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [B, n, d], y [B, m, d], cost [B, n, m]) float32: two Gaussian clouds per problem, the
    second shifted by a random offset, scaled per problem so that the cost |x_i - y_j|^2 has
    max 1 (so that eps is in units of the largest cost, as fastkd's eps-scaling starts)."""
    device = torch.device(case.device)
    x = torch.randn(case.batch, case.n, case.dim, generator=generator, device=device)
    shift = 0.5 * torch.randn(case.batch, 1, case.dim, generator=generator, device=device)
    y = torch.randn(case.batch, case.m, case.dim, generator=generator, device=device) + shift
    scale = pairwise_cost("sqeuclidean", x, y).amax((1, 2), keepdim=True).sqrt()
    x, y = x / scale, y / scale
    return x, y, pairwise_cost("sqeuclidean", x, y)


def _l1_marginal_error(plan: torch.Tensor) -> torch.Tensor:
    """[B]: L1 errors of both marginals of uniform-marginal plans [B, n, m], in float64 (one of
    the two is exact after a full Sinkhorn iteration; which one depends on the update order)."""
    p = plan.double()
    n, m = p.shape[-2:]
    return (p.sum(-1) - 1 / n).abs().sum(-1) + (p.sum(-2) - 1 / m).abs().sum(-1)


class _Summary(NamedTuple):
    iters: float | None = None
    converged: float | None = None  # fraction of problems under fastkd's rule
    transport0: float | None = None  # <P, C> of the first problem
    objective0: float | None = None  # <P, C> + eps KL(P || a b^T) of the first problem


class _Solver(NamedTuple):
    name: str
    peer: bool
    solve: Callable[[], object]
    summarize: Callable[[object], _Summary]
    time_scale: float = 1.0  # batch over the problems solved (POT's loop on a subset)


def _fastkd_solvers(case: SinkhornCase, cost: torch.Tensor) -> list[_Solver]:
    device = torch.device(case.device)
    # Triton runs on CPU only under its interpreter: nothing to time.
    kernels = kernel_backends("sinkhorn", device, interpreted_ok=False)
    kw = dict(eps=case.eps, tol=case.tol, max_iters=case.max_iters, eps_scaling=case.eps_scaling)

    def summarize(r) -> _Summary:
        return _Summary(
            r.iters.float().mean().item(),
            r.converged.float().mean().item(),
            r.transport_cost[0].item(),
            r.objective[0].item(),
        )

    solvers = [
        _Solver(
            f"fastkd[{b}]", False, functools.partial(sinkhorn, cost, backend=b, **kw), summarize
        )
        for b in kernels
    ]
    if "torch" in case.peers:
        solvers.append(
            _Solver(_TORCH, True, lambda: sinkhorn(cost, backend="torch", **kw), summarize)
        )
    return solvers


def _pot_loop_solvers(case: SinkhornCase, cost: torch.Tensor, count: int) -> list[_Solver]:
    """POT's sinkhorn_log on the first ``count`` problems, one call each, in numpy float64 (what
    POT computes in by default) and float32 (which POT keeps)."""
    import ot

    costs64 = cost[:count].double().cpu().numpy()
    suffix = (
        f" [first {count} of {case.batch}, time x{case.batch / count:g}]"
        if count < case.batch
        else ""
    )
    solvers = []
    for dtype in (np.float64, np.float32):
        costs = costs64.astype(dtype)
        a = np.full(case.n, 1 / case.n, dtype=dtype)
        b = np.full(case.m, 1 / case.m, dtype=dtype)

        def solve(costs=costs, a=a, b=b):
            return [
                ot.bregman.sinkhorn_log(
                    a,
                    b,
                    c,
                    case.eps,
                    numItermax=case.max_iters,
                    stopThr=case.tol,
                    log=True,
                    warn=False,
                )
                for c in costs
            ]

        def summarize(out) -> _Summary:
            plans = torch.from_numpy(np.stack([plan for plan, _ in out]))
            # POT's niter is the 0-based index of the last iteration.
            iters = np.mean([log["niter"] + 1 for _, log in out])
            return _Summary(
                float(iters),
                (_l1_marginal_error(plans) < case.tol).double().mean().item(),
                float((plans[0].double() * torch.from_numpy(costs64[0])).sum()),
            )

        name = _POT_REF if dtype == np.float64 else "POT sinkhorn_log loop f32"
        solvers.append(_Solver(name + suffix, True, solve, summarize, case.batch / count))
    return solvers


def _pot_batch_solver(case: SinkhornCase, cost: torch.Tensor) -> _Solver:
    """POT's batched solver on torch tensors (POT's torch backend): every problem iterates until
    the worst one meets POT's rule."""
    from ot.batch import solve_batch

    def solve():
        # reg_type="kl": POT's value is then the objective fastkd reports (the plan is the same
        # for either regularizer, the marginals being fixed).
        return solve_batch(
            cost,
            reg=case.eps,
            max_iter=case.max_iters,
            tol=case.tol,
            method="log_sinkhorn",
            reg_type="kl",
            grad="detach",
        )

    def summarize(res) -> _Summary:
        return _Summary(
            float(res.log["n_iter"] + 1),  # 0-based index of the last iteration
            (_l1_marginal_error(res.plan) < case.tol).double().mean().item(),
            res.value_linear[0].item(),
            res.value[0].item(),
        )

    return _Solver(_POT_BATCH, True, solve, summarize)


def _geomloss_scaling(case: SinkhornCase) -> float:
    """GeomLoss's ratio between successive blurs: eps^(1/2) ratio sqrt(kappa) under
    ``eps_scaling=kappa`` (the same ratio of eps per step), else GeomLoss's default 0.5."""
    return 0.5 if case.eps_scaling is None else math.sqrt(case.eps_scaling)


def _geomloss_solvers(case: SinkhornCase, x: torch.Tensor, y: torch.Tensor) -> list[_Solver]:
    from geomloss import SamplesLoss

    # GeomLoss's p=2 cost is |x - y|^2 / 2: points scaled by sqrt(2) give it the same cost C,
    # whose largest distance is then sqrt(2) (its "diameter", where its schedule starts).
    xs, ys = x * math.sqrt(2), y * math.sqrt(2)
    blur, scaling, diameter = math.sqrt(case.eps), _geomloss_scaling(case), math.sqrt(2)
    # GeomLoss's epsilon_schedule: diameter^p, then one value per factor scaling^p down to
    # blur^p, then blur^p; one symmetric update per value.
    iters = 2 + len(np.arange(2 * math.log(diameter), 2 * math.log(blur), 2 * math.log(scaling)))
    solvers = []
    for debias, name in ((True, _GEOM_DEBIASED), (False, _GEOM_OT)):
        loss = SamplesLoss(
            "sinkhorn",
            p=2,
            blur=blur,
            scaling=scaling,
            diameter=diameter,
            debias=debias,
            backend="tensorized",
        )

        def summarize(value, debias=debias) -> _Summary:
            return _Summary(iters, objective0=None if debias else value[0].item())

        solvers.append(
            _Solver(
                f"{name}, scaling={scaling:.3g}", True, functools.partial(loss, xs, ys), summarize
            )
        )
    return solvers


def _solvers(case: SinkhornCase, x, y, cost) -> tuple[list[_Solver], list[str]]:
    """(solvers, notes on the peers asked for but not installed)."""
    solvers = _fastkd_solvers(case, cost.to(getattr(torch, case.dtype)))
    missing = []
    pot = importlib.util.find_spec("ot") is not None
    if "pot" in case.peers:
        if pot:
            count = case.batch if case.pot_limit <= 0 else min(case.pot_limit, case.batch)
            solvers += _pot_loop_solvers(case, cost, count)
        else:
            missing.append("POT")
    if "pot-batch" in case.peers:
        if pot and importlib.util.find_spec("ot.batch") is not None:
            solvers.append(_pot_batch_solver(case, cost))
        else:
            missing.append("POT's batched API (ot.batch)")
    if "geomloss" in case.peers:
        if importlib.util.find_spec("geomloss") is not None:
            solvers += _geomloss_solvers(case, x, y)
        else:
            missing.append("GeomLoss")
    return solvers, missing


def _recording(solve: Callable[[], object], name: str, outputs: dict):
    """Impl.make for ``solve``: each step keeps its output for the columns computed after."""

    def make():
        def step():
            outputs[name] = solve()
            return outputs[name]

        return step

    return make


def _rel(value: float, ref: float) -> str:
    return f"{abs(value - ref) / abs(ref):.1e}"


def _notes(
    case: SinkhornCase, summaries: dict[str, _Summary], best: str | None, missing: list[str]
) -> list[str]:
    loop = next((n for n in summaries if n.startswith(_POT_REF)), None)
    notes = [
        f"Problems: per problem, x ~ N(0, I) and y ~ N(s, I) with s ~ N(0, 0.25 I) in d = "
        f"{case.dim}, cost C = |x_i - y_j|^2 scaled to max 1; uniform marginals. Time: median "
        f"of the solve from a ready cost (GeomLoss forms its costs from the points).",
        "Rows: fastkd[...]: fastkd.sinkhorn's kernels; plain PyTorch batched: fastkd's "
        "backend='torch', the batched log-domain loop in plain PyTorch ops "
        "(fastkd/reference/sinkhorn.py); POT sinkhorn_log loop: ot.bregman.sinkhorn_log called "
        "per problem on numpy arrays (float64, POT's default, and float32, which POT keeps), on "
        "the CPU, one core; POT solve_batch: ot.batch.solve_batch(method='log_sinkhorn') on the "
        "torch tensors (POT's torch backend).",
        f"time / fastkd best: this row's time over the fastest fastkd backend's. iters: mean "
        f"Sinkhorn iterations (a row and a column update). converged: fraction of problems whose "
        f"plan has L1 marginal error below tol = {case.tol:g} (fastkd's stopping rule; for POT "
        f"computed from its plans).",
        "Stopping rules: fastkd stops each problem on its own when the L1 error of its row "
        "marginal is below tol, checked every 10 iterations; POT's sinkhorn_log stops each "
        "problem when the L2 error of its column marginal is below tol, checked at iterations "
        "1, 11, 21, ...; POT's solve_batch stops the whole batch when the largest L2 row-marginal "
        "error is below tol, at the same checks. L2 <= L1, so POT may stop earlier; its "
        "converged column says whether it met fastkd's rule."
        + (
            ""
            if case.eps_scaling is None
            else f" Only fastkd and the plain-PyTorch row use eps_scaling={case.eps_scaling} "
            f"(their iterations count the schedule's); POT's two solvers have no eps-scaling."
        ),
    ]
    if loop and loop != _POT_REF:
        notes.append(
            "POT's loop is timed on the first problems and its time scaled linearly to "
            "the batch; its peak MB is for the problems timed."
        )
    if any(n.startswith("GeomLoss") for n in summaries):
        notes.append(
            "GeomLoss is a timing peer, not a numerically identical one: it runs a fixed "
            "eps-scaling schedule from diameter^2 = 2 max C down to eps (one symmetric, "
            "averaged update per step, no stopping test; iters = the schedule's length), and "
            "its default (debiased) row solves the Sinkhorn divergence S_eps = OT_eps(a, b) - "
            "(OT_eps(a, a) + OT_eps(b, b)) / 2, three problems per pair."
        )
    if loop and summaries[loop].transport0 is not None:
        ref = summaries[loop].transport0
        diffs = [
            f"{n.split(' [')[0]} {_rel(s.transport0, ref)}"
            for n, s in summaries.items()
            if n != loop and s.transport0 is not None
        ]
        notes.append(
            f"Same problem? <P, C> of problem 0: {ref:.9g} ({_POT_REF}); relative "
            f"difference: " + ", ".join(diffs) + "."
        )
    if best and summaries[best].objective0 is not None:
        ref = summaries[best].objective0
        diffs = [
            f"{n} {_rel(s.objective0, ref)}"
            for n, s in summaries.items()
            if n != best and s.objective0 is not None
        ]
        if diffs:
            notes.append(
                f"Entropic objective <P, C> + eps KL(P || a b^T) of problem 0: "
                f"{ref:.9g} ({best}); relative difference: " + ", ".join(diffs) + "."
            )
    if missing:
        notes.append("Not installed, not measured: " + ", ".join(missing) + ".")
    return notes


def run_sinkhorn_case(
    case: SinkhornCase, *, warmup: int = 2, reps: int = 5, seed: int = 0
) -> tuple[list[Result], str]:
    """Measures one case; returns the results and a markdown table with notes under it."""
    device = torch.device(case.device)
    x, y, cost = point_clouds(case, torch.Generator(device=device).manual_seed(seed))
    solvers, missing = _solvers(case, x, y, cost)
    outputs: dict[str, object] = {}
    impls = [Impl(s.name, _recording(s.solve, s.name, outputs), s.peer) for s in solvers]
    results = measure(impls, device, warmup=warmup, reps=reps)

    summaries = {}
    for s, r in zip(solvers, results):
        if r.error:
            continue
        summaries[s.name] = summary = s.summarize(outputs.pop(s.name))
        r.time_ms *= s.time_scale
        r.time_iqr = tuple(t * s.time_scale for t in r.time_iqr)
        r.extra["iters (mean)"] = "-" if summary.iters is None else f"{summary.iters:.1f}"
        r.extra["converged"] = "-" if summary.converged is None else f"{summary.converged:.3f}"
    fastkd = [r for r in results if not r.peer and r.time_ms]
    best = min(fastkd, key=lambda r: r.time_ms) if fastkd else None
    for r in results:
        if best and r.time_ms:
            r.extra["time / fastkd best"] = f"{r.time_ms / best.time_ms:.2f}x"
    table = format_table(case.title(), results, _COLS, time_label="solve ms")
    notes = _notes(case, summaries, best.impl if best else None, missing)
    return results, table + "\n\n" + "\n".join(f"- {n}" for n in notes)
