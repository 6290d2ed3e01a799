"""Files of a run's output folder other than checkpoints: the writer's lock, JSON written
atomically, and the final model."""

from __future__ import annotations

import json
import os
import shutil

__all__ = ["RunLock", "RunLockedError", "export_model", "write_json_atomic"]


class RunLockedError(RuntimeError):
    """Another run holds the output folder's lock."""


class RunLock:
    """An exclusive advisory lock on ``folder/.lock`` for a run's lifetime: a second run writing
    the same output folder (same machine or shared filesystem with flock) is refused at once
    instead of interleaving its checkpoints with this one's."""

    def __init__(self, folder: str, *, enabled: bool = True):
        self.folder, self.enabled, self.fd = folder, enabled, None

    def __enter__(self):
        if not self.enabled:
            return self
        import fcntl

        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"another fastkd run is writing {self.folder} (its .lock is "
                f"held); wait for it or choose another output.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None
        return False


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _model_state(full_state: dict) -> dict:
    """The wrapped model's own keys from the training module's (``student.model.<name>``)."""
    prefix = "student.model."
    out = {}
    for key, value in full_state.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if key.startswith(prefix):
            out[key[len(prefix) :]] = value
    return out


def export_model(student, tokenizer, path: str, full_state: dict) -> None:
    """The trained student in ``path``: a Hugging Face model folder (safetensors, config,
    tokenizer) when it wraps one, else ``model.safetensors`` of its state dict. ``full_state``
    is the training module's gathered state dict. Written beside and renamed into place,
    replacing an earlier export only once complete."""
    tmp, old = f"{path}.tmp", f"{path}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = _model_state(full_state)
    inner = getattr(student, "model", None)
    if hasattr(inner, "save_pretrained"):
        inner.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    else:
        from .checkpoint import _save_tensors

        _save_tensors(
            {k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors")
        )
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
