"""uld_loss: Universal Logit Distillation's sorted-probability L1 loss, for a teacher and a
student whose vocabularies differ (different tokenizers).

Input checks, the fused custom op with its fake kernel and autograd, backend dispatch. As for
``kd_loss``, the fused backends write the per-token loss and
``grad_scale * dLoss_token/dstudent_logits`` in the forward: ``cpu`` in one C++ kernel per row
(its own radix sort), ``triton`` by torch.sort of a chunk of rows and one Triton kernel over the
sorted rows. The backward is kd_loss's, which rescales that stored gradient. The ``torch``
backend is the plain-PyTorch reference.
"""

from __future__ import annotations


import torch

from ..reference.uld_loss import uld_loss_reference
from ._op_args import register_named_fake
from ._checks import check_kd_options, check_kernel_float, check_labels, check_logits
from ._layout import row_layout
from ._launch import launch
from ._native import DTYPE_CODES
from ._registry import native_backend, reference_backend, register_op, triton_backend
from ._fused_rows import (
    call_fused,
    grad_buffer,
    mean_grad_scale,
    pick_backend,
    reduce_rows,
    register_stored_grad_autograd,
)

__all__ = ["uld_loss"]

# A native kernel on CPU; on CUDA torch.sort and a Triton kernel over the sorted rows, first for
# its bounded memory (the plain-PyTorch reference keeps tens of bytes per element); its speed on
# a GPU is not yet measured.
register_op(
    "uld_loss",
    [
        reference_backend(),
        native_backend("cpu", "uld_loss_forward_cpu", skips_unneeded_grad=True),
        triton_backend("uld_loss"),
    ],
    auto={"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")},
)


def _check_inputs(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels,
    *,
    temperature,
    teacher_temperature,
    ignore_index,
    reduction,
    num_items_in_batch,
) -> None:
    check_logits("student_logits", student)
    check_logits("teacher_logits", teacher)
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student_logits {tuple(student.shape)} and teacher_logits "
            f"{tuple(teacher.shape)} must have the same leading shape (aligned "
            f"positions); their vocabularies may differ"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits are on {student.device} but teacher_logits on {teacher.device}"
        )
    # kd_loss's options that uld_loss does not take are passed at their defaults.
    check_kd_options(
        divergence="fkl",
        temperature=temperature,
        beta=0.5,
        alpha=0.1,
        ignore_index=ignore_index,
        hard_weight=0.0,
        softcap=None,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        has_labels=labels is not None,
    )
    if teacher_temperature is not None:
        check_kernel_float("teacher_temperature", teacher_temperature)
    check_labels(
        labels,
        student.shape[:-1],
        student.device,
        student.shape[-1],
        ignore_index,
        vocab_name="the student's vocabulary",
    )


# ---- the fused op ---------------------------------------------------------------------------


def launch_uld_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    teacher_temperature: float,
    ignore_index: int,
    grad_scale: float,
    backend: str,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs one fused kernel; returns (per-row loss fp32 [lead], grad like student; empty on CPU
    when not ``need_grad``)."""
    lead = student.shape[:-1]
    loss = torch.empty(lead, dtype=torch.float32, device=student.device)
    grad = grad_buffer(student, need_grad, backend, "uld_loss")
    n_rows = loss.numel()
    if n_rows == 0:
        return loss, grad
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    if backend == "triton":
        from ..triton.uld_loss import uld_loss_forward

        uld_loss_forward(
            student.reshape(n_rows, -1),
            teacher.reshape(n_rows, -1),
            flat_labels,
            grad.view(n_rows, -1),
            loss.view(-1),
            student_temperature=temperature,
            teacher_temperature=teacher_temperature,
            ignore_index=ignore_index,
            grad_scale=grad_scale,
        )
        return loss, grad
    s, inner_rows, s_layout = row_layout(student)
    t, inner_rows, t_layout = row_layout(teacher, inner_rows)
    launch(
        "uld_loss_forward_cpu",
        args="UldLossArgs",
        student=s,
        student_dtype=DTYPE_CODES[s.dtype],
        s_outer=s_layout.outer_stride,
        s_inner=s_layout.inner_stride,
        teacher=t,
        teacher_dtype=DTYPE_CODES[t.dtype],
        t_outer=t_layout.outer_stride,
        t_inner=t_layout.inner_stride,
        inner_rows=inner_rows,
        n_rows=n_rows,
        student_vocab=student.shape[-1],
        teacher_vocab=teacher.shape[-1],
        labels=flat_labels,
        ignore_index=ignore_index,
        grad=grad,
        loss=loss,
        student_temperature=temperature,
        teacher_temperature=teacher_temperature,
        grad_scale=grad_scale,
        run=dict(num_threads=torch.get_num_threads()),
    )
    return loss, grad


def _uld_loss_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    teacher_temperature: float,
    ignore_index: int,
    grad_scale: float,
    backend: str,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss (fp32, leading shape) and grad_scale * dLoss_token/dstudent (student's
    shape and dtype; empty on CPU when not ``need_grad``), by one kernel (``triton``: after
    torch.sort of each chunk of rows)."""
    return launch_uld_rows(
        student,
        teacher,
        labels,
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        ignore_index=ignore_index,
        grad_scale=grad_scale,
        backend=backend,
        need_grad=need_grad,
    )


uld_loss_fused = torch.library.custom_op("fastkd::uld_loss_fused", mutates_args=())(_uld_loss_rows)


def _fake_uld_loss(a):
    loss = a.student.new_empty(a.student.shape[:-1], dtype=torch.float32)
    return loss, grad_buffer(a.student, a.need_grad, a.backend, "uld_loss")


register_named_fake(uld_loss_fused, _fake_uld_loss)


register_stored_grad_autograd(uld_loss_fused)


# ---- public entry point ---------------------------------------------------------------------


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Universal Logit Distillation loss (Boizard et al., 2024): the L1 distance between the
    student's and the teacher's probabilities, each sorted in descending order, the shorter
    vocabulary padded with zeros. It ignores token identity, so teacher and student may use
    different tokenizers.

    Per token, with q = softmax(student / T) over V_s columns and p = softmax(teacher / T_t) over
    V_t columns:

        L = sum_{i < max(V_s, V_t)} |q_(i) - p_(i)|,      0 <= L <= 2,

    q_(i) the i-th largest probability (0 past the vocabulary). L is 0 exactly when the sorted
    vectors agree (p a permutation of q, up to zero padding). The gradient w.r.t. the student's
    logits is q_j (h_j - <q, h>) / T with h_j = sign(q_j - p_(r_j)), r_j the rank of column j
    (sign(0) = 0); equal probabilities are ranked by column, as a stable sort ranks them, so a
    tie gets a definite subgradient. The fused backends give the teacher no gradient: pass it
    detached or under no_grad (``backend="auto"`` runs the differentiable ``torch`` backend for
    a teacher that requires grad).

    Positions must already be aligned: row r of the student and row r of the teacher are
    compared. With different tokenizers, align the sequences first (the published method cuts
    both answers to the shorter length, left-aligned); rows to leave out are marked in
    ``labels`` with ``ignore_index``.

    Args:
        student_logits: ``[..., V_s]`` float32/bfloat16/float16 (float64: ``torch`` backend);
            any strides, stride 0 included.
        teacher_logits: ``[..., V_t]``, same leading shape; V_t may differ from V_s.
        temperature: T > 0 of the student's softmax, and of the teacher's unless
            ``teacher_temperature`` is given.
        teacher_temperature: T_t > 0 of the teacher's softmax, or None for T.
        labels: integer tensor of the leading shape (student token ids); tokens equal to
            ``ignore_index`` contribute nothing to loss or gradient. Only used as a mask.
        reduction: ``"mean"`` over valid tokens (or divided by ``num_items_in_batch`` when
            given; 0 when no token is valid), ``"sum"``, or ``"none"`` (per-token loss in the
            leading shape, 0 at ignored tokens).
        backend: ``"auto"`` (cpu on CPU, triton on CUDA, torch for float64), ``"torch"``,
            ``"cpu"`` or ``"triton"``. The plain-PyTorch ``torch`` backend holds fp32
            probabilities, their sorted copies and int64 sort indices for autograd (about 32
            bytes per student element); ``triton`` sorts chunks of rows within a fixed
            workspace (about 800 MB) and keeps only the gradient.

    A counted token where either model has no softmax (all logits -inf, or a NaN / +inf logit)
    gets loss and gradient NaN, as in ``kd_loss``.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or the leading shape for
        ``reduction="none"``. Units: probability mass (L1), per token.
    """
    _check_inputs(
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        ignore_index=ignore_index,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )
    device = student_logits.device
    name = pick_backend("uld_loss", backend, student_logits, teacher_logits)
    kwargs = dict(
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        labels=labels,
        ignore_index=ignore_index,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )
    if name == "torch":
        return uld_loss_reference(student_logits, teacher_logits, **kwargs)
    n_rows = student_logits.numel() // student_logits.shape[-1]
    grad_scale = mean_grad_scale(
        n_rows, device, labels, ignore_index, reduction, num_items_in_batch
    )
    t_teacher = temperature if teacher_temperature is None else teacher_temperature
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    args = (
        student_logits,
        teacher_logits.detach(),
        labels,
        float(temperature),
        float(t_teacher),
        int(ignore_index),
        float(grad_scale),
        name,
        need_grad,
    )
    rows, _ = call_fused(uld_loss_fused, _uld_loss_rows, args, need_grad=need_grad)
    valid = None if labels is None else labels != ignore_index
    return reduce_rows(rows, valid, reduction, num_items_in_batch)
