"""The scalars of one fused kd_loss call, as every backend kernel receives them.

Mirrors ``KdRowConfig`` in ``csrc/common/kd_math.h``. Built once per call by
``fastkd.ops.kd_loss`` from the user's arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..divergences import DIVERGENCES, DIVERGENCES_BY_CODE

__all__ = ["KdConfig", "make_kd_config"]


@dataclass(frozen=True)
class KdConfig:
    divergence: int  # Divergence.code, after the edge cases (jsd at beta 0 is fkl, ...)
    temperature: float  # T > 0
    softcap: float  # c > 0 caps logits as c * tanh(z / c) before 1/T; 0 = no cap
    soft_weight: float  # (1 - hard_weight) * (T^2 if t2_scale else 1)
    hard_weight: float  # weight of CE(student logits at T = 1, labels); 0 = no CE term
    ignore_index: int
    log_wp: float  # log of the teacher's weight in the mixture m (mixtures only)
    log_wq: float  # log of the student's weight in m
    coef: float  # the mixture's parameter (jsd: beta; skl, srkl: alpha), else 0
    grad_scale: float = 1.0  # the kernels write grad_scale * dLoss_row/dz_s (e.g. 1 / #tokens)

    @property
    def mixture_weights(self) -> tuple[float, float]:
        """(w_p, w_q): the teacher's and the student's weight in the mixture m = w_p p + w_q q
        (``Divergence.mixture_weights``; (0, 1) for the others, which do not read them), both
        formed in double precision, where 1 - coef is exact for coef in [1/2, 1] and within
        2^-53 below. The kernels take them rounded to float32 once: 1 - w formed in float32
        from a float32 w would carry w's rounding instead, a relative error of 1.3e-5 in
        1 - beta at beta = 0.999 (1.7e-4 at 0.9999) that scales the whole jsd gradient."""
        weights = DIVERGENCES_BY_CODE[self.divergence].mixture_weights
        return weights(self.coef) if weights else (self.coef, 1.0 - self.coef)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def make_kd_config(
    divergence: str,
    *,
    temperature: float,
    beta: float,
    alpha: float,
    softcap: float | None,
    hard_weight: float,
    t2_scale: bool,
    ignore_index: int,
    grad_scale: float = 1.0,
) -> KdConfig:
    """Resolves user arguments (already validated) into kernel scalars."""
    # Mixtures at their edge weights are plain KLs (Divergence.edge_cases); computing them as
    # mixtures would divide by a mixture component that may underflow (q/m with m = p for srkl
    # at alpha = 0).
    values = {"beta": beta, "alpha": alpha}
    div = DIVERGENCES[divergence].resolve(**values)
    log_wp, log_wq, coef = 0.0, 0.0, 0.0
    if div.mixture_weights is not None:
        coef = values[div.parameters[0]]
        w_p, w_q = div.mixture_weights(coef)
        log_wp, log_wq = _log(w_p), _log(w_q)
    soft_weight = (1.0 - hard_weight) * (temperature * temperature if t2_scale else 1.0)
    return KdConfig(
        divergence=div.code,
        temperature=float(temperature),
        softcap=float(softcap) if softcap is not None else 0.0,
        soft_weight=float(soft_weight),
        hard_weight=float(hard_weight),
        ignore_index=int(ignore_index),
        log_wp=log_wp,
        log_wq=log_wq,
        coef=float(coef),
        grad_scale=float(grad_scale),
    )
