"""Cross-tokenizer benchmark: alignment throughput and the GOLD merged-row losses.

* ``align``: the same texts under two byte-level BPE tokenizers of 1,000 and 400 ids trained
  locally (``xtok_tokenizers``, the kind TRL's offsets take); tokens
  per second (both sides' tokens over the time) of ``align_spans`` (native and vectorized torch)
  against TRL's GOLD aligner (``ULDLoss._align_by_byte_offsets``, one call per sequence on
  Python lists, as its trainer calls it) and a plain Python two-pointer loop, on the same byte
  spans; and of the whole path from texts (both tokenizations' byte offsets, then alignment)
  against TRL's ``encode_with_byte_offsets`` and its aligner. Where TRL's groups differ from
  fastkd's chunks, the count is reported.
* ``gold``: ``gold_loss`` (ULD on merged rows, and the hybrid) at the given vocabularies against
  the plain-PyTorch formulation (``reference/xtok_losses.py``: per sequence and chunk, full
  probability rows), forward+backward w.r.t. the student logits; and ``fused_linear_gold_loss``
  on the same chunks from hidden states and lm_heads (widths ``hidden`` and ``teacher_hidden``),
  forward+backward w.r.t. the student's hidden states, then w.r.t. its hidden states and head.
  Its inputs are the hidden states and the heads, so its peak memory (above the inputs) holds no
  logits but, with the head's gradient, ``[V_s, H_s]`` float32 buffers.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import torch

from ..reference.align_spans import align_spans_two_pointer
from ..reference.xtok_losses import gold_reference
from ..xtok import VocabMap, align_spans, byte_offsets, gold_loss
from ..xtok.fused_gold import fused_linear_gold_loss
from ..ops._registry import available_backends
from .harness import Result, add_loss_impl, format_table, measure

__all__ = ["XtokAlignCase", "XtokGoldCase", "run_xtok_align_case", "run_xtok_gold_case"]

_CJK = "中文的句子，包含多字节字符。日本語も少し。"


@dataclass(frozen=True)
class XtokAlignCase:
    texts: int = 64
    chars: int = 2000  # characters per text
    device: str = "cpu"

    def title(self) -> str:
        return f"xtok alignment: {self.texts} texts x {self.chars} chars on {self.device}"


def _texts(n: int, chars: int) -> list[str]:
    from ..train.corpus import stdlib_corpus

    source = "\n".join(stdlib_corpus(max_chars=2_000_000))[300_000:]
    out = []
    for i in range(n):
        text = source[i * chars : (i + 1) * chars]
        if i % 4 == 0:  # every fourth text: multi-byte characters split as bytes
            text = text[: chars - len(_CJK)] + _CJK
        out.append(text)
    return out


def _trl_aligner():
    try:
        from trl.experimental.gold.gold_trainer import ULDLoss
        from trl.experimental.utils import encode_with_byte_offsets
    except ImportError as exc:
        return None, None, f"{type(exc).__name__}: {exc}"
    return ULDLoss._align_by_byte_offsets, encode_with_byte_offsets, None


def _groups_from_ids(ids: list[int]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(ids):
        if c >= 0:
            groups.setdefault(c, []).append(i)
    return [groups[c] for c in sorted(groups)]


def _best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_xtok_align_case(
    case: XtokAlignCase, *, warmup: int = 1, reps: int = 5, seed: int = 0
) -> tuple[list[Result], str]:
    """Tokens per second of each aligner on the same spans; returns results and a table."""
    with tempfile.TemporaryDirectory() as tmp:
        from .xtok_tokenizers import byte_level_pair

        # TRL's offsets take ByteLevel tokenizers only (it refuses SentencePiece-style ones).
        student_tok, teacher_tok = byte_level_pair(tmp)
        texts = _texts(case.texts, case.chars)
        s = byte_offsets(student_tok, texts, add_special_tokens=False)
        t = byte_offsets(teacher_tok, texts, add_special_tokens=False)
        s_lists = [
            [tuple(x) for x in s.spans[b][s.attention_mask[b]].tolist()] for b in range(len(texts))
        ]
        t_lists = [
            [tuple(x) for x in t.spans[b][t.attention_mask[b]].tolist()] for b in range(len(texts))
        ]
        tokens = sum(map(len, s_lists)) + sum(map(len, t_lists))
        trl_align, trl_encode, trl_error = _trl_aligner()
        steps = {}
        for backend in available_backends("align_spans", case.device):
            steps[f"fastkd align_spans[{backend}]"] = (
                (lambda b: lambda: align_spans(s.spans, t.spans, backend=b))(backend),
                False,
            )
        steps["python two-pointer loop"] = (
            lambda: [align_spans_two_pointer(a, b) for a, b in zip(s_lists, t_lists)],
            True,
        )
        if trl_align is not None:
            steps["TRL GOLD _align_by_byte_offsets"] = (
                lambda: [trl_align(a, b) for a, b in zip(s_lists, t_lists)],
                True,
            )

        def fastkd_end_to_end():
            a = byte_offsets(student_tok, texts, add_special_tokens=False)
            b = byte_offsets(teacher_tok, texts, add_special_tokens=False)
            return align_spans(a.spans, b.spans)

        def trl_end_to_end():
            a = trl_encode(student_tok.backend_tokenizer, texts, add_special_tokens=False)
            b = trl_encode(teacher_tok.backend_tokenizer, texts, add_special_tokens=False)
            return [trl_align(x[1], y[1]) for x, y in zip(a, b)]

        steps["fastkd texts -> chunks"] = (fastkd_end_to_end, False)
        if trl_encode is not None:
            steps["TRL texts -> groups"] = (trl_end_to_end, True)
        results = []
        for name, (fn, peer) in steps.items():
            for _ in range(warmup):
                fn()
            seconds = _best_of(fn, reps)
            res = Result(name, peer, time_ms=seconds * 1e3)
            res.extra["Mtok/s"] = f"{tokens / seconds / 1e6:.2f}"
            results.append(res)
        note = ""
        if trl_align is not None:
            ours = align_spans(s.spans, t.spans)
            differ = 0
            for b in range(len(texts)):
                n_s, n_t = len(s_lists[b]), len(t_lists[b])
                mine = (
                    _groups_from_ids(ours.student_chunk_id[b, :n_s].tolist()),
                    _groups_from_ids(ours.teacher_chunk_id[b, :n_t].tolist()),
                )
                differ += mine != tuple(trl_align(s_lists[b], t_lists[b]))
            note = (
                f"\n\nTRL's groups differ from fastkd's chunks in {differ} of {len(texts)} texts."
            )
        else:
            note = f"\n\nTRL not measured: {trl_error}"
    title = f"{case.title()} ({tokens} tokens, both sides)"
    return results, format_table(title, results, extra_cols=("Mtok/s",), time_label="ms") + note


@dataclass(frozen=True)
class XtokGoldCase:
    student_tokens: int = 32
    teacher_tokens: int = 24
    vocab: int = 151936  # student's
    teacher_vocab: int = 128256
    hybrid: bool = False
    device: str = "cpu"
    # Hidden widths of the fused rows: Qwen2.5-0.5B's (V = 151936) and a 1024-wide teacher.
    hidden: int = 896
    teacher_hidden: int = 1024

    def title(self) -> str:
        kind = "hybrid" if self.hybrid else "ULD"
        return (
            f"gold_loss ({kind}) T_s={self.student_tokens} T_t={self.teacher_tokens} "
            f"V_s={self.vocab} V_t={self.teacher_vocab} (fused: H_s={self.hidden} "
            f"H_t={self.teacher_hidden}) float32 on {self.device}"
        )


def _random_chunks(n_tokens: int, n_chunks: int, gen) -> torch.Tensor:
    cuts = torch.randperm(n_tokens - 1, generator=gen)[: n_chunks - 1].sort().values + 1
    ids = torch.zeros(n_tokens, dtype=torch.int64)
    ids[cuts] = 1
    return ids.cumsum(0)[None]


def _gold_inputs(case: XtokGoldCase, seed: int):
    """(student logits, teacher logits, both targets, both chunk ids, vocabulary map, matched
    pairs, hybrid weights) of a case: random logits, chunks cut at random positions."""
    device = torch.device(case.device)
    gen = torch.Generator().manual_seed(seed)
    n_chunks = min(case.student_tokens, case.teacher_tokens) * 3 // 4
    s_ids, t_ids = (
        _random_chunks(case.student_tokens, n_chunks, gen).to(device),
        _random_chunks(case.teacher_tokens, n_chunks, gen).to(device),
    )
    student = (
        (torch.randn(1, case.student_tokens, case.vocab, generator=gen) * 2)
        .to(device)
        .requires_grad_()
    )
    teacher = (torch.randn(1, case.teacher_tokens, case.teacher_vocab, generator=gen) * 2).to(
        device
    )
    s_tg = torch.randint(0, case.vocab, (1, case.student_tokens), generator=gen).to(device)
    t_tg = torch.randint(0, case.teacher_vocab, (1, case.teacher_tokens), generator=gen).to(device)
    vmap, matched, weights = None, None, None
    if case.hybrid:
        k = min(case.vocab, case.teacher_vocab) // 2
        vmap = VocabMap(
            torch.randperm(case.vocab, generator=gen)[:k].sort().values,
            torch.randperm(case.teacher_vocab, generator=gen)[:k],
            case.vocab,
            case.teacher_vocab,
        )
        matched = (vmap.student_ids, vmap.teacher_ids)
        weights = (k / case.teacher_vocab, 1 - k / case.teacher_vocab)
    return student, teacher, s_tg, t_tg, s_ids, t_ids, vmap, matched, weights


FUSED_HIDDEN = "fastkd fused_linear_gold_loss (grad: hidden)"
FUSED_HEAD = "fastkd fused_linear_gold_loss (grad: hidden, head)"


def _head_inputs(case: XtokGoldCase, seed: int):
    """Hidden states and lm_head weights of both models, logits of the same scale as
    ``_gold_inputs``' (2 randn): hidden ~ N(0, 1), weight ~ N(0, 4 / H)."""
    device = torch.device(case.device)
    gen = torch.Generator().manual_seed(seed + 1)

    def make(rows: int, tokens: int, width: int):
        hidden = torch.randn(1, tokens, width, generator=gen).to(device)
        weight = (torch.randn(rows, width, generator=gen) * (2 / width**0.5)).to(device)
        return hidden, weight

    s_hidden, s_weight = make(case.vocab, case.student_tokens, case.hidden)
    t_hidden, t_weight = make(case.teacher_vocab, case.teacher_tokens, case.teacher_hidden)
    return s_hidden.requires_grad_(), s_weight.requires_grad_(), t_hidden, t_weight


def _gold_losses(case: XtokGoldCase, seed: int, only: str | None = None):
    """{name: (loss function, is a peer)} on one case's inputs (``only``: that one's), and the
    tensors that get gradients. The fused rows' hidden states and heads are built only for
    them."""
    student, teacher, s_tg, t_tg, s_ids, t_ids, vmap, matched, weights = _gold_inputs(case, seed)
    ids = (s_tg, t_tg, s_ids, t_ids)
    losses = {
        "fastkd gold_loss": (
            lambda: gold_loss(student, teacher, *ids, vocab_map=vmap),
            False,
        ),
        "plain PyTorch (per chunk)": (
            lambda: gold_reference(student, teacher, *ids, matched=matched, weights=weights),
            True,
        ),
    }
    leaves = [student]
    if only is None or only in (FUSED_HIDDEN, FUSED_HEAD):
        s_hidden, s_weight, t_hidden, t_weight = _head_inputs(case, seed)
        frozen = s_weight.detach()
        losses[FUSED_HIDDEN] = (
            lambda: fused_linear_gold_loss(
                s_hidden, frozen, t_hidden, t_weight, *ids, vocab_map=vmap
            ),
            False,
        )
        losses[FUSED_HEAD] = (
            lambda: fused_linear_gold_loss(
                s_hidden, s_weight, t_hidden, t_weight, *ids, vocab_map=vmap
            ),
            False,
        )
        leaves += [s_hidden, s_weight]
    return losses, leaves


def gold_peak_child(case_fields: str, name: str, seed: int) -> None:
    """Run in a fresh interpreter by ``run_xtok_gold_case``: prints the peak resident memory (MB)
    of one forward+backward of ``name`` above its inputs, so that no implementation reuses
    pages another one already grew the heap by."""
    import json

    from .harness import _rss_kb, _rss_peak_reset

    losses, _ = _gold_losses(XtokGoldCase(**json.loads(case_fields)), seed, only=name)
    fn = losses[name][0]
    if not _rss_peak_reset():
        print("nan")
        return
    base = _rss_kb("VmRSS")
    fn().backward()
    print(max(_rss_kb("VmHWM") - base, 0) / 1024)


def _peak_in_child(case: XtokGoldCase, name: str, seed: int) -> float | None:
    import json
    import subprocess
    import sys

    code = (
        "import sys; from fastkd.bench.xtok import gold_peak_child; "
        "gold_peak_child(sys.argv[1], sys.argv[2], int(sys.argv[3]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(case.__dict__), name, str(seed)],
        capture_output=True,
        text=True,
        check=True,
    )
    value = float(out.stdout.strip().splitlines()[-1])
    return None if value != value else value


def run_xtok_gold_case(
    case: XtokGoldCase, *, warmup: int = 1, reps: int = 3, seed: int = 0
) -> tuple[list[Result], str]:
    """Times each implementation in this process and measures each one's peak memory in a
    fresh one; returns the results and a markdown table."""
    device = torch.device(case.device)
    losses, leaves = _gold_losses(case, seed)
    impls, fwd = [], {}
    for name, (fn, peer) in losses.items():
        add_loss_impl(impls, fwd, name, fn, peer=peer)

    def drop_grad():
        for leaf in leaves:
            leaf.grad = None

    results = measure(
        impls, device, warmup=warmup, reps=reps, forward_only=fwd, before_each=drop_grad
    )
    for res in results:
        if res.error is None and device.type == "cpu":
            res.peak_mb = _peak_in_child(case, res.impl, seed)
    return results, format_table(case.title(), results)
