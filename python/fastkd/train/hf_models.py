"""Hugging Face causal LMs as :class:`CausalLM`: :func:`adapt` splits one into its body and
head, reading the head's extra transformations from its config, and checks the split on a probe;
:func:`load_causal_lm` and :func:`save_causal_lm` read and write local checkpoints.
``transformers`` is imported only by the functions that load or save them.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import nn

from .causal_lm import CausalLM, Head, _check_factor, _module_name

__all__ = ["adapt", "load_causal_lm", "save_causal_lm"]

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
