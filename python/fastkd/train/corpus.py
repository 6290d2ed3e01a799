"""A demo corpus that needs no download: the Python standard library's own source files."""

from __future__ import annotations

import os
import sysconfig

__all__ = ["stdlib_corpus"]

# Test suites are large, repetitive and full of deliberately odd text; idlelib and lib2to3 are
# applications rather than library code; site-packages holds third-party packages, not the
# standard library (dist-packages is its Debian name).
_SKIPPED_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages"})


def _module_paths(root: str) -> list[str]:
    """The ``.py`` files under ``root`` outside the skipped directories, as paths relative to
    ``root`` with ``/`` separators, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.endswith(".py"):
                found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(found)


def stdlib_corpus(max_chars: int | None = None) -> list[str]:
    """Documents made of the running Python's standard-library source code.

    One document per non-empty module file (``.py``, the full text, UTF-8), in the order of the
    files' paths relative to the standard-library directory (``sysconfig``'s ``"stdlib"`` path),
    sorted as strings with ``/`` separators. Left out: the ``test``, ``tests``, ``idlelib``,
    ``lib2to3``, ``site-packages`` and ``dist-packages`` directories, and files that are not
    valid UTF-8. Mostly Python code with English docstrings and comments: a corpus that
    ships with every Python, though it differs between Python versions.

    Args:
        max_chars: bound on the total length in characters (code points): the longest prefix of
            that order whose total stays within it (whole documents only). None: every file.

    Returns:
        The documents, one string per module file.
    """
    if max_chars is not None and (
        isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 0
    ):
        raise ValueError(f"max_chars must be None or an int >= 0; got {max_chars!r}")
    root = sysconfig.get_paths()["stdlib"]
    docs: list[str] = []
    total = 0
    for rel in _module_paths(root):
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            continue
        if not text:
            continue
        if max_chars is not None and total + len(text) > max_chars:
            break
        docs.append(text)
        total += len(text)
    return docs
