"""Entropic optimal transport: the batched Sinkhorn solver and the losses built on it.

``problem`` checks a batch of problems (cost or features, marginals, sizes, options);
``solver_op`` is the ``sinkhorn_solve`` custom op and its backends (C++ CPU, CUDA, Triton,
plain PyTorch), ``solver`` the public ``sinkhorn`` on it; ``sinkhorn_loss`` the differentiable
OT value (envelope or unrolled gradient); ``features`` the costs computed from point features,
formed or streamed block by block; ``losses`` the distillation losses ``sinkd_loss`` and
``sequence_ot_loss``. The kernels stay with the others: ``csrc/cpu/sinkhorn_cpu.cpp``,
``csrc/cuda/sinkhorn_cuda.cu``, ``triton/sinkhorn.py``.
"""

from .features import COSTS, pairwise_cost
from .losses import l1_cost, sequence_ot_loss, sinkd_loss
from .sinkhorn_loss import sinkhorn_loss
from .solver import SinkhornResult, sinkhorn

__all__ = [
    "COSTS",
    "SinkhornResult",
    "l1_cost",
    "pairwise_cost",
    "sequence_ot_loss",
    "sinkd_loss",
    "sinkhorn",
    "sinkhorn_loss",
]
