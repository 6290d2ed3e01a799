"""Op families: input checks, torch custom ops with fake kernels and autograd, backend dispatch."""

from ._backends import available_backends
from .kd_loss import kd_loss

__all__ = ["available_backends", "kd_loss"]
