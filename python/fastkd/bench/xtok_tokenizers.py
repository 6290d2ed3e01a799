"""A pair of different tokenizers trained in seconds on text that ships with Python, for the
cross-tokenizer benchmark and tests: a GPT-2-style byte-level BPE (no BOS, ``<|endoftext|>``)
and a SentencePiece-style BPE (``▁`` space marker, byte-fallback pieces ``<0x00>``..``<0xFF>``
for characters outside its alphabet, a BOS ``<s>`` added in front of every text)."""

from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..train.corpus import stdlib_corpus
from ..train.tokenizer import train_bpe_tokenizer

__all__ = ["BYTE_PIECES", "byte_level_pair", "tokenizer_pair"]

BYTE_PIECES = [f"<0x{i:02X}>" for i in range(256)]


def _byte_fallback_bpe(texts: list[str], vocab_size: int, path: str):
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    # A small alphabet: characters outside it are written as byte pieces.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials + BYTE_PIECES,
        limit_alphabet=90,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(path)
    return wrapped


def tokenizer_pair(path: str, *, chars: int = 200_000):
    """(byte-level BPE of 1,000 ids, byte-fallback BPE of 700 ids), trained on the first
    ``chars`` characters of the standard library's source and saved under ``path``."""
    texts = stdlib_corpus(max_chars=chars)
    byte_level = train_bpe_tokenizer(texts, 1000, os.path.join(path, "byte_level"))
    fallback = _byte_fallback_bpe(texts, 700, os.path.join(path, "byte_fallback"))
    return byte_level, fallback


def byte_level_pair(path: str, *, chars: int = 200_000):
    """(byte-level BPE of 1,000 ids, byte-level BPE of 400 ids): two tokenizers of the one kind
    TRL's GOLD aligner takes (ByteLevel), trained as ``tokenizer_pair``'s."""
    texts = stdlib_corpus(max_chars=chars)
    return (
        train_bpe_tokenizer(texts, 1000, os.path.join(path, "byte_level_1000")),
        train_bpe_tokenizer(texts, 400, os.path.join(path, "byte_level_400")),
    )
