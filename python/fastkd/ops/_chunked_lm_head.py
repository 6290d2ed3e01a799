"""The chunked lm_head engine shared by the fused lm_head ops (fused_linear_kd_loss,
fused_linear_sparse_kd_loss, fused_linear_logprobs, fused_linear_topk).

Tokens are processed in chunks of C rows. Per chunk:

    z = s * (x W^T + b)                     [C, V] fp32, straight from the matmul
    a row kernel reads z and, where gradients are wanted, writes g = grad_scale * dL/dz over it
    grad_x[rows] = s * g W                   [C, H]
    grad_W      += s * g^T x                 [V, H]     grad_b += s * sum_rows g

This module holds what does not depend on the row kernel: chunk sizing from a memory budget, the
GEMM helpers (fp32 logits from any head dtype), the chunk loop, its ops' fake outputs, and
autocast. The autograd of an op built on it is in ``_chunked_autograd`` and the checks of a head
and of the chunking options in ``_lm_head_checks``; their names are importable from here too.
"""

from __future__ import annotations

import functools

import torch

from ._chunked_autograd import register_chunked_autograd, register_recompute_autograd
from ._lm_head_checks import check_chunking, check_head, check_scale, check_tensor

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


def autocast_operands(tensors, device_type: str):
    """Casts floating tensors to the autocast dtype where autocast is on, as ``F.linear`` would
    run under it (the casts are recorded by autograd)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if t is not None and t.dtype != dtype else t for t in tensors]
