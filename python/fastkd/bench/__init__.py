"""The benchmark harness (`fastkd bench`, `python -m fastkd.bench`)."""

from .harness import Impl, Result, format_table, measure
from .kd_loss import KdCase, run_kd_loss_case

__all__ = ["Impl", "KdCase", "Result", "format_table", "measure", "run_kd_loss_case"]
