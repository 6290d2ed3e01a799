"""fused_linear_logprobs: the lm_head fused with the log-softmax gathered at target ids.

Per chunk of C tokens the chunked lm_head engine (``_chunked_lm_head``) forms the fp32 logits
z = s (x W^T + b); a row kernel writes, with a = z / T,

    logprob_t = a_t - lse(a),   lse(a),   H = -sum_j p_j log p_j   (p = softmax(a))

and, in the backward, the gradient of sum_rows (g_logprob logprob + g_lse lse + g_H H) over z:

    dz_j = (s / T) [ g_logprob (1[j = t] - p_j) + g_lse p_j - g_H p_j (log p_j + H) ]

The outputs are per token, so their incoming gradient is known only in the backward: the
forward computes the outputs, the backward runs the chunks again with the incoming gradients
(the engine's ``register_recompute_autograd``). No ``[N, V]`` tensor is formed on any backend
(float64 inputs on the ``torch`` backend excepted: they run the whole-logits reference).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from ..reference.fused_linear_logprobs import fused_linear_logprobs_reference
from ._op_args import register_named_fake
from ._chunked_lm_head import (
    autocast_operands,
    check_chunking,
    check_head,
    check_scale,
    default_memory_budget,
    register_recompute_autograd,
    resolve_chunk_size,
    run_chunks,
)
from ._checks import check_kernel_float
from ._launch import launch_native
from ._registry import (
    backend_spec,
    native_backend,
    reference_backend,
    register_op,
    resolve_backend,
    triton_backend,
)

__all__ = ["TokenLogProbs", "check_token_targets", "fused_linear_logprobs"]

# The row kernels read fp32 chunk logits. ``torch``: the same chunks with PyTorch row math.
register_op(
    "fused_linear_logprobs",
    [
        reference_backend(),
        native_backend("cpu", "fused_linear_logprobs_cpu"),
        native_backend("cuda", "fused_linear_logprobs_cuda"),
        triton_backend("fused_linear_logprobs"),
    ],
    auto={"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")},
)

# The torch row math holds three fp32 [C, V] temporaries (p, p log p, the gradient) next to the
# chunk's logits, which it works on in place.
_TORCH_ROW_TEMPORARIES = 3


class TokenLogProbs(NamedTuple):
    """Per-token outputs of :func:`fused_linear_logprobs`, each of the tokens' leading shape."""

    logprob: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None


def check_token_targets(
    targets,
    lead: torch.Size,
    device: torch.device,
    vocab: int,
    ignore_index: int,
    what: str = "hidden",
) -> None:
    """``targets`` is an integer tensor of shape ``lead`` on ``device`` with entries in
    [0, vocab) or equal to ``ignore_index`` (range checked on CPU, where it costs no sync)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(
            f"targets must be a torch.Tensor of token ids; got {type(targets).__name__}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor; got dtype {targets.dtype}")
    if targets.shape != lead:
        raise ValueError(
            f"targets must have the leading shape {tuple(lead)} of {what}; got "
            f"{tuple(targets.shape)}"
        )
    if targets.device != device:
        raise ValueError(f"targets are on {targets.device} but {what} on {device}")
    if targets.device.type == "cpu" and targets.numel() and not torch.compiler.is_compiling():
        bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
        if bool(bad.any()):
            raise ValueError(
                f"targets must lie in [0, {vocab}) (the head's rows) or equal "
                f"ignore_index={ignore_index}; got {targets[bad][:5].tolist()}"
            )


def _check_options(temperature, ignore_index, with_entropy) -> None:
    check_kernel_float("temperature", temperature)
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    if (
        not isinstance(ignore_index, numbers.Integral)
        or isinstance(ignore_index, bool)
        or not -(2**63) <= ignore_index < 2**63
    ):
        raise ValueError(f"ignore_index must be an int64; got {ignore_index!r}")
    if not isinstance(with_entropy, bool):
        raise TypeError(f"with_entropy must be a bool; got {with_entropy!r}")


# ---- row kernels ---------------------------------------------------------------------------


def _torch_rows(
    z, targets, row_grads, logprob, lse, entropy, *, temperature, ignore_index, grad_scale
):
    """The row math in PyTorch on fp32 chunk logits ``z`` ``[C, V]`` (overwritten: the gradient,
    or scratch)."""
    # In place, and at T = 1 no pass over the chunk for a division by 1.
    a = z if temperature == 1.0 else z.div_(temperature)
    row_lse = torch.logsumexp(a, -1)
    ignored = targets == ignore_index
    index = torch.where(ignored, 0, targets)[:, None]
    logprob.copy_(torch.where(ignored, 0.0, a.gather(1, index)[:, 0] - row_lse))
    lse.copy_(torch.where(ignored, 0.0, row_lse))
    log_p = a.sub_(row_lse[:, None])
    p = log_p.exp()
    if entropy is not None:
        plogp = p * torch.where(p == 0, 0.0, log_p)
        row_entropy = -plogp.sum(-1)
        entropy.copy_(torch.where(ignored, 0.0, row_entropy))
    if row_grads is None:
        return
    live = (~ignored).to(torch.float32)[:, None]
    g_logprob, g_lse, g_entropy = (row_grads * live).unbind(1)
    grad = p * (g_lse - g_logprob)[:, None]
    if entropy is not None:  # dH/da_j = -p_j (log p_j + H), 0 where p_j = 0
        grad.sub_(plogp.add_(p.mul_(row_entropy[:, None])).mul_(g_entropy[:, None]))
    grad.scatter_add_(1, index, g_logprob[:, None])
    z.copy_(grad.mul_(grad_scale / temperature))


def _launch_rows(
    backend, z, targets, row_grads, logprob, lse, entropy, *, temperature, ignore_index, grad_scale
):
    """One row kernel over the chunk's fp32 logits ``z`` ``[C, V]`` (contiguous rows)."""
    if backend_spec("fused_linear_logprobs", backend).is_reference:
        _torch_rows(
            z,
            targets,
            row_grads,
            logprob,
            lse,
            entropy,
            temperature=temperature,
            ignore_index=ignore_index,
            grad_scale=grad_scale,
        )
        return
    if backend == "triton":
        from ..triton.fused_linear_logprobs import logprob_rows

        logprob_rows(
            z,
            targets,
            row_grads,
            logprob,
            lse,
            entropy,
            temperature=temperature,
            ignore_index=ignore_index,
            grad_scale=grad_scale,
        )
        return
    fields = dict(
        logits=z,
        row_stride=z.stride(0),
        n_rows=z.shape[0],
        vocab=z.shape[1],
        targets=targets,
        row_grads=row_grads,
        logprob=logprob,
        lse=lse,
        entropy=entropy,
        temperature=temperature,
        ignore_index=ignore_index,
        grad_scale=grad_scale,
    )
    launch_native("fused_linear_logprobs", backend, z.device, args="LogprobRowsArgs", **fields)


# ---- the custom op -------------------------------------------------------------------------


@torch.library.custom_op("fastkd::fused_linear_logprobs_fused", mutates_args=())
def fused_linear_logprobs_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    row_grads: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    logit_scale: float,
    chunk_size: int,
    accum_fp32: bool,
    with_entropy: bool,
    backend: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob [N], lse [N], entropy [N] or empty, grad_hidden, grad_weight, grad_bias).

    ``hidden`` ``[N, H]``, ``targets`` ``[N]`` int64; ``row_grads`` ``[N, 3]`` fp32, the
    incoming gradients of the three outputs, or None (outputs only; no gradients)."""
    n_rows = hidden.shape[0]
    lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    entropy = (
        torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        if with_entropy
        else lse.new_empty(0)
    )

    def rows(z, begin, end, logprob, need_grad):
        _launch_rows(
            backend,
            z,
            targets[begin:end],
            row_grads[begin:end] if need_grad else None,
            logprob,
            lse[begin:end],
            entropy[begin:end] if with_entropy else None,
            temperature=temperature,
            ignore_index=ignore_index,
            grad_scale=logit_scale,
        )

    with torch.autocast(hidden.device.type, enabled=False):
        logprob, *grads = run_chunks(
            hidden,
            weight,
            bias,
            rows,
            None,
            logit_scale,
            chunk_size,
            accum_fp32,
            need_hidden,
            need_weight,
            need_bias,
        )
    return logprob, lse, entropy, *grads


def _fake_logprobs(a):
    n_rows = a.hidden.shape[0]
    row = a.hidden.new_empty(n_rows, dtype=torch.float32)
    return (
        row,
        torch.empty_like(row),
        torch.empty_like(row) if a.with_entropy else row.new_empty(0),
        torch.empty_like(a.hidden) if a.need_hidden else a.hidden.new_empty(0),
        torch.empty_like(a.weight) if a.need_weight else a.weight.new_empty(0),
        torch.empty_like(a.bias) if a.need_bias else a.weight.new_empty(0),
    )


register_named_fake(fused_linear_logprobs_fused, _fake_logprobs)
register_recompute_autograd(fused_linear_logprobs_fused, n_row_outputs=3)


# ---- public entry point --------------------------------------------------------------------


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    accum_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> TokenLogProbs:
    """Log-probabilities of ``targets`` under the lm_head's tempered softmax, without forming
    the ``[N, V]`` logits.

    With a = logit_scale * (hidden @ weight.T + bias) / temperature per token: ``logprob`` =
    a_t - logsumexp(a), ``lse`` = logsumexp(a) (of the tempered logits) and, when
    ``with_entropy``, ``entropy`` = -sum_j p_j log p_j (nats) with p = softmax(a). Gradients
    of all three reach ``hidden``, ``weight`` and ``bias``. A token whose target equals
    ``ignore_index`` gets 0 for all three outputs and no gradient.

    Args:
        hidden: ``[..., H]`` float32/bfloat16/float16 (float64: ``torch`` backend).
        weight: ``[V, H]`` lm_head weight; ``bias``: ``[V]`` or None.
        targets: ``[...]`` integer token ids in [0, V), or ``ignore_index``.
        temperature: T > 0. logit_scale: multiplier of the head's output (before T).
        chunk_size, memory_budget, accum_dtype: as in :func:`fastkd.fused_linear_kd_loss`.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"`` (the same
            chunks with PyTorch row math; float64 inputs there run the whole-logits
            reference).

    Returns:
        ``TokenLogProbs(logprob, lse, entropy)``, float32 tensors of the leading shape
        (float64 for float64 inputs); ``entropy`` is None unless ``with_entropy``. The
        backward runs the chunks again (two logits GEMMs per chunk and the gradient GEMMs).
    """
    check_head("", hidden, weight, bias)
    lead, device = hidden.shape[:-1], hidden.device
    _check_options(temperature, ignore_index, with_entropy)
    check_token_targets(targets, lead, device, weight.shape[0], ignore_index)
    check_chunking(chunk_size, memory_budget, accum_dtype)
    check_scale("logit_scale", logit_scale)
    hidden, weight, bias = autocast_operands([hidden, weight, bias], device.type)
    dtypes = tuple(t.dtype for t in (hidden, weight, bias) if t is not None)
    name = resolve_backend("fused_linear_logprobs", backend, device, dtypes=dtypes)
    spec = backend_spec("fused_linear_logprobs", name)
    if torch.float64 in dtypes:
        if not spec.float64:
            raise ValueError(
                f"backend {name!r} takes float32/bfloat16/float16 operands; got "
                f"{list(dtypes)}; use backend='torch'"
            )
        logprob, lse, entropy = fused_linear_logprobs_reference(
            hidden,
            weight,
            targets,
            bias,
            logit_scale=logit_scale,
            temperature=temperature,
            ignore_index=ignore_index,
            with_entropy=with_entropy,
        )
        return TokenLogProbs(logprob, lse, entropy)

    n_rows = lead.numel()
    flat_hidden = hidden.reshape(n_rows, hidden.shape[-1])
    flat_targets = targets.reshape(n_rows).to(torch.int64).contiguous()
    if chunk_size is None:
        budget = memory_budget if memory_budget is not None else default_memory_budget(device)
        if spec.is_reference:
            budget = max(1, budget // _TORCH_ROW_TEMPORARIES)
        low_precision_grad = device.type == "cuda" and weight.dtype != torch.float32
        chunk_size = resolve_chunk_size(n_rows, weight.shape[0], None, low_precision_grad, budget)
    logprob, lse, entropy, *_ = fused_linear_logprobs_fused(
        flat_hidden,
        weight,
        bias,
        flat_targets,
        None,
        float(temperature),
        int(ignore_index),
        float(logit_scale),
        int(chunk_size),
        accum_dtype == torch.float32,
        with_entropy,
        name,
        False,
        False,
        False,
    )
    return TokenLogProbs(
        logprob.reshape(lead), lse.reshape(lead), entropy.reshape(lead) if with_entropy else None
    )
