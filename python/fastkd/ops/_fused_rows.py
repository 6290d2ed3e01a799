"""The fused-row framework: what the fused loss ops share around their row kernels.

A fused loss op (kd_loss, sparse_kd_loss, uld_loss, and the chunked lm_head losses) runs a
kernel that writes, per row of ``[..., V]`` logits, the row's loss and ``grad_scale`` times the
row's gradient, ``grad_scale`` being the reduction's weight where it is known without a device
sync (``mean_grad_scale``). Around that kernel: the backend choice for a pair of logits
tensors (``pick_backend``), the gradient buffer (``grad_buffer``), the autograd formula that
only rescales the stored gradient by the incoming one, in place in eager mode
(``register_stored_grad_autograd``, ``rescale_grad_rows``), and the reduction of the per-row
losses (``reduce_rows``, ``reduce_total``). The plain-PyTorch references keep their own
reduction (``reference/kd_loss.py``), so that a bug in one cannot hide in the tests of the
other.
"""

from __future__ import annotations

import numbers

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._launch import launch
from ._native import DTYPE_CODES, native
from ._op_args import OpArgs
from ._registry import AUTO, accepts, backend_spec, resolve_backend

__all__ = [
    "grad_buffer",
    "mean_grad_scale",
    "pick_backend",
    "call_fused",
    "may_skip_dispatcher",
    "reduce_rows",
    "reduce_total",
    "register_stored_grad_autograd",
    "rescale_grad_rows",
]


# ---- the eager shortcut ---------------------------------------------------------------------


def may_skip_dispatcher(*tensors: torch.Tensor | None) -> bool:
    """Whether an op whose outputs need no autograd may run its implementation directly instead
    of through its custom op: in eager mode (not compiling, not under torch.jit.trace), on plain
    tensors (no FakeTensor, DTensor or other subclass), with no dispatch or torch-function mode
    and no functorch transform (vmap, grad) active. The dispatcher's Python layers cost about 40 %
    of a small call (kd_loss on 8 x 64 under no_grad); everything they would do for such a call
    is the implementation itself."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch.jit.is_tracing():  # sizes taken from shapes are 0-dim tensors there, not ints
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(t is None or type(t) is torch.Tensor for t in tensors)


def call_fused(op, impl, args: tuple, *, need_grad: bool):
    """``op(*args)``, or ``impl(*args)`` (the function ``op`` was made from) where the call wants
    no gradient and ``may_skip_dispatcher`` allows it: the same kernel, the same outputs."""
    if not need_grad and may_skip_dispatcher(*(a for a in args if isinstance(a, torch.Tensor))):
        return impl(*args)
    return op(*args)


# ---- backend and scale ----------------------------------------------------------------------


def pick_backend(op: str, backend: str, student: torch.Tensor, teacher: torch.Tensor) -> str:
    """The backend of a loss between ``student`` and ``teacher`` logits. The fused backends take
    float32/bfloat16/float16 logits and give the teacher no gradient: ``auto`` picks ``torch``
    otherwise, and a fused backend asked for by name raises."""
    inputs = dict(
        dtypes=(student.dtype, teacher.dtype),
        teacher_grad=teacher.requires_grad and torch.is_grad_enabled(),
    )
    name = resolve_backend(op, backend, student.device, **inputs)
    # auto only chooses a backend that accepts the inputs.
    if backend != AUTO and not accepts(op, name, **inputs):
        raise ValueError(
            f"backend {name!r} takes float32/bfloat16/float16 logits and no gradient for the "
            f"teacher; got student {student.dtype}, teacher {teacher.dtype} "
            f"(teacher requires_grad={teacher.requires_grad}); detach the teacher or use "
            f"backend='torch'"
        )
    return name


def mean_grad_scale(
    n_rows: int, device: torch.device, labels, ignore_index: int, reduction: str, num_items_in_batch
) -> float:
    """The reduction's weight of every row where it is known without a device sync or a
    data-dependent branch in a traced graph (else 1; the backward applies the rest)."""
    if reduction != "mean":
        return 1.0
    if isinstance(num_items_in_batch, numbers.Real):
        return 1.0 / float(num_items_in_batch)
    host = device.type == "cpu" and not torch.compiler.is_compiling()
    if num_items_in_batch is not None:
        on_host = host and num_items_in_batch.device.type == "cpu"
        return 1.0 / float(num_items_in_batch) if on_host else 1.0
    if labels is None:
        return 1.0 / max(n_rows, 1) if isinstance(n_rows, int) else 1.0
    return 1.0 / max(int((labels != ignore_index).sum()), 1) if host else 1.0


# ---- the gradient buffer and the backward ---------------------------------------------------


def grad_buffer(
    student: torch.Tensor, need_grad: bool, backend: str, op: str = "kd_loss"
) -> torch.Tensor:
    """The gradient output: like the student, or empty where no gradient is wanted and
    ``op``'s ``backend`` kernel can skip it."""
    if need_grad or not backend_spec(op, backend).skips_unneeded_grad:
        return torch.empty_like(student, memory_format=torch.contiguous_format)
    return student.new_empty((0,))


def rescale_grad_rows(
    grad: torch.Tensor, grad_loss: torch.Tensor, grad_scale: float
) -> torch.Tensor:
    """The stored ``grad`` ``[..., V]`` (grad_scale times the rows' gradients) times
    ``grad_loss / grad_scale`` per row: the gradient to return from a backward."""
    if torch.compiler.is_compiling() or type(grad) is not torch.Tensor:
        # Traced graphs (functional/fake tensor subclasses) must not mutate saved activations;
        # the compiler plans the buffer.
        return grad * (grad_loss / grad_scale).unsqueeze(-1)
    # In eager mode, in place: the stored gradient becomes the returned one, so no second [N, V]
    # buffer exists. Its version is bumped even where no row changed, so that a second backward
    # through the same graph always raises instead of rescaling twice.
    mod = native()
    if grad.device.type == "cpu" and mod is not None and grad.numel() > 0:
        factors = grad_loss.reshape(-1).to(torch.float32).contiguous()
        launch(
            "scale_rows_cpu",
            data=grad,
            dtype=DTYPE_CODES[grad.dtype],
            n_rows=factors.numel(),
            row_len=grad.shape[-1],
            factors=factors,
            unit=grad_scale,
            run=dict(num_threads=torch.get_num_threads()),
        )
        torch.autograd.graph.increment_version(grad)
    else:
        grad.mul_((grad_loss / grad_scale).unsqueeze(-1))
    return grad


def register_stored_grad_autograd(op, *, grad_scale: str = "grad_scale") -> None:
    """Autograd of a fused loss op whose outputs are (per-row loss, ``grad_scale`` times
    dLoss_row/d(first argument)), ``grad_scale`` being the name of the op's argument holding
    that factor: the backward rescales the stored gradient by the incoming one
    (``rescale_grad_rows``) and returns it for the first argument, None for the others."""
    args = OpArgs(op)
    grad_scale_arg = args.index(grad_scale)
    no_grads = (None,) * (len(args) - 1)

    def setup_context(ctx, inputs, output):
        ctx.grad_scale = inputs[grad_scale_arg]
        ctx.save_for_backward(output[1])
        # No gradient flows into the gradient buffer: without this, autograd would materialize
        # a zero [N, V] tensor as its incoming gradient on every backward.
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, grad_grad):
        (grad,) = ctx.saved_tensors
        if grad_loss is None:
            return None, *no_grads
        return rescale_grad_rows(grad, grad_loss, ctx.grad_scale), *no_grads

    op.register_autograd(backward, setup_context=setup_context)


# ---- the reduction --------------------------------------------------------------------------


def reduce_total(
    total: torch.Tensor,
    n_rows: int,
    valid: torch.Tensor | None,
    reduction: str,
    num_items_in_batch: int | torch.Tensor | None,
) -> torch.Tensor:
    """``"sum"`` or ``"mean"`` of ``n_rows`` per-row losses whose sum is ``total`` (0-dim).

    The mean divides by ``num_items_in_batch`` where it is given, else by the number of
    ``valid`` rows (all ``n_rows`` where None), at least 1: a mean over no valid row is 0.
    """
    if reduction == "sum":
        return total
    if num_items_in_batch is None:
        if valid is None and total.device.type == "cpu":  # no tensor made for the divisor
            return total / max(n_rows, 1)
        if valid is None:  # CUDA multiplies by the reciprocal of a Python divisor: a tensor
            return total / torch.tensor(max(n_rows, 1), dtype=total.dtype, device=total.device)
        return total / valid.sum().clamp(min=1).to(total.dtype)
    if not isinstance(num_items_in_batch, torch.Tensor):
        return total / num_items_in_batch
    # Not read on the host (that would sync): a count that is not > 0 gives NaN, never a
    # negative or infinite loss.
    count = num_items_in_batch.to(device=total.device, dtype=total.dtype).reshape(())
    return total / torch.where(count > 0, count, torch.nan)


def reduce_rows(
    rows: torch.Tensor,
    valid: torch.Tensor | None,
    reduction: str,
    num_items_in_batch: int | torch.Tensor | None,
) -> torch.Tensor:
    """The reduction of per-row losses ``rows`` (0 at ignored rows): ``"none"`` returns them,
    ``"sum"`` and ``"mean"`` as ``reduce_total``."""
    if reduction == "none":
        return rows
    return reduce_total(rows.sum(), rows.numel(), valid, reduction, num_items_in_batch)
