"""fused_linear_sparse_kd_loss: the student's lm_head fused with sparse_kd_loss (both directions).

The student's logits are made chunk by chunk by the lm_head engine (``_chunked_lm_head``), as in
``fused_linear_kd_loss``; each chunk's rows go through sparse_kd_loss's row kernels
(``_sparse_rows``), which write the chunk's gradient over its logits. The forward direction
takes the targets' weights, the reverse one their log-probabilities, through the same custom op.
"""

from __future__ import annotations

import torch

from ..reference.fused_linear_kd_loss import linear_logits
from ..reference.sparse_kd_loss import sparse_kd_loss_reference
from ..sparse.targets import SparseTargets
from ._checks import check_labels
from ._chunked_lm_head import (
    autocast_operands,
    check_chunking,
    check_head,
    check_scale,
    default_memory_budget,
    fake_outputs,
    register_chunked_autograd,
    resolve_chunk_size,
    run_chunks,
)
from ._fused_rows import mean_grad_scale, reduce_total
from ._op_args import register_named_fake
from ._registry import accepts, backend_spec, resolve_backend
from ._sparse_rows import (
    check_direction,
    check_sparse_options,
    check_targets,
    keep_first_of_equal_ids,
    launch_sparse_rows,
    merge_duplicate_ids,
    row_op,
)

__all__ = ["fused_linear_sparse_kd_loss"]


# ---- row kernels ---------------------------------------------------------------------------


def _sparse_teacher_rows(
    ids,
    weights,
    tail_mass,
    labels,
    *,
    vocab,
    temperature,
    soft_weight,
    hard_weight,
    ignore_index,
    grad_scale,
    backend,
    logprobs=None,
):
    """The row kernel of sparse targets ``ids``/``weights`` ``[N, K]``: sparse_kd_loss's (the
    reverse direction with ``logprobs`` ``[N, K]`` in place of ``weights``).

    The Triton kernel reads the ids' logits after it has written the row's gradient, so there
    the gradient goes to its own buffer and is copied over the logits."""
    op = row_op("reverse" if logprobs is not None else "forward")
    in_place = backend_spec(op, backend).grad_may_alias_input

    def run(zs, begin, end, loss, need_grad):
        _, grad = launch_sparse_rows(
            zs,
            ids[begin:end],
            None if weights is None else weights[begin:end],
            None if tail_mass is None else tail_mass[begin:end],
            None if labels is None else labels[begin:end],
            vocab=vocab,
            temperature=temperature,
            soft_weight=soft_weight,
            hard_weight=hard_weight,
            ignore_index=ignore_index,
            grad_scale=grad_scale,
            backend=backend,
            need_grad=need_grad,
            loss=loss,
            grad=zs if in_place and need_grad else None,
            logprobs=None if logprobs is None else logprobs[begin:end],
        )
        if need_grad and not in_place:
            zs.copy_(grad)

    return run


# ---- the custom op --------------------------------------------------------------------------


@torch.library.custom_op("fastkd::fused_linear_sparse_kd_loss_fused", mutates_args=())
def fused_linear_sparse_kd_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    values: torch.Tensor,
    tail_mass: torch.Tensor | None,
    labels: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    vocab: int,
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    grad_scale: float,
    logit_scale: float,
    chunk_size: int,
    accum_fp32: bool,
    reduce: bool,
    reverse: bool,
    backend: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As fused_linear_kd_loss_fused, against sparse targets by sparse_kd_loss's row kernel:
    ``ids`` ``[N, K]`` with ``values`` ``[N, K]``, their weights (forward) or log p_k
    (``reverse``), and ``tail_mass`` ``[N]`` or None (required by ``reverse``)."""
    with torch.autocast(hidden.device.type, enabled=False):
        rows = _sparse_teacher_rows(
            ids,
            None if reverse else values,
            tail_mass,
            labels,
            vocab=vocab,
            temperature=temperature,
            soft_weight=soft_weight,
            hard_weight=hard_weight,
            ignore_index=ignore_index,
            grad_scale=grad_scale * logit_scale,
            backend=backend,
            logprobs=values if reverse else None,
        )
        loss, *grads = run_chunks(
            hidden,
            weight,
            bias,
            rows,
            row_scale,
            logit_scale,
            chunk_size,
            accum_fp32,
            need_hidden,
            need_weight,
            need_bias,
        )
    return (loss.sum() if reduce else loss), *grads


register_named_fake(fused_linear_sparse_kd_loss_fused, fake_outputs)


register_chunked_autograd(fused_linear_sparse_kd_loss_fused)


# ---- public entry point --------------------------------------------------------------------


def fused_linear_sparse_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    targets: SparseTargets,
    *,
    student_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    logit_scale: float = 1.0,
    accum_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    t2_scale: bool = False,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    direction: str = "forward",
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`fastkd.sparse_kd_loss` of the student's lm_head output, without materializing its
    ``[N, V]`` logits: chunked like :func:`fastkd.fused_linear_kd_loss` (same ``chunk_size``,
    ``memory_budget``, ``logit_scale``, ``accum_dtype``, autocast and reduction behaviour).

    Args:
        student_hidden: ``[..., H]`` float32/bfloat16/float16 (float64: ``torch`` backend).
        student_weight: ``[V_s, H]``; ``student_bias``: ``[V_s]`` or None.
        targets: ``SparseTargets`` of leading shape ``[...]`` on the same device.
        temperature ... num_items_in_batch, direction: as in :func:`fastkd.sparse_kd_loss`
            (``"reverse"``: the reverse KL over the targets' support).
        backend: row kernel, ``"auto"``, ``"cpu"``, ``"triton"``, or ``"torch"`` (the plain
            path: whole logits, then the sparse loss reference).

    Returns:
        float32 loss: a scalar, or the leading shape for ``reduction="none"``.
    """
    check_head("student", student_hidden, student_weight, student_bias)
    lead, device = student_hidden.shape[:-1], student_hidden.device
    vocab = check_targets(targets, lead, device, student_weight.shape[0], "student_hidden")
    check_direction(direction, targets)
    check_sparse_options(
        temperature=temperature,
        ignore_index=ignore_index,
        hard_weight=hard_weight,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        has_labels=labels is not None,
    )
    check_labels(labels, lead, device, vocab, ignore_index, "student_hidden")
    check_chunking(chunk_size, memory_budget, accum_dtype)
    check_scale("logit_scale", logit_scale)
    student_hidden, student_weight, student_bias = autocast_operands(
        [student_hidden, student_weight, student_bias], device.type
    )
    loss_kwargs = dict(
        temperature=temperature,
        labels=labels,
        ignore_index=ignore_index,
        hard_weight=hard_weight,
        t2_scale=t2_scale,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )
    dtypes = (student_hidden.dtype,)
    op = row_op(direction)
    name = resolve_backend(op, backend, device, dtypes=dtypes)
    if name == "torch":
        logits = linear_logits(student_hidden, student_weight, student_bias, logit_scale)
        return sparse_kd_loss_reference(logits, targets, direction=direction, **loss_kwargs)
    if not accepts(op, name, dtypes=dtypes):
        raise ValueError(
            f"backend {name!r} takes float32/bfloat16/float16 operands; got "
            f"{student_hidden.dtype}; use backend='torch'"
        )

    n_rows = lead.numel()
    hidden = student_hidden.reshape(n_rows, student_hidden.shape[-1])
    k = targets.num_slots
    reverse = direction == "reverse"
    if reverse:
        ids, values = keep_first_of_equal_ids(
            targets.ids.reshape(n_rows, k), targets.logprobs.detach().reshape(n_rows, k)
        )
    else:
        ids, values = merge_duplicate_ids(
            targets.ids.reshape(n_rows, k), targets.weights.detach().reshape(n_rows, k)
        )
    ids, values = ids.contiguous(), values.contiguous()
    tail = (
        None
        if targets.tail_mass is None
        else targets.tail_mass.detach().reshape(n_rows).contiguous()
    )
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    grad_on = torch.is_grad_enabled()
    need = [
        grad_on and t is not None and t.requires_grad
        for t in (hidden, student_weight, student_bias)
    ]
    reduce = reduction != "none"
    vocab_s = student_weight.shape[0]
    if chunk_size is None:
        low_precision_grad = device.type == "cuda" and student_weight.dtype != torch.float32
        chunk_size = resolve_chunk_size(
            n_rows,
            vocab_s,
            None,
            low_precision_grad,
            memory_budget if memory_budget is not None else default_memory_budget(device),
        )
    soft_weight = (1.0 - hard_weight) * (temperature * temperature if t2_scale else 1.0)
    grad_scale = mean_grad_scale(
        n_rows, device, labels, ignore_index, reduction, num_items_in_batch
    )
    loss, *_ = fused_linear_sparse_kd_loss_fused(
        hidden,
        student_weight,
        student_bias,
        ids,
        values,
        tail,
        flat_labels,
        None,
        vocab,
        float(temperature),
        float(soft_weight),
        float(hard_weight),
        int(ignore_index),
        float(grad_scale),
        float(logit_scale),
        int(chunk_size),
        accum_dtype == torch.float32,
        reduce,
        reverse,
        name,
        *(need if reduce else (False,) * 3),
    )
    if not reduce:
        return loss.reshape(lead)
    valid = None if labels is None else labels != ignore_index
    return reduce_total(loss, n_rows, valid, reduction, num_items_in_batch)
