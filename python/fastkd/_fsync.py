"""Durability of files the project writes (teacher caches, checkpoints): a file's data, and a
rename or a new entry in a directory, survive a power loss only once synced (POSIX)."""

from __future__ import annotations

import os

__all__ = ["fsync_dir", "fsync_file"]


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
