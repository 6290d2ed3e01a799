"""sample_teacher: sparse teacher targets from dense teacher logits (random sampling, priority
sampling or top-k).

``method="random"`` runs the counter-based sampler (native kernels on CPU and CUDA, a Triton
kernel on CUDA, the plain-PyTorch twin in ``reference/`` anywhere): every draw is a pure function
of (seed, global token index, draw index), so the targets do not depend on how tokens are
batched. ``method="priority"`` (priority sampling: k distinct ids, unbiased weights) runs a
native kernel on CPU and the plain-PyTorch sampler elsewhere; it keys its uniforms by (seed,
global token index, vocabulary id), likewise independent of the batching. ``method="topk"`` (the
biased baseline) is plain PyTorch on every device.

This module declares the two ops' backends and holds ``sample_teacher``: its argument checks
are in ``_sample_teacher_checks``, the samplers of its methods in ``_sample_teacher_methods``.
"""

from __future__ import annotations

import torch

from ..reference.sample_teacher import sample_teacher_reference
from ..sparse.targets import SparseTargets
from ._registry import (
    accepts,
    backend_spec,
    native_backend,
    reference_backend,
    register_op,
    resolve_backend,
    triton_backend,
)
from ._sample_teacher_checks import _check_inputs
from ._sample_teacher_methods import (
    _nan_or_posinf_rows,
    _priority_sample,
    _raise_on_invalid_rows,
    _sample_fused,
    _topk_targets,
)

__all__ = ["sample_teacher"]

# method="random": the native kernels first (the same draws on every backend).
register_op(
    "sample_teacher",
    [
        reference_backend(),
        native_backend("cpu", "sample_teacher_cpu"),
        native_backend("cuda", "sample_teacher_cuda"),
        triton_backend("sample_teacher"),
    ],
    auto={"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")},
)
# method="priority": a native kernel on CPU, plain PyTorch elsewhere.
register_op(
    "priority_sample",
    [
        reference_backend(),
        native_backend("cpu", "priority_sample_cpu"),
    ],
    auto={"cpu": ("cpu", "torch"), "cuda": ("torch",)},
)


def sample_teacher(
    teacher_logits: torch.Tensor,
    *,
    num_samples: int | None = None,
    method: str = "random",
    k: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    token_offset: int = 0,
    tail: str | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_logprobs: bool = False,
    backend: str = "auto",
) -> SparseTargets:
    """Sparse targets of a teacher's distribution p = softmax(teacher_logits), per token.

    Args:
        teacher_logits: ``[..., V]`` float32/bfloat16/float16 (any layout; float64 runs the
            ``torch`` backend). ``-inf`` entries have no mass, and a row of only ``-inf`` keeps
            no id (all ids -1, weights 0, tail mass 0); a row with a NaN or +inf raises
            ValueError, with every method on every backend.
        num_samples: N draws per token (``"random"``, default 50), with replacement; must be
            left None for ``"priority"``.
        method: ``"random"`` (unbiased: the expected target is p), ``"priority"`` (unbiased,
            k distinct ids, see below) or ``"topk"``.
        k: ids kept by ``"topk"`` and ``"priority"`` (required there, 1 <= k <= V).
        temperature: the proposal of ``"random"`` is softmax(z / T); for T != 1 the weights are
            importance weights (count / N) p / r, still unbiased for p. Must be 1 for the other
            methods.
        seed: 64-bit key of the samplers.
        token_offset: global index of the first token: the draws of token i (flat row-major
            index over the leading shape) are keyed by (seed, token_offset + i, draw) (by
            (seed, token_offset + i, id) for ``"priority"``), so a batch split in two with the
            second part's offset moved on samples the same.
        tail: ``"topk"`` only: ``"renorm"``, ``"bucket"`` or ``"label"`` (needs ``labels``).
        return_logprobs: keep log p of every kept id.
        backend: ``"auto"``, ``"cpu"`` or ``"cuda"`` (native), ``"triton"`` or ``"torch"``
            (plain PyTorch, any device). ``"random"`` runs on all of them, ``"priority"`` on
            ``"cpu"`` and ``"torch"``; ``"topk"`` is plain PyTorch whatever the backend.

    Returns:
        ``SparseTargets`` with leading shape ``[...]``: ``"random"`` has K = N slots (ids
        ascending, then -1 padding); ``"priority"`` K = k (ids ascending, then -1 padding where
        fewer than k ids have p > 0); ``"topk"`` K = k (+1 for ``tail="label"``).

    ``"priority"`` (Duffield, Lund & Thorup, JACM 2007): per token, uniforms u_i in (0, 1),
    priorities q_i = p_i / u_i; the k ids of largest q are kept with weights max(p_i, tau), tau
    the (k+1)-th largest priority (0 when fewer than k + 1 ids have mass). For every f, sum
    over kept ids of w_i f(i) is an unbiased estimate of sum_i p_i f(i), so ``sparse_kd_loss``
    on these targets has an unbiased gradient; the weights are >= p at their ids and sum to 1
    only in expectation. Ids with p = 0 are never kept. Priorities are ranked in float64, equal
    ones by id (smaller first), so both backends keep the same ids. A uniform belongs to every
    one of the V ids (V / 4 Philox calls per token, well above ``"random"``'s N / 4): the
    ``cpu`` kernel draws them in one pass with a heap of the k + 1 best priorities, skipping
    blocks of four ids whose priority cannot enter it (2048 tokens at V = 32000 take about
    0.5 s on two cores, the cost of the Philox calls where few blocks can be skipped); the
    ``torch`` sampler works in chunks of rows (2^15 (row, id) pairs on CPU, 2^22 on CUDA), so
    that its working memory is O(max(V, chunk)) whatever the batch.

    Raises:
        ValueError: bad arguments, or NaN or +inf teacher logits.
    """
    if method == "random" and num_samples is None:
        num_samples = 50
    _check_inputs(
        teacher_logits,
        num_samples=num_samples,
        method=method,
        k=k,
        temperature=temperature,
        seed=seed,
        token_offset=token_offset,
        tail=tail,
        labels=labels,
        ignore_index=ignore_index,
    )
    vocab = teacher_logits.shape[-1]
    common = dict(vocab_size=vocab, temperature=float(temperature), seed=int(seed), method=method)
    if method == "priority":
        ids, weights, logprobs = _priority_sample(
            teacher_logits.detach(), backend, int(k), int(seed), int(token_offset), return_logprobs
        )
        return SparseTargets(ids, weights, logprobs, None, num_samples=int(k), **common)
    if method == "topk":
        ids, weights, logprobs, tail_mass = _topk_targets(
            teacher_logits.detach(), k, tail, labels, ignore_index, return_logprobs
        )
        return SparseTargets(
            ids, weights, logprobs, tail_mass, num_samples=int(k), tail=tail, **common
        )
    dtypes = (teacher_logits.dtype,)
    name = resolve_backend("sample_teacher", backend, teacher_logits.device, dtypes=dtypes)
    if not backend_spec("sample_teacher", name).is_reference:
        if not accepts("sample_teacher", name, dtypes=dtypes):
            raise ValueError(
                f"backend {name!r} takes float32/bfloat16/float16 logits; got "
                f"{teacher_logits.dtype}; use backend='torch'"
            )
        ids, weights, logprobs = _sample_fused(
            teacher_logits.detach(),
            name,
            int(num_samples),
            float(temperature),
            int(seed),
            int(token_offset),
            return_logprobs,
        )
    else:
        _raise_on_invalid_rows(_nan_or_posinf_rows(teacher_logits.detach()))
        ids, weights, logprobs = sample_teacher_reference(
            teacher_logits.detach(),
            num_samples=int(num_samples),
            temperature=temperature,
            seed=int(seed),
            token_offset=int(token_offset),
            return_logprobs=return_logprobs,
        )
    return SparseTargets(ids, weights, logprobs, None, num_samples=int(num_samples), **common)
