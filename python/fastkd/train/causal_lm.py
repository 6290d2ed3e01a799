"""Causal language models seen as final hidden states plus an output head: :class:`Head`, the
output layer as tensors and numbers, and :class:`CausalLM`, a model wrapped to return the head's
input.

The fused losses take a model's final hidden states ``[B, T, H]`` and its lm_head (weight
``[V, H]``, bias ``[V]``, a logit scale and a final-logit softcap) instead of ``[B, T, V]``
logits. :meth:`CausalLM.from_parts` wraps any model given as a body and a head; Hugging Face
models are split by ``hf_models.adapt``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CausalLM", "Head"]


def _check_factor(name: str, value, *, positive: bool) -> None:
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value == 0
        or (positive and value < 0)
    ):
        allowed = "a finite number > 0" if positive else "a finite nonzero number"
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


# eq=False: heads compare (and hash) by identity; a field-wise == would compare tensors.
@dataclass(frozen=True, eq=False)
class Head:
    """A causal LM's output layer: ``logits = softcap(logit_scale * (hidden @ weight.T + bias))``.

    Attributes:
        weight: ``[V, H]`` the head's parameter itself (the input embedding's, when tied), so
            that gradients computed from it reach the model.
        bias: ``[V]`` or None.
        logit_scale: multiplier of ``hidden @ weight.T + bias`` (Cohere's ``logit_scale``;
            ``1 / logits_scaling`` for Granite, which divides).
        softcap: final-logit softcap ``c``: ``z -> c * tanh(z / c)`` after the scale (Gemma-2/3's
            ``final_logit_softcapping``), or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self):
        if not isinstance(self.weight, torch.Tensor) or self.weight.dim() != 2:
            shape = tuple(self.weight.shape) if isinstance(self.weight, torch.Tensor) else None
            raise ValueError(
                f"Head.weight must be a tensor of shape [V, H]; got "
                f"{type(self.weight).__name__} of shape {shape}"
            )
        if self.bias is not None and (
            not isinstance(self.bias, torch.Tensor)
            or tuple(self.bias.shape) != (self.weight.shape[0],)
        ):
            shape = tuple(self.bias.shape) if isinstance(self.bias, torch.Tensor) else None
            raise ValueError(
                f"Head.bias must be None or a tensor of shape [V] = "
                f"[{self.weight.shape[0]}]; got {type(self.bias).__name__} of shape "
                f"{shape}"
            )
        _check_factor("Head.logit_scale", self.logit_scale, positive=False)
        if self.softcap is not None:
            _check_factor("Head.softcap", self.softcap, positive=True)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` hidden states -> ``[..., V]`` logits in their dtype, computed plainly (all
        ``V`` at once), for evaluation and checks; training uses the fused losses instead."""
        # The operations and their order are those of the Hugging Face heads, so that a model
        # and its Head agree to the rounding where the transformation is the same.
        z = F.linear(hidden, self.weight, self.bias)
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def for_float_logits(self) -> "Head":
        """This head with the weight that an fp32-output GEMM reads: itself where the device has
        a low-precision GEMM with fp32 output (CUDA) or the weight is fp32, else an fp32 copy
        (a bf16 head on CPU), made once for many :meth:`float_logits` calls."""
        from ..ops._chunked_lm_head import gemm_operand

        bias = None if self.bias is None else self.bias.float()
        return replace(self, weight=gemm_operand(self.weight.detach()), bias=bias)

    def float_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` -> ``[..., V]`` fp32 logits straight from the GEMM (no rounding to a
        bf16/fp16 weight's dtype), scaled and capped in fp32: the logits the fused losses see.
        Call it on :meth:`for_float_logits`'s head to avoid a weight copy per call."""
        from ..ops._chunked_lm_head import chunk_logits, gemm_operand

        w = gemm_operand(self.weight)
        x = hidden.reshape(-1, hidden.shape[-1])
        x = x.to(w.dtype) if w.dtype != torch.float32 else x.float()
        bias = None if self.bias is None else self.bias.float()
        z = chunk_logits(x, w, bias, self.logit_scale, None)
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z.reshape(*hidden.shape[:-1], z.shape[-1])


class _Projection(nn.Module):
    """A head given as a tensor: a parameter stays one (tied or trained), a plain tensor becomes
    a buffer (a frozen head that still follows ``.to()`` and the state dict)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        for name, t in (("weight", weight), ("bias", bias)):
            if isinstance(t, nn.Parameter) or t is None:
                self.register_parameter(name, t)
            else:
                self.register_buffer(name, t)


class _Parts(nn.Module):
    """The wrapped model of :meth:`CausalLM.from_parts`: its body and head as submodules."""

    def __init__(self, body: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.body = body
        self.lm_head = lm_head


def _module_name(root: nn.Module, module: nn.Module) -> str:
    """The qualified name of ``module`` inside ``root`` (``""`` for root itself)."""
    for name, m in root.named_modules():
        if m is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")


class CausalLM(nn.Module):
    """A causal LM seen as final hidden states plus a :class:`Head`.

    The wrapped model is the submodule ``model``: optimizers, DDP and FSDP see its parameters,
    and state dict keys are ``model.<its own names>``. Build one with :func:`adapt` (Hugging
    Face models), :func:`load_causal_lm`, or :meth:`from_parts` (anything else).
    ``forward`` returns hidden states only, so no ``[B, T, V]`` logits exist: give them and
    :meth:`head` to a fused loss.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        body: str,
        head: str,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        hugging_face: bool,
    ):
        """Internal: use :func:`adapt` or :meth:`from_parts`. ``body`` and ``head`` are the
        qualified names inside ``model`` of the module giving the final hidden states and of the
        module holding the head's ``weight`` (and ``bias``)."""
        super().__init__()
        self.model = model
        # Names rather than references: registering the body and head a second time would
        # duplicate their state dict entries.
        self._body = body
        self._head = head
        self._logit_scale = float(logit_scale)
        self._softcap = None if softcap is None else float(softcap)
        self._hugging_face = hugging_face
        # The wrapper takes the model's mode (only its own flag: the model's submodules keep
        # theirs, which may be mixed).
        self.training = model.training
        self.head()  # validates the head now rather than at the first loss

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, T]`` token ids (and ``[B, T]`` 1/0 attention mask) -> ``[B, T, H]`` final hidden
        states (after the final norm): the lm_head's input."""
        body = self.model.get_submodule(self._body)
        if self._hugging_face:
            # No KV cache: training reads every position once.
            return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        return body(input_ids, attention_mask)

    def head(self) -> Head:
        """The output layer as it is now: its ``weight`` and ``bias`` are the live parameters."""
        module = self.model.get_submodule(self._head)
        return Head(module.weight, getattr(module, "bias", None), self._logit_scale, self._softcap)

    def model_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, T, V]`` logits computed by the wrapped model itself (a Hugging Face model's
        ``model(...).logits``; ``head().logits(forward(...))`` for :meth:`from_parts`), to check
        the split against."""
        if self._hugging_face:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits
        return self.head().logits(self(input_ids, attention_mask))

    @property
    def vocab_size(self) -> int:
        """V, the head's number of logits per token."""
        return self.model.get_submodule(self._head).weight.shape[0]

    @property
    def hidden_size(self) -> int:
        """H, the size of the hidden states ``forward`` returns."""
        return self.model.get_submodule(self._head).weight.shape[1]

    @classmethod
    def from_parts(
        cls,
        body: nn.Module,
        head: nn.Linear | torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        logit_scale: float = 1.0,
        softcap: float | None = None,
    ) -> CausalLM:
        """A CausalLM of any model given as a body and a head.

        Args:
            body: a module called as ``body(input_ids, attention_mask)`` (``[B, T]`` each, the
                mask possibly None) returning ``[B, T, H]`` final hidden states.
            head: an ``nn.Linear(H, V)`` (its own bias is used), or a ``[V, H]`` weight tensor:
                an ``nn.Parameter`` (e.g. the body's input embedding, for a tied head) stays a
                parameter; a plain tensor becomes a buffer (a frozen head).
            bias: ``[V]`` bias for a tensor ``head``; None for an ``nn.Linear`` head.
            logit_scale, softcap: as in :class:`Head`.

        The result's submodule ``model`` holds ``model.body`` and ``model.lm_head``.
        """
        if not isinstance(body, nn.Module):
            raise TypeError(
                f"body must be an nn.Module called as body(input_ids, attention_mask);"
                f" got {type(body).__name__}"
            )
        if isinstance(head, nn.Linear):
            if bias is not None:
                raise ValueError(
                    "bias must be None when head is an nn.Linear (its own bias is "
                    "used); pass the weight tensor as head to give a separate bias"
                )
            lm_head = head
        elif isinstance(head, torch.Tensor):
            lm_head = _Projection(head, bias)
        else:
            raise TypeError(
                f"head must be an nn.Linear or a [V, H] weight tensor; got {type(head).__name__}"
            )
        return cls(
            _Parts(body, lm_head),
            body="body",
            head="lm_head",
            logit_scale=logit_scale,
            softcap=softcap,
            hugging_face=False,
        )
