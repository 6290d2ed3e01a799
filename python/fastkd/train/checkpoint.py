"""Checkpoints of a training run: written so that a kill at any moment leaves the previous one
readable, and read without unpickling arbitrary objects.

Layout under a run's ``checkpoints/`` folder::

    step-000120/            one complete checkpoint
        model.safetensors   the student's full state dict (tensors sharing storage stored once)
        optimizer.pt        the optimizer's full state dict, keyed by parameter name
        trainer.pt          step, scheduler, data position, metrics so far
        rng-rank0.pt ...    every rank's random number generator states
        state-rank0.pt ...  every rank's own state where it has one (a replay buffer)
    latest                  the name of the newest complete checkpoint
    .tmp-step-000140/       a checkpoint being written (removed when found later)

A checkpoint is written into a temporary folder, every file synced, then renamed into place and
only then named in ``latest`` (itself replaced atomically): an exception, Ctrl-C, kill -9 or a
full disk before the rename leaves ``latest`` on the previous checkpoint. ``.pt`` files are
read with ``torch.load(weights_only=True)``; the model with safetensors.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

from .._fsync import fsync_dir, fsync_file

__all__ = [
    "checkpoint_dirs",
    "latest_checkpoint",
    "load_checkpoint",
    "remove_partial",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

LATEST = "latest"
_STEP_DIR = re.compile(r"step-(\d{6,})")
_TMP_DIR = re.compile(r"\.tmp-step-\d{6,}|\.latest\.\d+")


def rng_state() -> dict:
    """This process's RNG states (torch CPU and CUDA, Python, NumPy) as tensors and plain values,
    loadable with ``weights_only=True``."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save(obj, path: str) -> None:
    torch.save(obj, path)
    fsync_file(path)


def _save_tensors(state: dict[str, torch.Tensor], path: str) -> None:
    """``state`` in safetensors, each storage once: tensors sharing one (an embedding tied to
    the head, in an unsharded state dict) become aliases listed in the file's metadata; tied
    tensors gathered as separate copies (FSDP) are stored twice and load equal."""
    from safetensors.torch import save_file

    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in state.items():
        ident = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if tensor.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        unique[key] = tensor.detach().contiguous()
    save_file(unique, path, metadata={"aliases": json.dumps(aliases)})
    fsync_file(path)


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(path)
    with safe_open(path, "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for key, target in aliases.items():
        state[key] = state[target]
    return state


def _step_of(name: str) -> int:
    return int(_STEP_DIR.fullmatch(name).group(1))


def checkpoint_dirs(root: str) -> list[str]:
    """Names of the complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if _STEP_DIR.fullmatch(n)]
    return sorted(names, key=_step_of)


def latest_checkpoint(root: str) -> str | None:
    """The folder ``latest`` names, or None. A ``latest`` naming a missing folder is an
    error, not a silent fresh start."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not _STEP_DIR.fullmatch(name) or not os.path.isdir(path):
        raise FileNotFoundError(
            f"{pointer} names {name!r}, which is not a checkpoint folder under {root}"
        )
    return path


def remove_partial(root: str) -> None:
    """Removes what a killed writer left: temporary checkpoint folders and pointer files."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if _TMP_DIR.fullmatch(name):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def save_checkpoint(
    root: str,
    step: int,
    *,
    model_state: dict | None,
    optimizer_state: dict | None,
    trainer_state: dict,
    rank: int,
    world_size: int,
    barrier,
    keep: int,
    rank_state: dict | None = None,
) -> str:
    """Writes checkpoint ``step`` under ``root``. Every rank calls it (each writes its RNG state);
    rank 0 writes the rest (``model_state``/``optimizer_state`` are the gathered full state
    dicts there, None elsewhere), renames the folder into place, points ``latest`` at it and
    removes all but the newest ``keep``. ``rank_state`` (tensors and plain values) is this
    rank's own state beyond its RNG (e.g. its replay buffer). ``barrier()`` synchronizes the
    ranks. Returns the checkpoint's folder."""
    name = f"step-{step:06d}"
    final = os.path.join(root, name)
    # One writer per run folder (the run holds its lock), so the temporary name needs no PID: a
    # folder of that name is a killed writer's leftover.
    tmp = os.path.join(root, f".tmp-{name}")
    if os.path.isdir(final):
        # Replacing it would delete the folder `latest` may name before the new one is in
        # place; a run saves each step once (the trainer skips a step already saved).
        raise FileExistsError(f"checkpoint {final} exists already")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    _torch_save(rng_state(), os.path.join(tmp, f"rng-rank{rank}.pt"))
    if rank_state is not None:
        _torch_save(rank_state, os.path.join(tmp, f"state-rank{rank}.pt"))
    if rank == 0:
        _save_tensors(model_state, os.path.join(tmp, "model.safetensors"))
        _torch_save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        _torch_save(
            {**trainer_state, "step": step, "world_size": world_size},
            os.path.join(tmp, "trainer.pt"),
        )
    barrier()
    if rank == 0:
        fsync_dir(tmp)
        os.replace(tmp, final)
        fsync_dir(root)
        pointer_tmp = os.path.join(root, f".{LATEST}.{os.getpid()}")
        with open(pointer_tmp, "w", encoding="utf-8") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, os.path.join(root, LATEST))
        fsync_dir(root)
        # Older steps only: never the checkpoint just written, whatever else the folder holds.
        older = [n for n in checkpoint_dirs(root) if _step_of(n) < step]
        for old in older[: max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str, rank: int) -> dict:
    """``{"model", "optimizer", "trainer", "rng", "rank"}`` of the checkpoint folder ``path``
    (this rank's RNG state and own state, None where it saved none; the rank-0 ones when the
    run had fewer ranks)."""
    for file in ("model.safetensors", "optimizer.pt", "trainer.pt"):
        if not os.path.isfile(os.path.join(path, file)):
            raise FileNotFoundError(f"checkpoint {path} is missing {file}")
    rng_file = os.path.join(path, f"rng-rank{rank}.pt")
    if not os.path.isfile(rng_file):
        rng_file = os.path.join(path, "rng-rank0.pt")
    state_file = os.path.join(path, f"state-rank{rank}.pt")
    if not os.path.isfile(state_file):
        state_file = os.path.join(path, "state-rank0.pt")
    load = dict(map_location="cpu", weights_only=True)
    return {
        "model": _load_tensors(os.path.join(path, "model.safetensors")),
        "optimizer": torch.load(os.path.join(path, "optimizer.pt"), **load),
        "trainer": torch.load(os.path.join(path, "trainer.pt"), **load),
        "rng": torch.load(rng_file, **load),
        "rank": torch.load(state_file, **load) if os.path.isfile(state_file) else None,
    }
