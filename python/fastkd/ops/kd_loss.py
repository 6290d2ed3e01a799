"""kd_loss: input checks, the fused custom op with its fake kernel and autograd, backend dispatch.

The fused backends (``cpu``, ``triton``, ``cuda``) run one kernel that writes the per-token loss
and ``grad_scale * dLoss_token/dstudent_logits`` in the forward, ``grad_scale`` being the
reduction's weight where it is known without a device sync (1/#tokens for a mean on CPU). The
backward only rescales that stored gradient by ``incoming / grad_scale``, in place, and skips the
rows where that ratio is 1 (on CPU). The ``torch`` backend is the plain-PyTorch reference.
"""

from __future__ import annotations

import numbers

import torch

from ..reference.kd_loss import kd_loss_reference, reduce_rows
from ._checks import check_kd_options, check_labels, check_logits
from ._kd_config import KdConfig, make_kd_config
from ._layout import row_layout
from ._launch import launch
from ._native import DTYPE_CODES, native
from ._vocab_mismatch import match_student_logits
from ._registry import (AUTO, accepts, backend_spec, native_backend, reference_backend,
                        register_op, resolve_backend, triton_backend)

__all__ = ["kd_loss"]

# Preference of backend="auto", best first. Set from the benchmark harness (`fastkd bench`): on
# CPU the C++ kernel beats torch eager and torch.compile; on CUDA see benchmarks/results/ for
# the CUDA-vs-Triton comparison. Every kernel reads a row's logits before it writes that row's
# gradient, so the gradient may overwrite the student's logits.
KD_LOSS = register_op("kd_loss", [
    reference_backend(),
    native_backend("cpu", "kd_loss_forward_cpu", skips_unneeded_grad=True,
                   grad_may_alias_input=True),
    native_backend("cuda", "kd_loss_forward_cuda", grad_may_alias_input=True),
    triton_backend("kd_loss", grad_may_alias_input=True),
], auto={"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")})


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, labels, *, divergence,
                  temperature, beta, alpha, ignore_index, hard_weight, softcap, reduction,
                  num_items_in_batch, vocab_mismatch) -> None:
    check_logits("student_logits", student)
    check_logits("teacher_logits", teacher)
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student_logits and teacher_logits must have the same leading shape; got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.device != teacher.device:
        raise ValueError(f"student_logits is on {student.device} but teacher_logits on {teacher.device}")
    check_kd_options(divergence=divergence, temperature=temperature, beta=beta, alpha=alpha,
                     ignore_index=ignore_index, hard_weight=hard_weight, softcap=softcap,
                     reduction=reduction, num_items_in_batch=num_items_in_batch,
                     has_labels=labels is not None, vocab_mismatch=vocab_mismatch)
    check_labels(labels, student.shape[:-1], student.device,
                 min(student.shape[-1], teacher.shape[-1]), ignore_index)


# ---- the fused op ---------------------------------------------------------------------------

def grad_buffer(student: torch.Tensor, need_grad: bool, backend: str,
                op: str = "kd_loss") -> torch.Tensor:
    """The gradient output: like the student, or empty where no gradient is wanted and
    ``op``'s ``backend`` kernel can skip it."""
    if need_grad or not backend_spec(op, backend).skips_unneeded_grad:
        return torch.empty_like(student, memory_format=torch.contiguous_format)
    return student.new_empty((0,))


def launch_kd_rows(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                   cfg: KdConfig, backend: str, need_grad: bool, *,
                   loss: torch.Tensor | None = None, grad: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs one fused kernel; returns (per-row loss fp32 [lead], grad like student).

    ``loss`` (contiguous fp32, the leading shape) and ``grad`` (contiguous, the student's shape)
    may be given to write into; ``grad`` may be ``student`` itself when that is contiguous:
    every kernel reads a row's logits before it writes that row's gradient.
    """
    lead = student.shape[:-1]
    vs, vt = student.shape[-1], teacher.shape[-1]
    vocab = min(vs, vt)
    if loss is None:
        loss = torch.empty(lead, dtype=torch.float32, device=student.device)
    if grad is None:
        grad = grad_buffer(student, need_grad, backend)
    n_rows = loss.numel()
    if n_rows == 0:
        return loss, grad
    s, inner_rows, s_layout = row_layout(student)
    t, inner_rows, t_layout = row_layout(teacher, inner_rows)
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    if backend == "triton":
        from ..triton.kd_loss import kd_loss_forward
        kd_loss_forward(s, t, flat_labels, grad, loss, n_rows=n_rows, inner_rows=inner_rows,
                        student_layout=s_layout, teacher_layout=t_layout, vocab=vocab,
                        grad_vocab=vs, cfg=cfg)
        return loss, grad
    w_p, w_q = cfg.mixture_weights
    fields = dict(
        student=s, student_dtype=DTYPE_CODES[s.dtype], s_outer=s_layout.outer_stride,
        s_inner=s_layout.inner_stride, teacher=t, teacher_dtype=DTYPE_CODES[t.dtype],
        t_outer=t_layout.outer_stride, t_inner=t_layout.inner_stride, inner_rows=inner_rows,
        n_rows=n_rows, vocab=vocab, grad_vocab=vs, labels=flat_labels, grad=grad, loss=loss,
        divergence=cfg.divergence, temperature=cfg.temperature, softcap=cfg.softcap,
        soft_weight=cfg.soft_weight, hard_weight=cfg.hard_weight, grad_scale=cfg.grad_scale,
        ignore_index=cfg.ignore_index, log_wp=cfg.log_wp, log_wq=cfg.log_wq, w_p=w_p, w_q=w_q)
    if backend == "cpu":
        launch("kd_loss_forward_cpu", args="KdLossArgs", **fields,
               run=dict(num_threads=torch.get_num_threads()))
    else:
        with torch.cuda.device(student.device):
            stream = torch.cuda.current_stream(student.device).cuda_stream
            launch("kd_loss_forward_cuda", args="KdLossArgs", **fields, run=dict(stream=stream))
    return loss, grad


@torch.library.custom_op("fastkd::kd_loss_fused", mutates_args=())
def kd_loss_fused(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                  divergence: int, temperature: float, softcap: float, soft_weight: float,
                  hard_weight: float, ignore_index: int, log_wp: float, log_wq: float,
                  coef: float, grad_scale: float, backend: str, need_grad: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss (fp32, leading shape) and grad_scale * dLoss_token/dstudent (student's
    shape and dtype; empty on CPU when not ``need_grad``). The second output is returned so that
    autograd can save it: the backward rescales it in place and returns it as the gradient."""
    cfg = KdConfig(divergence, temperature, softcap, soft_weight, hard_weight, ignore_index,
                   log_wp, log_wq, coef, grad_scale)
    return launch_kd_rows(student, teacher, labels, cfg, backend, need_grad)


@kd_loss_fused.register_fake
def _(student, teacher, labels, divergence, temperature, softcap, soft_weight, hard_weight,
      ignore_index, log_wp, log_wq, coef, grad_scale, backend, need_grad):
    loss = student.new_empty(student.shape[:-1], dtype=torch.float32)
    return loss, grad_buffer(student, need_grad, backend)


def rescale_grad_rows(grad: torch.Tensor, grad_loss: torch.Tensor,
                      grad_scale: float) -> torch.Tensor:
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
        launch("scale_rows_cpu", data=grad, dtype=DTYPE_CODES[grad.dtype],
               n_rows=factors.numel(), row_len=grad.shape[-1], factors=factors,
               unit=grad_scale, run=dict(num_threads=torch.get_num_threads()))
        torch.autograd.graph.increment_version(grad)
    else:
        grad.mul_((grad_loss / grad_scale).unsqueeze(-1))
    return grad


def register_stored_grad_autograd(op, *, n_args: int, grad_scale_arg: int) -> None:
    """Autograd of a fused loss op whose outputs are (per-row loss, ``grad_scale`` times
    dLoss_row/d(first argument)), ``grad_scale`` being its argument number ``grad_scale_arg``:
    the backward rescales the stored gradient by the incoming one (``rescale_grad_rows``) and
    returns it for the first argument, None for the other ``n_args - 1``."""
    no_grads = (None,) * (n_args - 1)

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


register_stored_grad_autograd(kd_loss_fused, n_args=15, grad_scale_arg=12)


# ---- public entry point ---------------------------------------------------------------------

def pick_backend(op: str, backend: str, student: torch.Tensor, teacher: torch.Tensor) -> str:
    """The backend of a loss between ``student`` and ``teacher`` logits. The fused backends take
    float32/bfloat16/float16 logits and give the teacher no gradient: ``auto`` picks ``torch``
    otherwise, and a fused backend asked for by name raises."""
    inputs = dict(dtypes=(student.dtype, teacher.dtype),
                  teacher_grad=teacher.requires_grad and torch.is_grad_enabled())
    name = resolve_backend(op, backend, student.device, **inputs)
    # auto only chooses a backend that accepts the inputs.
    if backend != AUTO and not accepts(op, name, **inputs):
        raise ValueError(
            f"backend {name!r} takes float32/bfloat16/float16 logits and no gradient for the "
            f"teacher; got student {student.dtype}, teacher {teacher.dtype} "
            f"(teacher requires_grad={teacher.requires_grad}); detach the teacher or use "
            f"backend='torch'")
    return name


def mean_grad_scale(n_rows: int, device: torch.device, labels, ignore_index: int,
                    reduction: str, num_items_in_batch) -> float:
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


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
            divergence: str = "fkl", temperature: float = 1.0, beta: float = 0.5,
            alpha: float = 0.1, labels: torch.Tensor | None = None, ignore_index: int = -100,
            hard_weight: float = 0.0, t2_scale: bool = False, softcap: float | None = None,
            reduction: str = "mean", num_items_in_batch: int | torch.Tensor | None = None,
            vocab_mismatch: str = "cut", backend: str = "auto") -> torch.Tensor:
    """Distillation loss between student and teacher logits, fused with the softmax.

    Args:
        student_logits: ``[..., V_s]`` float32/bfloat16/float16 (float64: ``torch`` backend).
        teacher_logits: ``[..., V_t]``, same leading shape; no gradient flows to it through the
            fused backends. Where V_s != V_t, see ``vocab_mismatch``. ``-inf`` logits mark tokens outside the support
            (0 log 0 = 0). A counted token where either model has no softmax over the prefix
            (all ``-inf``, or a NaN / ``+inf`` logit, after ``softcap`` where set: it maps
            +-inf to +-c) gets loss NaN and gradient NaN, as plain PyTorch gives; an ignored
            one stays 0.
        divergence: a name in ``fastkd.DIVERGENCES``, which describes each (its formula, the
            parameters it reads and the edge cases where it equals another), e.g. ``"fkl"``
            KL(p||q) (the default; Liger-Kernel's fused JSD losses default to JSD instead),
            ``"rkl"`` KL(q||p), ``"jsd"`` (``beta``: beta KL(p||m) + (1-beta) KL(q||m),
            m = beta p + (1-beta) q; beta=0 is exactly fkl, beta=1 rkl), ``"skl"`` and
            ``"srkl"`` (``alpha``); p = softmax(teacher/T), q = softmax(student/T).
        temperature: T applied to both models (after ``softcap``), in [2^-126, 2^126]: the
            kernels take T and 1/T as float32 (every positive float option has this range).
        t2_scale: multiply the soft loss by T^2 (keeps gradient magnitudes comparable across T).
        softcap: c in [2^-126, 2^126] maps logits z -> c tanh(z / c) for both models
            (Gemma-style heads).
        labels: integer tensor of the leading shape, of a dtype that can hold ``ignore_index``
            (int64 or int32 for the default -100; uint8 labels are refused there); tokens
            equal to ``ignore_index`` contribute nothing to loss or gradient.
        ignore_index: an int64 value.
        hard_weight: h in [0, 1]; loss = (1-h) soft + h CE(student logits at T=1, labels).
        reduction: ``"mean"`` over valid tokens (or divided by ``num_items_in_batch`` when
            given, for gradient accumulation; 0 when no token is valid), ``"sum"``, or
            ``"none"`` (per-token loss in the leading shape, 0 at ignored tokens).
        num_items_in_batch: a number in [2^-126, 2^126] or a one-element tensor; a CPU tensor
            is checked likewise, a device tensor is not read on the host (no sync): there a
            count <= 0 gives a NaN loss.
        vocab_mismatch: ``"cut"`` (default): both are cut to the common prefix
            ``min(V_s, V_t)``; student columns beyond it get zero gradient. ``"pad"``
            (Liger-Kernel's convention): a smaller student's logits are padded with zeros up to
            V_t, so the teacher's extra ids have student logit 0 (the hard-label term then runs
            over the padded logits too); V_s > V_t raises. Labels always lie in
            [0, min(V_s, V_t)).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or the leading shape for
        ``reduction="none"``. Units: nats per token (times T^2 with ``t2_scale``).
    """
    _check_inputs(student_logits, teacher_logits, labels, divergence=divergence,
                  temperature=temperature, beta=beta, alpha=alpha, ignore_index=ignore_index,
                  hard_weight=hard_weight, softcap=softcap, reduction=reduction,
                  num_items_in_batch=num_items_in_batch, vocab_mismatch=vocab_mismatch)
    student_logits = match_student_logits(student_logits, teacher_logits.shape[-1], vocab_mismatch)
    device = student_logits.device
    name = pick_backend("kd_loss", backend, student_logits, teacher_logits)
    kwargs = dict(divergence=divergence, temperature=temperature, beta=beta, alpha=alpha,
                  labels=labels, ignore_index=ignore_index, hard_weight=hard_weight,
                  t2_scale=t2_scale, softcap=softcap, reduction=reduction,
                  num_items_in_batch=num_items_in_batch)
    if name == "torch":
        return kd_loss_reference(student_logits, teacher_logits, **kwargs)
    n_rows = student_logits.numel() // student_logits.shape[-1]
    cfg = make_kd_config(divergence, temperature=temperature, beta=beta, alpha=alpha,
                         softcap=softcap, hard_weight=hard_weight, t2_scale=t2_scale,
                         ignore_index=ignore_index,
                         grad_scale=mean_grad_scale(n_rows, device, labels, ignore_index,
                                                    reduction, num_items_in_batch))
    rows, _ = kd_loss_fused(student_logits, teacher_logits.detach(), labels, cfg.divergence,
                            cfg.temperature, cfg.softcap, cfg.soft_weight, cfg.hard_weight,
                            cfg.ignore_index, cfg.log_wp, cfg.log_wq, cfg.coef, cfg.grad_scale,
                            name, torch.is_grad_enabled() and student_logits.requires_grad)
    valid = None if labels is None else labels != ignore_index
    return reduce_rows(rows, valid, reduction, num_items_in_batch)
