"""TeacherCache: read access to a teacher cache by sequence index. Readers take no lock: a writer
never changes or removes a shard that a manifest lists and replaces the manifest atomically, so a
reader sees one committed manifest and the shards it lists."""

from __future__ import annotations

import hashlib
import numbers
import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..targets import SparseTargets
from .format import (
    HASH_CHUNK,
    HEADER,
    IDENTITY_FIELDS,
    MAGIC,
    SHARD_VERSION,
    CacheCorruptError,
    Encoding,
    layout,
    open_regular,
    read_manifest,
    unpack_words,
)

if TYPE_CHECKING:
    from .writer import TeacherCacheWriter

# Tokens per step of the offset check: its memory is 8 bytes a token of a step (8 MiB), whatever
# size a shard claims.
_OFFSET_CHUNK = 1 << 20


def as_index(value, what: str = "a sequence index") -> int:
    """``value`` as an int if it is an integer: an int, a numpy integer, or a 0-d integer
    array or tensor. TypeError naming its type otherwise (bool and float included)."""
    if isinstance(value, torch.Tensor):
        ok = (
            value.dim() == 0
            and not value.dtype.is_floating_point
            and not value.dtype.is_complex
            and value.dtype != torch.bool
        )
    elif isinstance(value, np.ndarray):
        ok = value.ndim == 0 and value.dtype.kind in "iu"
    else:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok:
        dtype = getattr(value, "dtype", None)
        raise TypeError(
            f"{what} must be an integer (int, numpy integer, 0-d integer tensor); "
            f"got {type(value).__name__}{f' of {dtype}' if dtype else ''} "
            f"{value!r:.80}"
        )
    return int(value)


class _Shard:
    """One shard file: checked against its manifest record on open, mapped and (with verify)
    checksummed on first access."""

    def __init__(
        self, directory: str, record: dict, enc: Encoding, logprobs: bool, tail_mass: bool
    ):
        self.path = os.path.join(directory, record["file"])
        self.record = record
        self.enc = enc
        # The manifest's checks already tied record["bytes"] to this size.
        self.sections, size = layout(
            enc,
            record["slot_bytes"],
            record["sequences"],
            record["tokens"],
            record["entries"],
            logprobs,
            tail_mass,
        )
        try:
            f = open_regular(self.path)
        except FileNotFoundError:
            raise CacheCorruptError(f"shard {self.path} is missing") from None
        with f:
            actual = os.fstat(f.fileno()).st_size
            if actual != size:
                raise CacheCorruptError(
                    f"shard {self.path} has {actual} bytes; its manifest "
                    f"record says {size} (truncated or overwritten?)"
                )
            header = HEADER.unpack(f.read(HEADER.size))
        expected = (
            MAGIC,
            SHARD_VERSION,
            record["slot_bytes"],
            record["sequences"],
            record["tokens"],
            record["entries"],
        )
        if header != expected:
            raise CacheCorruptError(
                f"shard {self.path}: header {header} does not match its manifest record {expected}"
            )
        self.arrays: dict[str, np.ndarray] | None = None

    def load(self, verify: bool) -> dict[str, np.ndarray]:
        if self.arrays is None:
            if verify:
                self.verify_checksum()
            raw = np.memmap(self.path, np.uint8, "r")
            slot_dtype = {1: "<u1", 2: "<u2", 4: "<u4"}[self.record["slot_bytes"]]
            dtypes = {
                "seq_tokens": "<u8",
                "seq_entries": "<u8",
                "slots": slot_dtype,
                "entries": np.uint8,
                "weights": "<f4",
                "logprobs": "<f4",
                "tail_mass": "<f4",
            }
            arrays = {
                name: raw[off : off + size].view(dtypes[name])
                for name, (off, size) in self.sections.items()
            }
            self._check_offsets(arrays)
            self.arrays = arrays
        return self.arrays

    def verify_checksum(self) -> None:
        digest = hashlib.sha256()
        with open_regular(self.path) as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != self.record["sha256"]:
            raise CacheCorruptError(f"shard {self.path} fails its sha256 checksum (corrupt)")

    def _check_offsets(self, arrays: dict[str, np.ndarray]) -> None:
        # Offsets index everything else, so they are checked even without verify: a bad one would
        # otherwise read another sequence's entries or run off the mapping. Each sequence must
        # start where the slot counts before it add up to.
        tokens, entries, slots = arrays["seq_tokens"], arrays["seq_entries"], arrays["slots"]
        n_tokens = self.record["tokens"]
        ok = (
            tokens[0] == 0
            and tokens[-1] == n_tokens
            and not np.any(tokens[1:] < tokens[:-1])
            and entries[-1] == self.record["entries"]
        )
        if ok:
            starts = np.zeros(tokens.size, np.uint64)  # 8 bytes a sequence: a 16th of the file
            lo, total = int(np.searchsorted(tokens, 0, side="right")), np.uint64(0)
            for c0 in range(0, n_tokens, _OFFSET_CHUNK):
                c1 = min(n_tokens, c0 + _OFFSET_CHUNK)
                ends = np.cumsum(slots[c0:c1], dtype=np.uint64) + total
                hi = int(np.searchsorted(tokens, c1, side="right"))
                starts[lo:hi] = ends[tokens[lo:hi].astype(np.int64) - (c0 + 1)]
                lo, total = hi, ends[-1]
            ok = np.array_equal(starts, entries)
        if not ok:
            raise CacheCorruptError(f"shard {self.path}: inconsistent offsets (corrupt)")


class TeacherCache:
    """Read access to a teacher cache: ``cache[i]`` is sequence ``i`` as ``SparseTargets``.

    Made by ``TeacherCache.open``; ``TeacherCache.create`` returns a ``TeacherCacheWriter``.

    Attributes:
        path: the cache directory.
        metadata: dict of vocab_size, num_samples, method, temperature, seed, tail, teacher_name,
            tokenizer_fingerprint and logprobs (whether logprobs are kept).
        num_tokens: tokens over all sequences.
    """

    def __init__(self, path: str, manifest: dict, enc: Encoding, manifest_bytes: int, verify: bool):
        self.path = path
        self._manifest = manifest
        self._manifest_bytes = manifest_bytes
        self._verify = verify
        self._enc = enc
        records = manifest["shards"]
        self._shards = [
            _Shard(path, r, enc, bool(manifest["logprobs"]), manifest["tail"] == "bucket")
            for r in records
        ]
        self._first = np.array([r["first_sequence"] for r in records], np.int64)
        self._len = sum(r["sequences"] for r in records)
        self.num_tokens = sum(r["tokens"] for r in records)
        self.metadata = {k: manifest[k] for k in IDENTITY_FIELDS + ("logprobs",)}

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        vocab_size: int,
        num_samples: int,
        method: str = "random",
        temperature: float = 1.0,
        seed: int = 0,
        tail: str | None = None,
        teacher_name: str = "",
        tokenizer_fingerprint: str = "",
        logprobs: bool | None = None,
        shard_tokens: int = 1 << 20,
        resume: bool = False,
    ) -> "TeacherCacheWriter":
        """Start (or with ``resume``, continue) writing the cache directory ``path``.

        The writer holds an exclusive lock on the directory until it is closed: a second writer,
        in this process or another, raises CacheLockedError.

        Args:
            vocab_size, num_samples, method, temperature, seed, tail: the metadata of the
                ``SparseTargets`` to be written (see ``SparseTargets``); every appended sequence
                must carry the same. vocab_size is in [1, 2^31], num_samples in [1, 2^31 - 1],
                seed in [0, 2^64).
            teacher_name, tokenizer_fingerprint: recorded for readers to check against (at most
                4096 characters each).
            logprobs: whether logprobs are kept; None takes it from the first appended sequence.
            shard_tokens: in [1, 2^31]; a shard is written once its buffered sequences reach
                this many tokens.
            resume: continue an existing cache with the same metadata after its last complete
                shard (``writer.num_sequences`` says how many sequences it already holds);
                without it an existing cache raises FileExistsError.

        Raises:
            ValueError: an argument outside what a cache holds, or (resume) metadata that
                differs from the cache's.
            FileExistsError: ``path`` holds a cache (without resume) or files that are not a
                cache's.
            CacheLockedError: another writer holds ``path``.
            CacheCorruptError: (resume) the existing cache is corrupt.
        """
        # The writer resumes through TeacherCache.open, so it imports this module: import it here.
        from .writer import TeacherCacheWriter

        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise ValueError(f"temperature must be a finite float > 0; got {temperature!r}")
        return TeacherCacheWriter(
            os.fspath(path),
            {
                "vocab_size": vocab_size,
                "num_samples": num_samples,
                "method": method,
                "temperature": float(temperature),
                "seed": seed,
                "tail": tail,
                "teacher_name": teacher_name,
                "tokenizer_fingerprint": tokenizer_fingerprint,
            },
            logprobs=logprobs,
            shard_tokens=shard_tokens,
            resume=resume,
        )

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        vocab_size: int | None = None,
        tokenizer_fingerprint: str | None = None,
        verify: bool = True,
    ) -> "TeacherCache":
        """Open the cache directory ``path`` for reading.

        The manifest (with its checksum), every shard's presence, size and header are checked
        now; with ``verify`` each shard's sha256 is checked on its first access. Offsets are
        always checked before use.

        Args:
            vocab_size: if given, the student's vocabulary size; must equal the cache's.
            tokenizer_fingerprint: if given, must equal the fingerprint the cache was written with.

        Raises:
            FileNotFoundError: ``path`` is not a cache directory.
            CacheCorruptError: a missing, truncated, malformed or corrupt file.
            ValueError: ``vocab_size`` or ``tokenizer_fingerprint`` differs from the cache's.
        """
        path = os.fspath(path)
        manifest, enc, manifest_bytes = read_manifest(path)
        for key, wanted in (
            ("vocab_size", vocab_size),
            ("tokenizer_fingerprint", tokenizer_fingerprint),
        ):
            if wanted is not None and wanted != manifest[key]:
                raise ValueError(
                    f"{key} mismatch: the cache at {path} was written with "
                    f"{key}={manifest[key]!r}, the caller expects {wanted!r}"
                )
        return cls(path, manifest, enc, manifest_bytes, verify)

    def __len__(self) -> int:
        return self._len

    def bytes_per_token(self) -> float:
        """Bytes on disk (shards plus manifest) per cached token."""
        total = self._manifest_bytes + sum(r["bytes"] for r in self._manifest["shards"])
        return total / max(self.num_tokens, 1)

    def verify(self) -> None:
        """Check every shard's sha256 now; raises CacheCorruptError on the first mismatch."""
        for shard in self._shards:
            shard.verify_checksum()

    def __getitem__(self, index) -> SparseTargets:
        """Sequence ``index`` (an integer; negative counts from the end) as SparseTargets
        ``[T, K]``: K is its most entries on a token (at least 1), the rest of each row padded
        with id -1 and weight 0."""
        targets, _ = self.batch([index])
        return targets[0]

    def batch(self, indices) -> tuple[SparseTargets, torch.Tensor]:
        """Sequences ``indices`` (integers, e.g. a list or a 1-d integer tensor) as SparseTargets
        ``[B, T_max, K_max]`` and their lengths.

        Returns:
            targets: tokens past a sequence's length are padding (all ids -1, weights 0, and
                tail_mass 0); K_max is the most entries on any token (at least 1).
            lengths: ``[B]`` int64 tokens of each sequence.
        """
        pieces = [self._read(self._resolve(i)) for i in indices]
        lengths = np.array([p["slots"].size for p in pieces], np.int64)
        t_max = int(lengths.max(initial=0))
        slots = np.concatenate([p["slots"] for p in pieces] + [np.zeros(0, np.int64)])
        k_max = max(1, int(slots.max(initial=0)))
        b = len(pieces)

        # Scatter the ragged entries into the dense [B * T_max, K_max] grid: entry e of token t
        # goes to row (sequence * T_max + position of t) and column (e - first entry of t).
        seq_of_token = np.repeat(np.arange(b, dtype=np.int64), lengths)
        pos_of_token = np.arange(slots.size, dtype=np.int64) - np.repeat(
            np.cumsum(lengths) - lengths, lengths
        )
        row_of_token = seq_of_token * t_max + pos_of_token
        first_entry = np.cumsum(slots) - slots
        rows = np.repeat(row_of_token, slots)
        cols = np.arange(int(slots.sum()), dtype=np.int64) - np.repeat(first_entry, slots)

        def dense(key: str, fill, dtype) -> torch.Tensor:
            out = np.full((b * t_max, k_max), fill, dtype)
            out[rows, cols] = np.concatenate([p[key] for p in pieces] + [np.zeros(0, dtype)])
            return torch.from_numpy(out).reshape(b, t_max, k_max)

        meta = self._manifest
        tail_mass = None
        if meta["tail"] == "bucket":
            flat = np.zeros(b * t_max, np.float32)
            flat[row_of_token] = np.concatenate(
                [p["tail_mass"] for p in pieces] + [np.zeros(0, np.float32)]
            )
            tail_mass = torch.from_numpy(flat).reshape(b, t_max)
        targets = SparseTargets(
            ids=dense("ids", -1, np.int32),
            weights=dense("weights", 0, np.float32),
            logprobs=dense("logprobs", 0, np.float32) if meta["logprobs"] else None,
            tail_mass=tail_mass,
            vocab_size=meta["vocab_size"],
            num_samples=meta["num_samples"],
            temperature=meta["temperature"],
            seed=meta["seed"],
            method=meta["method"],
            tail=meta["tail"],
        )
        return targets, torch.from_numpy(lengths)

    def _resolve(self, index) -> tuple[_Shard, int]:
        i = as_index(index)
        if not -self._len <= i < self._len:
            raise IndexError(f"sequence {i} out of range for a cache of {self._len}")
        i %= self._len
        s = int(np.searchsorted(self._first, i, side="right")) - 1
        return self._shards[s], i - int(self._first[s])

    def _read(self, where: tuple[_Shard, int]) -> dict[str, np.ndarray]:
        """Sequence ``local`` of ``shard`` unpacked: slots [T] int64, ids [E] int32,
        weights [E] float32, and logprobs [E] / tail_mass [T] float32 when kept."""
        shard, local = where
        arrays = shard.load(self._verify)
        t0, t1 = (int(x) for x in arrays["seq_tokens"][local : local + 2])
        e0, e1 = (int(x) for x in arrays["seq_entries"][local : local + 2])
        enc, meta = self._enc, self._manifest
        words = unpack_words(
            arrays["entries"][e0 * enc.word_bytes : e1 * enc.word_bytes], enc.word_bytes
        )
        if enc.kind == "count":
            ids = words >> np.uint64(enc.count_bits)
            counts = (words & np.uint64((1 << enc.count_bits) - 1)) + np.uint64(1)
            if counts.size and counts.max() > meta["num_samples"]:
                raise CacheCorruptError(f"shard {shard.path}: a count exceeds N (corrupt)")
            # The same float32 division the sampler uses, so the weights match it bit for bit.
            weights = counts.astype(np.float32) / np.float32(meta["num_samples"])
        else:
            ids = words
            weights = np.array(arrays["weights"][e0:e1])
        if ids.size and ids.max() >= meta["vocab_size"]:
            raise CacheCorruptError(f"shard {shard.path}: an id is >= vocab_size (corrupt)")
        out = {
            "slots": arrays["slots"][t0:t1].astype(np.int64),
            "ids": ids.astype(np.int32),
            "weights": weights,
        }
        if meta["logprobs"]:
            out["logprobs"] = np.array(arrays["logprobs"][e0:e1])
        if meta["tail"] == "bucket":
            out["tail_mass"] = np.array(arrays["tail_mass"][t0:t1])
        return out
