"""A byte-level BPE tokenizer trained locally, saved in the Hugging Face format, and a
fingerprint of what decides a tokenizer's token ids."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

__all__ = ["load_tokenizer", "tokenizer_fingerprint", "train_bpe_tokenizer"]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    path: str,
    *,
    special_tokens: Iterable[str] = (EOS_TOKEN, PAD_TOKEN),
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on ``texts`` and saves it under ``path``.

    GPT-2 style: text is split by the byte-level pre-tokenizer's regex, mapped to bytes, and
    merged by BPE; the initial alphabet is all 256 bytes, so any text encodes (no unknown
    token) and decodes back exactly (no normalizer). The special tokens take the first ids, in
    the order given; ``<|endoftext|>`` is the eos token and ``<|pad|>`` the pad token, so both
    must be among them. The directory then loads with
    ``transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)``.

    Deterministic: the same ``texts`` (in any order) and ``vocab_size`` give byte-identical
    ``tokenizer.json`` files whatever the number of threads. The trainer breaks ties between
    equally frequent pairs by their token ids, and with the whole byte alphabet given up front
    every id is fixed before any words are counted: the byte ids in code-point order, each
    merge's id in merge order.

    Args:
        texts: the training documents.
        vocab_size: the vocabulary size (ids), counting the special tokens and the 256 bytes;
            less if the texts run out of pairs to merge.
        path: the output directory (created if missing; its tokenizer files are replaced).
        special_tokens: token strings that are never split and never produced by merges.

    Returns:
        The saved tokenizer, as loaded back from ``path`` (so it equals any later load).
    """
    special = list(special_tokens)
    for token in (EOS_TOKEN, PAD_TOKEN):
        if token not in special:
            raise ValueError(f"special_tokens must include {token!r}; got {special!r}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, int)
        or vocab_size < len(alphabet) + len(special)
    ):
        raise ValueError(
            f"vocab_size must be an int >= {len(alphabet) + len(special)} (the 256 "
            f"bytes and {len(special)} special tokens); got {vocab_size!r}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    # Saved explicitly: where the default is to clean up tokenization spaces (older
    # transformers), decode drops the space before "." and "," and code no longer round-trips.
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(path)
    return load_tokenizer(path)


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Loads the fast tokenizer saved in the local directory ``path`` (never downloads).

    Raises:
        FileNotFoundError: ``path`` is not a directory holding a ``tokenizer.json``.
        TypeError: the directory holds only a slow (Python) tokenizer.
    """
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(
            f"no tokenizer at {path!r}: expected a directory with a "
            f"tokenizer.json (as train_bpe_tokenizer or save_pretrained "
            f"write)"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tokenizer.is_fast:
        raise TypeError(
            f"the tokenizer at {path!r} loaded as the slow "
            f"{type(tokenizer).__name__}; a fast (tokenizers) one is needed"
        )
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """A sha256 hex digest of everything that decides the ids a tokenizer produces.

    Covers the backend tokenizer's model (vocabulary and merges), normalizer, pre-tokenizer,
    post-processor and added tokens, and the wrapper's special tokens (eos, pad, ...); not the
    decoder, padding or truncation settings. Equal for two loads of the same files, different
    after any change to the vocabulary, merges or special tokens.
    """
    serialized = json.loads(tokenizer.backend_tokenizer.to_str())
    parts = {
        key: serialized.get(key)
        for key in ("model", "normalizer", "pre_tokenizer", "post_processor", "added_tokens")
    }
    parts["special_tokens"] = {
        name: str(token) for name, token in tokenizer.special_tokens_map.items()
    }
    # sort_keys makes the digest independent of how the json happens to order dict entries.
    canonical = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
