"""pytest's hooks and fixtures: Triton runs under its CPU interpreter when no GPU is present (which
must be decided before anything imports triton), GPU tests skip without one, and the trainer
tests' tiny setup. What the tests share otherwise lives in helpers.py."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The trainer tests' corpus, tokenizer and tiny model configs (``train_setup.TinySetup``)."""
    pytest.importorskip("transformers")
    from train_setup import build_tiny_setup

    return build_tiny_setup(str(tmp_path_factory.mktemp("tiny-lm")))
