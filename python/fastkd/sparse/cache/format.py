"""The on-disk format of a teacher cache: its files, shard layout, entry encoding, limits and
checksums, and the checks a reader applies to the manifest.

A cache is a directory::

    manifest.json      format version, metadata, entry encoding, the complete shards, and the
                       sha256 of all of that (``manifest_sha256``)
    shard-000000.fkd   whole sequences; a shard is never split across files
    shard-000001.fkd
    ...
    .lock              empty; a writer holds an exclusive flock on it while it writes

Storage is ragged (CSR): padding slots are dropped on write, so a confident token costs one entry
and a high-entropy token keeps all of its ids. A shard file is little-endian, every section
starting at a multiple of 8 bytes::

    header       magic "FKDCSHRD", uint32 shard version (1), uint32 slot_bytes,
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

The manifest lists shard ``i`` as ``shard-{i:06d}.fkd`` with its first sequence (the sum of the
sequences before it), its counts, its size in bytes and its sha256. ``manifest_sha256`` is the
sha256 of the manifest's other keys as canonical JSON (sorted keys, no whitespace, ASCII), so an
edit that changes what the cache means (``num_samples``, a shard listed twice) fails it. The
manifest is format version 2; version 1 (the same files without ``manifest_sha256``) is still read
with every check but that one, and a writer resuming it rewrites its manifest as version 2. Shard
files are unchanged since version 1 and keep 1 in their header.

Limits (``LIMITS``) bound every size so that what a writer accepts a reader can hold: a writer
refuses larger arguments with a ValueError, and a reader checks a manifest's and a shard header's
sizes against them and against the file's size before it maps or allocates anything.

This module holds the cache's names, limits and metadata checks and its manifest (checksum,
reading and checks); the bytes of a shard file (header, section layout, entry encoding, the
packing of sequences) are in ``shard``, whose names are importable from here as well.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import stat

from ..targets import METHODS, TAILS

# The shard's names stay importable from here (the reader and the writer take them from here).
from .shard import (
    HEADER as HEADER,
    MAGIC as MAGIC,
    SHARD_VERSION as SHARD_VERSION,
    Encoding,
    encode_sequence as encode_sequence,
    layout,
    pack_shard as pack_shard,
    pack_words as pack_words,
    unpack_words as unpack_words,
)

FORMAT = "fastkd-teacher-cache"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
LOCK = ".lock"
CHECKSUM_KEY = "manifest_sha256"

SHARD_NAME = re.compile(r"shard-\d{6}\.fkd")
# A writer's temporary file: the final name, 16 random hex digits (so no two writes share a
# name) and ".tmp"; version-1 writers used the name without the random part. A resuming writer
# removes these and the shards its manifest does not list, and nothing else.
TEMP_NAME = re.compile(r"\.(?:shard-\d{6}\.fkd|manifest\.json)(?:\.[0-9a-f]{16})?\.tmp")
HASH_CHUNK = 1 << 24

# What a cache can hold, each bound with what decides it.
MAX_VOCAB_SIZE = 2**31  # ids are int32 in SparseTargets, so the largest is 2^31 - 1
MAX_NUM_SAMPLES = 2**31 - 1  # the samplers take N (and k) as a 32-bit int
MAX_SEED = 2**64  # the samplers' key is a uint64
MAX_SLOTS = 2**32 - 1  # K, slots per token: the widest slot count is a uint32
# A shard is written once it reaches shard_tokens (<= 2^31), so with sequences of < 2^31 tokens
# it holds < 2^32, which a reader checks before opening it.
MAX_SEQUENCE_TOKENS = 2**31 - 1
MAX_SHARD_TOKENS = 2**31
MAX_TOKENS_PER_SHARD = 2**32 - 1
MAX_COUNT = 2**63 - 1  # any other count: it must fit a uint64 header and numpy int64
MAX_SHARDS = 10**6  # shard names have six digits
MAX_NAME_CHARS = 4096  # teacher_name, tokenizer_fingerprint: a model path or a digest
# 10^6 shard records of at most 330 bytes each (indented JSON, every count at its limit).
MAX_MANIFEST_BYTES = 512 * 2**20

LIMITS = {
    "vocab_size": (1, MAX_VOCAB_SIZE),
    "num_samples": (1, MAX_NUM_SAMPLES),
    "seed": (0, MAX_SEED - 1),
    "shard_tokens": (1, MAX_SHARD_TOKENS),
}

# Fields that must agree between a cache and every SparseTargets written to it.
TARGET_FIELDS = ("vocab_size", "num_samples", "method", "temperature", "seed", "tail")
# Fields that identify a cache: resuming with any of them different is refused.
IDENTITY_FIELDS = TARGET_FIELDS + ("teacher_name", "tokenizer_fingerprint")
MANIFEST_KEYS = frozenset(("format", "version", "logprobs", "encoding", "shards") + IDENTITY_FIELDS)
RECORD_KEYS = frozenset(
    ("file", "first_sequence", "sequences", "tokens", "entries", "slot_bytes", "bytes", "sha256")
)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CacheCorruptError(ValueError):
    """A cache is unreadable: a file is missing, truncated, malformed, or fails its checksum or
    structure checks."""


def check_int(name: str, value, lo: int, hi: int) -> int:
    """``value`` as an int if it is an integer (not a bool) in ``[lo, hi]``, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}]; got {value!r}")
    return int(value)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.fkd"


def validate_metadata(meta: dict) -> None:
    """ValueError naming the first field of ``meta`` outside what a cache holds."""
    for key, (lo, hi) in LIMITS.items():
        if key in meta:
            check_int(key, meta[key], lo, hi)
    t = meta["temperature"]
    if not isinstance(t, float) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite float > 0; got {t!r}")
    if meta["method"] not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {meta['method']!r}")
    if meta["method"] == "topk" and meta["tail"] not in TAILS:
        raise ValueError(f"topk caches need tail in {TAILS}; got {meta['tail']!r}")
    if meta["method"] == "random" and meta["tail"] is not None:
        raise ValueError(f"random caches have tail None; got {meta['tail']!r}")
    for key in ("teacher_name", "tokenizer_fingerprint"):
        if not isinstance(meta[key], str) or len(meta[key]) > MAX_NAME_CHARS:
            raise ValueError(
                f"{key} must be a str of at most {MAX_NAME_CHARS} characters; got "
                f"{type(meta[key]).__name__} {meta[key]!r:.80}"
            )


def canonical_json(value) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def manifest_checksum(manifest: dict) -> str:
    """sha256 (hex) of every key of ``manifest`` but the checksum itself, as canonical JSON."""
    rest = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(canonical_json(rest)).hexdigest()


def encode_manifest(manifest: dict) -> bytes:
    """``manifest`` with its checksum, as the bytes of manifest.json (indented for people)."""
    full = {**manifest, CHECKSUM_KEY: manifest_checksum(manifest)}
    return json.dumps(full, indent=1, allow_nan=False).encode()


def open_regular(path: str):
    """``path`` opened for binary reading; FileNotFoundError if it is missing, CacheCorruptError
    if it is not a regular file (a FIFO or a device would block or never end)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise CacheCorruptError(f"{path} is not a regular file")
    return f


def read_manifest(path: str) -> tuple[dict, Encoding, int]:
    """The validated manifest of the cache at ``path``, its encoding, and its size in bytes.

    Raises:
        FileNotFoundError: ``path`` is not a directory or has no manifest.
        CacheCorruptError: the manifest is too large, not JSON, or fails a check.
    """
    file = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no teacher cache at {path}: not a directory")
    try:
        f = open_regular(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"no teacher cache at {path}: {MANIFEST} is missing") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        # read(n) allocates n bytes up front, so n is the file's size, once it is within the cap.
        raw = f.read(size + 1) if size <= MAX_MANIFEST_BYTES else b""
    if not 0 < len(raw) <= MAX_MANIFEST_BYTES:
        raise CacheCorruptError(
            f"{file} has {size} bytes; a manifest has 1 to "
            f"{MAX_MANIFEST_BYTES} (that of {MAX_SHARDS} shards)"
        )
    try:
        manifest = json.loads(raw, object_pairs_hook=_unique_keys)
        enc = _validate_manifest(manifest)
    except CacheCorruptError as e:
        raise CacheCorruptError(f"{file}: {e}") from None
    # Whatever else a malformed file makes the parser or the checks raise: a JSON or Unicode
    # error, an int of too many digits (ValueError), brackets nested deeper than the recursion
    # limit (RecursionError), a wrong type where a number or a list is expected.
    except (ValueError, RecursionError, TypeError, KeyError, AttributeError) as e:
        raise CacheCorruptError(f"{file} is corrupt: {type(e).__name__}: {e}") from None
    return manifest, enc, len(raw)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    # Parsers disagree on which of two equal keys wins, so a manifest that has any is corrupt.
    out = {}
    for key, value in pairs:
        if key in out:
            raise CacheCorruptError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _validate_manifest(manifest) -> Encoding:
    """The encoding of a parsed manifest, after checking everything in it; CacheCorruptError
    (or ValueError) on the first problem."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheCorruptError(f"not a {FORMAT} manifest")
    version = manifest.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise CacheCorruptError(
            f"format version {version!r}; this fastkd reads versions "
            f"{READABLE_VERSIONS} (was it written by a newer fastkd?)"
        )
    keys = MANIFEST_KEYS | {CHECKSUM_KEY} if version >= 2 else MANIFEST_KEYS
    if manifest.keys() != keys:
        raise CacheCorruptError(
            f"keys {sorted(keys - manifest.keys())} are missing and "
            f"{sorted(manifest.keys() - keys)} unexpected"
        )
    if version >= 2 and manifest[CHECKSUM_KEY] != manifest_checksum(manifest):
        raise CacheCorruptError("fails its manifest_sha256 checksum (edited or corrupt)")
    validate_metadata(manifest)
    enc = Encoding.for_metadata(manifest)
    if canonical_json(manifest["encoding"]) != canonical_json(enc.to_json()):
        raise CacheCorruptError(
            f"encoding {manifest['encoding']} does not follow from its "
            f"metadata (expected {enc.to_json()})"
        )
    logprobs, shards = manifest["logprobs"], manifest["shards"]
    if logprobs is not None and not isinstance(logprobs, bool):
        raise CacheCorruptError(f"logprobs must be true, false or null; got {logprobs!r}")
    if not isinstance(shards, list) or len(shards) > MAX_SHARDS:
        raise CacheCorruptError(f"shards must be a list of at most {MAX_SHARDS} records")
    if shards and logprobs is None:
        raise CacheCorruptError("shards are listed but logprobs is unset")
    first = 0
    for i, record in enumerate(shards):
        _validate_record(record, i, first, enc, bool(logprobs), manifest["tail"] == "bucket")
        first += record["sequences"]
    return enc


def _validate_record(
    record, index: int, first: int, enc: Encoding, logprobs: bool, tail_mass: bool
) -> None:
    if not isinstance(record, dict) or record.keys() != RECORD_KEYS:
        raise CacheCorruptError(
            f"shard record {index} is not an object with keys "
            f"{sorted(RECORD_KEYS)}: {record!r:.200}"
        )
    # Shard i is named for i, so the names are distinct and every shard is listed once, in order.
    if record["file"] != shard_name(index):
        raise CacheCorruptError(
            f"shard record {index} names {record['file']!r}; shard {index} "
            f"is {shard_name(index)} (each shard is listed once, in order)"
        )
    bounds = {
        "first_sequence": (0, MAX_COUNT),
        "sequences": (1, MAX_COUNT),
        "tokens": (0, MAX_TOKENS_PER_SHARD),
        "entries": (0, MAX_COUNT),
        "bytes": (0, MAX_COUNT),
    }
    for key, (lo, hi) in bounds.items():
        check_int(f"{record['file']}: {key}", record[key], lo, hi)
    if record["first_sequence"] != first:
        raise CacheCorruptError(
            f"{record['file']} starts at sequence {record['first_sequence']}"
            f"; the shards before it hold {first}"
        )
    if type(record["slot_bytes"]) is not int or record["slot_bytes"] not in (1, 2, 4):
        raise CacheCorruptError(
            f"{record['file']}: slot_bytes must be 1, 2 or 4; got {record['slot_bytes']!r}"
        )
    if record["entries"] > record["tokens"] * (256 ** record["slot_bytes"] - 1):
        raise CacheCorruptError(
            f"{record['file']}: {record['entries']} entries are more than "
            f"{record['tokens']} slot counts of {record['slot_bytes']} "
            f"bytes can hold"
        )
    if not isinstance(record["sha256"], str) or not _SHA256.fullmatch(record["sha256"]):
        raise CacheCorruptError(f"{record['file']}: sha256 must be 64 hex digits")
    _, size = layout(
        enc,
        record["slot_bytes"],
        record["sequences"],
        record["tokens"],
        record["entries"],
        logprobs,
        tail_mass,
    )
    if record["bytes"] != size:
        raise CacheCorruptError(
            f"{record['file']}: the manifest records {record['bytes']} "
            f"bytes; its counts imply {size}"
        )
