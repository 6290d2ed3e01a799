"""Sparse teacher targets: sampling from a teacher, losses against them, and an on-disk cache."""

from .cache import CacheCorruptError, TeacherCache
from .targets import METHODS, TAILS, SparseTargets

__all__ = ["CacheCorruptError", "METHODS", "SparseTargets", "TAILS", "TeacherCache"]
