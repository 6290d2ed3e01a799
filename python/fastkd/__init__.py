"""fastkd: fused, exact, memory-light knowledge-distillation losses for language models."""

__version__ = "0.1.0"

from ._build_info import build_info
from .losses import KDLoss
from .ops import available_backends, kd_loss

__all__ = ["KDLoss", "available_backends", "build_info", "kd_loss", "__version__"]
