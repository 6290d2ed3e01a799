"""The chunked lm_head engine shared by the fused lm_head ops (fused_linear_kd_loss,
fused_linear_sparse_kd_loss, fused_linear_logprobs, fused_linear_topk).

Tokens are processed in chunks of C rows. Per chunk:

    z = s * (x W^T + b)                     [C, V] fp32, straight from the matmul
    a row kernel reads z and, where gradients are wanted, writes g = grad_scale * dL/dz over it
    grad_x[rows] = s * g W                   [C, H]
    grad_W      += s * g^T x                 [V, H]     grad_b += s * sum_rows g

This module holds what does not depend on the row kernel: chunk sizing from a memory budget, the
GEMM helpers (fp32 logits from any head dtype), the chunk loop, the autograd of an op built on it,
autocast, and the checks of a head and of the chunking options.
"""

from __future__ import annotations

import functools
import numbers

import torch

from ._checks import KERNEL_FLOAT_MAX, KERNEL_FLOAT_MIN
from ._op_args import OpArgs

__all__ = [
    "autocast_operands",
    "check_chunking",
    "check_head",
    "check_scale",
    "check_tensor",
    "chunk_logits",
    "default_memory_budget",
    "fake_outputs",
    "gemm_operand",
    "logits_buffer",
    "register_chunked_autograd",
    "register_recompute_autograd",
    "resolve_chunk_size",
    "run_chunks",
]

# Default workspace per chunk (the fp32 logits of both models, and on CUDA the low-precision
# copy of the gradient fed to the GEMMs). On CPU a smaller chunk loses little GEMM efficiency.
_MEMORY_BUDGET = {"cpu": 256 << 20, "cuda": 1 << 30}
_FALLBACK_BUDGET = 256 << 20
_CHUNK_ALIGN = 8  # chunk rows are rounded up to a multiple of this where the budget allows


def default_memory_budget(device: torch.device) -> int:
    """Bytes of chunk workspace used when ``memory_budget`` is not given."""
    return _MEMORY_BUDGET.get(device.type, _FALLBACK_BUDGET)


def resolve_chunk_size(
    n_rows: int,
    student_vocab: int,
    teacher_vocab: int | None,
    low_precision_grad: bool,
    memory_budget: int,
) -> int:
    """Rows per chunk such that the chunk's workspace fits in ``memory_budget`` bytes, with the
    rows spread evenly over the fewest chunks (no small tail GEMM).

    Per row: 4 V_s bytes of student logits (overwritten by the gradient), 4 V_t of teacher
    logits when they are computed here (``teacher_vocab`` not None), and 2 V_s for the
    gradient's low-precision copy when the GEMMs run in bf16/fp16.
    """
    per_row = 4 * student_vocab + (4 * teacher_vocab if teacher_vocab else 0)
    per_row += 2 * student_vocab if low_precision_grad else 0
    max_rows = max(1, memory_budget // per_row)
    if n_rows <= max_rows:
        return max(n_rows, 1)
    n_chunks = -(-n_rows // max_rows)
    rows = -(-n_rows // n_chunks)
    aligned = -(-rows // _CHUNK_ALIGN) * _CHUNK_ALIGN  # GEMM-friendly row counts
    return aligned if aligned <= max_rows else rows


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(t, DTensor)


def check_tensor(name: str, t, *, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if _is_dtensor(t):
        raise TypeError(
            f"{name} is a DTensor (placements {tuple(t.placements)}); the fused lm_head ops need "
            f"the full tensor on every rank. Call it inside the FSDP-wrapped module's forward "
            f"(FSDP2's fully_shard unshards parameters there; FSDP1: under "
            f"FSDP.summon_full_params), or pass {name}.full_tensor()"
        )
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point; got dtype {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s); got shape {tuple(t.shape)}")


def check_head(prefix: str, hidden, weight, bias) -> None:
    """hidden ``[..., H]``, weight ``[V, H]``, bias ``[V]`` or None, on one device; the
    messages name them ``<prefix>_hidden`` etc. (``hidden`` etc. for an empty prefix)."""
    prefix = f"{prefix}_" if prefix else ""
    check_tensor(f"{prefix}hidden", hidden)
    check_tensor(f"{prefix}weight", weight, dim=2)
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}hidden must have shape [..., H]; got a scalar")
    if weight.shape[0] < 1:
        raise ValueError(
            f"{prefix}weight must have shape [V, H] with V >= 1; got {tuple(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{prefix}hidden [..., H] and {prefix}weight [V, H] must agree on H; "
            f"got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor(f"{prefix}bias", bias, dim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{prefix}bias must have shape [V] = [{weight.shape[0]}] like "
                f"{prefix}weight's rows; got {tuple(bias.shape)}"
            )
    for name, t in ((f"{prefix}weight", weight), (f"{prefix}bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but {prefix}hidden on {hidden.device}")
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(
                f"{name} and {prefix}hidden must have one dtype (as F.linear "
                f"needs); got {t.dtype} and {hidden.dtype}"
            )


def check_scale(name: str, value) -> None:
    # The scale enters the row kernels' float32 gradient weight: its magnitude must survive the
    # cast as the other kernel floats do (_checks.check_kernel_float).
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not KERNEL_FLOAT_MIN <= abs(float(value)) <= KERNEL_FLOAT_MAX
    ):
        raise ValueError(
            f"{name} must be a nonzero number of magnitude in [2**-126, 2**126] "
            f"(the kernels take it as a float32); got {value!r}"
        )


def check_chunking(chunk_size, memory_budget, accum_dtype) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1; got {chunk_size!r}")
    if memory_budget is not None and (
        not isinstance(memory_budget, numbers.Integral) or memory_budget < 1
    ):
        raise ValueError(
            f"memory_budget must be None or a number of bytes >= 1; got {memory_budget!r}"
        )
    if accum_dtype not in (None, torch.float32):
        raise ValueError(
            f"accum_dtype must be None (the weight's dtype) or torch.float32; got {accum_dtype!r}"
        )


@functools.lru_cache(maxsize=None)
def _has_fp32_out_mm(device_type: str) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for bf16 operands here: it
    gives fp32 logits from a low-precision GEMM without rounding them to bf16 first."""
    if device_type != "cuda":
        return False
    try:
        a = torch.ones(16, 16, dtype=torch.bfloat16, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def gemm_operand(t: torch.Tensor | None) -> torch.Tensor | None:
    """The operand a GEMM with fp32 output reads: ``t`` itself when the device has a
    low-precision GEMM with fp32 output (or ``t`` is fp32), else an fp32 copy."""
    if t is None or t.dtype == torch.float32 or _has_fp32_out_mm(t.device.type):
        return t
    return t.float()


def chunk_logits(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    scale: float,
    buffer: torch.Tensor | None,
) -> torch.Tensor:
    """``scale * (x w^T + b)`` in fp32: ``[C, H] x [V, H] -> [C, V]``, written into ``buffer``
    (fp32 GEMMs) or returned fresh from a low-precision GEMM with fp32 output."""
    if w.dtype != torch.float32:
        logits = torch.mm(x, w.t(), out_dtype=torch.float32)
    elif x.dtype == torch.float32:
        logits = torch.mm(x, w.t(), out=buffer)
    else:  # an fp32 copy of a low-precision weight (CPU)
        logits = torch.mm(x.float(), w.t(), out=buffer)
    if b is not None:
        logits.add_(b)
    if scale != 1.0:
        logits.mul_(scale)
    return logits


def logits_buffer(rows: int, w: torch.Tensor | None) -> torch.Tensor | None:
    """A reusable fp32 ``[rows, V]`` output for the fp32 GEMMs with ``w`` ``[V, H]`` (on CPU,
    reusing it spares the page faults of a fresh allocation per chunk); None where the GEMM
    allocates its own."""
    if w is None or w.dtype != torch.float32:
        return None
    return torch.empty(rows, w.shape[0], dtype=torch.float32, device=w.device)


def run_chunks(
    hidden,
    weight,
    bias,
    row_kernel,
    row_scale,
    logit_scale: float,
    chunk_size: int,
    accum_fp32: bool,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
):
    """Loss rows ``[N]`` fp32 and the requested gradients (empty tensors for the others).

    ``row_kernel(z_s, begin, end, loss, need_grad)`` runs the fused loss on the chunk's fp32
    student logits ``z_s`` ``[end - begin, V_s]`` (rows begin..end of the batch), writing the
    rows' loss into ``loss`` and, when ``need_grad``, grad_scale * logit_scale * dL/dz_s over
    ``z_s``: with z_s = s (x W^T + b) the GEMMs need s dL/dz_s, and the kernel's own gradient
    scale applies s at no cost.
    """
    n_rows, vocab_s = hidden.shape[0], weight.shape[0]
    device = hidden.device
    need_grad = need_hidden or need_weight or need_bias
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    # GEMM operands: fp32 copies where no low-precision GEMM with fp32 output exists (CPU);
    # there grad_W and grad_b accumulate in fp32 anyway, since the GEMMs produce fp32.
    w_mm = gemm_operand(weight)
    grad_dtype = torch.float32 if w_mm.dtype == torch.float32 else weight.dtype
    acc_dtype = torch.float32 if accum_fp32 or grad_dtype == torch.float32 else weight.dtype
    grad_weight = (
        torch.zeros(weight.shape, dtype=acc_dtype, device=device)
        if need_weight
        else weight.new_empty(0)
    )
    grad_bias = (
        torch.zeros(vocab_s, dtype=acc_dtype, device=device) if need_bias else weight.new_empty(0)
    )
    zs_buf = logits_buffer(min(chunk_size, n_rows), w_mm)

    for begin in range(0, n_rows, chunk_size):
        end = min(begin + chunk_size, n_rows)
        x = hidden[begin:end]
        zs = chunk_logits(
            x, w_mm, bias, logit_scale, None if zs_buf is None else zs_buf[: end - begin]
        )
        row_kernel(zs, begin, end, loss[begin:end], need_grad)
        if not need_grad:
            continue
        g = zs  # grad_scale * dL/dz_s, fp32, written over the logits
        if row_scale is not None:
            g.mul_(row_scale[begin:end, None])
        g_mm = g if grad_dtype == torch.float32 else g.to(grad_dtype)
        if need_hidden:
            if grad_hidden.dtype == g_mm.dtype:
                torch.mm(g_mm, w_mm, out=grad_hidden[begin:end])
            else:  # fp32 GEMM on CPU for low-precision hidden states
                grad_hidden[begin:end].copy_(torch.mm(g_mm, w_mm))
        if need_weight:
            x_mm = x if x.dtype == grad_weight.dtype else x.to(grad_weight.dtype)
            g_w = g_mm if g_mm.dtype == grad_weight.dtype else g
            grad_weight.addmm_(g_w.t(), x_mm)
        if need_bias:
            grad_bias.add_(g.sum(0))
    if need_weight and grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    if need_bias and grad_bias.dtype != bias.dtype:
        grad_bias = grad_bias.to(bias.dtype)
    return loss, grad_hidden, grad_weight, grad_bias


def fake_outputs(a):
    """The fake outputs of a chunked loss op (``register_named_fake``): the loss (a scalar
    with ``reduce``, else a row per token) and the three requested gradients."""
    loss = a.hidden.new_empty(() if a.reduce else a.hidden.shape[:1], dtype=torch.float32)
    return (
        loss,
        torch.empty_like(a.hidden) if a.need_hidden else a.hidden.new_empty(0),
        torch.empty_like(a.weight) if a.need_weight else a.weight.new_empty(0),
        torch.empty_like(a.bias) if a.need_bias else a.weight.new_empty(0),
    )


def _scale_in_place(grads, factor: torch.Tensor, unit: float):
    """``grads * factor / unit``; in place in eager mode, skipped on CPU where that is 1."""
    if torch.compiler.is_compiling() or any(type(g) is not torch.Tensor for g in grads):
        return [g * (factor / unit) for g in grads]
    # unit is compared as the incoming gradient's float32 would carry it (e.g. 1/#tokens).
    unit_as_factor = float(torch.tensor(unit, dtype=factor.dtype))
    if factor.device.type == "cpu" and float(factor) == unit_as_factor:
        scaled = grads
    else:
        scaled = [g.mul_(factor / unit) for g in grads]
    # Bump the versions even where nothing changed, so that a second backward through the
    # same graph raises instead of scaling twice.
    for g in scaled:
        torch.autograd.graph.increment_version(g)
    return scaled


# The arguments every chunked op has: the operands that get gradients first, the flags saying
# which gradients to compute last (the backward sets them to what autograd needs).
_OPERANDS = ("hidden", "weight", "bias")
_NEED_FLAGS = ("need_hidden", "need_weight", "need_bias")


def _chunked_op_args(op) -> OpArgs:
    """``OpArgs(op)``, checked to start with ``_OPERANDS`` and end with ``_NEED_FLAGS``."""
    args = OpArgs(op)
    if args.names[:3] != _OPERANDS or args.names[-3:] != _NEED_FLAGS:
        raise ValueError(
            f"{args.op_name}: a chunked op's arguments must start with {_OPERANDS} and end with "
            f"{_NEED_FLAGS}; got {list(args.names)}"
        )
    return args


def register_chunked_autograd(
    op, *, row_scale: str = "row_scale", grad_scale: str = "grad_scale", reduce: str = "reduce"
):
    """Autograd of a chunked op whose first three arguments are (hidden, weight, bias), whose
    last three are the need_hidden/need_weight/need_bias flags, and whose outputs are (loss,
    grad_hidden, grad_weight, grad_bias); the other arguments are named by ``row_scale``,
    ``grad_scale`` and ``reduce``. Reduced losses: the backward scales the gradients made in
    the forward. reduction="none": it reruns the op with each row's gradient weighted by its
    incoming gradient (the ``row_scale`` argument)."""
    args = _chunked_op_args(op)
    row_scale_arg, grad_scale_arg = args.index(row_scale), args.index(grad_scale)
    reduce_arg = args.index(reduce)
    n_args = len(args)
    no_grads = (None,) * (n_args - 3)

    def setup_context(ctx, inputs, output):
        ctx.reduce = inputs[reduce_arg]
        ctx.grad_scale = inputs[grad_scale_arg]
        grads = output[1:]
        # No gradient flows into the gradient outputs (this also spares autograd materializing
        # zero tensors as their incoming gradients).
        ctx.mark_non_differentiable(*grads)
        ctx.set_materialize_grads(False)
        if ctx.reduce:
            ctx.save_for_backward(*grads)
        else:
            is_tensor = [isinstance(t, torch.Tensor) for t in inputs]
            ctx.inputs = [None if tensor else t for t, tensor in zip(inputs, is_tensor)]
            ctx.tensor_positions = [i for i, tensor in enumerate(is_tensor) if tensor]
            ctx.save_for_backward(*(t for t, tensor in zip(inputs, is_tensor) if tensor))

    def backward(ctx, grad_loss, *unused):
        needs = ctx.needs_input_grad[:3]
        if grad_loss is None or not any(needs):
            return (None, None, None, *no_grads)
        if ctx.reduce:
            present = [g for g, need in zip(ctx.saved_tensors, needs) if need]
            scaled = iter(_scale_in_place(present, grad_loss.to(torch.float32), ctx.grad_scale))
            return (*(next(scaled) if need else None for need in needs), *no_grads)
        inputs = list(ctx.inputs)
        for position, t in zip(ctx.tensor_positions, ctx.saved_tensors):
            inputs[position] = t
        inputs[row_scale_arg] = grad_loss.to(torch.float32).contiguous()
        inputs[n_args - 3 :] = needs
        _, *grads = op(*inputs)
        return (*(g if need else None for g, need in zip(grads, needs)), *no_grads)

    op.register_autograd(backward, setup_context=setup_context)


def register_recompute_autograd(op, *, n_row_outputs: int, row_grads: str = "row_grads"):
    """Autograd of a chunked op with per-row outputs: its first three arguments are (hidden,
    weight, bias), its last three the need_hidden/need_weight/need_bias flags, and its outputs
    ``n_row_outputs`` per-row tensors ``[N]`` (an empty one for an output not computed)
    followed by (grad_hidden, grad_weight, grad_bias). The forward computes the outputs only;
    the backward runs the op again with the outputs' incoming gradients stacked as a
    ``[N, n_row_outputs]`` fp32 input, the argument named ``row_grads`` (zeros for outputs with
    none)."""
    args = _chunked_op_args(op)
    row_grads_arg = args.index(row_grads)
    n_args = len(args)
    no_grads = (None,) * (n_args - 3)

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[n_row_outputs:])
        ctx.set_materialize_grads(False)
        is_tensor = [isinstance(t, torch.Tensor) for t in inputs]
        ctx.inputs = [None if tensor else t for t, tensor in zip(inputs, is_tensor)]
        ctx.tensor_positions = [i for i, tensor in enumerate(is_tensor) if tensor]
        ctx.save_for_backward(*(t for t, tensor in zip(inputs, is_tensor) if tensor))

    def backward(ctx, *grad_outputs):
        needs = ctx.needs_input_grad[:3]
        incoming = [
            g if g is not None and g.numel() else None for g in grad_outputs[:n_row_outputs]
        ]
        if not any(needs) or all(g is None for g in incoming):
            return (None, None, None, *no_grads)
        inputs = list(ctx.inputs)
        for position, t in zip(ctx.tensor_positions, ctx.saved_tensors):
            inputs[position] = t
        n_rows = inputs[0].shape[0]
        zeros = inputs[0].new_zeros(n_rows, dtype=torch.float32)
        inputs[row_grads_arg] = torch.stack(
            [zeros if g is None else g.to(torch.float32) for g in incoming], 1
        ).contiguous()
        inputs[n_args - 3 :] = needs
        grads = op(*inputs)[n_row_outputs:]
        return (*(g if need else None for g, need in zip(grads, needs)), *no_grads)

    op.register_autograd(backward, setup_context=setup_context)


def autocast_operands(tensors, device_type: str):
    """Casts floating tensors to the autocast dtype where autocast is on, as ``F.linear`` would
    run under it (the casts are recorded by autograd)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if t is not None and t.dtype != dtype else t for t in tensors]
