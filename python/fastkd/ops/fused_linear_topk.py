"""fused_linear_topk: a teacher's top-k ids, their log-probs and the exact log tail mass, from its
lm_head without forming the ``[N, V]`` logits.

Per chunk of C tokens the chunked lm_head engine (``_chunked_lm_head``) forms the fp32 logits
z = s (x W^T + b); a row kernel finds, with a = z / T, the k largest a_j, lse(a) over the row
and lse_rest over the columns outside the kept ones, in the same pass over the row. The log tail
mass is lse_rest - lse: summed over its own columns, it keeps its relative accuracy where the
kept mass is within rounding of 1 (where log1p(-sum_k p_k) is all rounding error). The outputs
carry no gradient (a teacher's targets).
"""

from __future__ import annotations

import math
import numbers

import torch

from ..reference.fused_linear_logprobs import fused_linear_topk_reference
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
from ._launch import launch_native
from ._registry import backend_spec, native_backend, reference_backend, register_op, resolve_backend

__all__ = ["fused_linear_topk"]

# ``torch``: the same chunks with torch.topk and masked log-sum-exps.
register_op(
    "fused_linear_topk",
    [
        reference_backend(),
        native_backend("cpu", "fused_linear_topk_cpu"),
        native_backend("cuda", "fused_linear_topk_cuda"),
    ],
    auto={"cpu": ("cpu", "torch"), "cuda": ("cuda", "torch")},
)

# The torch row math holds about three fp32 [C, V] temporaries next to the chunk's logits.
_TORCH_ROW_TEMPORARIES = 3


def _check_k(k, vocab: int) -> None:
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= vocab:
        raise ValueError(
            f"k must be an int in [1, V] = [1, {vocab}] (V: the weight's rows); got {k!r}"
        )


def _torch_rows(z, ids, logprobs, log_tail, lse, *, k, temperature):
    """The row math in PyTorch on fp32 chunk logits ``z`` ``[C, V]``."""
    a = z if temperature == 1.0 else z.div_(temperature)  # no pass dividing by 1
    row_lse = torch.logsumexp(a, -1)
    values, top = torch.topk(a, k, dim=-1)
    ids.copy_(top)
    logprobs.copy_(values - row_lse[:, None])
    log_tail.copy_(torch.logsumexp(a.scatter_(1, top, -math.inf), -1) - row_lse)
    lse.copy_(row_lse)


def _launch_rows(backend, z, ids, logprobs, log_tail, lse, *, k, temperature):
    if backend_spec("fused_linear_topk", backend).is_reference:
        _torch_rows(z, ids, logprobs, log_tail, lse, k=k, temperature=temperature)
        return
    fields = dict(
        logits=z,
        row_stride=z.stride(0),
        n_rows=z.shape[0],
        vocab=z.shape[1],
        k=k,
        ids=ids,
        logprobs=logprobs,
        log_tail=log_tail,
        lse=lse,
        temperature=temperature,
    )
    launch_native("fused_linear_topk", backend, z.device, args="TopkRowsArgs", **fields)


def _order_slots(ids, logprobs):
    """Each row's k slots in decreasing log-prob, the lower id first among equal log-probs (NaN
    ranks as -inf). The row kernels leave the order to this: the CUDA kernel fills its slots in
    no particular order, and torch.topk does not order ties."""
    ids, by_id = ids.sort(dim=-1)
    logprobs = logprobs.gather(-1, by_id)
    rank = torch.where(logprobs.isnan(), -math.inf, logprobs)
    order = rank.sort(dim=-1, descending=True, stable=True).indices
    return ids.gather(-1, order), logprobs.gather(-1, order)


@torch.library.custom_op("fastkd::fused_linear_topk_fused", mutates_args=())
def fused_linear_topk_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    temperature: float,
    logit_scale: float,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [N, k] int64, logprobs [N, k] fp32, log_tail [N] fp32, lse [N] fp32) of
    ``hidden`` ``[N, H]``; ids in decreasing log-prob, the lower id first among equal ones."""
    n_rows = hidden.shape[0]
    ids = torch.empty(n_rows, k, dtype=torch.int64, device=hidden.device)
    logprobs = torch.empty(n_rows, k, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)

    def rows(z, begin, end, log_tail, need_grad):
        _launch_rows(
            backend,
            z,
            ids[begin:end],
            logprobs[begin:end],
            log_tail,
            lse[begin:end],
            k=k,
            temperature=temperature,
        )

    with torch.autocast(hidden.device.type, enabled=False):
        log_tail, *_ = run_chunks(
            hidden, weight, bias, rows, None, logit_scale, chunk_size, False, False, False, False
        )
    return *_order_slots(ids, logprobs), log_tail, lse


def _fake_topk(a):
    n_rows = a.hidden.shape[0]
    row = a.hidden.new_empty(n_rows, dtype=torch.float32)
    return (
        a.hidden.new_empty(n_rows, a.k, dtype=torch.int64),
        a.hidden.new_empty(n_rows, a.k, dtype=torch.float32),
        row,
        torch.empty_like(row),
    )


register_named_fake(fused_linear_topk_fused, _fake_topk)


def _as_targets(ids, logprobs, log_tail, vocab: int, k: int) -> SparseTargets:
    """``SparseTargets`` of ``tail="bucket"``: ids of zero mass (-inf log-prob) as padding."""
    has_mass = logprobs > -math.inf
    return SparseTargets(
        ids=torch.where(has_mass, ids, -1).to(torch.int32),
        weights=torch.where(has_mass, logprobs.exp(), 0.0).float(),
        logprobs=torch.where(has_mass, logprobs, 0.0).float(),
        tail_mass=log_tail.exp().float(),
        vocab_size=vocab,
        num_samples=k,
        method="topk",
        tail="bucket",
    )


def fused_linear_topk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    k: int,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    return_stats: bool = False,
    backend: str = "auto",
):
    """The k most probable ids per token under the lm_head's tempered softmax, their
    probabilities and the exact mass outside them, as ``tail="bucket"`` ``SparseTargets``:
    ids in decreasing probability, the lower id first among equal ones (on every backend). Where
    equal values straddle the k-th place, ``cpu`` and ``cuda`` keep the lowest of those ids,
    ``torch`` the ones torch.topk picks.

    With a = logit_scale * (hidden @ weight.T + bias) / temperature per token: ids of the k
    largest a_j, weights p_j = exp(a_j - lse(a)), logprobs a_j - lse(a), and
    ``tail_mass`` = exp(lse_rest - lse(a)), lse_rest the log-sum-exp of the columns outside the
    ids, summed in the same pass (not 1 - sum p_j, which is all rounding where the kept mass is
    within ~1e-7 of 1). Feed the result to :func:`fastkd.sparse_kd_loss` (or its fused-lm_head
    form) for the top-k forward KL with the exact tail bucket, or to ``TeacherCache``. Slots of
    zero mass (-inf logits among the top k) are padding (id -1, weight 0). No gradient flows
    (the inputs are read detached).

    Args:
        hidden: ``[..., H]`` float32/bfloat16/float16 (float64: ``torch`` backend).
        weight: ``[V, H]``; ``bias``: ``[V]`` or None.
        k: ids kept per token, 1 <= k <= V (k = V: an empty tail, mass 0).
        temperature: T > 0 (the targets are of softmax(z / T), ``logprobs`` included).
        logit_scale, chunk_size, memory_budget: as in :func:`fastkd.fused_linear_kd_loss`.
        return_stats: also return ``log_tail`` and ``lse`` ``[...]`` fp32.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"torch"`` (the same chunks with
            torch.topk and masked log-sum-exps; float64 inputs there run the whole-logits
            reference).

    Returns:
        ``SparseTargets`` (``[..., k]`` slots), or ``(targets, log_tail, lse)`` with
        ``return_stats``: the exact log tail mass (-inf where k = V) and lse(a).
    """
    check_head("", hidden, weight, bias)
    vocab = weight.shape[0]
    _check_k(k, vocab)
    check_kernel_float("temperature", temperature)
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    check_chunking(chunk_size, memory_budget, None)
    check_scale("logit_scale", logit_scale)
    lead, device = hidden.shape[:-1], hidden.device
    hidden, weight, bias = autocast_operands(
        [t if t is None else t.detach() for t in (hidden, weight, bias)], device.type
    )
    dtypes = tuple(t.dtype for t in (hidden, weight, bias) if t is not None)
    name = resolve_backend("fused_linear_topk", backend, device, dtypes=dtypes)
    spec = backend_spec("fused_linear_topk", name)
    if torch.float64 in dtypes:
        if not spec.float64:
            raise ValueError(
                f"backend {name!r} takes float32/bfloat16/float16 operands; got "
                f"{list(dtypes)}; use backend='torch'"
            )
        ids, logprobs, log_tail, lse = fused_linear_topk_reference(
            hidden, weight, bias, k=k, temperature=temperature, logit_scale=logit_scale
        )
        ids, logprobs = _order_slots(ids, logprobs)
    else:
        n_rows = lead.numel()
        if chunk_size is None:
            budget = memory_budget if memory_budget is not None else default_memory_budget(device)
            if spec.is_reference:
                budget = max(1, budget // _TORCH_ROW_TEMPORARIES)
            chunk_size = resolve_chunk_size(n_rows, vocab, None, False, budget)
        ids, logprobs, log_tail, lse = fused_linear_topk_fused(
            hidden.reshape(n_rows, hidden.shape[-1]),
            weight,
            bias,
            int(k),
            float(temperature),
            float(logit_scale),
            int(chunk_size),
            name,
        )
    targets = _as_targets(ids, logprobs, log_tail, vocab, k).reshape(*lead)
    if return_stats:
        return targets, log_tail.float().reshape(lead), lse.float().reshape(lead)
    return targets
