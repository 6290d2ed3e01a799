"""A teacher cache's shard file as bytes: its header, the layout of its sections, the encoding
of its entries, and the encoding of sequences and their packing into a shard. The format itself
(files, sections, encodings, limits) is described in ``format``, which re-exports these names.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..targets import SparseTargets

SHARD_VERSION = 1
MAGIC = b"FKDCSHRD"
HEADER = struct.Struct("<8sIIQQQ")


@dataclass(frozen=True)
class Encoding:
    """How entries are packed. ``kind`` is ``"count"`` (id and count - 1 in one word) or
    ``"float"`` (id, then a float32 weight in its own section)."""

    kind: str
    id_bits: int
    count_bits: int

    @staticmethod
    def for_metadata(meta: dict) -> "Encoding":
        """The encoding of a cache with (validated) metadata ``meta``; at most 31 + 31 bits."""
        id_bits = max(1, (meta["vocab_size"] - 1).bit_length())
        if meta["method"] == "random" and meta["temperature"] == 1.0:
            return Encoding("count", id_bits, max(1, (meta["num_samples"] - 1).bit_length()))
        return Encoding("float", id_bits, 0)

    @property
    def word_bytes(self) -> int:
        """Bytes of one entry in the entries section."""
        return (self.id_bits + self.count_bits + 7) // 8

    def to_json(self) -> dict:
        return {"kind": self.kind, "id_bits": self.id_bits, "count_bits": self.count_bits}


def pack_words(values: np.ndarray, nbytes: int) -> np.ndarray:
    """uint64 [n] -> uint8 [n * nbytes]: the low ``nbytes`` bytes of each value, little-endian."""
    return values.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :nbytes].reshape(-1)


def unpack_words(raw: np.ndarray, nbytes: int) -> np.ndarray:
    """uint8 [n * nbytes] -> uint64 [n], the inverse of ``pack_words``."""
    wide = np.zeros((raw.size // nbytes, 8), np.uint8)
    wide[:, :nbytes] = raw.reshape(-1, nbytes)
    return wide.view("<u8").reshape(-1)


def layout(
    enc: Encoding,
    slot_bytes: int,
    sequences: int,
    tokens: int,
    entries: int,
    logprobs: bool,
    tail_mass: bool,
) -> tuple[dict[str, tuple[int, int]], int]:
    """Section name -> (byte offset, byte size) of a shard, and the shard's total size."""
    sizes = [
        ("seq_tokens", 8 * (sequences + 1)),
        ("seq_entries", 8 * (sequences + 1)),
        ("slots", slot_bytes * tokens),
        ("entries", enc.word_bytes * entries),
    ]
    if enc.kind == "float":
        sizes.append(("weights", 4 * entries))
    if logprobs:
        sizes.append(("logprobs", 4 * entries))
    if tail_mass:
        sizes.append(("tail_mass", 4 * tokens))
    sections, offset = {}, HEADER.size
    for name, size in sizes:
        offset = -(-offset // 8) * 8
        sections[name] = (offset, size)
        offset += size
    return sections, offset


def encode_sequence(targets: SparseTargets, meta: dict, enc: Encoding) -> dict[str, np.ndarray]:
    """One sequence ``[T, K]`` as ragged sections: slots [T], entries (packed), weights /
    logprobs [E] and tail_mass [T] as kept. ValueError if it does not fit the encoding."""
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
            raise ValueError(
                f"weight {bad!r} is not count / N for an integer count in "
                f"[1, {n}] (N = num_samples); random targets at temperature 1 "
                f"are stored as counts"
            )
        words = (kept_ids << np.uint64(enc.count_bits)) | (counts - np.uint64(1))
        out["entries"] = pack_words(words, enc.word_bytes)
    else:
        out["entries"] = pack_words(kept_ids, enc.word_bytes)
        out["weights"] = weights.astype("<f4")
    if targets.logprobs is not None:
        out["logprobs"] = targets.logprobs.detach().cpu().numpy()[keep].astype("<f4")
    if targets.tail_mass is not None:
        out["tail_mass"] = targets.tail_mass.detach().cpu().numpy().astype("<f4")
    return out


def _bytes_view(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def pack_shard(
    pending: list[dict[str, np.ndarray]], enc: Encoding, logprobs: bool, tail_mass: bool
) -> tuple[list[np.ndarray], dict]:
    """The bytes of a shard holding the encoded sequences ``pending`` (as chunks to write in
    order) and its counts: sequences, tokens, entries and slot_bytes."""
    slots = np.concatenate([p["slots"] for p in pending])
    seq_tokens = np.cumsum([0] + [p["slots"].size for p in pending]).astype("<u8")
    seq_entries = np.cumsum([0] + [int(p["slots"].sum()) for p in pending]).astype("<u8")
    s, t, e = len(pending), int(seq_tokens[-1]), int(seq_entries[-1])
    max_slots = int(slots.max(initial=0))
    slot_bytes = 1 if max_slots <= 0xFF else 2 if max_slots <= 0xFFFF else 4
    sections, _ = layout(enc, slot_bytes, s, t, e, logprobs, tail_mass)
    data = {
        "seq_tokens": seq_tokens,
        "seq_entries": seq_entries,
        "slots": slots.astype(f"<u{slot_bytes}"),
    }
    for key in sections.keys() - data.keys():
        data[key] = np.concatenate([p[key] for p in pending])
    chunks = [np.frombuffer(HEADER.pack(MAGIC, SHARD_VERSION, slot_bytes, s, t, e), np.uint8)]
    offset = HEADER.size
    for name, (start, size) in sections.items():
        if start > offset:
            chunks.append(np.zeros(start - offset, np.uint8))  # alignment padding
        chunks.append(_bytes_view(data[name]))
        offset = start + size
    return chunks, {"sequences": s, "tokens": t, "entries": e, "slot_bytes": slot_bytes}
