"""TeacherCache: sparse teacher targets on disk, streamed from a teacher's forward loop and read
back by sequence index as ``SparseTargets`` ready for the loss.

A cache is a directory::

    manifest.json      format version, metadata, entry encoding, and the complete shards
    shard-000000.fkd   whole sequences; a shard is never split across files
    shard-000001.fkd
    ...

Storage is ragged (CSR): padding slots are dropped on write, so a confident token costs one entry
and a high-entropy token keeps all of its ids. A shard file is little-endian, every section
starting at a multiple of 8 bytes::

    header       magic "FKDCSHRD", uint32 format version, uint32 slot_bytes,
                 uint64 S (sequences), T (tokens), E (entries)
    seq_tokens   uint64 [S + 1]  token offset of each sequence in the shard
    seq_entries  uint64 [S + 1]  entry offset of each sequence in the shard
    slots        uint8/16/32 [T] entries of each token (slot_bytes = 1, 2 or 4)
    entries      "count" encoding: [E] little-endian words of entry_bytes bytes,
                     (id << count_bits) | (count - 1)
                 "float" encoding: [E] ids of id_bytes bytes
    weights      float32 [E]     ("float" encoding only)
    logprobs     float32 [E]     (caches that keep logprobs)
    tail_mass    float32 [T]     (tail="bucket")

The encoding is chosen per cache from its metadata and recorded in the manifest. ``"random"`` at
temperature 1 has weights exactly ``count / N``, so an entry is the id and the count packed into
``ceil((ceil(log2 V) + ceil(log2 N)) / 8)`` bytes: 3 bytes for V <= 2^18 and N <= 64 (e.g.
V = 32000, N = 50: 15 + 6 bits), 4 bytes for V = 262144 and N = 100. Importance weights
(temperature != 1) and ``"topk"`` weights are arbitrary, so they are kept as float32 beside the
id. Everything read back is bit-identical to what was written.

A shard is written to a temporary file in the same directory, fsynced and renamed into place; the
manifest is then rewritten the same way. A killed writer therefore leaves the shards its manifest
lists complete, and at worst a temporary file or a renamed shard the manifest does not list yet;
``TeacherCache.create(..., resume=True)`` removes those and continues after the last listed shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass

import numpy as np
import torch

from .targets import METHODS, TAILS, SparseTargets

__all__ = ["CacheCorruptError", "TeacherCache", "TeacherCacheWriter"]

FORMAT = "fastkd-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

_MAGIC = b"FKDCSHRD"
_HEADER = struct.Struct("<8sIIQQQ")
_SHARD_NAME = re.compile(r"shard-\d{6}\.fkd")
_TMP_SUFFIX = ".tmp"
_HASH_CHUNK = 1 << 24
# Fields that must agree between a cache and every SparseTargets written to it.
_TARGET_FIELDS = ("vocab_size", "num_samples", "method", "temperature", "seed", "tail")
# Fields that identify a cache: resuming with any of them different is refused.
_IDENTITY_FIELDS = _TARGET_FIELDS + ("teacher_name", "tokenizer_fingerprint")


class CacheCorruptError(ValueError):
    """A cache is unreadable: a file is missing, truncated, or fails its checksum or structure
    checks."""


@dataclass(frozen=True)
class _Encoding:
    """How entries are packed. ``kind`` is ``"count"`` (id and count - 1 in one word) or
    ``"float"`` (id, then a float32 weight in its own section)."""

    kind: str
    id_bits: int
    count_bits: int

    @staticmethod
    def for_metadata(vocab_size: int, num_samples: int, method: str,
                     temperature: float) -> "_Encoding":
        id_bits = max(1, (vocab_size - 1).bit_length())
        if method == "random" and temperature == 1.0:
            count_bits = max(1, (num_samples - 1).bit_length())
            if id_bits + count_bits > 64:
                raise ValueError(f"vocab_size {vocab_size} and num_samples {num_samples} need "
                                 f"{id_bits + count_bits} bits per entry; at most 64 are supported")
            return _Encoding("count", id_bits, count_bits)
        return _Encoding("float", id_bits, 0)

    @property
    def word_bytes(self) -> int:
        """Bytes of one entry in the entries section."""
        return (self.id_bits + self.count_bits + 7) // 8

    def to_json(self) -> dict:
        return {"kind": self.kind, "id_bits": self.id_bits, "count_bits": self.count_bits}


def _pack_words(values: np.ndarray, nbytes: int) -> np.ndarray:
    """uint64 [n] -> uint8 [n * nbytes]: the low ``nbytes`` bytes of each value, little-endian."""
    return values.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :nbytes].reshape(-1)


def _unpack_words(raw: np.ndarray, nbytes: int) -> np.ndarray:
    """uint8 [n * nbytes] -> uint64 [n], the inverse of ``_pack_words``."""
    wide = np.zeros((raw.size // nbytes, 8), np.uint8)
    wide[:, :nbytes] = raw.reshape(-1, nbytes)
    return wide.view("<u8").reshape(-1)


def _slot_bytes(max_slots: int) -> int:
    return 1 if max_slots <= 0xFF else 2 if max_slots <= 0xFFFF else 4


def _layout(enc: _Encoding, slot_bytes: int, sequences: int, tokens: int, entries: int,
            logprobs: bool, tail_mass: bool) -> tuple[dict[str, tuple[int, int]], int]:
    """Section name -> (byte offset, byte size) of a shard, and the shard's total size."""
    sizes = [("seq_tokens", 8 * (sequences + 1)), ("seq_entries", 8 * (sequences + 1)),
             ("slots", slot_bytes * tokens), ("entries", enc.word_bytes * entries)]
    if enc.kind == "float":
        sizes.append(("weights", 4 * entries))
    if logprobs:
        sizes.append(("logprobs", 4 * entries))
    if tail_mass:
        sizes.append(("tail_mass", 4 * tokens))
    sections, offset = {}, _HEADER.size
    for name, size in sizes:
        offset = -(-offset // 8) * 8
        sections[name] = (offset, size)
        offset += size
    return sections, offset


def _fsync_dir(directory: str) -> None:
    # A rename is durable only once its directory is synced (POSIX); Windows cannot open a
    # directory, and there the rename is as durable as the platform makes it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(directory: str, name: str, chunks) -> tuple[int, str]:
    """Write ``chunks`` (bytes-like) to ``directory/name`` through a synced temporary file and a
    rename, so readers see either the old file or the complete new one. Returns (size, sha256)."""
    tmp = os.path.join(directory, f".{name}{_TMP_SUFFIX}")
    digest, size = hashlib.sha256(), 0
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            digest.update(chunk)
            size += memoryview(chunk).nbytes
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, name))
    _fsync_dir(directory)
    return size, digest.hexdigest()


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(_TMP_SUFFIX)


def _bytes_view(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _validate_metadata(meta: dict) -> None:
    v, n, t = meta["vocab_size"], meta["num_samples"], meta["temperature"]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"vocab_size must be an int >= 1; got {v!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_samples must be an int >= 1; got {n!r}")
    if not isinstance(t, float) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite float > 0; got {t!r}")
    if not isinstance(meta["seed"], int):
        raise ValueError(f"seed must be an int; got {meta['seed']!r}")
    if meta["method"] not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {meta['method']!r}")
    if meta["method"] == "topk" and meta["tail"] not in TAILS:
        raise ValueError(f"topk caches need tail in {TAILS}; got {meta['tail']!r}")
    if meta["method"] == "random" and meta["tail"] is not None:
        raise ValueError(f"random caches have tail None; got {meta['tail']!r}")
    for key in ("teacher_name", "tokenizer_fingerprint"):
        if not isinstance(meta[key], str):
            raise ValueError(f"{key} must be a str; got {meta[key]!r}")


def _read_manifest(path: str) -> tuple[dict, int]:
    """The parsed, validated manifest of the cache at ``path`` and its size in bytes."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no teacher cache at {path}: not a directory")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no teacher cache at {path}: {MANIFEST} is missing")
    with open(file, "rb") as f:
        raw = f.read()
    try:
        manifest = json.loads(raw)
        if manifest.get("format") != FORMAT:
            raise CacheCorruptError(f"{file} is not a {FORMAT} manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise CacheCorruptError(f"{file} has format version {manifest.get('version')!r}; "
                                    f"this fastkd reads version {FORMAT_VERSION}")
        _validate_metadata(manifest)
        enc = _Encoding.for_metadata(manifest["vocab_size"], manifest["num_samples"],
                                     manifest["method"], manifest["temperature"])
        if manifest["encoding"] != enc.to_json():
            raise CacheCorruptError(f"{file}: encoding {manifest['encoding']} does not follow "
                                    f"from its metadata (expected {enc.to_json()})")
        if manifest["logprobs"] not in (True, False, None):
            raise CacheCorruptError(f"{file}: logprobs must be true, false or null")
        first = 0
        for shard in manifest["shards"]:
            counts = [shard[k] for k in ("sequences", "tokens", "entries", "bytes")]
            if (not _SHARD_NAME.fullmatch(shard["file"]) or shard["first_sequence"] != first
                    or shard["slot_bytes"] not in (1, 2, 4)
                    or not isinstance(shard["sha256"], str)
                    or not all(isinstance(c, int) and c >= 0 for c in counts)):
                raise CacheCorruptError(f"{file}: bad shard record {shard}")
            first += shard["sequences"]
        if manifest["shards"] and manifest["logprobs"] is None:
            raise CacheCorruptError(f"{file}: shards are listed but logprobs is unset")
    except CacheCorruptError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CacheCorruptError(f"{file} is corrupt: {type(e).__name__}: {e}") from e
    return manifest, len(raw)


class _Shard:
    """One shard file: checked against its manifest record on open, mapped and (with verify)
    checksummed on first access."""

    def __init__(self, directory: str, record: dict, enc: _Encoding, logprobs: bool,
                 tail_mass: bool):
        self.path = os.path.join(directory, record["file"])
        self.record = record
        self.enc = enc
        self.sections, size = _layout(enc, record["slot_bytes"], record["sequences"],
                                      record["tokens"], record["entries"], logprobs, tail_mass)
        if not os.path.isfile(self.path):
            raise CacheCorruptError(f"shard {self.path} is missing")
        actual = os.path.getsize(self.path)
        if actual != record["bytes"] or actual != size:
            raise CacheCorruptError(f"shard {self.path} has {actual} bytes; the manifest records "
                                    f"{record['bytes']} and its counts imply {size} (truncated "
                                    f"or overwritten?)")
        with open(self.path, "rb") as f:
            header = _HEADER.unpack(f.read(_HEADER.size))
        expected = (_MAGIC, FORMAT_VERSION, record["slot_bytes"], record["sequences"],
                    record["tokens"], record["entries"])
        if header != expected:
            raise CacheCorruptError(f"shard {self.path}: header {header} does not match its "
                                    f"manifest record {expected}")
        self.arrays: dict[str, np.ndarray] | None = None

    def load(self, verify: bool) -> dict[str, np.ndarray]:
        if self.arrays is None:
            if verify:
                self._verify_checksum()
            raw = np.memmap(self.path, np.uint8, "r")
            slot_dtype = {1: "<u1", 2: "<u2", 4: "<u4"}[self.record["slot_bytes"]]
            dtypes = {"seq_tokens": "<u8", "seq_entries": "<u8", "slots": slot_dtype,
                      "entries": np.uint8, "weights": "<f4", "logprobs": "<f4",
                      "tail_mass": "<f4"}
            arrays = {name: raw[off:off + size].view(dtypes[name])
                      for name, (off, size) in self.sections.items()}
            self._check_offsets(arrays)
            self.arrays = arrays
        return self.arrays

    def _verify_checksum(self) -> None:
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != self.record["sha256"]:
            raise CacheCorruptError(f"shard {self.path} fails its sha256 checksum (corrupt)")

    def _check_offsets(self, arrays: dict[str, np.ndarray]) -> None:
        # Offsets index everything else, so they are checked even without verify: a bad one would
        # otherwise read another sequence's entries or run off the mapping.
        tokens, entries = arrays["seq_tokens"], arrays["seq_entries"]
        slot_ends = np.concatenate([[0], np.cumsum(arrays["slots"], dtype=np.uint64)])
        if (tokens[0] != 0 or tokens[-1] != self.record["tokens"]
                or np.any(tokens[1:] < tokens[:-1])
                or slot_ends[-1] != self.record["entries"]
                or not np.array_equal(slot_ends[tokens], entries)):
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

    def __init__(self, path: str, manifest: dict, manifest_bytes: int, verify: bool):
        self.path = path
        self._manifest = manifest
        self._manifest_bytes = manifest_bytes
        self._verify = verify
        self._enc = _Encoding(**manifest["encoding"])
        records = manifest["shards"]
        self._shards = [_Shard(path, r, self._enc, bool(manifest["logprobs"]),
                               manifest["tail"] == "bucket") for r in records]
        self._first = np.array([r["first_sequence"] for r in records], np.int64)
        self._len = sum(r["sequences"] for r in records)
        self.num_tokens = sum(r["tokens"] for r in records)
        self.metadata = {k: manifest[k] for k in _IDENTITY_FIELDS + ("logprobs",)}

    @classmethod
    def create(cls, path: str | os.PathLike, *, vocab_size: int, num_samples: int,
               method: str = "random", temperature: float = 1.0, seed: int = 0,
               tail: str | None = None, teacher_name: str = "",
               tokenizer_fingerprint: str = "", logprobs: bool | None = None,
               shard_tokens: int = 1 << 20, resume: bool = False) -> "TeacherCacheWriter":
        """Start (or with ``resume``, continue) writing the cache directory ``path``.

        Args:
            vocab_size, num_samples, method, temperature, seed, tail: the metadata of the
                ``SparseTargets`` to be written (see ``SparseTargets``); every appended sequence
                must carry the same.
            teacher_name, tokenizer_fingerprint: recorded for readers to check against.
            logprobs: whether logprobs are kept; None takes it from the first appended sequence.
            shard_tokens: a shard is written once its buffered sequences reach this many tokens.
            resume: continue an existing cache with the same metadata after its last complete
                shard (``writer.num_sequences`` says how many sequences it already holds);
                without it an existing cache raises FileExistsError.
        """
        return TeacherCacheWriter(
            os.fspath(path),
            {"vocab_size": vocab_size, "num_samples": num_samples, "method": method,
             "temperature": float(temperature), "seed": seed, "tail": tail,
             "teacher_name": teacher_name, "tokenizer_fingerprint": tokenizer_fingerprint},
            logprobs=logprobs, shard_tokens=shard_tokens, resume=resume)

    @classmethod
    def open(cls, path: str | os.PathLike, *, vocab_size: int | None = None,
             tokenizer_fingerprint: str | None = None, verify: bool = True) -> "TeacherCache":
        """Open the cache directory ``path`` for reading.

        The manifest, every shard's presence, size and header are checked now; with ``verify``
        each shard's sha256 is checked on its first access. Offsets are always checked before use.

        Args:
            vocab_size: if given, the student's vocabulary size; must equal the cache's.
            tokenizer_fingerprint: if given, must equal the fingerprint the cache was written with.

        Raises:
            FileNotFoundError: ``path`` is not a cache directory.
            CacheCorruptError: a missing, truncated or corrupt file.
            ValueError: ``vocab_size`` or ``tokenizer_fingerprint`` differs from the cache's.
        """
        path = os.fspath(path)
        manifest, manifest_bytes = _read_manifest(path)
        for key, wanted in (("vocab_size", vocab_size),
                            ("tokenizer_fingerprint", tokenizer_fingerprint)):
            if wanted is not None and wanted != manifest[key]:
                raise ValueError(f"{key} mismatch: the cache at {path} was written with "
                                 f"{key}={manifest[key]!r}, the caller expects {wanted!r}")
        return cls(path, manifest, manifest_bytes, verify)

    def __len__(self) -> int:
        return self._len

    def bytes_per_token(self) -> float:
        """Bytes on disk (shards plus manifest) per cached token."""
        total = self._manifest_bytes + sum(r["bytes"] for r in self._manifest["shards"])
        return total / max(self.num_tokens, 1)

    def verify(self) -> None:
        """Check every shard's sha256 now; raises CacheCorruptError on the first mismatch."""
        for shard in self._shards:
            shard._verify_checksum()

    def __getitem__(self, index: int) -> SparseTargets:
        """Sequence ``index`` as SparseTargets ``[T, K]``: K is its most entries on a token (at
        least 1), the rest of each row padded with id -1 and weight 0."""
        targets, _ = self.batch([index])
        return targets[0]

    def batch(self, indices) -> tuple[SparseTargets, torch.Tensor]:
        """Sequences ``indices`` as SparseTargets ``[B, T_max, K_max]`` and their lengths.

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
            np.cumsum(lengths) - lengths, lengths)
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
            flat[row_of_token] = np.concatenate([p["tail_mass"] for p in pieces]
                                                + [np.zeros(0, np.float32)])
            tail_mass = torch.from_numpy(flat).reshape(b, t_max)
        targets = SparseTargets(
            ids=dense("ids", -1, np.int32), weights=dense("weights", 0, np.float32),
            logprobs=dense("logprobs", 0, np.float32) if meta["logprobs"] else None,
            tail_mass=tail_mass, vocab_size=meta["vocab_size"],
            num_samples=meta["num_samples"], temperature=meta["temperature"], seed=meta["seed"],
            method=meta["method"], tail=meta["tail"])
        return targets, torch.from_numpy(lengths)

    def _resolve(self, index) -> tuple[_Shard, int]:
        index = int(index)
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"sequence {index} out of range for a cache of {self._len}")
        s = int(np.searchsorted(self._first, index, side="right")) - 1
        return self._shards[s], index - int(self._first[s])

    def _read(self, where: tuple[_Shard, int]) -> dict[str, np.ndarray]:
        """Sequence ``local`` of ``shard`` unpacked: slots [T] int64, ids [E] int32,
        weights [E] float32, and logprobs [E] / tail_mass [T] float32 when kept."""
        shard, local = where
        arrays = shard.load(self._verify)
        t0, t1 = (int(x) for x in arrays["seq_tokens"][local:local + 2])
        e0, e1 = (int(x) for x in arrays["seq_entries"][local:local + 2])
        enc, meta = self._enc, self._manifest
        words = _unpack_words(arrays["entries"][e0 * enc.word_bytes:e1 * enc.word_bytes],
                              enc.word_bytes)
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
        out = {"slots": arrays["slots"][t0:t1].astype(np.int64), "ids": ids.astype(np.int32),
               "weights": weights}
        if meta["logprobs"]:
            out["logprobs"] = np.array(arrays["logprobs"][e0:e1])
        if meta["tail"] == "bucket":
            out["tail_mass"] = np.array(arrays["tail_mass"][t0:t1])
        return out


class TeacherCacheWriter:
    """Streams whole sequences of SparseTargets into a cache directory (one writer at a time).

    Made by ``TeacherCache.create``; use it as a context manager or call ``close()``, which
    writes the last partial shard.

    Attributes:
        num_sequences: sequences appended so far, including those already in the cache when
            resuming; a resumed teacher loop restarts at this sequence index.
        committed_sequences: the sequences in complete shards on disk (what a killed writer
            would keep).
    """

    def __init__(self, path: str, meta: dict, *, logprobs: bool | None, shard_tokens: int,
                 resume: bool):
        _validate_metadata(meta)
        if logprobs not in (True, False, None):
            raise ValueError(f"logprobs must be True, False or None; got {logprobs!r}")
        if not isinstance(shard_tokens, int) or shard_tokens < 1:
            raise ValueError(f"shard_tokens must be an int >= 1; got {shard_tokens!r}")
        self.path = path
        self._shard_tokens = shard_tokens
        self._enc = _Encoding.for_metadata(meta["vocab_size"], meta["num_samples"],
                                           meta["method"], meta["temperature"])
        names = os.listdir(path) if os.path.isdir(path) else []
        if MANIFEST in names:
            if not resume:
                raise FileExistsError(f"{path} already holds a teacher cache; pass resume=True "
                                      f"to continue it")
            manifest = TeacherCache.open(path, verify=False)._manifest
            diffs = [f"{k}: cache has {manifest[k]!r}, create() got {meta[k]!r}"
                     for k in _IDENTITY_FIELDS if manifest[k] != meta[k]]
            if logprobs is not None and manifest["logprobs"] not in (None, logprobs):
                diffs.append(f"logprobs: cache has {manifest['logprobs']!r}, create() got "
                             f"{logprobs!r}")
            if diffs:
                raise ValueError(f"cannot resume {path} with different metadata: "
                                 + "; ".join(diffs))
            if manifest["logprobs"] is None:
                manifest["logprobs"] = logprobs
            # What the manifest does not list is a killed writer's leftover: a temporary file,
            # or a shard renamed into place before the manifest update that would list it.
            listed = {r["file"] for r in manifest["shards"]}
            leftovers = [n for n in names if _is_temp(n)
                         or _SHARD_NAME.fullmatch(n) and n not in listed]
        else:
            manifest = {"format": FORMAT, "version": FORMAT_VERSION, **meta,
                        "logprobs": logprobs, "encoding": self._enc.to_json(), "shards": []}
            leftovers = [n for n in names if _is_temp(n)]
            if len(leftovers) < len(names):
                raise FileExistsError(f"{path} is neither empty nor a teacher cache")
        os.makedirs(path, exist_ok=True)
        for name in leftovers:
            os.remove(os.path.join(path, name))
        self._manifest = manifest
        self.committed_sequences = sum(r["sequences"] for r in manifest["shards"])
        self.num_sequences = self.committed_sequences
        self._buffer: list[dict[str, np.ndarray]] = []
        self._buffered_tokens = 0
        self._closed = False
        self._write_manifest()

    def append(self, targets: SparseTargets) -> None:
        """Add one sequence: SparseTargets ``[T, K]`` (any device) with the cache's metadata.

        Padding slots (id -1) are dropped; the other entries keep their order within each token.
        """
        if self._closed:
            raise ValueError("append to a closed TeacherCacheWriter")
        if not isinstance(targets, SparseTargets):
            raise TypeError(f"append takes SparseTargets; got {type(targets).__name__}")
        if targets.ids.dim() != 2:
            raise ValueError(f"append takes one sequence [T, K]; got ids "
                             f"{tuple(targets.ids.shape)} (use extend for [B, T, K])")
        self._check_metadata(targets)
        self._buffer.append(self._encode(targets))
        self._manifest["logprobs"] = targets.logprobs is not None
        self._buffered_tokens += targets.ids.shape[0]
        self.num_sequences += 1
        if self._buffered_tokens >= self._shard_tokens:
            self._flush()

    def extend(self, targets: SparseTargets, lengths=None) -> None:
        """Add a batch of sequences: SparseTargets ``[B, T, K]``; ``lengths`` ([B] ints, default
        all T) keeps the first ``lengths[b]`` tokens of sequence ``b``."""
        if targets.ids.dim() != 3:
            raise ValueError(f"extend takes a batch [B, T, K]; got ids "
                             f"{tuple(targets.ids.shape)}")
        b, t = targets.ids.shape[:2]
        lengths = [t] * b if lengths is None else [int(n) for n in lengths]
        if len(lengths) != b or any(not 0 <= n <= t for n in lengths):
            raise ValueError(f"lengths must be {b} values in [0, {t}]; got {lengths}")
        for i, n in enumerate(lengths):
            self.append(targets[i, :n])

    def close(self) -> None:
        """Write the buffered sequences as a last shard. Further appends raise."""
        if not self._closed:
            self._flush()
            self._closed = True

    def __enter__(self) -> "TeacherCacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        # Every buffered sequence is complete (append validates before buffering), so they are
        # worth keeping even when the teacher loop raised.
        self.close()

    def _check_metadata(self, targets: SparseTargets) -> None:
        meta = self._manifest
        diffs = [f"{k}: cache has {meta[k]!r}, targets have {getattr(targets, k)!r}"
                 for k in _TARGET_FIELDS if getattr(targets, k) != meta[k]]
        has_logprobs = targets.logprobs is not None
        if meta["logprobs"] is not None and meta["logprobs"] != has_logprobs:
            diffs.append(f"logprobs: the cache {'keeps' if meta['logprobs'] else 'has no'} "
                         f"logprobs, the targets {'have' if has_logprobs else 'have none'}")
        if diffs:
            raise ValueError("targets do not match the cache: " + "; ".join(diffs))

    def _encode(self, targets: SparseTargets) -> dict[str, np.ndarray]:
        """One sequence's sections, ragged: slots [T], entries (packed), weights / logprobs [E]
        and tail_mass [T] as kept."""
        meta, enc = self._manifest, self._enc
        ids = targets.ids.detach().cpu().numpy()
        if np.any(ids < -1) or np.any(ids >= meta["vocab_size"]):
            raise ValueError(f"ids must be -1 (padding) or in [0, {meta['vocab_size']})")
        keep = ids >= 0
        kept_ids = ids[keep].astype(np.uint64)
        weights = targets.weights.detach().cpu().numpy()[keep]
        out = {"slots": keep.sum(axis=1)}
        if enc.kind == "count":
            n = meta["num_samples"]
            counts = np.rint(weights.astype(np.float64) * n)
            valid = (counts >= 1) & (counts <= n)
            counts = np.where(valid, counts, 1).astype(np.uint64)
            # Exact only if reading back (the sampler's float32 count / N) reproduces each weight.
            exact = valid & (counts.astype(np.float32) / np.float32(n) == weights)
            if not exact.all():
                bad = weights[~exact][0]
                raise ValueError(f"weight {bad!r} is not count / N for an integer count in "
                                 f"[1, {n}] (N = num_samples); random targets at temperature 1 "
                                 f"are stored as counts")
            words = (kept_ids << np.uint64(enc.count_bits)) | (counts - np.uint64(1))
            out["entries"] = _pack_words(words, enc.word_bytes)
        else:
            out["entries"] = _pack_words(kept_ids, enc.word_bytes)
            out["weights"] = weights.astype("<f4")
        if targets.logprobs is not None:
            out["logprobs"] = targets.logprobs.detach().cpu().numpy()[keep].astype("<f4")
        if targets.tail_mass is not None:
            out["tail_mass"] = targets.tail_mass.detach().cpu().numpy().astype("<f4")
        return out

    def _flush(self) -> None:
        if not self._buffer:
            return
        meta, buffer = self._manifest, self._buffer
        slots = np.concatenate([p["slots"] for p in buffer])
        seq_tokens = np.cumsum([0] + [p["slots"].size for p in buffer]).astype("<u8")
        seq_entries = np.cumsum([0] + [int(p["slots"].sum()) for p in buffer]).astype("<u8")
        s, t, e = len(buffer), int(seq_tokens[-1]), int(seq_entries[-1])
        slot_bytes = _slot_bytes(int(slots.max(initial=0)))
        sections, _ = _layout(self._enc, slot_bytes, s, t, e, bool(meta["logprobs"]),
                              meta["tail"] == "bucket")
        data = {"seq_tokens": seq_tokens, "seq_entries": seq_entries,
                "slots": slots.astype(f"<u{slot_bytes}")}
        for key in sections.keys() - data.keys():
            data[key] = np.concatenate([p[key] for p in buffer])
        chunks, offset = [_HEADER.pack(_MAGIC, FORMAT_VERSION, slot_bytes, s, t, e)], _HEADER.size
        for name, (start, size) in sections.items():
            chunks.append(bytes(start - offset))  # alignment padding
            chunks.append(_bytes_view(data[name]))
            offset = start + size
        name = f"shard-{len(meta['shards']):06d}.fkd"
        nbytes, sha = _atomic_write(self.path, name, chunks)
        meta["shards"].append({"file": name, "first_sequence": self.committed_sequences,
                               "sequences": s, "tokens": t, "entries": e,
                               "slot_bytes": slot_bytes, "bytes": nbytes, "sha256": sha})
        self._write_manifest()
        self.committed_sequences += s
        self._buffer, self._buffered_tokens = [], 0

    def _write_manifest(self) -> None:
        _atomic_write(self.path, MANIFEST, [json.dumps(self._manifest, indent=1).encode()])
