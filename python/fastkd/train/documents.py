"""Training documents: read from ``.txt`` and ``.jsonl`` files, and split into a training and a
held-out set.

Two kinds of document: plain text, and prompt/completion pairs (see ``data`` for how each
becomes next-token sequences).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Document", "read_documents", "split_documents"]

_FORMATS = {"auto": (".txt", ".jsonl"), "txt": (".txt",), "jsonl": (".jsonl",)}


@dataclass(frozen=True)
class Document:
    """A text document (``text``), or a prompt/completion pair (``prompt`` and ``completion``);
    the fields of the other kind are None."""

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None

    def __post_init__(self):
        fields = (self.text, self.prompt, self.completion)
        if any(f is not None and not isinstance(f, str) for f in fields):
            raise TypeError(
                f"Document fields must be str or None; got "
                f"{tuple(type(f).__name__ for f in fields)}"
            )
        if (self.text is None) == (self.prompt is None and self.completion is None) or (
            self.prompt is None
        ) != (self.completion is None):
            raise ValueError("a Document has either text, or both prompt and completion")

    @property
    def is_pair(self) -> bool:
        """True for a prompt/completion pair, False for a text document."""
        return self.text is None


def _files_of(path: str, fmt: str) -> list[tuple[str, str]]:
    """``path`` (a file, or a directory standing for its files of ``fmt``'s suffixes, sorted by
    name) as (file, format) pairs, format ``"txt"`` or ``"jsonl"``."""
    suffixes = _FORMATS[fmt]
    if os.path.isdir(path):
        names = sorted(
            n
            for n in os.listdir(path)
            if n.endswith(suffixes) and os.path.isfile(os.path.join(path, n))
        )
        if not names:
            raise ValueError(f"directory {path!r} holds no {' or '.join(suffixes)} files")
        return [f for n in names for f in _files_of(os.path.join(path, n), fmt)]
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or directory: {path!r}")
    if fmt != "auto":
        return [(path, fmt)]
    if not path.endswith(suffixes):
        raise ValueError(
            f"cannot tell the format of {path!r} from its name: expected a .txt or "
            f".jsonl file, or format='txt' or 'jsonl'"
        )
    return [(path, "txt" if path.endswith(".txt") else "jsonl")]


def _read_txt(path: str) -> Document:
    try:
        with open(path, encoding="utf-8") as f:
            return Document(text=f.read())
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _read_jsonl(path: str, text_key: str, prompt_key: str, completion_key: str) -> list[Document]:
    with open(path, "rb") as f:
        data = f.read()
    docs = []
    # JSON escapes newlines inside strings, so every raw b"\n" ends a record.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object; got {type(record).__name__}")
        has_text, has_prompt = text_key in record, prompt_key in record
        has_completion = completion_key in record
        if has_text and (has_prompt or has_completion):
            raise ValueError(
                f"{where}: a record is either text ({text_key!r}) or a pair "
                f"({prompt_key!r}, {completion_key!r}), not both"
            )
        if has_text:
            keys = (text_key,)
        elif has_prompt and has_completion:
            keys = (prompt_key, completion_key)
        elif has_prompt or has_completion:
            missing = completion_key if has_prompt else prompt_key
            raise ValueError(
                f"{where}: missing key {missing!r} (a pair needs {prompt_key!r} and "
                f"{completion_key!r})"
            )
        else:
            raise ValueError(
                f"{where}: expected key {text_key!r}, or keys {prompt_key!r} and "
                f"{completion_key!r}; got keys {sorted(record)}"
            )
        for key in keys:
            if not isinstance(record[key], str):
                raise ValueError(
                    f"{where}: {key!r} must be a string; got {type(record[key]).__name__}"
                )
        docs.append(
            Document(text=record[text_key])
            if has_text
            else Document(prompt=record[prompt_key], completion=record[completion_key])
        )
    return docs


def read_documents(
    paths: Sequence[str | os.PathLike],
    *,
    format: str = "auto",
    text_key: str = "text",
    prompt_key: str = "prompt",
    completion_key: str = "completion",
) -> list[Document]:
    """Reads documents from ``.txt`` and ``.jsonl`` files, in the order of ``paths``.

    A ``.txt`` file is one text document (UTF-8). A ``.jsonl`` file holds one JSON object per
    line (blank lines skipped): ``{text_key: str}`` is a text document, ``{prompt_key: str,
    completion_key: str}`` a prompt/completion pair; other keys are ignored and one file may mix
    both kinds. A directory stands for its ``.txt`` and ``.jsonl`` files (not subdirectories),
    sorted by name.

    Args:
        paths: files and directories.
        format: ``"auto"`` (by file suffix), or ``"txt"`` / ``"jsonl"`` to read every file (and
            a directory's files of that suffix) as that format.
        text_key, prompt_key, completion_key: the JSONL keys of the fields.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a file is not UTF-8, a record is not valid (the message names the file and
            line), a file's format cannot be told, or a directory holds no such files.
    """
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError(f"paths must be a list of paths; got the single path {paths!r}")
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {sorted(_FORMATS)}; got {format!r}")
    docs: list[Document] = []
    for path in paths:
        for file, fmt in _files_of(os.fspath(path), format):
            if fmt == "txt":
                docs.append(_read_txt(file))
            else:
                docs.extend(_read_jsonl(file, text_key, prompt_key, completion_key))
    return docs


def split_documents(
    docs: Sequence[Document], *, eval_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Splits documents into a training and an evaluation set, deterministically.

    Each distinct document gets a key, the sha256 of ``seed`` and its content; the evaluation
    set takes distinct documents in key order (with all their copies, so that no content is in
    both sets) until it holds ``round(eval_fraction * n)`` documents, at least one when
    ``eval_fraction > 0``, and never all of them. The split depends on the documents' contents
    and ``seed`` only, not on their order. Both sets keep the input order.
    With fewer than two distinct documents the evaluation set is empty.

    Args:
        docs: the documents (n of them).
        eval_fraction: the fraction of documents held out, in [0, 1).
        seed: any int; different seeds give independent splits.

    Returns:
        (train_docs, eval_docs).
    """
    if (
        isinstance(eval_fraction, bool)
        or not isinstance(eval_fraction, (int, float))
        or not 0.0 <= eval_fraction < 1.0
    ):
        raise ValueError(f"eval_fraction must be a number in [0, 1); got {eval_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int; got {seed!r}")
    n = len(docs)
    target = min(max(1, round(eval_fraction * n)), n - 1) if eval_fraction > 0 and n >= 2 else 0
    copies: dict[str, list[int]] = {}
    for i, doc in enumerate(docs):
        content = json.dumps([seed, doc.text, doc.prompt, doc.completion], ensure_ascii=False)
        key = hashlib.sha256(content.encode("utf-8", "surrogatepass")).hexdigest()
        copies.setdefault(key, []).append(i)
    held_out: set[int] = set()
    for key in sorted(copies):
        if len(held_out) >= target:
            break
        if len(held_out) + len(copies[key]) < n:
            held_out.update(copies[key])
    return (
        [d for i, d in enumerate(docs) if i not in held_out],
        [d for i, d in enumerate(docs) if i in held_out],
    )
