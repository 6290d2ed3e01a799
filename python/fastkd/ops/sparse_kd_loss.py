"""sparse_kd_loss: distillation against sparse teacher targets (``SparseTargets``), fused with the
student's softmax.

Input checks, the fused custom op with its fake kernel and autograd, backend dispatch. As for
``kd_loss``, the fused backends (``cpu``, ``triton``) write the per-token loss and
``grad_scale * dLoss_token/dstudent_logits`` in one kernel, ``grad_scale`` being the mean's
1/#tokens where it is known without a device sync; the backward is the fused-row framework's
(``_fused_rows``), which rescales that stored gradient (in place in eager mode). The ``torch``
backend is the plain-PyTorch reference. The row kernel's registration and launcher, shared
with fused_linear_sparse_kd_loss, are in ``_sparse_rows``. The reverse direction runs the same
custom op and kernels with the targets' log-probabilities in place of their weights.
"""

from __future__ import annotations

import torch

from ..reference.sparse_kd_loss import sparse_kd_loss_reference
from ..sparse.targets import SparseTargets
from ._op_args import register_named_fake
from ._checks import check_labels, check_logits
from ._fused_rows import (
    call_fused,
    grad_buffer,
    mean_grad_scale,
    reduce_rows,
    register_stored_grad_autograd,
)
from ._registry import accepts, resolve_backend
from ._sparse_rows import (
    check_direction,
    check_sparse_options,
    check_targets,
    keep_first_of_equal_ids,
    launch_sparse_rows,
    merge_duplicate_ids,
    row_op,
)

__all__ = ["sparse_kd_loss"]


def _check_inputs(
    student: torch.Tensor,
    targets,
    labels,
    *,
    temperature,
    ignore_index,
    hard_weight,
    reduction,
    num_items_in_batch,
    direction,
) -> None:
    check_logits("student_logits", student)
    vocab = check_targets(targets, student.shape[:-1], student.device, student.shape[-1])
    check_direction(direction, targets)
    check_sparse_options(
        temperature=temperature,
        ignore_index=ignore_index,
        hard_weight=hard_weight,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        has_labels=labels is not None,
    )
    check_labels(labels, student.shape[:-1], student.device, vocab, ignore_index)


# ---- the fused op ---------------------------------------------------------------------------


def _sparse_kd_loss_rows(
    student: torch.Tensor,
    ids: torch.Tensor,
    values: torch.Tensor,
    tail_mass: torch.Tensor | None,
    labels: torch.Tensor | None,
    vocab: int,
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    grad_scale: float,
    reverse: bool,
    backend: str,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss (fp32, leading shape) and grad_scale * dLoss_token/dstudent (student's
    shape and dtype; empty on CPU when not ``need_grad``), by one kernel. ``ids`` are the
    targets' ``[..., K]`` int32 slots, ``values`` their fp32 weights (forward) or log p_k
    (``reverse``), ``tail_mass`` ``[...]`` fp32 or None (required by ``reverse``)."""
    return launch_sparse_rows(
        student,
        ids,
        None if reverse else values,
        tail_mass,
        labels,
        vocab=vocab,
        temperature=temperature,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        ignore_index=ignore_index,
        grad_scale=grad_scale,
        backend=backend,
        need_grad=need_grad,
        logprobs=values if reverse else None,
    )


sparse_kd_loss_fused = torch.library.custom_op("fastkd::sparse_kd_loss_fused", mutates_args=())(
    _sparse_kd_loss_rows
)


def _fake_sparse_kd_loss(a):
    loss = a.student.new_empty(a.student.shape[:-1], dtype=torch.float32)
    op = row_op("reverse" if a.reverse else "forward")
    return loss, grad_buffer(a.student, a.need_grad, a.backend, op)


register_named_fake(sparse_kd_loss_fused, _fake_sparse_kd_loss)


register_stored_grad_autograd(sparse_kd_loss_fused)


# ---- public entry point ---------------------------------------------------------------------


def sparse_kd_loss(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    *,
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
    """Distillation loss against sparse teacher targets, fused with the student's softmax.

    With a = z/T over the first V = min(V_s, targets.vocab_size) student columns,
    q = softmax(a), and the targets' weights w_k at ids s_k (padding skipped), a token's soft
    loss is

        L = sum_k w_k (log w_k - log q_{s_k})

    (terms with w_k = 0 are 0). With weights summing to 1 (``"topk"`` targets, and
    ``"random"`` ones sampled at T = 1) this is KL(t || q) for the target distribution t: >= 0,
    and 0 where q equals t on its support. Importance weights (``"random"`` sampled at T != 1)
    need not sum to 1; L is the same expression, whose expectation over the draws is the full
    KL(p || q) plus a term independent of the student (so its gradient is unbiased), and it can
    be slightly negative. ``tail="bucket"`` targets add ``w_b (log w_b - log q_b)``: the
    teacher's tail mass w_b against the student's mass outside the ids, q_b = 1 - sum_k q_{s_k}
    (where the ids cover all V columns the bucket is empty and w_b, then the rounding of
    1 - sum_k w_k or teacher mass past V, is dropped).
    The ``torch`` and ``cpu`` backends sum q_b over those columns, exact where the ids hold
    nearly all of q; ``triton`` takes the ids' share out of the row's sum of exponentials,
    clamped at 0, so that q_b carries the absolute error of that sum (a few 1e-7): a q_b of
    that order is inexact and may read as 0 (loss +inf where w_b > 0). Gradients w.r.t. a
    (then divided by T), W = sum_k w_k:
    ``(W + w_b) q_j - w_j`` at the ids and ``(W + w_b - w_b / q_b) q_j`` elsewhere (the last
    term taken as 0 where q_b = 0).

    ``direction="reverse"`` is the reverse KL over the support S = the ids plus the bucket,
    against the targets' probabilities p_k = exp(``targets.logprobs``) and tail mass
    p_b = ``targets.tail_mass`` (both required; weights are not read):

        L = sum_k q_{s_k} (log q_{s_k} - log p_k) + q_b (log q_b - log p_b)

    with q_b summed over its own columns (``torch``, ``cpu``; ``triton`` as above). Its gradient
    w.r.t. a is q_j (c_j - L), c_j = log q_j - log p_j at the ids and log q_b - log p_b
    elsewhere. Terms with q = 0 are 0; a term with p = 0 < q (log p_k = -inf, or a tail mass
    <= 0 with student mass outside the ids) makes L +inf, and its gradient then follows the
    formula as ``kd_loss(divergence="rkl")``'s does (-inf or NaN). Where the ids cover all V
    columns the bucket is empty (q_b = 0). Equal ids in a row are one id, with the
    log-probability of its first slot. It is meant for student-side supports
    (:func:`fastkd.student_support_targets`): where the p_k and p_b sum to 1, L is KL(q_S ||
    p_S) of the two distributions coarsened to S (each id a class, the bucket one): >= 0, and 0
    where q and p agree on S.

    Args:
        student_logits: ``[..., V_s]`` float32/bfloat16/float16 (float64: ``torch`` backend).
            Columns from V on get zero gradient. -inf logits are allowed (a target id at one
            makes the token's loss +inf).
        targets: ``SparseTargets`` with the same leading shape, on the same device; ids must be
            < V (checked for CPU tensors; elsewhere a token with such an id gets a NaN loss and
            gradient). Equal ids in a row are one target with the sum of their weights. No
            gradient flows to the targets through the fused backends. Weights and tail masses
            <= 0 count as 0; a counted token with a NaN or +inf weight or tail mass gets loss
            NaN and gradient NaN (an ignored one stays 0): the NaN rule of ``kd_loss``, where
            the targets play the teacher's part.
        temperature: T > 0 of the student's softmax (the targets are a distribution already).
        t2_scale: multiply the soft loss by T^2.
        labels: integer tensor of the leading shape; tokens equal to ``ignore_index`` contribute
            nothing to loss or gradient.
        hard_weight: h in [0, 1]; loss = (1-h) soft + h CE(student logits at T=1, labels).
        reduction: ``"mean"`` over valid tokens (or divided by ``num_items_in_batch``),
            ``"sum"``, or ``"none"`` (per-token loss in the leading shape, 0 at ignored tokens).
            A token whose targets are all padding (and which has no CE term) has loss 0 and no
            gradient but still counts in the mean; mark such tokens in ``labels`` with
            ``ignore_index`` to leave them out.
        direction: ``"forward"`` (KL(targets || student), above) or ``"reverse"``
            (KL(student || targets) over the support).
        backend: ``"auto"`` (cpu on CPU, triton on CUDA, torch for float64), ``"torch"``,
            ``"cpu"`` or ``"triton"``.

    Returns:
        float32 loss (float64 for float64 logits): a scalar, or the leading shape for
        ``reduction="none"``. Units: nats per token (times T^2 with ``t2_scale``).
    """
    _check_inputs(
        student_logits,
        targets,
        labels,
        temperature=temperature,
        ignore_index=ignore_index,
        hard_weight=hard_weight,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        direction=direction,
    )
    device = student_logits.device
    dtypes = (student_logits.dtype,)
    op = row_op(direction)
    name = resolve_backend(op, backend, device, dtypes=dtypes)
    kwargs = dict(
        temperature=temperature,
        labels=labels,
        ignore_index=ignore_index,
        hard_weight=hard_weight,
        t2_scale=t2_scale,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )
    if name == "torch":
        return sparse_kd_loss_reference(student_logits, targets, direction=direction, **kwargs)
    if not accepts(op, name, dtypes=dtypes):
        raise ValueError(
            f"backend {name!r} takes float32/bfloat16/float16 student logits; got "
            f"{student_logits.dtype}; use backend='torch'"
        )
    n_rows = student_logits.numel() // student_logits.shape[-1]
    soft_weight = (1.0 - hard_weight) * (temperature * temperature if t2_scale else 1.0)
    grad_scale = mean_grad_scale(
        n_rows, device, labels, ignore_index, reduction, num_items_in_batch
    )
    reverse = direction == "reverse"
    if reverse:
        ids, values = keep_first_of_equal_ids(targets.ids, targets.logprobs.detach())
    else:
        ids, values = merge_duplicate_ids(targets.ids, targets.weights.detach())
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    args = (
        student_logits,
        ids,
        values,
        None if targets.tail_mass is None else targets.tail_mass.detach(),
        labels,
        min(student_logits.shape[-1], targets.vocab_size),
        float(temperature),
        float(soft_weight),
        float(hard_weight),
        int(ignore_index),
        float(grad_scale),
        reverse,
        name,
        need_grad,
    )
    rows, _ = call_fused(sparse_kd_loss_fused, _sparse_kd_loss_rows, args, need_grad=need_grad)
    valid = None if labels is None else labels != ignore_index
    return reduce_rows(rows, valid, reduction, num_items_in_batch)
