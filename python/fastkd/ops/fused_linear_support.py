"""fused_linear_support: a model's log-probabilities at given ids and the exact log of its mass
outside them, from its lm_head without forming the ``[N, V]`` logits; student_support_targets:
the student's own top-k scored so by the teacher (targets of the reverse sparse KL).

Per chunk of C tokens the chunked lm_head engine (``_chunked_lm_head``) forms the fp32 logits
z = s (x W^T + b); with a = z / T the row math takes lse(a) over the row, a at the ids, and
lse_rest over the columns outside the ids (the ids' entries of the chunk set to -inf), as
fused_linear_topk does for its own ids. The log tail mass is lse_rest - lse: summed over its
own columns, it keeps its relative accuracy where the ids hold all but ~1e-7 of the mass
(where log1p(-sum_k p_k) is all rounding error). The outputs carry no gradient (a teacher's
targets).
"""

from __future__ import annotations

import math
import numbers

import torch

from ..reference.fused_linear_kd_loss import linear_logits
from ..sparse.targets import SparseTargets
from ._op_args import register_named_fake
from ._chunked_lm_head import (
    autocast_operands,
    check_chunking,
    check_head,
    check_scale,
    default_memory_budget,
    resolve_chunk_size,
    run_chunks,
)
from ._checks import check_kernel_float
from ._registry import reference_backend, register_op, resolve_backend

__all__ = ["fused_linear_support", "student_support_targets"]

# No kernel of its own: the chunks' row math is a gather and two log-sum-exps in PyTorch on any
# device (the GEMM dominates it).
register_op("fused_linear_support", [reference_backend()], auto={})

# The row math holds about two fp32 [C, V] temporaries next to the chunk's logits: three
# logits-sized tensors per chunk against the budget.
_ROW_TEMPORARIES = 2


def _check_ids(ids, lead: torch.Size, device: torch.device, vocab: int) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor [..., K]; got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"ids must be an integer tensor; got dtype {ids.dtype}")
    if ids.dim() < 1 or ids.shape[:-1] != lead:
        raise ValueError(
            f"ids must have shape [..., K] with the leading shape {tuple(lead)} of hidden; got "
            f"{tuple(ids.shape)}"
        )
    if ids.device != device:
        raise ValueError(f"ids are on {ids.device} but hidden on {device}")
    # Range check where it costs no device sync (and outside traced graphs).
    if ids.device.type == "cpu" and ids.numel() > 0 and not torch.compiler.is_compiling():
        bad = (ids >= vocab) | (ids < -1)
        if bool(bad.any()):
            values = ids[bad].unique()[:5].tolist()
            raise ValueError(
                f"ids must lie in [0, {vocab}) (V: the weight's rows) or be -1 (padding); "
                f"found {values}"
            )


def _drop_repeated_ids(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` ``[N, K]`` int64 with every slot whose id an earlier slot of the row holds set to
    -1 (padding): each id is scored once, in its first slot."""
    if ids.shape[1] < 2:
        return ids
    ordered, order = ids.sort(dim=-1, stable=True)
    repeat = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    later = torch.cat([torch.zeros_like(repeat[:, :1]), repeat], 1)
    return torch.where(torch.zeros_like(later).scatter_(1, order, later), -1, ids)


def _support_rows(z, ids, logprobs, log_tail, lse, *, temperature):
    """The row math on chunk logits ``z`` ``[C, V]`` (overwritten) at ``ids`` ``[C, K]`` (distinct
    per row, -1 = padding): ``logprobs`` ``[C, K]`` (0 at padding), ``log_tail`` and ``lse``
    ``[C]`` written in place."""
    # At T = 1 the logits themselves: no pass over the chunk for a division by 1.
    a = z if temperature == 1.0 else z.div_(temperature)
    row_lse = torch.logsumexp(a, -1)
    present = ids >= 0
    safe = torch.where(present, ids, 0)
    at_ids = a.gather(1, safe) - row_lse[:, None]
    logprobs.copy_(torch.where(present, at_ids, 0.0))
    # The ids' columns to -inf; a padding slot takes min(a_0, +inf) = a_0, leaving column 0 as
    # it is (a plain scatter would race with an id 0 of the same row).
    fill = torch.where(present, -math.inf, math.inf).to(a.dtype)
    a.scatter_reduce_(1, safe, fill, reduce="amin")
    log_tail.copy_(torch.logsumexp(a, -1) - row_lse)
    lse.copy_(row_lse)


@torch.library.custom_op("fastkd::fused_linear_support_fused", mutates_args=())
def fused_linear_support_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    temperature: float,
    logit_scale: float,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [N, K] fp32, log_tail [N] fp32, lse [N] fp32) of ``hidden`` ``[N, H]`` at
    ``ids`` ``[N, K]`` int64 (distinct per row, -1 = padding)."""
    n_rows = hidden.shape[0]
    logprobs = torch.empty(ids.shape, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)

    def rows(z, begin, end, log_tail, need_grad):
        _support_rows(
            z,
            ids[begin:end],
            logprobs[begin:end],
            log_tail,
            lse[begin:end],
            temperature=temperature,
        )

    with torch.autocast(hidden.device.type, enabled=False):
        log_tail, *_ = run_chunks(
            hidden, weight, bias, rows, None, logit_scale, chunk_size, False, False, False, False
        )
    return logprobs, log_tail, lse


def _fake_support(a):
    row = a.hidden.new_empty(a.hidden.shape[0], dtype=torch.float32)
    return a.hidden.new_empty(a.ids.shape, dtype=torch.float32), row, torch.empty_like(row)


register_named_fake(fused_linear_support_fused, _fake_support)


def _float64_support(hidden, weight, bias, ids, *, temperature, logit_scale, chunk_size):
    """The same chunks in float64 (torch's fp32-output GEMM takes no float64 operands)."""
    n_rows = hidden.shape[0]
    logprobs = hidden.new_empty(ids.shape)
    log_tail, lse = hidden.new_empty(n_rows), hidden.new_empty(n_rows)
    for begin in range(0, n_rows, chunk_size):
        end = min(begin + chunk_size, n_rows)
        z = linear_logits(hidden[begin:end], weight, bias, logit_scale, torch.float64)
        _support_rows(
            z,
            ids[begin:end],
            logprobs[begin:end],
            log_tail[begin:end],
            lse[begin:end],
            temperature=temperature,
        )
    return logprobs, log_tail, lse


@torch.no_grad()
def fused_linear_support(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> SparseTargets:
    """A model's log-probabilities at given ids and its exact mass outside them, as
    ``tail="bucket"`` ``SparseTargets`` (``method="support"``), without its ``[N, V]`` logits.

    With a = logit_scale * (hidden @ weight.T + bias) / temperature per token: ``logprobs`` =
    a_id - lse(a) at each slot's id, ``weights`` = their exp, and ``tail_mass`` =
    exp(lse_rest - lse(a)), lse_rest the log-sum-exp of the columns outside the ids summed in the
    same pass (not 1 - sum p_k, which is all rounding where the ids hold all but ~1e-7 of the
    mass). Computed chunk by chunk of tokens: no ``[N, V]`` tensor exists, only one chunk's
    logits. Runs under ``torch.no_grad()``: no gradient flows (the model scored here is the
    teacher; the student's loss takes the result as constants). Feed the result to
    :func:`fastkd.sparse_kd_loss` with ``direction="reverse"``.

    Args:
        hidden: ``[..., H]`` float32/bfloat16/float16/float64 (float64 computes in float64 and
            rounds the outputs to float32).
        weight: ``[V, H]``; ``bias``: ``[V]`` or None.
        ids: ``[..., K]`` integer ids in [0, V), -1 = padding (checked for CPU tensors). Equal
            ids in a row are scored once: the first slot keeps the id, the later ones become
            padding (id -1, weight 0, logprob 0). An id at a -inf logit keeps its slot with
            logprob -inf (weight 0). Where the (distinct) ids cover all V columns the tail mass
            is 0.
        temperature: T > 0 (the targets are of softmax(z / T), ``logprobs`` included).
        logit_scale, chunk_size: as in :func:`fastkd.fused_linear_kd_loss`.
        backend: ``"auto"`` or ``"torch"`` (the only one: the chunks' row math in PyTorch, on
            any device).

    Returns:
        ``SparseTargets`` with the ids' slots in their order (``[..., K]`` int32 ids, fp32
        weights and logprobs, ``[...]`` fp32 tail_mass), vocab_size V. A token whose logits are
        all -inf has no softmax: NaN log-probs and tail mass.
    """
    check_head("", hidden, weight, bias)
    vocab = weight.shape[0]
    lead, device = hidden.shape[:-1], hidden.device
    _check_ids(ids, lead, device, vocab)
    _check_temperature(temperature)
    check_chunking(chunk_size, None, None)
    check_scale("logit_scale", logit_scale)
    hidden, weight, bias = autocast_operands([hidden, weight, bias], device.type)
    dtypes = tuple(t.dtype for t in (hidden, weight, bias) if t is not None)
    name = resolve_backend("fused_linear_support", backend, device, dtypes=dtypes)
    n_rows, k = lead.numel(), ids.shape[-1]
    flat_ids = _drop_repeated_ids(ids.reshape(n_rows, k).to(torch.int64)).contiguous()
    if chunk_size is None:
        budget = max(1, default_memory_budget(device) // (1 + _ROW_TEMPORARIES))
        chunk_size = resolve_chunk_size(n_rows, vocab, None, False, budget)
    flat_hidden = hidden.reshape(n_rows, hidden.shape[-1])
    if torch.float64 in dtypes:
        logprobs, log_tail, _ = _float64_support(
            flat_hidden,
            weight,
            bias,
            flat_ids,
            temperature=float(temperature),
            logit_scale=float(logit_scale),
            chunk_size=int(chunk_size),
        )
    else:
        logprobs, log_tail, _ = fused_linear_support_fused(
            flat_hidden,
            weight,
            bias,
            flat_ids,
            float(temperature),
            float(logit_scale),
            int(chunk_size),
            name,
        )
    present = flat_ids >= 0
    return SparseTargets(
        ids=flat_ids.to(torch.int32),
        weights=torch.where(present, logprobs.exp(), 0.0).float(),
        logprobs=logprobs.float(),
        tail_mass=log_tail.exp().float(),
        vocab_size=vocab,
        num_samples=k,
        method="support",
        tail="bucket",
    ).reshape(*lead)


def _check_temperature(temperature) -> None:
    check_kernel_float("temperature", temperature)
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")


def _check_same_lead(student_hidden, teacher_hidden) -> None:
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden [..., H_s] and teacher_hidden [..., H_t] must have one leading "
            f"shape; got {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
        )


def _top_ids(z: torch.Tensor, k: int) -> torch.Tensor:
    """``[C, k]`` int64: the ids of each row's k largest logits ``z`` ``[C, V]`` (in decreasing
    order), -1 where the logit is -inf (no mass)."""
    values, top = torch.topk(z, k, dim=-1)
    return torch.where(values > -math.inf, top, -1)


def _student_top_ids(hidden, weight, bias, *, k, logit_scale, chunk_size) -> torch.Tensor:
    """``_top_ids`` of ``hidden`` ``[N, H]``'s logits chunk by chunk of rows: the selection of
    fused_linear_topk without its log-probs and tail, which the student's support does not need
    (op modules do not import each other)."""
    n_rows = hidden.shape[0]
    ids = torch.empty(n_rows, k, dtype=torch.int64, device=hidden.device)
    if hidden.dtype == torch.float64:
        for begin in range(0, n_rows, chunk_size):
            z = linear_logits(hidden[begin : begin + chunk_size], weight, bias, logit_scale)
            ids[begin : begin + chunk_size] = _top_ids(z, k)
        return ids

    def rows(z, begin, end, unused_loss, need_grad):
        ids[begin:end] = _top_ids(z, k)

    with torch.autocast(hidden.device.type, enabled=False):
        run_chunks(
            hidden, weight, bias, rows, None, logit_scale, chunk_size, False, False, False, False
        )
    return ids


@torch.no_grad()
def student_support_targets(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    k: int,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> SparseTargets:
    """Targets for the on-policy reverse KL over the student's own support: the student's k most
    probable ids per token, scored by the teacher.

    The ids are the student's top k over its first V = min(V_s, V_t) columns, chosen chunk by
    chunk of tokens from its fp32 logits as :func:`fastkd.fused_linear_topk` chooses them (ids
    of zero student mass become padding); the targets are the teacher's log-probabilities at
    them and its exact mass outside them (:func:`fastkd.fused_linear_support`). Everything runs
    under ``torch.no_grad()``: the support is chosen without gradient, and the student's
    gradient comes only from the loss, e.g. ``fastkd.fused_linear_sparse_kd_loss(student_hidden,
    student_weight, targets, direction="reverse")``.

    Args:
        student_hidden: ``[..., H_s]`` float32/bfloat16/float16/float64; student_weight
            ``[V_s, H_s]``; student_bias ``[V_s]`` or None.
        teacher_hidden: ``[..., H_t]`` of the same leading shape; teacher_weight ``[V_t, H_t]``;
            teacher_bias ``[V_t]`` or None.
        k: ids per token, 1 <= k <= V.
        student_logit_scale, teacher_logit_scale: each head's logit scale.
        temperature: T > 0 of the teacher's softmax (the student's top k does not depend on it;
            the loss takes its own temperature for the student).
        chunk_size: tokens per chunk of both passes (None: from the memory budget).

    Returns:
        ``SparseTargets`` ``[..., k]`` (``method="support"``, ``tail="bucket"``, vocab_size V_t).
    """
    check_head("student", student_hidden, student_weight, student_bias)
    check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
    _check_same_lead(student_hidden, teacher_hidden)
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(
            f"teacher_hidden is on {teacher_hidden.device} but student_hidden on "
            f"{student_hidden.device}"
        )
    vocab = min(student_weight.shape[0], teacher_weight.shape[0])
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= vocab:
        raise ValueError(
            f"k must be an int in [1, V] = [1, {vocab}] (V = min(V_s, V_t) = "
            f"min({student_weight.shape[0]}, {teacher_weight.shape[0]})); got {k!r}"
        )
    check_chunking(chunk_size, None, None)
    check_scale("student_logit_scale", student_logit_scale)
    # The teacher's options are checked again by fused_linear_support; here before the
    # student's pass, so that a bad one costs no work.
    check_scale("teacher_logit_scale", teacher_logit_scale)
    _check_temperature(temperature)
    lead, device = student_hidden.shape[:-1], student_hidden.device
    bias = None if student_bias is None else student_bias[:vocab]
    hidden, weight, bias = autocast_operands(
        [student_hidden, student_weight[:vocab], bias], device.type
    )
    n_rows = lead.numel()
    requested_chunk_size = chunk_size
    if chunk_size is None:
        chunk_size = resolve_chunk_size(n_rows, vocab, None, False, default_memory_budget(device))
    ids = _student_top_ids(
        hidden.reshape(n_rows, hidden.shape[-1]),
        weight,
        bias,
        k=k,
        logit_scale=float(student_logit_scale),
        chunk_size=int(chunk_size),
    )
    # The teacher's pass sizes its own chunks (its vocabulary and row temporaries differ) unless
    # the caller fixed them.
    return fused_linear_support(
        teacher_hidden,
        teacher_weight,
        ids.reshape(*lead, k),
        bias=teacher_bias,
        temperature=temperature,
        logit_scale=teacher_logit_scale,
        chunk_size=requested_chunk_size,
    )
