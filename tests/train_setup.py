"""Shared setup of the trainer's tests: a small corpus, a BPE tokenizer trained on it, and
config.json files of a tiny Llama-style teacher and student (random weights), built once per
test session by the ``tiny`` fixture of ``conftest.py``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass
class TinySetup:
    root: str
    corpus: str
    tokenizer: str
    teacher: str
    student: str
    student_dropout: str  # the student with attention dropout 0.2
    vocab_size: int

    def config(self, out: str, **sections) -> dict:
        """A distill config of the tiny models on the corpus, writing to ``out``; ``sections``
        are merged into it (e.g. ``train={"steps": 3}``)."""
        tree = {
            "model": {
                "student": self.student,
                "teacher": self.teacher,
                "tokenizer": self.tokenizer,
            },
            "data": {"train": [self.corpus], "eval_fraction": 0.1, "seq_len": 32},
            "train": {
                "steps": 4,
                "micro_batch_size": 2,
                "grad_accum": 2,
                "lr": 3e-3,
                "warmup_steps": 1,
                "seed": 0,
            },
            "eval": {"batch_size": 4, "max_batches": 2},
            "output": {"dir": out, "progress": False, "plots": False},
        }
        for section, values in sections.items():
            tree[section] = {**tree.get(section, {}), **values}
        return tree


def _llama(path: str, vocab: int, hidden: int, layers: int, tokenizer, dropout: float = 0.0) -> str:
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        attention_dropout=dropout,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(path)
    return path


def build_cross_tokenizer_teacher(tiny: TinySetup) -> tuple[str, str]:
    """(tokenizer, teacher config) of a teacher with a tokenizer of its own: a byte-level BPE of
    another size trained on the same corpus (its ids differ from the student's), built once
    under the tiny setup's folder."""
    from fastkd.train.tokenizer import load_tokenizer, train_bpe_tokenizer

    tok_dir = os.path.join(tiny.root, "teacher-tokenizer")
    teacher = os.path.join(tiny.root, "teacher-own-tokenizer")
    if os.path.isfile(os.path.join(teacher, "config.json")):
        return tok_dir, teacher
    with open(tiny.corpus, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    tokenizer = train_bpe_tokenizer(docs, 420, tok_dir)
    _llama(teacher, len(load_tokenizer(tok_dir)), 24, 2, tokenizer)
    return tok_dir, teacher


def build_tiny_setup(root: str) -> TinySetup:
    from fastkd.train.corpus import stdlib_corpus
    from fastkd.train.tokenizer import train_bpe_tokenizer

    docs = stdlib_corpus(max_chars=40_000)
    corpus = os.path.join(root, "corpus.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    tok_dir = os.path.join(root, "tokenizer")
    tokenizer = train_bpe_tokenizer(docs, 320, tok_dir)
    vocab = len(tokenizer)
    return TinySetup(
        root,
        corpus,
        tok_dir,
        _llama(os.path.join(root, "teacher"), vocab, 32, 2, tokenizer),
        _llama(os.path.join(root, "student"), vocab, 16, 1, tokenizer),
        _llama(os.path.join(root, "student-dropout"), vocab, 16, 1, tokenizer, dropout=0.2),
        vocab,
    )
