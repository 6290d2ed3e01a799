"""Causal language models seen as final hidden states plus an output head.

The fused losses take a model's final hidden states ``[B, T, H]`` and its lm_head (weight
``[V, H]``, bias ``[V]``, a logit scale and a final-logit softcap) instead of ``[B, T, V]``
logits. :func:`adapt` splits a Hugging Face causal LM into those parts, reading the head's extra
transformations from its config, and checks the split on a probe; :meth:`CausalLM.from_parts`
does the same for any other model. ``transformers`` is imported only by the functions that load
or save Hugging Face checkpoints.

This module gathers their public names: :class:`Head` and :class:`CausalLM` are defined in
``causal_lm``; :func:`adapt`, :func:`load_causal_lm` and :func:`save_causal_lm` in
``hf_models``.
"""

from __future__ import annotations

from .causal_lm import CausalLM, Head
from .hf_models import adapt, load_causal_lm, save_causal_lm

__all__ = ["CausalLM", "Head", "adapt", "load_causal_lm", "save_causal_lm"]
