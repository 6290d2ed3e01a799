"""The bytes each token id stands for, and the map between two tokenizers' identical tokens.

Tokenizers spell the same bytes differently: byte-level BPE (GPT-2, Llama 3, Qwen) writes each
byte as one printable character (``Ġ`` for a space), SentencePiece-style models (Llama 2, Gemma)
write a space as ``▁`` and unknown bytes as byte-fallback pieces ``<0xE4>``. ``token_bytes``
undoes each spelling, so two vocabularies can be compared by the bytes their tokens decode to.
Both are computed once per tokenizer (cached by a digest of its serialized vocabulary).
"""

from __future__ import annotations

import hashlib
import re
import weakref
from typing import NamedTuple

import torch

__all__ = ["VocabMap", "byte_piece_ids", "token_bytes", "vocab_map"]

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPACE_MARKER = "\u2581"  # ▁


def _byte_level_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet: printable characters standing for bytes 0..255 (the GPT-2
    table, also ``tokenizers.pre_tokenizers.ByteLevel.alphabet()``), inverted."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_decoder()

# Per tokenizer object: the digest of its serialized backend (so an equal tokenizer loaded twice
# shares the cached tables) and the tables themselves.
_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKEN_BYTES: dict[str, list[bytes | None]] = {}
_MAPS: dict[tuple[str, str], "VocabMap"] = {}


def _backend_json(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"a fast (tokenizers-backed) tokenizer is needed to read its vocabulary; "
            f"got {type(tokenizer).__name__}"
        )
    return backend.to_str()


def _digest(tokenizer) -> str:
    try:
        return _DIGESTS[tokenizer]
    except (KeyError, TypeError):
        pass
    text = _backend_json(tokenizer) + repr(sorted(tokenizer.all_special_tokens))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    try:
        _DIGESTS[tokenizer] = digest
    except TypeError:  # not weak-referenceable: recomputed next time
        pass
    return digest


def _is_byte_level(tokenizer) -> bool:
    # The model spells bytes as the byte-level alphabet when its pre-tokenizer or decoder is
    # ByteLevel (possibly inside a Sequence).
    text = _backend_json(tokenizer)
    return '"type":"ByteLevel"' in text.replace(" ", "")


def token_bytes(tokenizer) -> list[bytes | None]:
    """The UTF-8 bytes each token id decodes to, by id (``len(tokenizer)`` entries); None for
    special tokens, which stand for no text. Byte-level tokens are mapped through the byte-level
    alphabet, ``▁`` becomes a space and ``<0xNN>`` the byte NN (byte-fallback pieces)."""
    key = _digest(tokenizer)
    cached = _TOKEN_BYTES.get(key)
    if cached is not None:
        return cached
    byte_level = _is_byte_level(tokenizer)
    special = set(tokenizer.all_special_tokens)
    added = set(tokenizer.get_added_vocab())
    out: list[bytes | None] = [None] * len(tokenizer)
    for token, idx in tokenizer.get_vocab().items():
        if idx >= len(out) or token in special:
            continue
        piece = _BYTE_PIECE.match(token)
        if piece:
            out[idx] = bytes([int(piece.group(1), 16)])
        elif token in added:  # added tokens are matched as written
            out[idx] = token.encode("utf-8")
        elif byte_level and all(c in _BYTE_LEVEL for c in token):
            out[idx] = bytes(_BYTE_LEVEL[c] for c in token)
        else:
            out[idx] = token.replace(_SPACE_MARKER, " ").encode("utf-8")
    _TOKEN_BYTES[key] = out
    return out


def byte_piece_ids(tokenizer) -> torch.Tensor:
    """Bool ``[len(tokenizer)]``: which ids are byte-fallback pieces (``<0xNN>``)."""
    flags = torch.zeros(len(tokenizer), dtype=torch.bool)
    for token, idx in tokenizer.get_vocab().items():
        if idx < len(flags) and _BYTE_PIECE.match(token):
            flags[idx] = True
    return flags


class VocabMap(NamedTuple):
    """Pairs of token ids, one per student and teacher token that decode to the same bytes (or
    special tokens with the same string), one-to-one.

    Attributes:
        student_ids: int64 ``[K]`` ids in the student's vocabulary, increasing.
        teacher_ids: int64 ``[K]`` the teacher's id of the same bytes.
        student_vocab: ``len(student_tokenizer)``.
        teacher_vocab: ``len(teacher_tokenizer)``.
    """

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_vocab: int
    teacher_vocab: int

    def check(self, student_vocab: int, teacher_vocab: int) -> None:
        """Raises ValueError unless every id lies within logits of the given widths."""
        for name, ids, width in (
            ("student", self.student_ids, student_vocab),
            ("teacher", self.teacher_ids, teacher_vocab),
        ):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= width):
                raise ValueError(
                    f"the vocabulary map's {name} ids run from {int(ids.min())} to "
                    f"{int(ids.max())} but the {name} logits have {width} columns; "
                    f"build the map from the tokenizers of these models"
                )


def _keys(tokenizer) -> dict:
    """Normalized key -> id, regular tokens before byte-fallback pieces of the same byte (a model
    emits ``A`` for the byte A, its ``<0x41>`` piece only by accident)."""
    names = set(tokenizer.all_special_tokens)
    keys: dict = {("special", t): i for t, i in tokenizer.get_vocab().items() if t in names}
    pieces = byte_piece_ids(tokenizer)
    table = token_bytes(tokenizer)
    for prefer_pieces in (False, True):
        for idx, data in enumerate(table):
            if data is not None and bool(pieces[idx]) == prefer_pieces:
                keys.setdefault(("bytes", data), idx)
    return keys


def vocab_map(student_tokenizer, teacher_tokenizer) -> VocabMap:
    """The map between the two tokenizers' tokens that decode to identical bytes, built once per
    pair of vocabularies and cached. See ``token_bytes`` for the normalization."""
    key = (_digest(student_tokenizer), _digest(teacher_tokenizer))
    cached = _MAPS.get(key)
    if cached is not None:
        return cached
    s_keys, t_keys = _keys(student_tokenizer), _keys(teacher_tokenizer)
    pairs = sorted((s_id, t_keys[k]) for k, s_id in s_keys.items() if k in t_keys)
    s_ids = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    t_ids = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    out = VocabMap(s_ids, t_ids, len(student_tokenizer), len(teacher_tokenizer))
    _MAPS[key] = out
    return out
