"""Shared test setup: Triton runs under its CPU interpreter when no GPU is present (which must be
decided before anything imports triton), and GPU tests skip without one."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastkd  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def fused_backends(device: str) -> list[str]:
    """The fused backends that can run on ``device`` here."""
    if device == "cuda" and not HAS_CUDA:
        return []
    return [b for b in fastkd.available_backends("kd_loss", device) if b != "torch"]
