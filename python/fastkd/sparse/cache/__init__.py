"""TeacherCache: sparse teacher targets on disk, streamed from a teacher's forward loop and read
back by sequence index as ``SparseTargets`` ready for the loss.

- ``format``: the files of a cache directory, the limits, the checksums, and the checks of a
  manifest (its docstring describes the format).
- ``shard``: the bytes of a shard file: its header, section layout, entry encoding and packing.
- ``reader``: ``TeacherCache``, read access by sequence index; readers take no lock.
- ``writer``: ``TeacherCacheWriter``, one writer at a time (an exclusive lock on the directory),
  one atomic commit per shard, resumable after any interruption.
"""

from .format import CacheCorruptError
from .reader import TeacherCache
from .writer import CacheLockedError, TeacherCacheWriter

__all__ = ["CacheCorruptError", "CacheLockedError", "TeacherCache", "TeacherCacheWriter"]
