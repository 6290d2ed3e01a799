"""Causal language models seen as final hidden states plus an output head.

The fused losses take a model's final hidden states ``[B, T, H]`` and its lm_head (weight
``[V, H]``, bias ``[V]``, a logit scale and a final-logit softcap) instead of ``[B, T, V]``
logits. :func:`adapt` splits a Hugging Face causal LM into those parts, reading the head's extra
transformations from its config, and checks the split on a probe; :meth:`CausalLM.from_parts`
does the same for any other model. ``transformers`` is imported only by the functions that load
or save Hugging Face checkpoints.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CausalLM", "Head", "adapt", "load_causal_lm", "save_causal_lm"]

# Tokens in the probe that adapt(verify=True) runs: enough to exercise attention over a few
# positions, short enough to cost nothing next to loading the model.
_PROBE_TOKENS = 8

# Files of which one marks a directory as holding saved weights (transformers' names, single
# or sharded).
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


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


# ---- Hugging Face models --------------------------------------------------------------------


def _head_transform(config) -> tuple[float, float | None, str]:
    """(logit_scale, softcap, where they came from) of a Hugging Face config: ``logit_scale``
    multiplies the logits (Cohere), ``logits_scaling`` divides them (Granite),
    ``final_logit_softcapping`` caps them (Gemma-2/3)."""
    # Composite (e.g. vision-language) models keep these in their text model's config.
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale, softcap, sources = 1.0, None, []
    multiplier = getattr(text, "logit_scale", None)
    if multiplier is not None:
        scale *= float(multiplier)
        sources.append(f"logit_scale={multiplier!r} (multiplies)")
    divisor = getattr(text, "logits_scaling", None)
    if divisor is not None:
        _check_factor("config.logits_scaling", divisor, positive=False)
        scale /= float(divisor)
        sources.append(f"logits_scaling={divisor!r} (divides)")
    cap = getattr(text, "final_logit_softcapping", None)
    if cap is not None:
        softcap = float(cap)
        sources.append(f"final_logit_softcapping={cap!r}")
    if not sources:
        return (
            scale,
            softcap,
            ("the config sets none of logit_scale, logits_scaling, final_logit_softcapping"),
        )
    return scale, softcap, "read from the config's " + ", ".join(sources)


def _mismatch(head: Head, hidden: torch.Tensor, got: torch.Tensor) -> str:
    """What ``got`` (the model's logits) does beyond ``head.logits(hidden)``, in words."""
    expected = head.logits(hidden).float()
    if got.shape != expected.shape:
        return (
            f"the model returns logits of shape {tuple(got.shape)} where the head gives "
            f"{tuple(expected.shape)}"
        )
    # Only names the kind of mismatch (found by _verify), so a loose tolerance suits any dtype.
    tol = 1e-3 * (1.0 + expected.abs().max().item())
    if head.softcap is not None:
        uncapped = replace(head, softcap=None).logits(hidden).float()
        if (got - uncapped).abs().max().item() <= tol:
            return (
                f"the model does not cap its logits although its config sets "
                f"final_logit_softcapping={head.softcap!r}"
            )
    diff = got - expected
    shift = diff.mean().item()
    if (diff - shift).abs().max().item() <= tol:
        return f"the model adds {shift:.6g} to every logit (an additive shift)"
    factor = ((got * expected).sum() / (expected * expected).sum().clamp_min(1e-30)).item()
    if (got - factor * expected).abs().max().item() <= tol:
        return (
            f"the model multiplies the logits by a further {factor:.6g} (a logit scale not "
            f"in its config)"
        )
    return (
        "the model transforms the logits in another way than a shift, a scale or a softcap "
        "(e.g. a custom head, or a body whose output is not the head's input)"
    )


def _verify(lm: CausalLM, model: nn.Module, described: str) -> None:
    """Raise ValueError unless ``model``'s own logits equal ``lm.head().logits(lm(...))`` on a
    probe of a few tokens, in eval mode and without gradients; restores every submodule's
    train/eval mode."""
    head = lm.head()
    # Token ids spread evenly over the vocabulary, one sequence.
    ids = torch.linspace(0, lm.vocab_size - 1, _PROBE_TOKENS, device=head.weight.device)
    ids = ids.long()[None]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        try:
            got = lm.model_logits(ids, torch.ones_like(ids)).float()
            hidden = lm(ids, torch.ones_like(ids))
        finally:
            for m, training in modes:
                m.training = training
        expected = head.logits(hidden)
        # The two sides run the same operations in the model's dtype; they may differ by the
        # rounding of one step (Granite divides where Head multiplies by the reciprocal).
        tol = 4 * torch.finfo(expected.dtype).eps * (1.0 + expected.abs().max().item())
        if got.shape == expected.shape and (got - expected.float()).abs().max().item() <= tol:
            return
        raise ValueError(
            f"adapt({type(model).__name__}): the model's logits differ from its head as "
            f"described (logits = softcap(logit_scale * (hidden @ weight.T + bias)) with "
            f"logit_scale={head.logit_scale!r}, softcap={head.softcap!r}; {described}): "
            f"{_mismatch(head, hidden, got)}. adapt does not support this head; describe the "
            f"model with CausalLM.from_parts"
        )


def adapt(model: nn.Module, *, verify: bool = True) -> CausalLM:
    """Wrap a Hugging Face causal LM (``PreTrainedModel`` with an lm_head) as a :class:`CausalLM`.

    The body is ``model.get_decoder()`` (or ``model.base_model``), whose first output is the
    final hidden states; the head is ``model.get_output_embeddings()`` (weight ``[V, H]``,
    shared with the input embedding when tied, and its bias), with the logit scale and softcap
    read from the config: ``logit_scale`` multiplies (Cohere), ``logits_scaling`` divides
    (Granite), ``final_logit_softcapping`` caps (Gemma-2/3). Llama, Qwen2/3, Mistral and GPT-2
    heads are plain.

    Args:
        model: the Hugging Face model; it becomes the result's submodule ``model`` (not copied).
        verify: run ``model`` on a probe of a few tokens (eval mode, no gradients, the modes
            restored afterwards) and check that its logits equal the head applied to the body's
            hidden states, so that a head transformation this description misses is an error
            rather than a silently wrong loss.

    Raises:
        TypeError: ``model`` is not a Hugging Face causal LM whose head can be found.
        ValueError: (verify) the model's logits are not those of the described head.
    """
    name = type(model).__name__
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"adapt({name}): adapt takes a Hugging Face causal LM (an nn.Module); "
            f"describe other models with CausalLM.from_parts"
        )
    get_output = getattr(model, "get_output_embeddings", None)
    config = getattr(model, "config", None)
    lm_head = get_output() if callable(get_output) else None
    if config is None or not isinstance(getattr(lm_head, "weight", None), torch.Tensor):
        raise TypeError(
            f"adapt({name}): not a Hugging Face causal LM with an output head (it needs .config "
            f"and get_output_embeddings() returning the lm_head); describe it with "
            f"CausalLM.from_parts(body, head, bias=..., logit_scale=..., softcap=...)"
        )
    get_decoder = getattr(model, "get_decoder", None)
    body = get_decoder() if callable(get_decoder) else getattr(model, "base_model", model)
    if body is model or not isinstance(body, nn.Module):
        raise TypeError(
            f"adapt({name}): found no decoder module separate from the head (tried "
            f"get_decoder() and base_model); describe it with CausalLM.from_parts"
        )
    scale, softcap, described = _head_transform(config)
    lm = CausalLM(
        model,
        body=_module_name(model, body),
        head=_module_name(model, lm_head),
        logit_scale=scale,
        softcap=softcap,
        hugging_face=True,
    )
    if verify:
        _verify(lm, model, described)
    return lm


def load_causal_lm(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> CausalLM:
    """A :class:`CausalLM` from a local Hugging Face model (nothing is downloaded).

    Args:
        path: a directory with ``config.json`` and weights (``model.safetensors`` or
            ``pytorch_model.bin``, possibly sharded) -> those weights; a directory with only
            ``config.json``, or a ``.json`` config file -> a model initialized randomly from
            the config (the config needs its ``model_type``).
        dtype: parameter dtype; None keeps the checkpoint's (``dtype="auto"``), or torch's
            default dtype for a random initialization.
        device: where the model is placed.
        seed: seed of a random initialization: one seed gives the same weights on every call,
            whatever the device; the caller's random state is left as it was.

    Returns:
        the adapted model (verified, see :func:`adapt`) in eval mode.

    Raises:
        FileNotFoundError: ``path`` does not exist, or is a directory without ``config.json``.
        ValueError: ``path`` is a file that is not a ``.json`` config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"load_causal_lm: path {path!r} does not exist (a local model "
            f"directory or a .json config file is needed)"
        )
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"load_causal_lm: directory {path!r} has no config.json; a "
                f"Hugging Face model directory holds config.json (and weights)"
            )
        has_weights = any(os.path.isfile(os.path.join(path, f)) for f in _WEIGHT_FILES)
    elif path.endswith(".json"):
        has_weights = False
    else:
        raise ValueError(
            f"load_causal_lm: path {path!r} is a file but not a .json config; give "
            f"a model directory or a config .json file"
        )
    if has_weights:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto" if dtype is None else dtype, local_files_only=True
        )
    else:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        # Initialized on the CPU under a forked generator: the weights depend on the seed only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to(device).eval()
    return adapt(model)


def save_causal_lm(model: CausalLM, path: str | os.PathLike) -> None:
    """Save the Hugging Face model wrapped by ``model`` to the directory ``path`` (config.json
    and safetensors weights, as ``save_pretrained`` writes them) for :func:`load_causal_lm`."""
    if not isinstance(model, CausalLM) or not model._hugging_face:
        raise TypeError(
            f"save_causal_lm saves a CausalLM made by adapt or load_causal_lm (a "
            f"Hugging Face model); got {type(model).__name__}"
            + (" from CausalLM.from_parts" if isinstance(model, CausalLM) else "")
        )
    model.model.save_pretrained(os.fspath(path))
