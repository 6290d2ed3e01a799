"""sparse_kd_loss's row kernel: its backends' registration (the forward and the reverse
direction), the checks and preparation of the targets, and the launcher, which sparse_kd_loss and
the chunked lm_head loss (fused_linear_sparse_kd_loss, on each chunk's logits) share."""

from __future__ import annotations

import torch

from ..sparse.targets import SparseTargets
from ._checks import check_kd_options
from ._fused_rows import grad_buffer
from ._launch import launch
from ._layout import row_layout
from ._native import DTYPE_CODES
from ._registry import native_backend, reference_backend, register_op, triton_backend

__all__ = [
    "DIRECTIONS",
    "check_direction",
    "check_sparse_options",
    "check_targets",
    "keep_first_of_equal_ids",
    "launch_sparse_rows",
    "merge_duplicate_ids",
    "row_op",
]

DIRECTIONS = ("forward", "reverse")

# No CUDA kernel: Triton on GPUs. The CPU kernel reads a row into scratch before it writes the
# row's gradient; the Triton kernel re-reads the ids' logits after writing it.
register_op(
    "sparse_kd_loss",
    [
        reference_backend(),
        native_backend(
            "cpu", "sparse_kd_loss_forward_cpu", skips_unneeded_grad=True, grad_may_alias_input=True
        ),
        triton_backend("sparse_kd_loss"),
    ],
    auto={"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")},
)
# The reverse direction (direction="reverse") of the same kernels, declared on its own so that
# the registry says which backends have it.
register_op(
    "sparse_kd_loss_reverse",
    [
        reference_backend(),
        native_backend(
            "cpu", "sparse_kd_loss_forward_cpu", skips_unneeded_grad=True, grad_may_alias_input=True
        ),
        triton_backend("sparse_kd_loss"),
    ],
    auto={"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")},
)


def row_op(direction: str) -> str:
    """The registered op whose backends run the sparse rows in ``direction``."""
    return "sparse_kd_loss_reverse" if direction == "reverse" else "sparse_kd_loss"


def check_direction(direction, targets: SparseTargets) -> None:
    """``direction`` is one of ``DIRECTIONS``; ``"reverse"`` needs the targets' log-probabilities
    and their tail mass (``tail="bucket"``)."""
    if not isinstance(direction, str) or direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}; got {direction!r}")
    if direction != "reverse":
        return
    if targets.logprobs is None:
        raise ValueError(
            "direction='reverse' needs targets.logprobs (the log-probabilities log p_k at the "
            f"ids); these {targets.method!r} targets have none: make them with "
            "fastkd.fused_linear_support, fastkd.student_support_targets or "
            "fastkd.fused_linear_topk"
        )
    if targets.tail_mass is None:
        raise ValueError(
            "direction='reverse' needs tail='bucket' targets (targets.tail_mass, the mass "
            f"outside the ids); got tail={targets.tail!r}"
        )


def check_targets(
    targets,
    lead: torch.Size,
    device: torch.device,
    student_vocab: int,
    what: str = "student_logits",
) -> int:
    """``targets`` fit a student of leading shape ``lead`` and ``student_vocab`` columns on
    ``device``; returns the vocabulary the loss sees, V = min(V_s, targets.vocab_size)."""
    if not isinstance(targets, SparseTargets):
        raise TypeError(f"targets must be a fastkd SparseTargets; got {type(targets).__name__}")
    if targets.lead_shape != lead:
        raise ValueError(
            f"targets must have the leading shape {tuple(lead)} of {what}; "
            f"got ids of shape {tuple(targets.ids.shape)}"
        )
    if targets.device != device:
        raise ValueError(f"targets are on {targets.device} but {what} on {device}")
    vocab = min(student_vocab, targets.vocab_size)
    # Range check of the ids where it costs no device sync (and outside traced graphs);
    # elsewhere a token with an id >= V gets a NaN loss (the kernels never read past V).
    ids = targets.ids
    if ids.device.type == "cpu" and ids.numel() > 0 and not torch.compiler.is_compiling():
        bad = (ids >= vocab) | (ids < -1)
        if bool(bad.any()):
            values = ids[bad].unique()[:5].tolist()
            raise ValueError(
                f"target ids must lie in [0, {vocab}) (V = min(V_s, targets.vocab_size) = "
                f"min({student_vocab}, {targets.vocab_size})) or be -1 (padding); found "
                f"{values}"
            )
    return vocab


def merge_duplicate_ids(
    ids: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets ``ids``/``weights`` ``[..., K]`` with every id at most once per row: the
    weights of equal ids are added (each clamped at 0 first, as the loss counts weights <= 0
    as 0; NaN and +inf are kept for the kernels' NaN rule), in the slot of the first of them
    after sorting; the other slots become padding (id -1, weight 0). Slots come back in
    ascending id order. The fused kernels assume distinct ids (they gather and overwrite the
    id columns of a row once per slot); a few [..., K] operations make that hold for any input.
    """
    k = ids.shape[-1]
    if k < 2:
        return ids, weights
    ids, order = ids.sort(-1)
    weights = weights.gather(-1, order)
    weights = torch.where(weights <= 0, 0.0, weights)
    repeat = (ids[..., 1:] == ids[..., :-1]) & (ids[..., 1:] >= 0)
    if not torch.compiler.is_compiling() and ids.device.type == "cpu" and not bool(repeat.any()):
        return ids, weights
    first = torch.cat([torch.ones_like(repeat[..., :1]), ~repeat], -1)
    slot = torch.arange(k, device=ids.device).expand_as(ids)
    run_start = torch.where(first, slot, 0).cummax(-1).values
    merged = torch.zeros_like(weights).scatter_add_(-1, run_start, weights)
    keep = first & (ids >= 0)
    return torch.where(keep, ids, -1), torch.where(keep, merged, 0.0)


def keep_first_of_equal_ids(
    ids: torch.Tensor, logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets ``ids``/``logprobs`` ``[..., K]`` of the reverse direction with every id at
    most once per row: of equal ids the first slot is kept (with its log-probability), the
    others become padding (id -1, log-prob 0). Slots come back in ascending id order, as
    ``merge_duplicate_ids`` gives them."""
    k = ids.shape[-1]
    if k < 2:
        return ids, logprobs
    ids, order = ids.sort(dim=-1, stable=True)
    logprobs = logprobs.gather(-1, order)
    repeat = (ids[..., 1:] == ids[..., :-1]) & (ids[..., 1:] >= 0)
    if not torch.compiler.is_compiling() and ids.device.type == "cpu" and not bool(repeat.any()):
        return ids, logprobs
    keep = torch.cat([torch.ones_like(repeat[..., :1]), ~repeat], -1)
    return torch.where(keep, ids, -1), torch.where(keep, logprobs, 0.0)


def check_sparse_options(
    *, temperature, ignore_index, hard_weight, reduction, num_items_in_batch, has_labels: bool
) -> None:
    # kd_loss's options that the sparse losses do not take are passed at their defaults.
    check_kd_options(
        divergence="fkl",
        temperature=temperature,
        beta=0.5,
        alpha=0.1,
        ignore_index=ignore_index,
        hard_weight=hard_weight,
        softcap=None,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        has_labels=has_labels,
    )


def launch_sparse_rows(
    student: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor | None,
    tail_mass: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    vocab: int,
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    grad_scale: float,
    backend: str,
    need_grad: bool,
    loss: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs one fused kernel; returns (per-row loss fp32 [lead], grad like student).

    The forward direction reads the targets' ``weights``; with ``logprobs`` (``[..., K]`` fp32
    log p_k; ``weights`` then None) the kernel computes the reverse direction.

    ``loss`` (contiguous fp32, the leading shape) and ``grad`` (contiguous, the student's
    shape) may be given to write into. On ``cpu``, ``grad`` may be ``student`` itself when that
    is contiguous (the kernel reads a row into scratch before writing its gradient); the Triton
    kernel re-reads the ids' logits after writing the row, so its ``grad`` must not alias.
    """
    lead = student.shape[:-1]
    if loss is None:
        loss = torch.empty(lead, dtype=torch.float32, device=student.device)
    if grad is None:
        op = row_op("reverse" if logprobs is not None else "forward")
        grad = grad_buffer(student, need_grad, backend, op)
    n_rows = loss.numel()
    if n_rows == 0:
        return loss, grad
    s, inner_rows, layout = row_layout(student)
    k = ids.shape[-1]
    flat_ids = ids.reshape(n_rows, k).contiguous()
    flat_weights = None if weights is None else weights.reshape(n_rows, k).contiguous()
    flat_logprobs = None if logprobs is None else logprobs.reshape(n_rows, k).contiguous()
    flat_tail = None if tail_mass is None else tail_mass.reshape(-1).contiguous()
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    if backend == "triton":
        from ..triton.sparse_kd_loss import sparse_kd_loss_forward

        sparse_kd_loss_forward(
            s,
            flat_ids,
            flat_weights,
            flat_tail,
            flat_labels,
            grad,
            loss,
            n_rows=n_rows,
            inner_rows=inner_rows,
            layout=layout,
            vocab=vocab,
            grad_vocab=student.shape[-1],
            temperature=temperature,
            soft_weight=soft_weight,
            hard_weight=hard_weight,
            ignore_index=ignore_index,
            grad_scale=grad_scale,
            logprobs=flat_logprobs,
        )
        return loss, grad
    launch(
        "sparse_kd_loss_forward_cpu",
        args="SparseKdLossArgs",
        student=s,
        student_dtype=DTYPE_CODES[s.dtype],
        s_outer=layout.outer_stride,
        s_inner=layout.inner_stride,
        inner_rows=inner_rows,
        n_rows=n_rows,
        vocab=vocab,
        grad_vocab=student.shape[-1],
        ids=flat_ids,
        weights=flat_weights,
        num_slots=k,
        logprobs=flat_logprobs,
        reverse=logprobs is not None,
        tail_mass=flat_tail,
        labels=flat_labels,
        grad=grad,
        loss=loss,
        temperature=temperature,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        grad_scale=grad_scale,
        ignore_index=ignore_index,
        run=dict(num_threads=torch.get_num_threads()),
    )
    return loss, grad
