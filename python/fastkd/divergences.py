"""The divergences of ``fastkd.kd_loss`` and the ops built on it, one descriptor each.

``DIVERGENCES`` is the Python side's only list of them: argument checks, the CLI, the trainer's
config, the kernel scalars (``fastkd.ops._kd_config``) and the Triton kernel's codes read it.
The codes are those of ``FASTKD_DIVERGENCES`` in ``csrc/common/kd_math.h``, the compiled
kernels' list; where the extension ``fastkd._C`` is present, importing this module checks that
both lists agree.

Notation: p = softmax(cap(z_t) / T) (teacher), q = softmax(cap(z_s) / T) (student), summed over
the vocabulary.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .ops._native import native, refuse_native

__all__ = ["DIVERGENCES", "DIVERGENCES_BY_CODE", "Divergence", "EdgeCase"]


@dataclass(frozen=True)
class EdgeCase:
    """At ``parameter == value`` the divergence is exactly the divergence ``same_as``, which the
    fused kernels compute instead (evaluated as a mixture, it would divide by a mixture
    component that may underflow)."""

    parameter: str
    value: float
    same_as: str


@dataclass(frozen=True)
class Divergence:
    """One divergence: its ``name`` (the ``divergence=`` argument), its ``code`` in the kernels,
    a one-line ``description``, the ``parameters`` it reads (names of ``kd_loss`` arguments, each
    in [0, 1]), its ``edge_cases``, and for mixtures ``mixture_weights``: the parameter's value
    -> (w_p, w_q), the teacher's and the student's weight in m = w_p p + w_q q, formed in double
    precision (the kernels take them, and their logs, rounded to float32 once)."""

    name: str
    code: int
    description: str
    parameters: tuple[str, ...] = ()
    edge_cases: tuple[EdgeCase, ...] = ()
    mixture_weights: Callable[[float], tuple[float, float]] | None = None

    def resolve(self, **values: float) -> Divergence:
        """The divergence the kernels compute for these parameter ``values`` (extra keywords
        are ignored): ``same_as`` of the edge case they hit, else this one."""
        for edge in self.edge_cases:
            if values.get(edge.parameter) == edge.value:
                return DIVERGENCES[edge.same_as]
        return self


def _divergences(*entries: Divergence) -> Mapping[str, Divergence]:
    return MappingProxyType({d.name: d for d in entries})


DIVERGENCES: Mapping[str, Divergence] = _divergences(
    Divergence("fkl", 0, "forward KL(p || q)"),
    Divergence("rkl", 1, "reverse KL(q || p)"),
    Divergence(
        "jsd",
        2,
        "generalized Jensen-Shannon beta KL(p || m) + (1 - beta) KL(q || m), "
        "m = beta p + (1 - beta) q",
        parameters=("beta",),
        edge_cases=(EdgeCase("beta", 0.0, "fkl"), EdgeCase("beta", 1.0, "rkl")),
        mixture_weights=lambda beta: (beta, 1.0 - beta),
    ),
    Divergence("tvd", 3, "total variation distance 1/2 sum |p - q|"),
    Divergence(
        "skl",
        4,
        "skew KL(p || alpha p + (1 - alpha) q)",
        parameters=("alpha",),
        edge_cases=(EdgeCase("alpha", 0.0, "fkl"),),
        mixture_weights=lambda alpha: (alpha, 1.0 - alpha),
    ),
    Divergence(
        "srkl",
        5,
        "skew reverse KL(q || (1 - alpha) p + alpha q)",
        parameters=("alpha",),
        edge_cases=(EdgeCase("alpha", 0.0, "rkl"),),
        mixture_weights=lambda alpha: (1.0 - alpha, alpha),
    ),
    Divergence("hellinger", 6, "squared Hellinger distance 1 - sum sqrt(p q)"),
)
"""name -> ``Divergence``, in code order."""

DIVERGENCES_BY_CODE: Mapping[int, Divergence] = MappingProxyType(
    {d.code: d for d in DIVERGENCES.values()}
)


def _check_against_extension() -> None:
    """Where the compiled kernels were built with other divergences (a stale build), they would
    compute another divergence than the one asked for: the native backends are then refused,
    with the reason in ``fastkd.build_info()`` and their errors, and a warning says so."""
    extension = native()
    if extension is None:
        return
    listed = {d.name: d.code for d in DIVERGENCES.values()}
    codes = getattr(extension, "divergence_codes", None)
    built = dict(codes()) if codes is not None else None
    if built != listed:
        reason = (
            f"fastkd._C was built with the divergences {built}, but fastkd.DIVERGENCES "
            f"lists {listed}: rebuild the extension (pip install -e .)"
        )
        refuse_native(reason)
        warnings.warn(reason, RuntimeWarning, stacklevel=2)


_check_against_extension()
