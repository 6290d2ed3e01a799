"""Sparse teacher targets: sampling from a teacher, losses against them, and an on-disk cache."""

from .cache import CacheCorruptError, CacheLockedError, TeacherCache
from .targets import METHODS, TAILS, SparseTargets

__all__ = [
    "CacheCorruptError",
    "CacheLockedError",
    "METHODS",
    "SparseTargets",
    "TAILS",
    "TeacherCache",
]
