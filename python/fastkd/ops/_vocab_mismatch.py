"""What the kd_loss family does when the student's and the teacher's vocabularies differ in size
(``vocab_mismatch``).

``"cut"`` (the default) compares the common prefix ``min(V_s, V_t)`` of the two vocabularies:
the kernels read that many columns of each and give the student's extra columns a zero gradient.

``"pad"`` is Liger-Kernel's convention (``LigerFusedLinearDistillationBase._compute_loss`` in
liger-kernel 0.8.5 appends ``V_t - V_s`` zero columns to the student's temperature-scaled logits
when the teacher's head is larger): the student gets logit 0 at every teacher id it lacks, so
those ids keep student probability ``exp(0) / Z`` and enter the divergence. Here the padding is
applied before the softcap, the scales and the temperature, all of which map 0 to 0, so the
result is the same. The padded columns' gradients are dropped (they belong to no parameter).
Where the teacher's vocabulary is the smaller one, Liger cannot run (its divergence stacks
tensors of different widths) and fastkd raises rather than pick a convention silently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["VOCAB_MISMATCH", "match_student_head", "match_student_logits"]

VOCAB_MISMATCH = ("cut", "pad")


def _check_pad(vocab_s: int, vocab_t: int, student: str) -> None:
    if vocab_s > vocab_t:
        raise ValueError(
            f"vocab_mismatch='pad' pads the student's logits with zeros up to the teacher's "
            f"vocabulary and needs V_s <= V_t; got {student} with V_s={vocab_s} and a teacher "
            f"with V_t={vocab_t}; use vocab_mismatch='cut' to compare the first {vocab_t} ids"
        )


def match_student_logits(
    student_logits: torch.Tensor, teacher_vocab: int, vocab_mismatch: str
) -> torch.Tensor:
    """``student_logits`` ``[..., V_s]`` as the kernels see them: unchanged for ``"cut"`` (they
    cut to the common prefix themselves) or V_s = V_t, else zero-padded to ``[..., V_t]``
    (a differentiable pad: the padded columns' gradients are dropped)."""
    vocab_s = student_logits.shape[-1]
    if vocab_mismatch == "cut" or vocab_s == teacher_vocab:
        return student_logits
    _check_pad(vocab_s, teacher_vocab, "student_logits")
    return F.pad(student_logits, (0, teacher_vocab - vocab_s))


def match_student_head(
    weight: torch.Tensor, bias: torch.Tensor | None, teacher_vocab: int, vocab_mismatch: str
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The student head ``weight`` ``[V_s, H]`` and ``bias`` ``[V_s]`` as the fused op uses them,
    and their row count: for ``"pad"`` with V_s < V_t, ``V_t - V_s`` zero rows (and zero bias
    entries) appended, which give logit 0 for those ids; autograd drops their gradients. This
    costs one ``[V_t, H]`` copy of the weight per call."""
    vocab_s = weight.shape[0]
    if vocab_mismatch == "cut" or vocab_s == teacher_vocab:
        return weight, bias, vocab_s
    _check_pad(vocab_s, teacher_vocab, "student_weight")
    extra = teacher_vocab - vocab_s
    weight = torch.cat([weight, weight.new_zeros(extra, weight.shape[1])])
    if bias is not None:
        bias = torch.cat([bias, bias.new_zeros(extra)])
    return weight, bias, teacher_vocab
