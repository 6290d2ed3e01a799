"""Op families: input checks, torch custom ops with fake kernels and autograd, backend dispatch."""

from ..ot import SinkhornResult, sequence_ot_loss, sinkd_loss, sinkhorn, sinkhorn_loss
from ._registry import available_backends
from .fused_linear_kd_loss import fused_linear_kd_loss
from .fused_linear_sparse_kd_loss import fused_linear_sparse_kd_loss
from .fused_linear_logprobs import TokenLogProbs, fused_linear_logprobs
from .fused_linear_support import fused_linear_support, student_support_targets
from .fused_linear_topk import fused_linear_topk
from .kd_loss import kd_loss
from .onpolicy_losses import sampled_reverse_kl, sampled_reverse_kl_reward
from .sample_teacher import sample_teacher
from .sparse_kd_loss import sparse_kd_loss
from .uld_loss import uld_loss

__all__ = [
    "SinkhornResult",
    "TokenLogProbs",
    "available_backends",
    "fused_linear_kd_loss",
    "fused_linear_logprobs",
    "fused_linear_sparse_kd_loss",
    "fused_linear_support",
    "fused_linear_topk",
    "kd_loss",
    "sample_teacher",
    "sampled_reverse_kl",
    "sampled_reverse_kl_reward",
    "sequence_ot_loss",
    "sinkd_loss",
    "sinkhorn",
    "sinkhorn_loss",
    "sparse_kd_loss",
    "student_support_targets",
    "uld_loss",
]
