"""fastkd: fused, exact, memory-light knowledge-distillation losses for language models."""

__version__ = "0.1.0"

from ._build_info import build_info
from .divergences import DIVERGENCES
from .losses import FusedLinearKDLoss, KDLoss, ULDLoss
from .ops import (
    SinkhornResult,
    TokenLogProbs,
    available_backends,
    fused_linear_kd_loss,
    fused_linear_logprobs,
    fused_linear_sparse_kd_loss,
    fused_linear_support,
    fused_linear_topk,
    kd_loss,
    sample_teacher,
    sampled_reverse_kl,
    sampled_reverse_kl_reward,
    sequence_ot_loss,
    sinkd_loss,
    sinkhorn,
    sinkhorn_loss,
    sparse_kd_loss,
    student_support_targets,
    uld_loss,
)
from .sparse import CacheCorruptError, SparseTargets, TeacherCache
from . import xtok  # noqa: E402  (cross-tokenizer alignment and chunk losses: fastkd.xtok.*)

__all__ = [
    "DIVERGENCES",
    "CacheCorruptError",
    "FusedLinearKDLoss",
    "KDLoss",
    "SinkhornResult",
    "SparseTargets",
    "TeacherCache",
    "TokenLogProbs",
    "ULDLoss",
    "available_backends",
    "build_info",
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
    "xtok",
    "__version__",
]
