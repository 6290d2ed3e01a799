"""The targets of each of sample_teacher's methods: method="random" on its native (``cpu``,
``cuda``) or Triton kernel, method="priority" on its native kernel or the plain-PyTorch sampler,
method="topk" in plain PyTorch; and the ValueError naming the rows that no sampler can sample
(NaN or +inf logits). The ops' registration, the backend choice of method="random" and its
plain-PyTorch path are in ``sample_teacher``."""

from __future__ import annotations

import math

import torch

from ..reference.sample_teacher import priority_sample_reference
from ._layout import row_layout
from ._launch import launch_native
from ._native import DTYPE_CODES
from ._registry import accepts, backend_spec, resolve_backend


def _empty_targets(logits: torch.Tensor, slots: int, return_logprobs: bool):
    """Uninitialized ``(ids, weights, logprobs or None)`` ``[..., slots]`` and ``invalid``
    ``[rows]`` (uint8, zeros) on the logits' device, for a kernel to fill."""
    shape = (*logits.shape[:-1], slots)
    device = logits.device
    ids = torch.empty(shape, dtype=torch.int32, device=device)
    weights = torch.empty(shape, dtype=torch.float32, device=device)
    logprobs = torch.empty(shape, dtype=torch.float32, device=device) if return_logprobs else None
    invalid = torch.zeros(logits.shape[:-1].numel(), dtype=torch.uint8, device=device)
    return ids, weights, logprobs, invalid


def _raise_on_invalid_rows(
    invalid: torch.Tensor, logits: torch.Tensor | None = None, temperature: float = 1.0
) -> None:
    """ValueError naming the first flat rows flagged in ``invalid``: NaN or +inf logits, or
    (``logits`` given) finite ones that overflow float32 once divided by ``temperature``."""
    if not bool(invalid.any()):
        return
    rows = invalid.nonzero()[:5, 0].tolist()
    if logits is not None:
        flagged = logits.reshape(-1, logits.shape[-1])[rows].double()
        if not (flagged.isnan() | (flagged == math.inf)).any():
            top = float(flagged.abs().nan_to_num(0.0, 0.0, 0.0).max())
            raise ValueError(
                f"teacher_logits / temperature overflows float32 in flat rows {rows} "
                f"(max |z| = {top:.6g}, temperature = {temperature!r}, float32 max 3.4e38); "
                f"use a larger temperature"
            )
    raise ValueError(
        f"teacher_logits has NaN or +inf entries (flat rows {rows}); -inf "
        f"marks tokens outside the support, NaN and +inf cannot be sampled"
    )


def _nan_or_posinf_rows(logits: torch.Tensor) -> torch.Tensor:
    """``[rows]`` bool: the rows of ``logits`` holding a NaN or +inf (their LSE is NaN or +inf),
    which no sampler can sample."""
    lse = torch.logsumexp(logits.reshape(-1, logits.shape[-1]).float(), -1)
    return torch.isnan(lse) | (lse == math.inf)


def _kernel_fields(
    logits: torch.Tensor, ids, weights, logprobs, invalid, *, seed: int, token_offset: int
) -> dict:
    """Fields shared by the native samplers for ``launch``: the rows of ``logits`` (addressed
    by their layout; a contiguous copy where the layout needs one, held by ``launch`` with the
    other tensors until the kernel returns), the outputs, seed and token offset."""
    z, inner_rows, layout = row_layout(logits)
    return dict(
        logits=z,
        dtype=DTYPE_CODES[z.dtype],
        outer_stride=layout.outer_stride,
        inner_stride=layout.inner_stride,
        inner_rows=inner_rows,
        n_rows=invalid.numel(),
        vocab=logits.shape[-1],
        seed=seed,
        token_offset=token_offset,
        ids=ids,
        weights=weights,
        logprobs=logprobs,
        invalid=invalid,
    )


def _sample_fused(
    logits: torch.Tensor,
    backend: str,
    num_samples: int,
    temperature: float,
    seed: int,
    token_offset: int,
    return_logprobs: bool,
):
    """The ``cpu`` or ``cuda`` (native) or ``triton`` sampler: outputs on the logits' device."""
    ids, weights, logprobs, invalid = _empty_targets(logits, num_samples, return_logprobs)
    n_rows = invalid.numel()
    if n_rows and backend == "triton":
        from ..triton.sample_teacher import sample_teacher_forward

        z, inner_rows, layout = row_layout(logits)
        sample_teacher_forward(
            z,
            ids,
            weights,
            logprobs,
            invalid,
            n_rows=n_rows,
            inner_rows=inner_rows,
            layout=layout,
            vocab=logits.shape[-1],
            temperature=temperature,
            num_samples=num_samples,
            seed=seed,
            token_offset=token_offset,
        )
    elif n_rows:
        fields = _kernel_fields(
            logits, ids, weights, logprobs, invalid, seed=seed, token_offset=token_offset
        )
        launch_native(
            "sample_teacher",
            backend,
            logits.device,
            **fields,
            temperature=temperature,
            num_samples=num_samples,
        )
    _raise_on_invalid_rows(invalid, logits, temperature)
    return ids, weights, logprobs


def _priority_sample(
    logits: torch.Tensor, backend: str, k: int, seed: int, token_offset: int, return_logprobs: bool
):
    """``(ids, weights, logprobs)`` of method="priority" from the native kernel (``cpu``) or the
    plain-PyTorch sampler (``torch``, any device)."""
    name = resolve_backend("priority_sample", backend, logits.device, dtypes=(logits.dtype,))
    if backend_spec("priority_sample", name).is_reference:
        ids, weights, logprobs, bad = priority_sample_reference(
            logits, k=k, seed=seed, token_offset=token_offset, return_logprobs=return_logprobs
        )
        invalid = bad.reshape(-1)
    else:
        if not accepts("priority_sample", name, dtypes=(logits.dtype,)):
            raise ValueError(
                f"backend {name!r} takes float32/bfloat16/float16 logits; got "
                f"{logits.dtype}; use backend='torch'"
            )
        ids, weights, logprobs, invalid = _empty_targets(logits, k, return_logprobs)
        if invalid.numel():
            launch_native(
                "priority_sample",
                name,
                logits.device,
                **_kernel_fields(
                    logits, ids, weights, logprobs, invalid, seed=seed, token_offset=token_offset
                ),
                k=k,
            )
    _raise_on_invalid_rows(invalid)
    return ids, weights, logprobs


def _topk_targets(
    logits: torch.Tensor, k: int, tail: str, labels, ignore_index: int, return_logprobs: bool
):
    """(ids, weights, logprobs, tail_mass) of the k most probable ids, tail as documented in
    ``fastkd.sparse.targets``; ids in decreasing probability, -1 where fewer than k have mass."""
    z = logits.float()
    lse = torch.logsumexp(z, -1, keepdim=True)
    # The samplers' rule: NaN and +inf logits cannot be sampled (LSE is NaN or +inf there); a
    # row of -inf only has no mass and keeps no id.
    _raise_on_invalid_rows((torch.isnan(lse) | (lse == math.inf)).reshape(-1))
    row_has_mass = lse[..., 0] > -math.inf
    values, ids = torch.topk(z, k, dim=-1)
    log_p = values - lse
    has_mass = values > -math.inf
    p = torch.where(has_mass, log_p.exp(), 0.0)
    # The mass outside the top k, 1 - sum(p), without cancellation: -expm1(LSE(log p)).
    rest = torch.where(row_has_mass, (-torch.expm1(torch.logsumexp(log_p, -1))).clamp_min(0.0), 0.0)
    tail_mass = None
    if tail == "renorm":
        weights = torch.where(has_mass, torch.softmax(values, -1), 0.0)
    elif tail == "bucket":
        weights, tail_mass = p, rest
    else:
        label = labels.to(torch.int64)
        live = (label != ignore_index) & row_has_mass
        hit = (ids == label[..., None]) & live[..., None]
        weights = p + hit * rest[..., None]
        extra = live & ~hit.any(-1)
        ids = torch.cat([ids, torch.where(extra, label, -1)[..., None]], -1)
        weights = torch.cat([weights, torch.where(extra, rest, 0.0)[..., None]], -1)
        log_p = torch.cat([log_p, torch.zeros_like(rest)[..., None]], -1)
        extra_lp = torch.where(
            extra, (z.gather(-1, label.clamp_min(0)[..., None])[..., 0] - lse[..., 0]), 0.0
        )
        log_p[..., -1] = extra_lp
        has_mass = torch.cat([has_mass, extra[..., None]], -1)
    ids = torch.where(has_mass, ids, -1).to(torch.int32)
    logprobs = torch.where(has_mass, log_p, 0.0) if return_logprobs else None
    return ids, weights.float(), logprobs, tail_mass
