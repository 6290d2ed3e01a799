"""Plain-PyTorch implementations of every op: readable, float64-capable, the test oracle."""

from .fused_linear_kd_loss import fused_linear_kd_loss_reference
from .fused_linear_logprobs import fused_linear_logprobs_reference, fused_linear_topk_reference
from .kd_loss import kd_loss_reference
from .ot_losses import sequence_ot_loss_reference, sinkd_loss_reference
from .sample_teacher import sample_teacher_reference
from .sinkhorn import sinkhorn_reference
from .sparse_kd_loss import sparse_kd_loss_reference
from .uld_loss import uld_loss_reference

__all__ = [
    "fused_linear_kd_loss_reference",
    "fused_linear_logprobs_reference",
    "fused_linear_topk_reference",
    "kd_loss_reference",
    "sample_teacher_reference",
    "sequence_ot_loss_reference",
    "sinkd_loss_reference",
    "sinkhorn_reference",
    "sparse_kd_loss_reference",
    "uld_loss_reference",
]
