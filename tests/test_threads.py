"""Every C++ CPU kernel gives the same bits whatever the thread count: rows are split among
threads, never a row's sums. The tests run one thread per process under ``pytest -n``, so the
split is exercised here explicitly (1 thread against 3)."""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd.ops._native import native

from helpers import make_labels, make_logits

pytestmark = pytest.mark.skipif(native() is None, reason="needs the native CPU kernels")

# csrc/cpu/parallel.h gives a thread at least ceil(65536 / row length) rows (64 at V = 1031): 200
# rows of every call below (one chunk of the lm_head ops at the default budget) reach 3 threads.
ROWS, VOCAB = 200, 1031
MIN_ELEMENTS_PER_THREAD = 65536
assert ROWS >= 3 * -(-MIN_ELEMENTS_PER_THREAD // VOCAB)


def _student():
    return make_logits(ROWS, VOCAB, seed=1).requires_grad_()


def _head():
    """An identity head: the hidden states are the logits, so the GEMMs around the row kernels
    are exact whatever their blocking (a sum of one product and zeros)."""
    return make_logits(ROWS, VOCAB, seed=3).requires_grad_(), torch.eye(VOCAB)


def kd():
    s = _student()
    loss = fastkd.kd_loss(s, make_logits(ROWS, VOCAB, seed=2), divergence="jsd", backend="cpu")
    loss.backward()
    return loss, s.grad


def sparse():
    targets = fastkd.sample_teacher(
        make_logits(ROWS, VOCAB, seed=2), num_samples=64, seed=5, backend="cpu"
    )
    s = _student()
    loss = fastkd.sparse_kd_loss(s, targets, backend="cpu")
    loss.backward()
    return targets.ids, targets.weights, loss, s.grad


def priority():
    targets = fastkd.sample_teacher(
        make_logits(ROWS, VOCAB, seed=2), method="priority", k=16, seed=5, backend="cpu"
    )
    return targets.ids, targets.weights


def uld():
    s = _student()
    labels = make_labels(ROWS, VOCAB)
    loss = fastkd.uld_loss(s, make_logits(ROWS, 700, seed=2), labels=labels, backend="cpu")
    loss.backward()
    return loss, s.grad


def logprobs():
    hidden, weight = _head()
    out = fastkd.fused_linear_logprobs(
        hidden, weight, make_labels(ROWS, VOCAB), with_entropy=True, backend="cpu"
    )
    sum(o.sum() for o in out).backward()
    return (*out, hidden.grad)


def topk():
    hidden, weight = _head()
    targets, log_tail, lse = fastkd.fused_linear_topk(
        hidden, weight, k=9, return_stats=True, backend="cpu"
    )
    return targets.ids, targets.logprobs, log_tail, lse


@pytest.mark.parametrize(
    "run", [kd, sparse, priority, uld, logprobs, topk], ids=lambda f: f.__name__
)
def test_same_bits_for_any_thread_count(run):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(3)
        three = run()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, three, strict=True):
        assert torch.equal(a, b)
