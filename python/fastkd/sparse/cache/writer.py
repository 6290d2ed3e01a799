"""TeacherCacheWriter: streams sequences into a cache directory, one atomic commit per shard.

A commit writes the shard to a fresh temporary file, fsyncs it and renames it into place, then
does the same for the manifest that lists it; the writer's own state changes only once the
manifest's rename has returned. The disk therefore always holds a committed manifest and the
complete shards it lists, at worst beside a temporary file or a shard it does not list yet,
whatever interrupts the writer (an exception, KeyboardInterrupt, kill -9). Temporary files are
created with O_EXCL | O_NOFOLLOW under random names, so no existing file or link is ever opened
for writing. One writer at a time: it holds an exclusive flock on ``.lock`` in the directory.
POSIX only (flock, O_NOFOLLOW).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import weakref

import numpy as np

from ..._fsync import fsync_dir
from ..targets import SparseTargets
from .format import (
    FORMAT,
    FORMAT_VERSION,
    IDENTITY_FIELDS,
    LIMITS,
    LOCK,
    MANIFEST,
    MAX_SEQUENCE_TOKENS,
    MAX_SHARDS,
    MAX_SLOTS,
    SHARD_NAME,
    TARGET_FIELDS,
    TEMP_NAME,
    Encoding,
    check_int,
    encode_manifest,
    encode_sequence,
    pack_shard,
    shard_name,
    validate_metadata,
)
from .reader import TeacherCache, as_index


class CacheLockedError(RuntimeError):
    """Another TeacherCacheWriter (in this process or another) is writing the cache."""


# Writers of this process, so that a child made by fork() disowns the copies it inherits.
_WRITERS: "weakref.WeakSet[TeacherCacheWriter]" = weakref.WeakSet()


def _disown_after_fork() -> None:
    for writer in list(_WRITERS):
        writer._disown()


os.register_at_fork(after_in_child=_disown_after_fork)


def _lock(path: str) -> int:
    """A descriptor holding an exclusive flock on ``path``'s lock file; CacheLockedError if
    another writer holds it. The flock belongs to this open file description, so a second open
    in the same process is refused as well."""
    lock = os.path.join(path, LOCK)
    fd = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CacheLockedError(
            f"the teacher cache at {path} is being written by another "
            f"TeacherCacheWriter ({lock} is locked, by this process or "
            f"another); close that writer first"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _write_temp(directory: str, name: str, chunks) -> tuple[str, int, str]:
    """Write ``chunks`` (C-contiguous arrays or bytes) to a new temporary file for ``name`` in
    ``directory`` and fsync it. Returns (its path, size in bytes, sha256); on any exception the
    file is removed. O_EXCL | O_NOFOLLOW: an existing file or symlink at the name is an error,
    never a target."""
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        digest, size = hashlib.sha256(), 0
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                digest.update(view)
                size += view.nbytes
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp, size, digest.hexdigest()


def _install(tmp: str, path: str) -> None:
    """Rename ``tmp`` onto ``path`` (atomic: readers see the old file or the new one)."""
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


class TeacherCacheWriter:
    """Streams whole sequences of SparseTargets into a cache directory (one writer at a time).

    Made by ``TeacherCache.create``; use it as a context manager or call ``close()``, which
    writes the last partial shard. Leaving the ``with`` block by an exception writes nothing
    more: the buffered sequences are dropped and the cache holds ``committed_sequences``, where
    ``TeacherCache.create(..., resume=True)`` continues. Not thread-safe: call it from one thread.

    Every append and close either commits its shard or leaves the writer as it was and the cache
    as it was, with one exception: an interruption while the manifest is being replaced, when it
    cannot know whether the cache now lists the shard. The writer is then ``broken``: it refuses
    further writes, and the cache holds either state, complete.

    Attributes:
        path: the cache directory.
        num_sequences: sequences appended so far, including those already in the cache when
            resuming; a resumed teacher loop restarts at this sequence index.
        committed_sequences: the sequences in complete shards on disk (what a killed writer
            would keep).
        broken: None, or why the writer refuses further writes.
    """

    def __init__(
        self, path: str, meta: dict, *, logprobs: bool | None, shard_tokens: int, resume: bool
    ):
        validate_metadata(meta)
        meta = {**meta, **{k: int(meta[k]) for k in LIMITS if k in meta}}
        if logprobs is not None and not isinstance(logprobs, bool):
            raise ValueError(f"logprobs must be True, False or None; got {logprobs!r}")
        self.path = path
        self._shard_tokens = check_int("shard_tokens", shard_tokens, *LIMITS["shard_tokens"])
        self._enc = Encoding.for_metadata(meta)
        self._logprobs_arg = logprobs
        self._buffer: list[dict[str, np.ndarray]] = []
        self._lock_fd: int | None = None
        self._closed = True
        self.broken: str | None = None
        # Refuse someone else's directory before creating anything in it.
        if os.path.isdir(path) and not _may_hold_cache(os.listdir(path)):
            raise FileExistsError(f"{path} is neither empty nor a teacher cache")
        created, missing = [], os.path.abspath(path)
        while not os.path.isdir(missing):
            created.append(missing)
            missing = os.path.dirname(missing)
        os.makedirs(path, exist_ok=True)
        for directory in created:  # so that the new directories outlive a power loss
            fsync_dir(os.path.dirname(directory))
        self._lock_fd = _lock(path)
        _WRITERS.add(self)
        try:
            self._start(meta, resume)
        except BaseException:
            self._release()
            raise
        self._closed = False

    def _start(self, meta: dict, resume: bool) -> None:
        """Under the lock: read (resume) or start the manifest and remove what the cache's own
        writers left behind."""
        names = os.listdir(self.path)
        if MANIFEST in names:
            if not resume:
                raise FileExistsError(
                    f"{self.path} already holds a teacher cache; pass resume=True to continue it"
                )
            manifest = TeacherCache.open(self.path, verify=False)._manifest
            diffs = [
                f"{k}: cache has {manifest[k]!r}, create() got {meta[k]!r}"
                for k in IDENTITY_FIELDS
                if manifest[k] != meta[k]
            ]
            wanted = self._logprobs_arg
            if wanted is not None and manifest["logprobs"] not in (None, wanted):
                diffs.append(
                    f"logprobs: cache has {manifest['logprobs']!r}, create() got {wanted!r}"
                )
            if diffs:
                raise ValueError(
                    f"cannot resume {self.path} with different metadata: " + "; ".join(diffs)
                )
            # Left by a killed writer: a temporary file, or a shard renamed into place before
            # the manifest that would list it.
            listed = {r["file"] for r in manifest["shards"]}
            leftovers = [
                n
                for n in names
                if TEMP_NAME.fullmatch(n) or SHARD_NAME.fullmatch(n) and n not in listed
            ]
        else:
            if not _may_hold_cache(names):
                raise FileExistsError(f"{self.path} is neither empty nor a teacher cache")
            manifest = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                **meta,
                "logprobs": self._logprobs_arg,
                "encoding": self._enc.to_json(),
                "shards": [],
            }
            leftovers = [n for n in names if TEMP_NAME.fullmatch(n)]
        for name in leftovers:
            os.remove(os.path.join(self.path, name))
        self._manifest = manifest
        # A new cache, or a version-1 manifest that gains its checksum.
        if MANIFEST not in names or manifest["version"] != FORMAT_VERSION:
            self._write_manifest({**manifest, "version": FORMAT_VERSION})

    @property
    def committed_sequences(self) -> int:
        shards = self._manifest["shards"]
        return shards[-1]["first_sequence"] + shards[-1]["sequences"] if shards else 0

    @property
    def num_sequences(self) -> int:
        return self.committed_sequences + len(self._buffer)

    def append(self, targets: SparseTargets) -> None:
        """Add one sequence: SparseTargets ``[T, K]`` (any device) with the cache's metadata,
        T <= 2^31 - 1 and K <= 2^32 - 1.

        Padding slots (id -1) are dropped; the other entries keep their order within each token.
        When the buffer reaches ``shard_tokens`` the shard is committed; if that raises, the
        sequence is not appended (see ``broken`` for the one case where the cache may hold it).
        """
        self._check_writable()
        if not isinstance(targets, SparseTargets):
            raise TypeError(f"append takes SparseTargets; got {type(targets).__name__}")
        if targets.ids.dim() != 2:
            raise ValueError(
                f"append takes one sequence [T, K]; got ids "
                f"{tuple(targets.ids.shape)} (use extend for [B, T, K])"
            )
        t, k = targets.ids.shape
        if t > MAX_SEQUENCE_TOKENS or k > MAX_SLOTS:
            raise ValueError(
                f"a sequence holds at most {MAX_SEQUENCE_TOKENS} tokens of at most "
                f"{MAX_SLOTS} slots; got targets [T={t}, K={k}]"
            )
        self._check_metadata(targets)
        pending = self._buffer + [encode_sequence(targets, self._manifest, self._enc)]
        if sum(p["slots"].size for p in pending) >= self._shard_tokens:
            self._commit(pending)
        else:
            self._buffer = pending

    def extend(self, targets: SparseTargets, lengths=None) -> None:
        """Add a batch of sequences: SparseTargets ``[B, T, K]``; ``lengths`` ([B] integers,
        default all T) keeps the first ``lengths[b]`` tokens of sequence ``b``. The sequences are
        appended in order; if one raises, those before it stay appended."""
        if not isinstance(targets, SparseTargets):
            raise TypeError(f"extend takes SparseTargets; got {type(targets).__name__}")
        if targets.ids.dim() != 3:
            raise ValueError(f"extend takes a batch [B, T, K]; got ids {tuple(targets.ids.shape)}")
        b, t = targets.ids.shape[:2]
        lengths = [t] * b if lengths is None else [as_index(n, "a length") for n in lengths]
        if len(lengths) != b or any(not 0 <= n <= t for n in lengths):
            raise ValueError(f"lengths must be {b} values in [0, {t}]; got {lengths}")
        for i, n in enumerate(lengths):
            self.append(targets[i, :n])

    def close(self) -> None:
        """Commit the buffered sequences as a last shard and release the directory. Further
        appends raise. If the commit raises, the writer stays open (a later ``close()`` tries
        again), unless it is ``broken``: then it is released and RuntimeError says why."""
        if self._closed:
            return
        if self.broken is None and self._buffer:
            try:
                self._commit(self._buffer)
            except BaseException:
                if self.broken is not None:
                    self._release()
                raise
        self._release()
        self._check_not_broken()

    def __enter__(self) -> "TeacherCacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # After an exception in the body nothing more is written: the buffered sequences are
        # dropped, and the cache holds the committed shards.
        try:
            if exc_type is None:
                self.close()
        finally:
            self._release()

    def __del__(self) -> None:
        # A writer dropped without close() releases the directory and writes nothing.
        self._release()

    def _release(self) -> None:
        self._buffer = []
        self._closed = True
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            _WRITERS.discard(self)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _disown(self) -> None:
        # In a child of fork(): the lock and the directory stay with the parent's writer.
        # Closing this copy of the descriptor leaves the parent's flock in place.
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)
        self._buffer = []
        self.broken = "it was inherited through fork(); only the process that created it writes"

    def _check_writable(self) -> None:
        if self._closed:
            raise ValueError(f"append to a closed TeacherCacheWriter (cache {self.path})")
        self._check_not_broken()

    def _check_not_broken(self) -> None:
        if self.broken is not None:
            raise RuntimeError(
                f"the TeacherCacheWriter of {self.path} refuses writes: "
                f"{self.broken}. The cache holds its committed shards; continue "
                f"it with TeacherCache.create(..., resume=True)"
            )

    def _kept_logprobs(self) -> bool | None:
        if self._buffer:
            return "logprobs" in self._buffer[0]
        kept = self._manifest["logprobs"]
        return self._logprobs_arg if kept is None else kept

    def _check_metadata(self, targets: SparseTargets) -> None:
        meta = self._manifest
        diffs = [
            f"{k}: cache has {meta[k]!r}, targets have {getattr(targets, k)!r}"
            for k in TARGET_FIELDS
            if getattr(targets, k) != meta[k]
        ]
        kept, has_logprobs = self._kept_logprobs(), targets.logprobs is not None
        if kept is not None and kept != has_logprobs:
            diffs.append(
                f"logprobs: the cache {'keeps' if kept else 'has no'} logprobs, the "
                f"targets {'have' if has_logprobs else 'have none'}"
            )
        if diffs:
            raise ValueError("targets do not match the cache: " + "; ".join(diffs))

    def _commit(self, pending: list[dict[str, np.ndarray]]) -> None:
        """Write ``pending`` as the next shard and the manifest that lists it; then, and only
        then, take the new manifest as this writer's and empty the buffer."""
        shards = self._manifest["shards"]
        if len(shards) >= MAX_SHARDS:
            raise ValueError(
                f"a cache holds at most {MAX_SHARDS} shards; write it with a "
                f"larger shard_tokens (now {self._shard_tokens})"
            )
        logprobs = "logprobs" in pending[0]
        chunks, counts = pack_shard(
            pending, self._enc, logprobs, self._manifest["tail"] == "bucket"
        )
        name = shard_name(len(shards))
        # Shard `name` is listed nowhere yet, so failing anywhere here changes nothing a reader
        # or a retry sees: a retry writes the same name again.
        tmp, size, sha = _write_temp(self.path, name, chunks)
        _install(tmp, os.path.join(self.path, name))
        fsync_dir(self.path)
        record = {
            "file": name,
            "first_sequence": self.committed_sequences,
            **counts,
            "bytes": size,
            "sha256": sha,
        }
        self._write_manifest({**self._manifest, "logprobs": logprobs, "shards": shards + [record]})

    def _write_manifest(self, manifest: dict) -> None:
        """Commit ``manifest``; once it is on disk it is this writer's, with an empty buffer."""
        tmp, _, _ = _write_temp(self.path, MANIFEST, [encode_manifest(manifest)])
        # From here until the new manifest is this writer's, an interruption leaves the disk
        # with the old manifest or the new one, and this writer cannot tell which.
        self.broken = "it was interrupted while replacing the manifest"
        _install(tmp, os.path.join(self.path, MANIFEST))
        self._manifest, self._buffer = manifest, []
        self.broken = "syncing the cache directory after replacing the manifest failed"
        fsync_dir(self.path)
        self.broken = None


def _may_hold_cache(names: list[str]) -> bool:
    """Whether a directory holding ``names`` is a cache or may become one: it has a manifest,
    or nothing but what the cache's own writers leave behind."""
    return MANIFEST in names or all(n == LOCK or TEMP_NAME.fullmatch(n) for n in names)
