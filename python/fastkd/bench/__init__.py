"""The benchmark harness (`fastkd bench`, `python -m fastkd.bench`)."""

from .fused_linear import FusedLinearCase, run_fused_linear_case
from .harness import Impl, Result, format_table, measure
from .kd_loss import KdCase, run_kd_loss_case
from .sample_teacher import SampleCase, run_sample_teacher_case
from .sparse_kd_loss import SparseCase, run_sparse_kd_loss_case
from .uld_loss import UldCase, run_uld_loss_case

__all__ = [
    "FusedLinearCase",
    "Impl",
    "KdCase",
    "Result",
    "SampleCase",
    "SparseCase",
    "UldCase",
    "format_table",
    "measure",
    "run_fused_linear_case",
    "run_kd_loss_case",
    "run_sample_teacher_case",
    "run_sparse_kd_loss_case",
    "run_uld_loss_case",
]
