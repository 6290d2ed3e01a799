"""The input checks of fused_linear_kd_loss: the student's head, the teacher (hidden states and
head, or dense logits) against it, and the options the chunked lm_head adds to kd_loss's. They
raise before any chunk runs, with the offending shapes or values in the message."""

from __future__ import annotations

from ._chunked_lm_head import check_chunking, check_head, check_scale, check_tensor

__all__ = ["check_fused_linear_options"]


def _check_inputs(
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    teacher_logits,
    *,
    chunk_size,
    memory_budget,
    logit_scale,
    teacher_logit_scale,
    accum_dtype,
) -> None:
    check_head("student", student_hidden, student_weight, student_bias)
    lead = student_hidden.shape[:-1]
    device = student_hidden.device
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError(
                "give the teacher either as teacher_logits or as teacher_hidden and "
                "teacher_weight (and teacher_bias), not both"
            )
        check_tensor("teacher_logits", teacher_logits)
        if (
            teacher_logits.dim() < 1
            or teacher_logits.shape[:-1] != lead
            or teacher_logits.shape[-1] < 1
        ):
            raise ValueError(
                f"teacher_logits must have shape [..., V_t] with the leading shape "
                f"{tuple(lead)} of student_hidden; got {tuple(teacher_logits.shape)}"
            )
        if teacher_logits.device != device:
            raise ValueError(
                f"teacher_logits is on {teacher_logits.device} but student_hidden on {device}"
            )
        if teacher_logit_scale != 1.0:
            raise ValueError(
                f"teacher_logit_scale={teacher_logit_scale!r} applies to logits "
                f"computed from teacher_hidden; scale dense teacher_logits yourself"
            )
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError(
                "the teacher is missing: give teacher_hidden and teacher_weight, or teacher_logits"
            )
        check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(
                f"teacher_hidden must have the leading shape {tuple(lead)} of "
                f"student_hidden; got {tuple(teacher_hidden.shape)}"
            )
        if teacher_hidden.device != device:
            raise ValueError(
                f"teacher_hidden is on {teacher_hidden.device} but student_hidden on {device}"
            )
    check_chunking(chunk_size, memory_budget, accum_dtype)
    check_scale("logit_scale", logit_scale)
    check_scale("teacher_logit_scale", teacher_logit_scale)


def check_fused_linear_options(
    *, chunk_size, memory_budget, accum_dtype, logit_scale, teacher_logit_scale
) -> None:
    """The options ``fused_linear_kd_loss`` adds to ``kd_loss``'s (checked by ``FusedLinearKDLoss``
    when it is built)."""
    check_chunking(chunk_size, memory_budget, accum_dtype)
    check_scale("logit_scale", logit_scale)
    check_scale("teacher_logit_scale", teacher_logit_scale)
