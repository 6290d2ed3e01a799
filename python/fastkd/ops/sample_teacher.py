"""sample_teacher: sparse teacher targets from dense teacher logits (random sampling, priority
sampling or top-k).

``method="random"`` runs the counter-based sampler (native kernels on CPU and CUDA, a Triton
kernel on CUDA, the plain-PyTorch twin in ``reference/`` anywhere): every draw is a pure function
of (seed, global token index, draw index), so the targets do not depend on how tokens are
batched. ``method="priority"`` (priority sampling: k distinct ids, unbiased weights) runs a
native kernel on CPU and the plain-PyTorch sampler elsewhere; it keys its uniforms by (seed,
global token index, vocabulary id), likewise independent of the batching. ``method="topk"`` (the
biased baseline) is plain PyTorch on every device.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..reference.sample_teacher import priority_sample_reference, sample_teacher_reference
from ..sparse.targets import METHODS, TAILS, SparseTargets
from ._backends import resolve_backend
from ._checks import check_logits
from ._layout import row_layout
from ._native import DTYPE_CODES, native

__all__ = ["sample_teacher"]

_MAX_SEED = 2**64


def _check_inputs(logits, *, num_samples, method, k, temperature, seed, token_offset, tail,
                  labels, ignore_index) -> None:
    check_logits("teacher_logits", logits)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if not isinstance(temperature, numbers.Real) or not 0 < float(temperature) < math.inf:
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    if not isinstance(seed, numbers.Integral) or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**64); got {seed!r}")
    if not isinstance(token_offset, numbers.Integral) or token_offset < 0:
        raise ValueError(f"token_offset must be an int >= 0; got {token_offset!r}")
    vocab = logits.shape[-1]
    if method == "random":
        if not isinstance(num_samples, numbers.Integral) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1; got {num_samples!r}")
        if k is not None or tail is not None:
            raise ValueError(f"k and tail apply to method='topk'; got k={k!r}, tail={tail!r}")
        return
    if method == "priority":
        if not isinstance(k, numbers.Integral) or not 1 <= k <= vocab:
            raise ValueError(f"method='priority' needs k in [1, V={vocab}]; got k={k!r}")
        if num_samples is not None or tail is not None:
            raise ValueError(f"method='priority' keeps k ids and takes neither num_samples nor "
                             f"tail; got num_samples={num_samples!r}, tail={tail!r}")
        if temperature != 1.0:
            raise ValueError(f"method='priority' samples p = softmax(z) itself: temperature "
                             f"must be 1; got {temperature!r}")
        return
    if not isinstance(k, numbers.Integral) or not 1 <= k <= vocab:
        raise ValueError(f"method='topk' needs k in [1, V={vocab}]; got k={k!r}")
    if tail not in TAILS:
        raise ValueError(f"method='topk' needs tail in {TAILS}; got {tail!r}")
    if temperature != 1.0:
        raise ValueError(f"temperature applies to method='random' (its proposal); got "
                         f"{temperature!r} with method='topk'")
    if tail == "label":
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point:
            raise TypeError("tail='label' needs integer labels of the logits' leading shape")
        if labels.shape != logits.shape[:-1]:
            raise ValueError(f"labels must have the leading shape {tuple(logits.shape[:-1])}; "
                             f"got {tuple(labels.shape)}")
        if labels.device.type == "cpu":
            bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
            if bool(bad.any()):
                raise ValueError(f"labels must lie in [0, {vocab}) or equal "
                                 f"ignore_index={ignore_index}; found "
                                 f"{labels[bad].unique()[:5].tolist()}")


def _empty_targets(logits: torch.Tensor, slots: int, return_logprobs: bool):
    """Uninitialized ``(ids, weights, logprobs or None)`` ``[..., slots]`` and ``invalid``
    ``[rows]`` (uint8, zeros) on the logits' device, for a kernel to fill."""
    shape = (*logits.shape[:-1], slots)
    device = logits.device
    ids = torch.empty(shape, dtype=torch.int32, device=device)
    weights = torch.empty(shape, dtype=torch.float32, device=device)
    logprobs = (torch.empty(shape, dtype=torch.float32, device=device) if return_logprobs
                else None)
    invalid = torch.zeros(logits.shape[:-1].numel(), dtype=torch.uint8, device=device)
    return ids, weights, logprobs, invalid


def _raise_on_invalid_rows(invalid: torch.Tensor) -> None:
    """ValueError naming the first flat rows flagged in ``invalid`` (NaN or +inf logits)."""
    if bool(invalid.any()):
        rows = invalid.nonzero()[:5, 0].tolist()
        raise ValueError(f"teacher_logits has NaN or +inf entries (flat rows {rows}); -inf "
                         f"marks tokens outside the support, NaN and +inf cannot be sampled")


def _kernel_args(logits: torch.Tensor, ids, weights, logprobs, invalid, *, seed: int,
                 token_offset: int) -> dict:
    """Keyword arguments shared by the native samplers: the rows of ``logits`` (addressed by
    their layout), the output pointers, seed and token offset."""
    z, inner_rows, layout = row_layout(logits)
    return dict(logits=z.data_ptr(), dtype=DTYPE_CODES[z.dtype],
                outer_stride=layout.outer_stride, inner_stride=layout.inner_stride,
                inner_rows=inner_rows, n_rows=invalid.numel(), vocab=logits.shape[-1],
                seed=seed, token_offset=token_offset, ids=ids.data_ptr(),
                weights=weights.data_ptr(),
                logprobs=0 if logprobs is None else logprobs.data_ptr(),
                invalid=invalid.data_ptr())


def _sample_fused(logits: torch.Tensor, backend: str, num_samples: int, temperature: float,
                  seed: int, token_offset: int, return_logprobs: bool):
    """The ``cpu`` or ``cuda`` (native) or ``triton`` sampler: outputs on the logits' device."""
    ids, weights, logprobs, invalid = _empty_targets(logits, num_samples, return_logprobs)
    n_rows = invalid.numel()
    if n_rows and backend == "triton":
        from ..triton.sample_teacher import sample_teacher_forward
        z, inner_rows, layout = row_layout(logits)
        sample_teacher_forward(z, ids, weights, logprobs, invalid, n_rows=n_rows,
                               inner_rows=inner_rows, layout=layout, vocab=logits.shape[-1],
                               temperature=temperature, num_samples=num_samples, seed=seed,
                               token_offset=token_offset)
    elif n_rows:
        args = _kernel_args(logits, ids, weights, logprobs, invalid, seed=seed,
                            token_offset=token_offset)
        args.update(temperature=temperature, num_samples=num_samples)
        if backend == "cuda":
            with torch.cuda.device(logits.device):
                native().sample_teacher_cuda(
                    **args, stream=torch.cuda.current_stream(logits.device).cuda_stream)
        else:
            native().sample_teacher_cpu(**args, num_threads=torch.get_num_threads())
    _raise_on_invalid_rows(invalid)
    return ids, weights, logprobs


def _priority_sample(logits: torch.Tensor, backend: str, k: int, seed: int, token_offset: int,
                     return_logprobs: bool):
    """``(ids, weights, logprobs)`` of method="priority" from the native kernel (``cpu``) or the
    plain-PyTorch sampler (``torch``, any device)."""
    if backend == "auto" and logits.dtype not in DTYPE_CODES:
        backend = "torch"
    name = resolve_backend("priority_sample", backend, logits.device)
    if name == "torch":
        ids, weights, logprobs, bad = priority_sample_reference(
            logits, k=k, seed=seed, token_offset=token_offset, return_logprobs=return_logprobs)
        invalid = bad.reshape(-1)
    else:
        if logits.dtype not in DTYPE_CODES:
            raise ValueError(f"backend {name!r} takes float32/bfloat16/float16 logits; got "
                             f"{logits.dtype}; use backend='torch'")
        ids, weights, logprobs, invalid = _empty_targets(logits, k, return_logprobs)
        if invalid.numel():
            native().priority_sample_cpu(
                **_kernel_args(logits, ids, weights, logprobs, invalid, seed=seed,
                               token_offset=token_offset),
                k=k, num_threads=torch.get_num_threads())
    _raise_on_invalid_rows(invalid)
    return ids, weights, logprobs


def _topk_targets(logits: torch.Tensor, k: int, tail: str, labels, ignore_index: int,
                  return_logprobs: bool):
    """(ids, weights, logprobs, tail_mass) of the k most probable ids, tail as documented in
    ``fastkd.sparse.targets``; ids in decreasing probability, -1 where fewer than k have mass."""
    z = logits.float()
    lse = torch.logsumexp(z, -1, keepdim=True)
    values, ids = torch.topk(z, k, dim=-1)
    log_p = values - lse
    has_mass = values > -math.inf
    p = torch.where(has_mass, log_p.exp(), 0.0)
    # The mass outside the top k, 1 - sum(p), without cancellation: -expm1(LSE(log p)).
    rest = (-torch.expm1(torch.logsumexp(log_p, -1))).clamp_min(0.0)
    tail_mass = None
    if tail == "renorm":
        weights = torch.where(has_mass, torch.softmax(values, -1), 0.0)
    elif tail == "bucket":
        weights, tail_mass = p, rest
    else:
        label = labels.to(torch.int64)
        live = label != ignore_index
        hit = (ids == label[..., None]) & live[..., None]
        weights = p + hit * rest[..., None]
        extra = live & ~hit.any(-1)
        ids = torch.cat([ids, torch.where(extra, label, -1)[..., None]], -1)
        weights = torch.cat([weights, torch.where(extra, rest, 0.0)[..., None]], -1)
        log_p = torch.cat([log_p, torch.zeros_like(rest)[..., None]], -1)
        extra_lp = torch.where(extra, (z.gather(-1, label.clamp_min(0)[..., None])[..., 0]
                                       - lse[..., 0]), 0.0)
        log_p[..., -1] = extra_lp
        has_mass = torch.cat([has_mass, extra[..., None]], -1)
    ids = torch.where(has_mass, ids, -1).to(torch.int32)
    logprobs = torch.where(has_mass, log_p, 0.0) if return_logprobs else None
    return ids, weights.float(), logprobs, tail_mass


def sample_teacher(teacher_logits: torch.Tensor, *, num_samples: int | None = None,
                   method: str = "random", k: int | None = None, temperature: float = 1.0,
                   seed: int = 0, token_offset: int = 0, tail: str | None = None,
                   labels: torch.Tensor | None = None, ignore_index: int = -100,
                   return_logprobs: bool = False, backend: str = "auto") -> SparseTargets:
    """Sparse targets of a teacher's distribution p = softmax(teacher_logits), per token.

    Args:
        teacher_logits: ``[..., V]`` float32/bfloat16/float16 (any layout; float64 runs the
            ``torch`` backend). ``-inf`` entries have no mass; rows with NaN or +inf raise on
            the ``cpu``, ``cuda`` and ``triton`` backends, and with ``"priority"`` on every
            backend (``"random"`` on ``torch`` gives them no draws: all ids -1).
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
        ValueError: bad arguments, or (``"priority"``) NaN or +inf teacher logits.
    """
    if method == "random" and num_samples is None:
        num_samples = 50
    _check_inputs(teacher_logits, num_samples=num_samples, method=method, k=k,
                  temperature=temperature, seed=seed, token_offset=token_offset, tail=tail,
                  labels=labels, ignore_index=ignore_index)
    vocab = teacher_logits.shape[-1]
    common = dict(vocab_size=vocab, temperature=float(temperature), seed=int(seed),
                  method=method)
    if method == "priority":
        ids, weights, logprobs = _priority_sample(teacher_logits.detach(), backend, int(k),
                                                  int(seed), int(token_offset), return_logprobs)
        return SparseTargets(ids, weights, logprobs, None, num_samples=int(k), **common)
    if method == "topk":
        ids, weights, logprobs, tail_mass = _topk_targets(
            teacher_logits.detach(), k, tail, labels, ignore_index, return_logprobs)
        return SparseTargets(ids, weights, logprobs, tail_mass, num_samples=int(k), tail=tail,
                             **common)
    if backend == "auto" and teacher_logits.dtype not in DTYPE_CODES:
        backend = "torch"
    name = resolve_backend("sample_teacher", backend, teacher_logits.device)
    if name in ("cpu", "cuda", "triton"):
        if teacher_logits.dtype not in DTYPE_CODES:
            raise ValueError(f"backend {name!r} takes float32/bfloat16/float16 logits; got "
                             f"{teacher_logits.dtype}; use backend='torch'")
        ids, weights, logprobs = _sample_fused(teacher_logits.detach(), name, int(num_samples),
                                               float(temperature), int(seed),
                                               int(token_offset), return_logprobs)
    else:
        ids, weights, logprobs = sample_teacher_reference(
            teacher_logits.detach(), num_samples=int(num_samples), temperature=temperature,
            seed=int(seed), token_offset=int(token_offset), return_logprobs=return_logprobs)
    return SparseTargets(ids, weights, logprobs, None, num_samples=int(num_samples), **common)
