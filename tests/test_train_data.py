"""Training data: reading documents, the train/eval split, packing and prompt masking, the step
sampler's layout, the local BPE tokenizer and the standard-library corpus."""

import json
import re
from pathlib import Path

import pytest
import torch
from fastkd.train.corpus import stdlib_corpus
from fastkd.train.data import (
    IGNORE_INDEX,
    Document,
    StepSampler,
    collate,
    read_documents,
    split_documents,
    tokenize_documents,
)
from fastkd.train.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer
from transformers import AutoTokenizer

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "def add(x, y):\n    return x + y\n",
    "pack my box with five dozen liquor jugs",
    "import os\nprint(os.getcwd())\n",
] * 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_bpe_tokenizer(TEXTS, 300, str(tmp_path_factory.mktemp("tok")))


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# packing and prompt masking


@pytest.mark.parametrize(
    "texts,seq_len",
    [
        (TEXTS[:4], 1),
        (TEXTS[:4], 3),
        (TEXTS[:4], 7),
        (TEXTS[:4], 64),
        (TEXTS[:4], 1000),
        (["a"], 1),
        (["a"], 4),
        (["", "ab", ""], 2),
        (["x" * 50], 10),
    ],
)
def test_packing_predicts_every_token_after_the_first_once(tok, texts, seq_len):
    stream = [t for text in texts for t in encode(tok, text) + [tok.eos_token_id]]
    ds = tokenize_documents([Document(text=t) for t in texts], tok, seq_len=seq_len)
    assert len(ds) == -(-(len(stream) - 1) // seq_len)  # ceil: a partial block is kept
    mask = ds.attention_mask.bool()
    # Read in order, the labels are the stream after its first token, and the inputs are the
    # stream without its last one: each token is predicted exactly once, eos included.
    assert ds.labels[ds.labels != IGNORE_INDEX].tolist() == stream[1:]
    assert ds.input_ids[mask].tolist() == stream[:-1]
    assert (ds.labels != IGNORE_INDEX).equal(mask)
    assert (ds.input_ids[~mask] == tok.pad_token_id).all()
    # The first input and the labels decode to the documents, each followed by the eos token.
    first = ds.input_ids[:1, 0].tolist()
    assert tok.decode(first + ds.labels[ds.labels != IGNORE_INDEX].tolist()) == "".join(
        text + "<|endoftext|>" for text in texts
    )
    assert ds.num_label_tokens() == len(stream) - 1
    assert mask[:-1].all(), "only the last sequence may be padded"
    item = ds[len(ds) - 1]
    assert {k: (v.dtype, tuple(v.shape)) for k, v in item.items()} == {
        k: (torch.int64, (seq_len,)) for k in ("input_ids", "labels", "attention_mask")
    }


def test_packing_of_nothing_is_empty(tok):
    ds = tokenize_documents([], tok, seq_len=4)
    assert len(ds) == 0 and ds.input_ids.shape == (0, 4) and ds.num_label_tokens() == 0


@pytest.mark.parametrize(
    "prompt,completion,room,kept",
    [
        ("Q: add", " A: x + y", 40, True),  # padded
        ("Q: add", " A: x + y", 3, True),  # completion truncated
        ("def add(x, y):", "\n", 0, True),  # the prompt leaves one label
        ("def add(x, y): return x + y", "!", -1, False),  # the prompt fills all T + 1 tokens
        ("", "the fox", 8, True),  # empty prompt: the first token is not predicted
        ("", "", 8, False),  # only an eos, with nothing before it
    ],
)
def test_prompt_completion_labels_only_the_completion(tok, prompt, completion, room, kept):
    p, c = encode(tok, prompt), encode(tok, completion)
    seq_len = len(p) + room
    assert len(c) > room or room != 3, "the truncation case must truncate"
    seq = (p + c + [tok.eos_token_id])[: seq_len + 1]
    docs = [Document(prompt=prompt, completion=completion)]
    if not kept:
        with pytest.warns(UserWarning, match="1 of 1 prompt/completion pairs dropped"):
            assert len(tokenize_documents(docs, tok, seq_len=seq_len)) == 0
        return
    ds = tokenize_documents(docs, tok, seq_len=seq_len)
    assert len(ds) == 1
    m = len(seq) - 1
    first = max(len(p), 1) - 1  # the first position whose next token is a completion token
    want_labels = [IGNORE_INDEX] * first + seq[first + 1 :] + [IGNORE_INDEX] * (seq_len - m)
    assert ds.labels[0].tolist() == want_labels
    assert ds.input_ids[0].tolist() == seq[:-1] + [tok.pad_token_id] * (seq_len - m)
    assert ds.attention_mask[0].tolist() == [1] * m + [0] * (seq_len - m)
    truncated = len(p) + len(c) + 1 > seq_len + 1
    assert (tok.eos_token_id in ds.labels[0].tolist()) == (not truncated)


def test_pairs_follow_the_packed_blocks(tok):
    docs = [
        Document(prompt="Q:", completion=" fox"),
        Document(text=TEXTS[0]),
        Document(prompt="Q: dog", completion=" lazy"),
    ]
    ds = tokenize_documents(docs, tok, seq_len=4)
    packed = tokenize_documents(docs[1:2], tok, seq_len=4)
    pairs = [tokenize_documents([d], tok, seq_len=4) for d in (docs[0], docs[2])]
    for key in ("input_ids", "labels", "attention_mask"):
        want = torch.cat([getattr(packed, key)] + [getattr(p, key) for p in pairs])
        assert getattr(ds, key).equal(want)


def test_dataset_fingerprint_and_collate(tok):
    docs = [Document(text=t) for t in TEXTS[:4]]
    a = tokenize_documents(docs, tok, seq_len=8)
    assert a.fingerprint == tokenize_documents(docs, tok, seq_len=8).fingerprint
    assert a.fingerprint != tokenize_documents(docs[::-1], tok, seq_len=8).fingerprint
    assert a.fingerprint != tokenize_documents(docs, tok, seq_len=9).fingerprint
    batch = collate([a[i] for i in (2, 0)])
    assert batch["labels"].shape == (2, 8) and batch["labels"][1].equal(a.labels[0])
    with pytest.raises(ValueError, match="seq_len must be an int >= 1; got 0"):
        tokenize_documents(docs, tok, seq_len=0)


# ---------------------------------------------------------------------------------------------
# reading documents


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_read_documents_txt_jsonl_and_directories(tmp_path):
    (tmp_path / "d").mkdir()
    write(tmp_path / "d" / "b.txt", "second")
    write(
        tmp_path / "d" / "a.jsonl",
        '{"text": "first"}\n\n{"prompt": "p", "completion": "c", "id": 3}\n',
    )
    write(tmp_path / "d" / "skip.md", "not read")
    single = write(tmp_path / "one.txt", "héllo\nworld")
    docs = read_documents([single, tmp_path / "d"])
    assert docs == [
        Document(text="héllo\nworld"),
        Document(text="first"),
        Document(prompt="p", completion="c"),
        Document(text="second"),
    ]
    assert read_documents([tmp_path / "d"], format="txt") == [Document(text="second")]
    custom = write(tmp_path / "c.data", '{"q": "p", "a": "c"}\n')
    assert read_documents([custom], format="jsonl", prompt_key="q", completion_key="a") == [
        Document(prompt="p", completion="c")
    ]


@pytest.mark.parametrize(
    "content,line,message",
    [
        ('{"text": "ok"}\n{"text": "bad"\n', 2, "invalid JSON"),
        ('{"text": "ok"}\n\n["text"]\n', 3, "expected a JSON object; got list"),
        ('{"prompt": "p"}\n', 1, "missing key 'completion'"),
        ('{"completion": "c"}\n', 1, "missing key 'prompt'"),
        ('{"body": "x"}\n', 1, r"expected key 'text', or keys 'prompt' and 'completion'; got keys"),
        ('{"text": 3}\n', 1, "'text' must be a string; got int"),
        ('{"text": "t", "prompt": "p", "completion": "c"}\n', 1, "a record is either text"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, line, message):
    path = write(tmp_path / "data.jsonl", content)
    with pytest.raises(ValueError, match=f"^{re.escape(path)}:{line}: {message}"):
        read_documents([path])


def test_read_documents_path_errors(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_documents([missing])
    with pytest.raises(ValueError, match="holds no .txt or .jsonl files"):
        read_documents([tmp_path])
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_documents([write(tmp_path / "x.csv", "a,b")])
    with pytest.raises(TypeError, match="a list of paths"):
        read_documents(missing)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="bad.txt: not valid UTF-8"):
        read_documents([tmp_path / "bad.txt"])


# ---------------------------------------------------------------------------------------------
# train/eval split


@pytest.mark.parametrize(
    "n,fraction,n_eval",
    [
        (1, 0.5, 0),
        (2, 0.01, 1),
        (10, 0.0, 0),
        (10, 0.25, 2),
        (10, 0.99, 9),
        (100, 0.05, 5),
    ],
)
def test_split_is_deterministic_disjoint_and_sized(n, fraction, n_eval):
    docs = [Document(text=f"doc {i}") for i in range(n)]
    train, held = split_documents(docs, eval_fraction=fraction, seed=7)
    assert len(held) == n_eval and sorted(train + held, key=docs.index) == docs
    assert not set(train) & set(held)
    assert [d for d in docs if d in held] == held, "the input order is kept"
    assert split_documents(docs, eval_fraction=fraction, seed=7) == (train, held)
    # The split follows contents, not order.
    assert set(split_documents(docs[::-1], eval_fraction=fraction, seed=7)[1]) == set(held)


def test_split_seeds_and_duplicates():
    docs = [Document(text=f"doc {i}") for i in range(40)]
    splits = {
        tuple(d.text for d in split_documents(docs, eval_fraction=0.2, seed=s)[1]) for s in range(5)
    }
    assert len(splits) == 5
    twins = [Document(text="same")] * 3 + [Document(text="other")]
    for seed in range(6):
        train, held = split_documents(twins, eval_fraction=0.25, seed=seed)
        assert not set(train) & set(held) and len(held) in (1, 3)
    with pytest.raises(ValueError, match=r"eval_fraction must be a number in \[0, 1\); got 1.0"):
        split_documents(docs, eval_fraction=1.0, seed=0)


# ---------------------------------------------------------------------------------------------
# step sampler


def step_union(n, mb, accum, world, step, seed=3):
    return sorted(
        i
        for r in range(world)
        for batch in StepSampler(
            n, micro_batch_size=mb, grad_accum=accum, world_size=world, rank=r, seed=seed
        ).step_indices(step)
        for i in batch
    )


@pytest.mark.parametrize(
    "n,splits",
    [
        (50, [(4, 3, 1), (4, 1, 3), (2, 2, 3), (1, 12, 1), (12, 1, 1), (3, 2, 2)]),  # G = 12
        (5, [(2, 4, 1), (1, 2, 4), (8, 1, 1)]),  # G = 8 > N: steps wrap around several epochs
    ],
)
def test_step_union_is_the_same_for_every_split_of_the_global_batch(n, splits):
    for step in range(6):
        unions = [step_union(n, *split, step) for split in splits]
        assert all(u == unions[0] for u in unions)
        g = splits[0][0] * splits[0][1] * splits[0][2]
        assert len(unions[0]) == g


@pytest.mark.parametrize(
    "n,mb,accum,world,shuffle",
    [
        (24, 2, 3, 2, True),
        (25, 2, 3, 2, True),
        (7, 3, 1, 1, True),
        (10, 2, 2, 1, False),
    ],
)
def test_epochs_visit_each_sequence_once(n, mb, accum, world, shuffle):
    samplers = [
        StepSampler(
            n,
            micro_batch_size=mb,
            grad_accum=accum,
            world_size=world,
            rank=r,
            seed=11,
            shuffle=shuffle,
        )
        for r in range(world)
    ]
    g = samplers[0].global_batch_size
    steps = -(-3 * n // g)  # enough for three epochs, cut below at the epoch boundaries
    # Positions laid end to end, as the ranks' micro-batches interleave them.
    flat = []
    for step in range(steps):
        per_rank = [s.step_indices(step) for s in samplers]
        for j in range(accum):
            for r in range(world):
                flat.extend(per_rank[r][j])
    for epoch in range(3):
        chunk = flat[epoch * n : (epoch + 1) * n]
        assert sorted(chunk) == list(range(n))
        assert chunk == samplers[0].epoch_order(epoch).tolist()
        assert (chunk == list(range(n))) == (not shuffle)


def test_step_sampler_random_access_equals_sequential():
    kw = dict(micro_batch_size=3, grad_accum=2, world_size=2, rank=1, seed=5)
    sequential = [StepSampler(17, **kw).step_indices(s) for s in range(30)]
    fresh = StepSampler(17, **kw)
    assert [fresh.step_indices(s) for s in reversed(range(30))][::-1] == sequential
    assert all(StepSampler(17, **kw).step_indices(s) == sequential[s] for s in (29, 0, 13))
    assert StepSampler(17, **{**kw, "seed": 6}).step_indices(0) != sequential[0]
    # N = 10, G = 4: steps start at positions 0, 4, 8, 12, 16, 20.
    sampler = StepSampler(10, micro_batch_size=2, grad_accum=1, world_size=2)
    assert [sampler.epoch_of(s) for s in range(6)] == [0, 0, 0, 1, 1, 2]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_sequences=0), "num_sequences must be an int >= 1; got 0"),
        (dict(micro_batch_size=0), "micro_batch_size must be an int >= 1; got 0"),
        (dict(grad_accum=2.0), "grad_accum must be an int >= 1; got 2.0"),
        (dict(world_size=2, rank=2), r"rank must be an int in \[0, world_size=2\); got 2"),
    ],
)
def test_step_sampler_errors(kwargs, message):
    args = dict(num_sequences=4, micro_batch_size=1, grad_accum=1) | kwargs
    with pytest.raises(ValueError, match=message):
        StepSampler(args.pop("num_sequences"), **args)
    with pytest.raises(ValueError, match="step must be an int >= 0; got -1"):
        StepSampler(4, micro_batch_size=1, grad_accum=1).step_indices(-1)


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_is_deterministic_and_fingerprinted(tok, tmp_path):
    a = train_bpe_tokenizer(TEXTS, 300, str(tmp_path / "a"))
    b = train_bpe_tokenizer(TEXTS[::-1], 300, str(tmp_path / "b"))
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b) == tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(load_tokenizer(str(tmp_path / "a"))) == tokenizer_fingerprint(a)
    changed = [
        train_bpe_tokenizer(TEXTS, 299, str(tmp_path / "c")),
        train_bpe_tokenizer(TEXTS + ["zebra zebra"], 300, str(tmp_path / "d")),
        train_bpe_tokenizer(
            TEXTS, 300, str(tmp_path / "e"), special_tokens=("<|pad|>", "<|endoftext|>")
        ),
    ]
    prints = {tokenizer_fingerprint(t) for t in [a] + changed}
    assert len(prints) == 4
    grown = load_tokenizer(str(tmp_path / "a"))
    grown.add_tokens(["zebra"])
    assert tokenizer_fingerprint(grown) != tokenizer_fingerprint(a)


def test_tokenizer_training_serial_equals_parallel(tok, tmp_path, monkeypatch):
    # The tokenizers library reads this variable at each parallel loop: "false" runs the
    # trainer's loops serially, against the fixture's multithreaded training.
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    serial = train_bpe_tokenizer(TEXTS, 300, str(tmp_path / "serial"))
    assert (tmp_path / "serial" / "tokenizer.json").read_bytes() == Path(
        tok.name_or_path, "tokenizer.json"
    ).read_bytes()
    assert tokenizer_fingerprint(serial) == tokenizer_fingerprint(tok)


def test_tokenizer_round_trips_through_auto_tokenizer(tok, tmp_path):
    auto = AutoTokenizer.from_pretrained(tok.name_or_path, local_files_only=True)
    assert (auto.eos_token, auto.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert (auto.eos_token_id, auto.pad_token_id) == (tok.eos_token_id, tok.pad_token_id) == (0, 1)
    # Bytes never seen in training still encode, and everything decodes back exactly.
    text = "def f(x) :\n\treturn x . y , 'é' + \"日本\" \U0001f600  "
    ids = encode(auto, text)
    assert ids == encode(tok, text) and auto.decode(ids) == text
    assert len(auto) == 300
    with pytest.raises(FileNotFoundError, match="no tokenizer at .*missing"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=re.escape("special_tokens must include '<|pad|>'")):
        train_bpe_tokenizer(TEXTS, 300, str(tmp_path / "x"), special_tokens=("<|endoftext|>",))


# ---------------------------------------------------------------------------------------------
# corpus


def test_stdlib_corpus_is_deterministic_and_bounded():
    full = stdlib_corpus(2_000_000)
    assert full == stdlib_corpus(2_000_000)
    assert sum(map(len, full)) <= 2_000_000 and len(full) > 10
    assert all(isinstance(d, str) and d for d in full)
    for bound in (0, 1, 50_000, 300_000):
        docs = stdlib_corpus(bound)
        assert sum(map(len, docs)) <= bound
        assert docs == full[: len(docs)], "a prefix of the same order"
        assert sum(map(len, full[: len(docs) + 1])) > bound, "the longest such prefix"
    assert any("import " in d for d in full)
    with pytest.raises(ValueError, match="max_chars must be None or an int >= 0; got -1"):
        stdlib_corpus(-1)


def test_jsonl_round_trip_of_corpus_documents(tmp_path, tok):
    docs = stdlib_corpus(20_000)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    read = read_documents([str(path)])
    assert [d.text for d in read] == docs
    ds = tokenize_documents(read, tok, seq_len=32)
    assert ds.num_label_tokens() == sum(len(encode(tok, d)) + 1 for d in docs) - 1
