"""Cross-tokenizer distillation: align two tokenizations of the same text by byte offsets and
compare the models on the aligned chunks.

* ``byte_offsets``: each token's UTF-8 byte span from a fast tokenizer's offsets;
* ``align_spans``: chunk ids of both sides (native two-pointer walk on CPU, vectorized torch);
* ``TokenAligner``: tokenize and align a batch (prefixes, prompts, padding, BOS/EOS), with an
  edit-distance fallback for tokenizers without offsets;
* ``vocab_map``: the tokens both vocabularies hold (same bytes);
* losses: ``chunk_logprobs`` and ``alm_loss`` (approximate likelihood matching),
  ``merge_chunk_probs`` and ``gold_loss`` (GOLD's chain-rule merge, ULD and the hybrid), and
  ``fused_linear_gold_loss`` (GOLD from hidden states and lm_heads, no logits);
* ``xtok_ot_loss``: entropic OT between the two tokenizations' positions with the chunk
  alignment as a prior (MultiLevelOT / CoT2Align); ``sorted_topk_probs``: sorted top-k rows.
"""

from .align import Alignment, align_spans
from .aligner import AlignedBatch, TokenAligner
from .chunk_losses import alm_loss, chunk_logprobs, chunk_mask, token_logprobs
from .fused_gold import fused_linear_gold_loss
from .gold import gold_loss, merge_chunk_probs
from .offsets import TokenSpans, byte_offsets
from .ot import sorted_topk_probs, xtok_ot_loss
from .vocab_map import VocabMap, token_bytes, vocab_map

__all__ = [
    "AlignedBatch",
    "Alignment",
    "TokenAligner",
    "TokenSpans",
    "VocabMap",
    "align_spans",
    "alm_loss",
    "byte_offsets",
    "chunk_logprobs",
    "chunk_mask",
    "fused_linear_gold_loss",
    "gold_loss",
    "merge_chunk_probs",
    "sorted_topk_probs",
    "token_bytes",
    "token_logprobs",
    "vocab_map",
    "xtok_ot_loss",
]
