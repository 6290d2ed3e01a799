"""Op families: input checks, torch custom ops with fake kernels and autograd, backend dispatch."""

from ..ot import SinkhornResult, sequence_ot_loss, sinkd_loss, sinkhorn, sinkhorn_loss
from ._registry import available_backends
from .fused_linear_kd_loss import fused_linear_kd_loss, fused_linear_sparse_kd_loss
from .kd_loss import kd_loss
from .sample_teacher import sample_teacher
from .sparse_kd_loss import sparse_kd_loss
from .uld_loss import uld_loss

__all__ = ["SinkhornResult", "available_backends", "fused_linear_kd_loss",
           "fused_linear_sparse_kd_loss", "kd_loss", "sample_teacher", "sequence_ot_loss",
           "sinkd_loss", "sinkhorn", "sinkhorn_loss", "sparse_kd_loss", "uld_loss"]
