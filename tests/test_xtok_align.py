"""fastkd.xtok alignment: align_spans on hand and random spans (every backend against the set
definition and the two-pointer reference), byte_offsets and TokenAligner on two real tokenizers
trained locally, the vocabulary map, and the errors."""

import pytest
import torch
from xtok_setup import ADVERSARIAL_TEXTS, check_invariants, oracle_chunks

import fastkd
from fastkd.reference.align_spans import align_spans_two_pointer
from fastkd.xtok import TokenAligner, align_spans, byte_offsets, token_bytes, vocab_map

BACKENDS = fastkd.available_backends("align_spans", "cpu")

# (student spans, teacher spans, student ids, teacher ids) for one sequence.
HAND_CASES = {
    "identity": ([(0, 2), (2, 5)], [(0, 2), (2, 5)], [0, 1], [0, 1]),
    "refinement": ([(0, 1), (1, 2), (2, 5)], [(0, 2), (2, 5)], [0, 0, 1], [0, 1]),
    "crossing": ([(0, 2), (2, 4), (4, 6)], [(0, 3), (3, 6)], [0, 0, 0], [0, 0]),
    "bos_one_side": ([(0, 0), (0, 3), (3, 4)], [(0, 3), (3, 4)], [-1, 0, 1], [0, 1]),
    "zero_width_eos": ([(0, 3), (3, 3)], [(0, 1), (1, 3)], [0, -1], [0, 0]),
    "shared_end_pieces": ([(0, 3), (0, 3), (3, 5)], [(0, 3), (3, 5)], [0, 0, 1], [0, 1]),
    "left_padding": ([(-1, -1), (-1, -1), (0, 4)], [(0, 2), (2, 4)], [-1, -1, 0], [0, 0]),
    "right_padding": ([(0, 4), (-1, -1)], [(0, 2), (2, 4), (-1, -1)], [0, -1], [0, 0, -1]),
    "empty": ([(0, 0)], [(-1, -1)], [-1], [-1]),
    "offset_start": ([(5, 7), (7, 9)], [(5, 9)], [0, 0], [0]),
}


def _batch(spans_list):
    width = max(len(s) for s in spans_list)
    out = torch.full((len(spans_list), max(width, 0), 2), -1, dtype=torch.int64)
    for b, spans in enumerate(spans_list):
        if spans:
            out[b, : len(spans)] = torch.tensor(spans)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(HAND_CASES))
def test_hand_cases(case, backend):
    s, t, s_ids, t_ids = HAND_CASES[case]
    out = align_spans(_batch([s]), _batch([t]), backend=backend)
    assert out.student_chunk_id.dtype == torch.int32
    assert out.student_chunk_id[0].tolist() == s_ids
    assert out.teacher_chunk_id[0].tolist() == t_ids
    assert int(out.num_chunks[0]) == max(s_ids + [-1]) + 1
    assert align_spans_two_pointer(s, t) == (s_ids, t_ids)
    assert oracle_chunks(s, t) == (s_ids, t_ids)


def _random_spans(gen, length, n_cuts, empties, pad_left):
    """Spans of one tokenization of ``length`` bytes with about n_cuts inner cuts, empty
    tokens sprinkled in, padded (-1, -1) on one side."""
    cuts = sorted(set(torch.randint(1, max(length, 2), (n_cuts,), generator=gen).tolist()))
    cuts = [c for c in cuts if 0 < c < length]
    bounds = [0, *cuts, length] if length else [0]
    spans = [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    for _ in range(empties):
        pos = int(torch.randint(0, len(spans) + 1, (1,), generator=gen))
        at = spans[pos - 1][1] if pos else 0
        spans.insert(pos, (at, at))
    pad = [(-1, -1)] * int(torch.randint(0, 3, (1,), generator=gen))
    return pad + spans if pad_left else spans + pad


@pytest.mark.parametrize("seed", range(6))
def test_random_spans_against_definition(seed):
    gen = torch.Generator().manual_seed(seed)
    s_list, t_list = [], []
    for b in range(7):
        length = int(torch.randint(0, 60, (1,), generator=gen))
        s_list.append(_random_spans(gen, length, 25, b % 3, b % 2 == 0))
        t_list.append(_random_spans(gen, length, 8, (b + 1) % 3, b % 3 == 0))
    s, t = _batch(s_list), _batch(t_list)
    results = {name: align_spans(s, t, backend=name) for name in BACKENDS}
    for out in results.values():
        for b in range(len(s_list)):
            s_ids = out.student_chunk_id[b, : len(s_list[b])].tolist() if s_list[b] else []
            t_ids = out.teacher_chunk_id[b, : len(t_list[b])].tolist() if t_list[b] else []
            assert (s_ids, t_ids) == oracle_chunks(s_list[b], t_list[b])
            assert (s_ids, t_ids) == align_spans_two_pointer(s_list[b], t_list[b])
            check_invariants(s_list[b], t_list[b], s_ids, t_ids, int(out.num_chunks[b]))
        # Swapping the sides swaps the outputs.
        back = align_spans(t, s, backend=next(iter(results)))
        assert torch.equal(back.student_chunk_id, out.teacher_chunk_id)
        assert torch.equal(back.teacher_chunk_id, out.student_chunk_id)
    first = next(iter(results.values()))
    for out in results.values():
        assert all(torch.equal(x, y) for x, y in zip(out, first))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_refinement_gives_the_coarse_tokens_as_chunks(seed, backend):
    # The fine side cuts wherever the coarse side does, and more: every coarse token is a
    # chunk, holding the fine tokens inside it.
    gen = torch.Generator().manual_seed(seed)
    coarse = _random_spans(gen, 50, 6, 1, False)
    cuts = {e for a, e in coarse if e > a} | set(
        torch.randint(1, 50, (15,), generator=gen).tolist()
    )
    bounds = [0, *sorted(cuts)]
    fine = list(zip(bounds[:-1], bounds[1:]))
    out = align_spans(_batch([fine]), _batch([coarse]), backend=backend)
    coarse_ids = out.teacher_chunk_id[0, : len(coarse)].tolist()
    live = [i for i, (a, e) in enumerate(coarse) if e > a]
    assert [coarse_ids[i] for i in live] == list(range(len(live)))
    for (a, e), c in zip(fine, out.student_chunk_id[0].tolist()):
        ca, ce = coarse[live[c]]
        assert ca <= a and e <= ce


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_int32_spans(backend):
    s = _batch([[(0, 2), (2, 5)]]).to(torch.int32)
    strided = s.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, transposed
    assert not strided.is_contiguous()
    out = align_spans(strided, _batch([[(0, 5)]]), backend=backend)
    assert out.student_chunk_id.tolist() == [[0, 0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "s,t,match",
    [
        ([(0, 3)], [(0, 4)], "do not cover the same text"),
        ([(1, 3)], [(0, 3)], "do not cover the same text"),
        ([(0, 3)], [(0, 0)], "do not cover the same text"),
        ([(0, 3), (1, 2)], [(0, 3)], r"student_spans\[0, 1\]"),
        ([(0, 3)], [(-2, 3)], r"teacher_spans\[0, 0\]"),
    ],
)
def test_spans_that_differ_raise(s, t, match, backend):
    with pytest.raises(ValueError, match=match):
        align_spans(_batch([s]), _batch([t]), backend=backend)


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (torch.zeros(1, 2, 2), TypeError, "integer byte offsets"),
        (torch.zeros(1, 2, 3, dtype=torch.int64), ValueError, r"\[B, T, 2\]"),
        (torch.zeros(2, 2, 2, dtype=torch.int64), ValueError, "same batch size"),
        ([[0, 1]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_arguments(bad, error, match):
    with pytest.raises(error, match=match):
        align_spans(bad, torch.zeros(1, 2, 2, dtype=torch.int64))


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        align_spans(_batch([[(0, 1)]]), _batch([[(0, 1)]]), backend="gpu")


# ---- real tokenizers ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    pytest.importorskip("transformers")
    from fastkd.bench.xtok_tokenizers import tokenizer_pair

    return tokenizer_pair(str(tmp_path_factory.mktemp("xtok-tokenizers")))


@pytest.fixture(scope="session")
def with_eos(pair):
    """The byte-level tokenizer appending a zero-width EOS to every text."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    byte_level, _ = pair
    backend = Tokenizer.from_str(byte_level.backend_tokenizer.to_str())
    eos = backend.token_to_id("<|endoftext|>")
    backend.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def _token_text_bytes(tok, texts, out):
    """(token bytes by the vocabulary, bytes of the text under the span) per live token."""
    table = token_bytes(tok)
    pairs = []
    for b, text in enumerate(texts):
        data = text.encode("utf-8")
        for i, (a, e) in enumerate(out.spans[b].tolist()):
            if e > a:
                pairs.append((table[int(out.input_ids[b, i])], data[a:e]))
    return pairs


def test_byte_offsets_match_token_bytes(pair):
    byte_level, fallback = pair
    out = byte_offsets(byte_level, ADVERSARIAL_TEXTS)
    assert all(tb == xb for tb, xb in _token_text_bytes(byte_level, ADVERSARIAL_TEXTS, out))
    out = byte_offsets(fallback, ADVERSARIAL_TEXTS)
    for tb, xb in _token_text_bytes(fallback, ADVERSARIAL_TEXTS, out):
        # The Metaspace marker prepended to the first word stands for no byte of the text.
        assert tb == xb or tb == b" " + xb, (tb, xb)


def test_byte_fallback_pieces_are_split(pair):
    _, fallback = pair
    out = byte_offsets(fallback, ["你"])
    pieces = fallback.convert_ids_to_tokens(out.input_ids[0].tolist())
    assert pieces[0] == "<s>" and out.spans[0, 0].tolist() == [0, 0]
    live = [(p, s) for p, s in zip(pieces, out.spans[0].tolist()) if s[1] > s[0]]
    assert [s for _, s in live][-3:] == [[0, 1], [1, 2], [2, 3]]
    assert [p for p, _ in live][-3:] == ["<0xE4>", "<0xBD>", "<0xA0>"]


def test_padding_sides_and_special_mask(pair):
    byte_level, _ = pair
    right = byte_offsets(byte_level, ["ab cd", "x"])
    left = byte_offsets(byte_level, ["ab cd", "x"], padding_side="left")
    n = int(right.attention_mask[1].sum())
    assert right.spans[1, n:].eq(-1).all() and left.spans[1, :-n].eq(-1).all()
    assert torch.equal(right.spans[1, :n], left.spans[1, -n:])
    assert right.special_mask[1, n:].all() and not right.special_mask[1, :n].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_aligner_invariants_on_adversarial_texts(pair, padding_side, backend):
    byte_level, fallback = pair
    out = TokenAligner(byte_level, fallback)(
        ADVERSARIAL_TEXTS, padding_side=padding_side, backend=backend
    )
    for b, text in enumerate(ADVERSARIAL_TEXTS):
        s_spans, t_spans = out.student_spans[b].tolist(), out.teacher_spans[b].tolist()
        s_ids, t_ids = out.student_chunk_id[b].tolist(), out.teacher_chunk_id[b].tolist()
        assert (s_ids, t_ids) == oracle_chunks(s_spans, t_spans)
        check_invariants(
            s_spans, t_spans, s_ids, t_ids, int(out.num_chunks[b]), text.encode("utf-8")
        )
        # The teacher's BOS is in no chunk.
        first = int((~out.teacher_attention_mask[b]).sum()) if padding_side == "left" else 0
        assert t_ids[first] == -1


def test_eos_on_one_side_and_bos_on_the_other(pair, with_eos):
    byte_level, fallback = pair
    plain = TokenAligner(byte_level, fallback)(ADVERSARIAL_TEXTS)
    out = TokenAligner(with_eos, fallback)(ADVERSARIAL_TEXTS)
    for b in range(len(ADVERSARIAL_TEXTS)):
        n = int(out.student_attention_mask[b].sum())
        assert out.student_chunk_id[b, n - 1] == -1  # the EOS is in no chunk
        assert torch.equal(out.student_chunk_id[b, : n - 1], plain.student_chunk_id[b, : n - 1])
    assert torch.equal(out.teacher_chunk_id, plain.teacher_chunk_id)
    assert torch.equal(out.num_chunks, plain.num_chunks)


def test_same_tokenizer_gives_identity_chunks(pair):
    for tok in pair:
        out = TokenAligner(tok, tok)(ADVERSARIAL_TEXTS)
        assert torch.equal(out.student_chunk_id, out.teacher_chunk_id)
        for b in range(len(ADVERSARIAL_TEXTS)):
            ids = [c for c in out.student_chunk_id[b].tolist() if c >= 0]
            assert ids == list(range(len(ids)))


def test_aligner_is_symmetric(pair):
    byte_level, fallback = pair
    forward = TokenAligner(byte_level, fallback)(ADVERSARIAL_TEXTS)
    back = TokenAligner(fallback, byte_level)(ADVERSARIAL_TEXTS)
    assert torch.equal(forward.student_chunk_id, back.teacher_chunk_id)
    assert torch.equal(forward.teacher_chunk_id, back.student_chunk_id)


def test_refinement_gives_the_coarser_tokens(pair):
    # The byte-fallback tokenizer spells 你 as three byte pieces, the byte-level one as fewer
    # tokens over the same three bytes: the chunk is the coarser side's token.
    byte_level, fallback = pair
    out = TokenAligner(byte_level, fallback, add_special_tokens=False)(["你"])
    s_live = [s for s in out.student_spans[0].tolist() if s[1] > s[0]]
    assert int(out.num_chunks[0]) == len({e for _, e in s_live} & {1, 2, 3})


def test_prefixes_and_completion_mask(pair):
    byte_level, fallback = pair
    aligner = TokenAligner(byte_level, fallback)
    prompts, completions = ["Question: 2+2?", "日本", "p"], [" Answer: 4", "語", ""]
    out = aligner(
        prompts=prompts,
        completions=completions,
        student_prefixes=["<|user|>\n"] * 3,
        teacher_prefixes=["[INST] "] * 3,
    )
    plain = aligner([p + c for p, c in zip(prompts, completions)])
    # The prefixes shift no span of the shared text and join no chunk.
    for b in range(3):
        assert int(out.num_chunks[b]) == int(plain.num_chunks[b])
    for b, (p, c) in enumerate(zip(prompts, completions)):
        counted = out.chunk_mask[b]
        if not c:
            assert not counted.any()  # an empty completion counts no chunk
            continue
        assert counted.any()
        n_prompt = len(p.encode("utf-8"))
        ids = out.student_chunk_id[b]
        for c_id in counted.nonzero().squeeze(1).tolist():
            starts = out.student_spans[b][ids == c_id][:, 0]
            assert int(starts.min()) >= n_prompt or c_id > 0
        assert torch.equal(
            out.student_completion_mask[b], (ids >= 0) & counted[ids.clamp(min=0).long()]
        )


class _NoOffsets:
    """A tokenizer that gives no offsets (as a slow tokenizer), delegating the rest."""

    is_fast = False

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self._inner(text, add_special_tokens=add_special_tokens)["input_ids"]}


def test_mined_fallback_matches_offsets_on_plain_text(pair):
    byte_level, fallback = pair
    texts = ["def f(x):\n    return x + 1", "plain words here"]
    exact = TokenAligner(byte_level, fallback)(texts)
    with pytest.raises(TypeError, match="fallback='mined'"):
        TokenAligner(_NoOffsets(byte_level), fallback)
    guessed = TokenAligner(_NoOffsets(byte_level), fallback, fallback="mined")(texts)
    assert torch.equal(guessed.student_spans, exact.student_spans)
    assert torch.equal(guessed.student_chunk_id, exact.student_chunk_id)


def test_edit_alignment():
    from fastkd.xtok.mined import edit_alignment

    assert edit_alignment("abc", "abc").tolist() == [0, 1, 2, 3]
    assert edit_alignment("a c", "abc").tolist() == [0, 1, 2, 3]
    mapped = edit_alignment("ac", "abc").tolist()
    assert mapped[0] == 0 and mapped[-1] == 3 and mapped == sorted(mapped)


def test_vocab_map(pair):
    byte_level, fallback = pair
    vm = vocab_map(byte_level, fallback)
    assert vocab_map(byte_level, fallback) is vm  # cached
    s_tokens = byte_level.convert_ids_to_tokens(vm.student_ids.tolist())
    t_tokens = fallback.convert_ids_to_tokens(vm.teacher_ids.tolist())
    pairs = dict(zip(s_tokens, t_tokens))
    assert pairs.get("Ġ") == "\u2581" and pairs.get("ä") == "<0xE4>"
    assert pairs.get("def") == "def"
    s_bytes, t_bytes = token_bytes(byte_level), token_bytes(fallback)
    assert all(
        s_bytes[s] == t_bytes[t] for s, t in zip(vm.student_ids.tolist(), vm.teacher_ids.tolist())
    )
    assert len(set(vm.teacher_ids.tolist())) == len(vm.teacher_ids)
    with pytest.raises(ValueError, match="teacher logits have 10 columns"):
        vm.check(len(byte_level), 10)


def test_hypothesis_random_unicode(pair):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    byte_level, fallback = pair
    aligner = TokenAligner(byte_level, fallback)

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
    @hypothesis.given(
        st.lists(
            st.text(st.characters(exclude_categories=("Cs",)), max_size=24), min_size=1, max_size=3
        )
    )
    def run(texts):
        out = aligner(texts)
        for b, text in enumerate(texts):
            s_spans, t_spans = out.student_spans[b].tolist(), out.teacher_spans[b].tolist()
            s_ids, t_ids = out.student_chunk_id[b].tolist(), out.teacher_chunk_id[b].tolist()
            assert (s_ids, t_ids) == oracle_chunks(s_spans, t_spans)
            check_invariants(
                s_spans, t_spans, s_ids, t_ids, int(out.num_chunks[b]), text.encode("utf-8")
            )

    run()
