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
from ._checks import INT32_MAX, INT64_MAX, check_int, check_kernel_float, check_labels, check_logits
from ._layout import row_layout
from ._launch import launch
from ._native import DTYPE_CODES
from ._registry import (
    accepts,
    backend_spec,
    native_backend,
    reference_backend,
    register_op,
    resolve_backend,
    triton_backend,
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

_MAX_SEED = 2**64


def _check_inputs(
    logits, *, num_samples, method, k, temperature, seed, token_offset, tail, labels, ignore_index
) -> None:
    check_logits("teacher_logits", logits)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    check_kernel_float("temperature", temperature)
    if (
        not isinstance(seed, numbers.Integral)
        or isinstance(seed, bool)
        or not 0 <= seed < _MAX_SEED
    ):
        raise ValueError(f"seed must be an int in [0, 2**64); got {seed!r}")
    # Draws are keyed by the global token index token_offset + i, a signed 64-bit counter in
    # every backend: the last token's index must not pass 2^63 - 1.
    tokens = logits.numel() // logits.shape[-1]
    check_int("token_offset", token_offset, 0, INT64_MAX - max(tokens - 1, 0))
    vocab = logits.shape[-1]
    if method == "random":
        check_int("num_samples", num_samples, 1, INT32_MAX)
        if k is not None or tail is not None:
            raise ValueError(f"k and tail apply to method='topk'; got k={k!r}, tail={tail!r}")
        return
    if method == "priority":
        if (
            not isinstance(k, numbers.Integral)
            or isinstance(k, bool)
            or not 1 <= k <= min(vocab, INT32_MAX)
        ):
            raise ValueError(
                f"method='priority' needs k in [1, V={vocab}] (at most {INT32_MAX}); got k={k!r}"
            )
        if num_samples is not None or tail is not None:
            raise ValueError(
                f"method='priority' keeps k ids and takes neither num_samples nor "
                f"tail; got num_samples={num_samples!r}, tail={tail!r}"
            )
        if temperature != 1.0:
            raise ValueError(
                f"method='priority' samples p = softmax(z) itself: temperature "
                f"must be 1; got {temperature!r}"
            )
        return
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= vocab:
        raise ValueError(f"method='topk' needs k in [1, V={vocab}]; got k={k!r}")
    if tail not in TAILS:
        raise ValueError(f"method='topk' needs tail in {TAILS}; got {tail!r}")
    if temperature != 1.0:
        raise ValueError(
            f"temperature applies to method='random' (its proposal); got "
            f"{temperature!r} with method='topk'"
        )
    if tail == "label":
        if labels is None:
            raise TypeError("tail='label' needs integer labels of the logits' leading shape")
        check_int("ignore_index", ignore_index, -INT64_MAX - 1, INT64_MAX)
        check_labels(
            labels,
            logits.shape[:-1],
            logits.device,
            vocab,
            ignore_index,
            vocab_name="the teacher's vocabulary",
        )


def _empty_targets(logits: torch.Tensor, slots: int, return_logprobs: bool):
    """Uninitialized ``(ids, weights, logprobs or None)`` ``[..., slots]`` and ``invalid``
    ``[rows]`` (uint8, zeros) on the logits' device, for a kernel to fill."""
    shape = (*logits.shape[:-1], slots)
    device = logits.device
    ids = torch.empty(shape, dtype=torch.int32, device=device)
    weights = torch.empty(shape, dtype=torch.float32, device=device)
    logprobs = torch.empty(shape, dtype=torch.float32, device=device) if return_logprobs else None
    invalid = torch.zeros(logits.shape[:-1].numel(), dtype=torch.uint8, device=device)
    return ids, weights, logprobs, invalid


def _raise_on_invalid_rows(
    invalid: torch.Tensor, logits: torch.Tensor | None = None, temperature: float = 1.0
) -> None:
    """ValueError naming the first flat rows flagged in ``invalid``: NaN or +inf logits, or
    (``logits`` given) finite ones that overflow float32 once divided by ``temperature``."""
    if not bool(invalid.any()):
        return
    rows = invalid.nonzero()[:5, 0].tolist()
    if logits is not None:
        flagged = logits.reshape(-1, logits.shape[-1])[rows].double()
        if not (flagged.isnan() | (flagged == math.inf)).any():
            top = float(flagged.abs().nan_to_num(0.0, 0.0, 0.0).max())
            raise ValueError(
                f"teacher_logits / temperature overflows float32 in flat rows {rows} "
                f"(max |z| = {top:.6g}, temperature = {temperature!r}, float32 max 3.4e38); "
                f"use a larger temperature"
            )
    raise ValueError(
        f"teacher_logits has NaN or +inf entries (flat rows {rows}); -inf "
        f"marks tokens outside the support, NaN and +inf cannot be sampled"
    )


def _nan_or_posinf_rows(logits: torch.Tensor) -> torch.Tensor:
    """``[rows]`` bool: the rows of ``logits`` holding a NaN or +inf (their LSE is NaN or +inf),
    which no sampler can sample."""
    lse = torch.logsumexp(logits.reshape(-1, logits.shape[-1]).float(), -1)
    return torch.isnan(lse) | (lse == math.inf)


def _kernel_fields(
    logits: torch.Tensor, ids, weights, logprobs, invalid, *, seed: int, token_offset: int
) -> dict:
    """Fields shared by the native samplers for ``launch``: the rows of ``logits`` (addressed
    by their layout; a contiguous copy where the layout needs one, held by ``launch`` with the
    other tensors until the kernel returns), the outputs, seed and token offset."""
    z, inner_rows, layout = row_layout(logits)
    return dict(
        logits=z,
        dtype=DTYPE_CODES[z.dtype],
        outer_stride=layout.outer_stride,
        inner_stride=layout.inner_stride,
        inner_rows=inner_rows,
        n_rows=invalid.numel(),
        vocab=logits.shape[-1],
        seed=seed,
        token_offset=token_offset,
        ids=ids,
        weights=weights,
        logprobs=logprobs,
        invalid=invalid,
    )


def _sample_fused(
    logits: torch.Tensor,
    backend: str,
    num_samples: int,
    temperature: float,
    seed: int,
    token_offset: int,
    return_logprobs: bool,
):
    """The ``cpu`` or ``cuda`` (native) or ``triton`` sampler: outputs on the logits' device."""
    ids, weights, logprobs, invalid = _empty_targets(logits, num_samples, return_logprobs)
    n_rows = invalid.numel()
    if n_rows and backend == "triton":
        from ..triton.sample_teacher import sample_teacher_forward

        z, inner_rows, layout = row_layout(logits)
        sample_teacher_forward(
            z,
            ids,
            weights,
            logprobs,
            invalid,
            n_rows=n_rows,
            inner_rows=inner_rows,
            layout=layout,
            vocab=logits.shape[-1],
            temperature=temperature,
            num_samples=num_samples,
            seed=seed,
            token_offset=token_offset,
        )
    elif n_rows:
        fields = _kernel_fields(
            logits, ids, weights, logprobs, invalid, seed=seed, token_offset=token_offset
        )
        if backend == "cuda":
            with torch.cuda.device(logits.device):
                launch(
                    "sample_teacher_cuda",
                    **fields,
                    temperature=temperature,
                    num_samples=num_samples,
                    run=dict(stream=torch.cuda.current_stream(logits.device).cuda_stream),
                )
        else:
            launch(
                "sample_teacher_cpu",
                **fields,
                temperature=temperature,
                num_samples=num_samples,
                run=dict(num_threads=torch.get_num_threads()),
            )
    _raise_on_invalid_rows(invalid, logits, temperature)
    return ids, weights, logprobs


def _priority_sample(
    logits: torch.Tensor, backend: str, k: int, seed: int, token_offset: int, return_logprobs: bool
):
    """``(ids, weights, logprobs)`` of method="priority" from the native kernel (``cpu``) or the
    plain-PyTorch sampler (``torch``, any device)."""
    name = resolve_backend("priority_sample", backend, logits.device, dtypes=(logits.dtype,))
    if backend_spec("priority_sample", name).is_reference:
        ids, weights, logprobs, bad = priority_sample_reference(
            logits, k=k, seed=seed, token_offset=token_offset, return_logprobs=return_logprobs
        )
        invalid = bad.reshape(-1)
    else:
        if not accepts("priority_sample", name, dtypes=(logits.dtype,)):
            raise ValueError(
                f"backend {name!r} takes float32/bfloat16/float16 logits; got "
                f"{logits.dtype}; use backend='torch'"
            )
        ids, weights, logprobs, invalid = _empty_targets(logits, k, return_logprobs)
        if invalid.numel():
            launch(
                "priority_sample_cpu",
                **_kernel_fields(
                    logits, ids, weights, logprobs, invalid, seed=seed, token_offset=token_offset
                ),
                k=k,
                run=dict(num_threads=torch.get_num_threads()),
            )
    _raise_on_invalid_rows(invalid)
    return ids, weights, logprobs


def _topk_targets(
    logits: torch.Tensor, k: int, tail: str, labels, ignore_index: int, return_logprobs: bool
):
    """(ids, weights, logprobs, tail_mass) of the k most probable ids, tail as documented in
    ``fastkd.sparse.targets``; ids in decreasing probability, -1 where fewer than k have mass."""
    z = logits.float()
    lse = torch.logsumexp(z, -1, keepdim=True)
    # The samplers' rule: NaN and +inf logits cannot be sampled (LSE is NaN or +inf there); a
    # row of -inf only has no mass and keeps no id.
    _raise_on_invalid_rows((torch.isnan(lse) | (lse == math.inf)).reshape(-1))
    row_has_mass = lse[..., 0] > -math.inf
    values, ids = torch.topk(z, k, dim=-1)
    log_p = values - lse
    has_mass = values > -math.inf
    p = torch.where(has_mass, log_p.exp(), 0.0)
    # The mass outside the top k, 1 - sum(p), without cancellation: -expm1(LSE(log p)).
    rest = torch.where(row_has_mass, (-torch.expm1(torch.logsumexp(log_p, -1))).clamp_min(0.0), 0.0)
    tail_mass = None
    if tail == "renorm":
        weights = torch.where(has_mass, torch.softmax(values, -1), 0.0)
    elif tail == "bucket":
        weights, tail_mass = p, rest
    else:
        label = labels.to(torch.int64)
        live = (label != ignore_index) & row_has_mass
        hit = (ids == label[..., None]) & live[..., None]
        weights = p + hit * rest[..., None]
        extra = live & ~hit.any(-1)
        ids = torch.cat([ids, torch.where(extra, label, -1)[..., None]], -1)
        weights = torch.cat([weights, torch.where(extra, rest, 0.0)[..., None]], -1)
        log_p = torch.cat([log_p, torch.zeros_like(rest)[..., None]], -1)
        extra_lp = torch.where(
            extra, (z.gather(-1, label.clamp_min(0)[..., None])[..., 0] - lse[..., 0]), 0.0
        )
        log_p[..., -1] = extra_lp
        has_mass = torch.cat([has_mass, extra[..., None]], -1)
    ids = torch.where(has_mass, ids, -1).to(torch.int32)
    logprobs = torch.where(has_mass, log_p, 0.0) if return_logprobs else None
    return ids, weights.float(), logprobs, tail_mass


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
