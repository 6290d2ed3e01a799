"""pytest's hooks and fixtures: Triton runs under its CPU interpreter when no GPU is present (which
must be decided before anything imports triton), each worker of ``pytest -n`` takes its share of
torch's threads, GPU tests skip without one, and the trainer tests' tiny setup. What the tests
share otherwise lives in helpers.py."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# pytest -n (pytest-xdist, the default in pyproject's addopts) runs several worker processes on
# the same cores: each takes its share of torch's threads (on 2 cores, 2 workers of 1 thread ran
# the default tests in 92 s against 135 s for one process of 2 threads). The kernels' split of
# rows among threads is tested explicitly (test_threads.py).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))


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
