"""The autograd of a custom op built on the chunked lm_head engine (``_chunked_lm_head``, which
re-exports these names). ``register_chunked_autograd``, for a loss: reduced, the backward scales
the gradients the forward made; with reduction="none", it reruns the op with each row's gradient
weighted by its incoming gradient. ``register_recompute_autograd``, for per-row outputs: the
backward reruns the op with their incoming gradients. Both find the op's arguments by name in
its schema (``_op_args.OpArgs``)."""

from __future__ import annotations

import torch

from ._op_args import OpArgs

__all__ = ["register_chunked_autograd", "register_recompute_autograd"]


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
