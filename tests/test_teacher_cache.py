"""TeacherCache: bit-exact round trips of sparse targets, sharding and random access, atomic and
resumable writes under injected faults and kills, one writer at a time, and clear errors on bad,
corrupt, edited and mismatched caches."""

import errno
import hashlib
import json
import os
import signal
import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch

from fastkd.sparse import SparseTargets, TeacherCache
from fastkd.sparse.cache import CacheCorruptError, CacheLockedError


def count_targets(
    lengths, *, vocab_size=32000, num_samples=50, slots=(1, 40), seed=0, logprobs=False
):
    """Hand-built "random" targets, one SparseTargets [T, N] per entry of ``lengths``: each
    token has a random number of distinct ids in [slots[0], slots[1]] (both ends forced to
    occur), counts >= 1 summing to N, and weights count / N in float32 as the sampler computes
    them; the rest of the row is padding."""
    rng = np.random.default_rng(seed)
    n = num_samples
    out = []
    for t_len in lengths:
        ids = np.full((t_len, n), -1, np.int32)
        weights = np.zeros((t_len, n), np.float32)
        lp = np.zeros((t_len, n), np.float32)
        for t in range(t_len):
            k = slots[t % 2] if t < 2 else int(rng.integers(slots[0], slots[1] + 1))
            row = rng.choice(vocab_size, k, replace=False)
            row[0] = vocab_size - 1 if t == 0 else row[0]  # the largest id must survive packing
            counts = 1 + np.bincount(rng.integers(0, k, n - k), minlength=k)
            ids[t, :k] = row
            weights[t, :k] = counts.astype(np.float32) / np.float32(n)
            lp[t, :k] = -10 * rng.random(k, np.float32)
        out.append(
            SparseTargets(
                ids=torch.from_numpy(ids),
                weights=torch.from_numpy(weights),
                logprobs=torch.from_numpy(lp) if logprobs else None,
                vocab_size=vocab_size,
                num_samples=n,
            )
        )
    return out


def float_targets(
    lengths, *, vocab_size=1000, k=8, method="topk", tail="bucket", temperature=1.0, seed=1
):
    """Hand-built targets with arbitrary float32 weights, logprobs and (bucket) tail_mass; some
    tokens keep fewer than k ids."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t_len in lengths:
        ids = torch.stack(
            [torch.randperm(vocab_size, generator=gen)[:k] for _ in range(t_len)]
        ).int()
        weights = torch.rand(t_len, k, generator=gen) ** 3
        weights[:, 0] = torch.tensor([1e-40, -0.0, 3.0e38, 1.0])[torch.arange(t_len) % 4]
        logprobs = torch.log(torch.rand(t_len, k, generator=gen))
        short = torch.arange(t_len) % 3 == 0
        ids[short, k // 2 :] = -1
        weights[short, k // 2 :] = 0
        logprobs[short, k // 2 :] = 0
        tail_mass = torch.rand(t_len, generator=gen) if tail == "bucket" else None
        out.append(
            SparseTargets(
                ids=ids,
                weights=weights,
                logprobs=logprobs,
                tail_mass=tail_mass,
                vocab_size=vocab_size,
                num_samples=k,
                temperature=temperature,
                method=method,
                tail=tail,
            )
        )
    return out


def create(path, like: SparseTargets, **kw):
    return TeacherCache.create(
        path,
        vocab_size=like.vocab_size,
        num_samples=like.num_samples,
        method=like.method,
        temperature=like.temperature,
        seed=like.seed,
        tail=like.tail,
        **kw,
    )


def write(path, seqs, **kw):
    with create(path, seqs[0], **kw) as w:
        for s in seqs:
            w.append(s)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def assert_same(read: SparseTargets, written: SparseTargets):
    """``read`` holds exactly ``written``'s entries, bit for bit, with the padding columns that
    were empty on every token dropped."""
    k = read.num_slots
    assert read.lead_shape == written.lead_shape
    for f in ("vocab_size", "num_samples", "temperature", "seed", "method", "tail"):
        assert getattr(read, f) == getattr(written, f), f
    assert torch.equal(read.ids, written.ids[..., :k])
    assert bool((written.ids[..., k:] == -1).all())
    assert torch.equal(bits(read.weights), bits(written.weights[..., :k]))
    assert (read.logprobs is None) == (written.logprobs is None)
    if read.logprobs is not None:
        assert torch.equal(bits(read.logprobs), bits(written.logprobs[..., :k]))
    assert (read.tail_mass is None) == (written.tail_mass is None)
    if read.tail_mass is not None:
        assert torch.equal(bits(read.tail_mass), bits(written.tail_mass))


def manifest(path):
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


@pytest.mark.parametrize(
    "vocab_size, num_samples, word_bytes, logprobs",
    [
        (32000, 50, 3, False),  # 15 + 6 bits
        (262144, 64, 3, True),  # 18 + 6 bits: the widest that fits 3 bytes
        (262144, 100, 4, False),  # 18 + 7 bits
        (1 << 31, 1000, 6, False),  # 31 + 10 bits
    ],
)
def test_round_trip_counts(tmp_path, vocab_size, num_samples, word_bytes, logprobs):
    seqs = count_targets(
        [1, 7, 30, 2], vocab_size=vocab_size, num_samples=num_samples, logprobs=logprobs
    )
    write(tmp_path / "c", seqs, teacher_name="t", tokenizer_fingerprint="f")
    assert manifest(tmp_path / "c")["encoding"]["kind"] == "count"
    cache = TeacherCache.open(tmp_path / "c", vocab_size=vocab_size, tokenizer_fingerprint="f")
    assert len(cache) == 4 and cache.num_tokens == 40
    assert cache.metadata["teacher_name"] == "t" and cache.metadata["logprobs"] == logprobs
    for i, s in enumerate(seqs):
        assert_same(cache[i], s)
    assert cache[2].num_slots == 40 and cache[0].num_slots == 1
    # Entries dominate: word_bytes each, 1 byte of slot count per token, a little per sequence.
    entries = sum(int(s.nonpadding().sum()) for s in seqs)
    shard = manifest(tmp_path / "c")["shards"][0]
    assert shard["bytes"] <= 40 + 16 * (4 + 1) + 40 + (word_bytes + 4 * logprobs) * entries + 7 * 5


@pytest.mark.parametrize(
    "method, tail, temperature",
    [("topk", "bucket", 1.0), ("topk", "label", 1.0), ("random", None, 0.7)],
)
def test_round_trip_float_weights(tmp_path, method, tail, temperature):
    seqs = float_targets([5, 1, 12], method=method, tail=tail, temperature=temperature)
    write(tmp_path / "c", seqs)
    assert manifest(tmp_path / "c")["encoding"] == {"kind": "float", "id_bits": 10, "count_bits": 0}
    cache = TeacherCache.open(tmp_path / "c")
    for i, s in enumerate(seqs):
        assert_same(cache[i], s)


def test_shards_and_random_access(tmp_path):
    seqs = count_targets([3, 9, 1, 14, 6, 2, 11, 5, 8, 4], seed=3)
    write(tmp_path / "c", seqs, shard_tokens=10)
    shards = manifest(tmp_path / "c")["shards"]
    assert len(shards) > 3
    assert [r["first_sequence"] for r in shards] == sorted(r["first_sequence"] for r in shards)
    cache = TeacherCache.open(tmp_path / "c")
    assert len(cache) == 10 and cache.num_tokens == 63
    for i in np.random.default_rng(0).permutation(10):
        assert_same(cache[int(i)], seqs[i])
    assert_same(cache[-1], seqs[-1])
    with pytest.raises(IndexError):
        cache[10]
    cache.verify()


def test_batch_pads_tokens_and_slots(tmp_path):
    seqs = float_targets([5, 2, 7])
    write(tmp_path / "c", seqs, shard_tokens=6)
    cache = TeacherCache.open(tmp_path / "c")
    targets, lengths = cache.batch([1, 0, 2, 1])
    assert lengths.tolist() == [2, 5, 7, 2]
    assert tuple(targets.ids.shape) == (4, 7, 8)
    for b, i in enumerate([1, 0, 2, 1]):
        n = int(lengths[b])
        assert_same(targets[b, :n], seqs[i])
        pad = targets[b, n:]
        assert bool((pad.ids == -1).all()) and bool((pad.weights == 0).all())
        assert bool((pad.logprobs == 0).all()) and bool((pad.tail_mass == 0).all())


def test_extend_with_lengths(tmp_path):
    seqs = count_targets([6, 6, 6], seed=5)
    batch = SparseTargets(
        ids=torch.stack([s.ids for s in seqs]),
        weights=torch.stack([s.weights for s in seqs]),
        vocab_size=32000,
        num_samples=50,
    )
    with create(tmp_path / "c", seqs[0]) as w:
        w.extend(batch, lengths=torch.tensor([6, 0, 3]))
        w.extend(batch)
        assert w.num_sequences == 6
    cache = TeacherCache.open(tmp_path / "c")
    assert [cache[i].lead_shape[0] for i in range(6)] == [6, 0, 3, 6, 6, 6]
    assert_same(cache[2], seqs[2][:3])
    assert_same(cache[4], seqs[1])


def test_append_rejects_mismatched_targets(tmp_path):
    seq = count_targets([4])[0]
    with create(tmp_path / "c", seq) as w:
        for field, value in [
            ("num_samples", 64),
            ("vocab_size", 50000),
            ("seed", 7),
            ("temperature", 2.0),
        ]:
            with pytest.raises(ValueError, match=field):
                w.append(SparseTargets(**{**seq.__dict__, field: value}))
        with pytest.raises(ValueError, match="not count / N"):
            w.append(SparseTargets(**{**seq.__dict__, "weights": seq.weights * 0.999}))
        with pytest.raises(ValueError, match="one sequence"):
            w.append(seq.reshape(1, 4))
        w.append(seq)
        with pytest.raises(ValueError, match="logprobs"):
            w.append(count_targets([4], logprobs=True)[0])
        assert w.num_sequences == 1
    assert len(TeacherCache.open(tmp_path / "c")) == 1


def test_open_rejects_mismatched_vocab_or_fingerprint(tmp_path):
    write(tmp_path / "c", count_targets([3]), tokenizer_fingerprint="sha256:abc")
    with pytest.raises(ValueError, match="vocab_size.*32000.*32001"):
        TeacherCache.open(tmp_path / "c", vocab_size=32001)
    with pytest.raises(ValueError, match="sha256:abc.*sha256:xyz"):
        TeacherCache.open(tmp_path / "c", tokenizer_fingerprint="sha256:xyz")


def test_corrupt_byte_fails_checksum(tmp_path):
    write(tmp_path / "c", count_targets([5, 5], seed=2), shard_tokens=5)
    shard = tmp_path / "c" / "shard-000001.fkd"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x10  # an entry byte: sizes and offsets still agree, only the checksum sees it
    shard.write_bytes(bytes(raw))
    cache = TeacherCache.open(tmp_path / "c")
    cache[0]  # the intact shard still reads
    with pytest.raises(CacheCorruptError, match="shard-000001.*checksum"):
        cache[1]
    with pytest.raises(CacheCorruptError, match="checksum"):
        cache.verify()


def test_truncated_missing_or_garbled_files(tmp_path):
    path = tmp_path / "c"
    write(path, count_targets([5, 5], seed=2), shard_tokens=5)
    shard = path / "shard-000001.fkd"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-7])
    with pytest.raises(CacheCorruptError, match="truncated"):
        TeacherCache.open(path)
    shard.unlink()
    with pytest.raises(CacheCorruptError, match="missing"):
        TeacherCache.open(path)
    shard.write_bytes(raw)
    TeacherCache.open(path)
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(CacheCorruptError, match="manifest.json"):
        TeacherCache.open(path)
    with pytest.raises(FileNotFoundError):
        TeacherCache.open(tmp_path / "nowhere")


def test_killed_writer_resumes(tmp_path):
    path = tmp_path / "c"
    seqs = count_targets([4, 6, 3, 5, 7, 2, 4, 6], seed=4)
    w = create(path, seqs[0], shard_tokens=8)
    for s in seqs[:5]:
        w.append(s)
    # Killed here: two shards are complete, one sequence is buffered and lost. A temporary file
    # and a renamed shard the manifest never listed are what a kill mid-write leaves behind.
    assert w.committed_sequences == 4 and w.num_sequences == 5
    del w
    (path / ".shard-000003.fkd.tmp").write_bytes(b"partial")
    (path / "shard-000002.fkd").write_bytes(b"renamed but never listed")
    cache = TeacherCache.open(path)
    assert len(cache) == 4
    assert_same(cache[3], seqs[3])

    with pytest.raises(FileExistsError):
        create(path, seqs[0])
    with pytest.raises(ValueError, match="teacher_name"):
        create(path, seqs[0], resume=True, teacher_name="other")
    with create(path, seqs[0], shard_tokens=8, resume=True) as w:
        assert w.num_sequences == 4
        for s in seqs[w.num_sequences :]:
            w.append(s)
    assert sorted(os.listdir(path)) == [".lock", "manifest.json"] + [
        f"shard-{i:06d}.fkd" for i in range(len(manifest(path)["shards"]))
    ]
    cache = TeacherCache.open(path)
    assert len(cache) == len(seqs)
    for i, s in enumerate(seqs):
        assert_same(cache[i], s)
    cache.verify()


def test_create_refuses_foreign_directory(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("not a cache")
    with pytest.raises(FileExistsError):
        TeacherCache.create(tmp_path / "c", vocab_size=10, num_samples=5)
    with TeacherCache.create(tmp_path / "d", vocab_size=10, num_samples=5, resume=True) as w:
        assert w.num_sequences == 0
    assert len(TeacherCache.open(tmp_path / "d")) == 0


def sampled_targets(logits: torch.Tensor, num_samples: int, gen) -> SparseTargets:
    """N draws with replacement from softmax(logits) per row, kept as distinct ids (ascending)
    with weights count / N: what the "random" sampler produces, [T, N] with padding."""
    draws = (
        torch.multinomial(torch.softmax(logits, -1), num_samples, replacement=True, generator=gen)
        .sort(-1)
        .values
    )
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = new.cumsum(-1) - 1
    ids = torch.full(draws.shape, -1, dtype=torch.int32).scatter_(1, slot, draws.int())
    counts = torch.zeros_like(slot).scatter_add_(1, slot, torch.ones_like(slot))
    weights = torch.from_numpy(counts.numpy().astype(np.float32) / np.float32(num_samples))
    return SparseTargets(
        ids=ids, weights=weights, vocab_size=logits.shape[-1], num_samples=num_samples
    )


def teacher_cache_size(
    path, sharpness, *, tokens=2000, seq_len=500, vocab_size=32000, num_samples=50, seed=0
):
    """Writes sampled targets of a long-tailed teacher, logits s_t * randn + a Zipf bias
    -1.1 log(rank) over a random id order, with per-token sharpness s_t = ``sharpness(T)``.
    Returns (bytes per token, mean distinct ids per token, mean entropy in nats)."""
    gen = torch.Generator().manual_seed(seed)
    rank = torch.randperm(vocab_size, generator=gen).float() + 1
    entries = entropy = 0.0
    with TeacherCache.create(path, vocab_size=vocab_size, num_samples=num_samples) as w:
        for _ in range(tokens // seq_len):
            s = sharpness(seq_len, gen)
            logits = s * torch.randn(seq_len, vocab_size, generator=gen) - 1.1 * rank.log()
            logp = torch.log_softmax(logits, -1)
            entropy += float(-(logp.exp() * logp).sum())
            targets = sampled_targets(logits, num_samples, gen)
            entries += float(targets.nonpadding().sum())
            w.append(targets)
    cache = TeacherCache.open(path)
    return cache.bytes_per_token(), entries / tokens, entropy / tokens


@pytest.mark.slow  # 6 s of the full run's 1,025 s
def test_bytes_per_token(tmp_path):
    # A strong LM's predictions average about 2 nats of entropy, confident on some tokens and
    # broad on others: per-token sharpness uniform in [3, 10] gives that.
    bpt, distinct, entropy = teacher_cache_size(
        tmp_path / "lm", lambda t, gen: 3 + 7 * torch.rand(t, 1, generator=gen)
    )
    print(
        f"\nLM-like teacher (mean entropy {entropy:.2f} nats): {distinct:.2f} distinct ids "
        f"per token at N=50, {bpt:.2f} bytes per token"
    )
    assert 1.5 < entropy < 2.5
    assert bpt <= 40

    # A flatter teacher (sharpness 3 on every token) keeps more ids; the format still costs
    # 3 bytes per id plus about 1 byte per token.
    bpt, distinct, entropy = teacher_cache_size(tmp_path / "flat", lambda t, gen: 3.0)
    print(
        f"flat teacher (mean entropy {entropy:.2f} nats): {distinct:.2f} distinct ids per "
        f"token at N=50, {bpt:.2f} bytes per token"
    )
    assert bpt <= 3 * distinct + 1.5


# ---- interruptions: every call of os.write, os.fsync and os.replace is a moment to fail at ----

SMALL = dict(vocab_size=64, num_samples=8, slots=(1, 8))
SMALL_LENGTHS = [3, 4, 2, 5, 3, 1, 4, 2]  # shards of 7, 7 and 8 tokens at shard_tokens=6, + 2


def inject(monkeypatch, op=None, at=0, fault=None, after=False):
    """Counts the writer's calls of os.write, os.fsync and os.replace, and at call ``at`` of
    ``op`` raises ``fault`` (or with ``fault="kill"`` sends SIGKILL to this process) before the
    real call, or after it with ``after``. fsync does not sync: durability cannot be observed
    here, and a real fsync costs about 10 ms. Returns the counts."""
    calls = dict.fromkeys(("write", "fsync", "replace"), 0)
    real = {"write": os.write, "fsync": lambda fd: None, "replace": os.replace}

    def fail():
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise fault

    def wrap(name):
        def call(*args):
            calls[name] += 1
            hit = name == op and calls[name] == at
            if hit and not after:
                fail()
            out = real[name](*args)
            if hit and after:
                fail()
            return out

        return call

    for name in calls:
        monkeypatch.setattr(os, name, wrap(name))
    return calls


@pytest.fixture
def no_sync(monkeypatch):
    """fsync does nothing, as in ``inject``."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def write_small(path, seqs, *, resume=False):
    """Writes ``seqs`` (from the cache's sequence count on) with shard_tokens=6; returns the
    writer (None if create() raised) and how many sequences it had started to append."""
    w, started = None, 0
    try:
        with create(path, seqs[0], shard_tokens=6, resume=resume) as w:
            for i in range(w.num_sequences, len(seqs)):
                started = i + 1
                w.append(seqs[i])
    except (OSError, KeyboardInterrupt):
        pass
    return w, started


def small_reference(tmp_path, monkeypatch):
    """The small sequences, their cache written without faults (checked bit-exact), and the
    calls of each operation that writing it makes."""
    seqs = count_targets(SMALL_LENGTHS, **SMALL)
    with monkeypatch.context() as m:
        calls = inject(m)
        write_small(tmp_path / "reference", seqs)
    ref = TeacherCache.open(tmp_path / "reference")
    for i, s in enumerate(seqs):
        assert_same(ref[i], s)
    return seqs, ref, calls


def check_prefix_and_resume(monkeypatch, path, seqs, ref, lo, hi):
    """The cache at ``path`` holds between ``lo`` and ``hi`` sequences, bit-exact against the
    reference cache ``ref``; resuming it writes the rest of ``seqs`` and gives ``ref``'s
    sequences, leaving no file but the cache's."""

    def same_as_ref(cache, n):
        got, got_lengths = cache.batch(range(n))
        want, want_lengths = ref.batch(range(n))
        assert torch.equal(got_lengths, want_lengths) and torch.equal(got.ids, want.ids)
        assert torch.equal(bits(got.weights), bits(want.weights))

    n = len(TeacherCache.open(path)) if (path / "manifest.json").exists() else 0
    assert lo <= n <= hi
    if n:
        same_as_ref(TeacherCache.open(path), n)
    with monkeypatch.context() as m:
        inject(m)
        w, _ = write_small(path, seqs, resume=True)
    assert w is not None and w.broken is None and w.committed_sequences == len(seqs)
    cache = TeacherCache.open(path)
    cache.verify()
    assert len(cache) == len(seqs)
    same_as_ref(cache, len(seqs))
    assert sorted(os.listdir(path)) == [".lock", "manifest.json"] + [
        f"shard-{i:06d}.fkd" for i in range(len(manifest(path)["shards"]))
    ]


def test_interrupted_manifest_write_keeps_the_cache(tmp_path, monkeypatch):
    seqs, ref, _ = small_reference(tmp_path, monkeypatch)
    # Disk full while the manifest listing the second shard is written (the first write after
    # the 3rd rename: shard 0, its manifest, shard 1): the writer is as before, so close()
    # retries and nothing is written twice.
    w = create(tmp_path / "c", seqs[0], shard_tokens=6)
    real_write, real_replace, renames = os.write, os.replace, []

    def write(fd, data):
        if len(renames) == 3:
            raise OSError(errno.ENOSPC, "disk full")
        return real_write(fd, data)

    with monkeypatch.context() as m:
        m.setattr(os, "write", write)
        m.setattr(os, "replace", lambda *a: (renames.append(a), real_replace(*a)))
        for s in seqs[:3]:
            w.append(s)
        with pytest.raises(OSError, match="disk full"):
            w.append(seqs[3])
    assert len(renames) == 3  # the manifest's rename never came
    assert w.broken is None and w.committed_sequences == 2 and w.num_sequences == 3
    assert len(TeacherCache.open(tmp_path / "c")) == 2
    w.append(seqs[3])
    w.close()
    cache = TeacherCache.open(tmp_path / "c")
    assert len(cache) == 4
    assert [r["first_sequence"] for r in manifest(tmp_path / "c")["shards"]] == [0, 2]
    for i in range(4):
        assert_same(cache[i], seqs[i])

    # Ctrl-C while the manifest is renamed, inside `with`: nothing is written after it, and the
    # cache opens with the committed shards (or with the one being committed, which may have
    # landed) and resumes.
    for after in (False, True):
        path = tmp_path / f"interrupted-{after}"
        with monkeypatch.context() as m:
            inject(m, "replace", 5, KeyboardInterrupt(), after)  # 1: create, 5: shard 1
            w, started = write_small(path, seqs)
        assert w.broken and w.committed_sequences == 2 and started == 4
        check_prefix_and_resume(monkeypatch, path, seqs, ref, 2, 4)


def test_exception_in_with_writes_nothing_more(tmp_path, monkeypatch):
    seqs, ref, _ = small_reference(tmp_path, monkeypatch)
    with pytest.raises(RuntimeError, match="teacher loop"):
        with create(tmp_path / "c", seqs[0], shard_tokens=6) as w:
            for s in seqs[:3]:
                w.append(s)
            raise RuntimeError("the teacher loop failed")
    assert w.committed_sequences == 2 and w.num_sequences == 2
    assert manifest(tmp_path / "c")["shards"][-1]["first_sequence"] == 0
    assert len(TeacherCache.open(tmp_path / "c")) == 2
    with pytest.raises(ValueError, match="closed"):
        w.append(seqs[3])
    check_prefix_and_resume(monkeypatch, tmp_path / "c", seqs, ref, 2, 2)


def test_fault_at_every_call_keeps_a_resumable_cache(tmp_path, monkeypatch):
    """OSError or KeyboardInterrupt at each call of os.write, os.fsync and os.replace (before the
    call, or after it for fsync and replace), over appends and the close: the cache holds exactly
    the writer's committed sequences (up to the shard in flight if it reports itself broken),
    bit-exact, and a resumed writer completes it to what an uninterrupted run writes."""
    seqs, ref, calls = small_reference(tmp_path, monkeypatch)
    # The manifest at create, then 4 shards and their manifests; each file and the directory
    # after each rename are synced, and the parent of the new cache directory.
    assert calls["replace"] == 9 and calls["fsync"] == 1 + 18
    # Each call gets one fault before it and the other after it; alternating in pairs of calls
    # gives file and directory fsyncs, and shard and manifest renames, both kinds.
    faults = [OSError(errno.EIO, "injected"), KeyboardInterrupt()]
    cases = [
        (op, at, faults[(at // 2 + after) % 2], after)
        for op in calls
        for at in range(1, calls[op] + 1)
        for after in (False, True)
        if op != "write" or not after
    ]
    for case, (op, at, fault, after) in enumerate(cases):
        path = tmp_path / str(case)
        with monkeypatch.context() as m:
            inject(m, op, at, fault, after)
            w, started = write_small(path, seqs)
        committed = 0 if w is None else w.committed_sequences
        broken = w is None or w.broken is not None
        check_prefix_and_resume(
            monkeypatch, path, seqs, ref, committed, started if broken else committed
        )


def run_in_child(fn) -> int:
    """Runs ``fn()`` in a child made by fork() and returns its exit code: what ``fn`` returned,
    99 if it raised, or minus the signal that ended it."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = fn()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.002)
    return os.waitstatus_to_exitcode(done[1])


def test_kill_9_at_any_moment_keeps_a_resumable_cache(tmp_path, monkeypatch):
    """A writer process killed (SIGKILL) just before or just after each rename, or amid writing
    a shard: nothing but the kernel cleans up after it."""
    seqs, ref, calls = small_reference(tmp_path, monkeypatch)
    cases = [
        ("replace", at, after) for at in range(1, calls["replace"] + 1) for after in (False, True)
    ] + [("write", calls["write"] // 2, False)]
    for case, (op, at, after) in enumerate(cases):
        path = tmp_path / str(case)

        def child():
            inject(monkeypatch, op, at, "kill", after)
            write_small(path, seqs)
            return 0

        assert run_in_child(child) == -signal.SIGKILL
        check_prefix_and_resume(monkeypatch, path, seqs, ref, 0, len(seqs))


# ---- one writer at a time ----


def test_second_writer_is_refused(tmp_path, monkeypatch):
    seqs, ref, _ = small_reference(tmp_path, monkeypatch)
    path = tmp_path / "c"
    first = create(path, seqs[0], shard_tokens=6)
    first.append(seqs[0])
    with pytest.raises(CacheLockedError, match=f"{path}.*another TeacherCacheWriter"):
        create(path, seqs[0], shard_tokens=6, resume=True)

    def second_process():
        try:
            create(path, seqs[0], resume=True)
        except CacheLockedError:
            pass
        else:
            return 1
        # The child's copy of the parent's writer is disowned: it writes nothing.
        with pytest.raises(RuntimeError, match="inherited through fork"):
            first.append(seqs[1])
        return 0

    assert run_in_child(second_process) == 0
    with pytest.raises(CacheLockedError):  # the child left the parent's lock in place
        create(path, seqs[0], resume=True)
    for s in seqs[1:4]:
        first.append(s)
    first.close()
    assert len(TeacherCache.open(path)) == 4

    # Released on close (above), on leaving `with` by an exception, and when dropped unclosed.
    with pytest.raises(KeyError):
        with create(path, seqs[0], shard_tokens=6, resume=True):
            raise KeyError("teacher loop")
    w = create(path, seqs[0], shard_tokens=6, resume=True)
    del w
    check_prefix_and_resume(monkeypatch, path, seqs, ref, 4, 4)


# ---- only the cache's own files are written or removed ----


def test_planted_symlinks_are_not_followed(tmp_path, monkeypatch):
    """Links at the lock file, at every temporary name a writer could use (the fixed names of
    version-1 writers, and its random ones, made predictable here) and at the shard names it is
    about to rename onto: no target changes, and the cache stays whole."""
    seqs, ref, _ = small_reference(tmp_path, monkeypatch)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "c"
    path.mkdir()
    (path / ".lock").symlink_to(victim)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):  # O_NOFOLLOW
        create(path, seqs[0])
    (path / ".lock").unlink()
    names = [".manifest.json.tmp", ".manifest.json.0000000000000000.tmp"] + [
        f".shard-{i:06d}.fkd{suffix}.tmp" for i in range(4) for suffix in ("", ".0000000000000000")
    ]
    with monkeypatch.context() as m:
        m.setattr("secrets.token_hex", lambda n: "0" * 2 * n)
        with pytest.raises(FileExistsError):  # O_EXCL: the temporary name is taken
            with create(path, seqs[0], shard_tokens=6) as w:
                for name in names:
                    (path / name).symlink_to(victim)
                for s in seqs:
                    w.append(s)
    assert w.committed_sequences == 0 and w.broken is None
    with create(path, seqs[0], shard_tokens=6, resume=True) as w:
        assert not any((path / name).exists() for name in names)  # leftovers: removed
        for i in range(4):
            (path / f"shard-{i:06d}.fkd").symlink_to(victim)
        for s in seqs:
            w.append(s)
    assert victim.read_bytes() == b"precious"
    assert not any((path / f"shard-{i:06d}.fkd").is_symlink() for i in range(4))
    check_prefix_and_resume(monkeypatch, path, seqs, ref, len(seqs), len(seqs))


def test_unrelated_tmp_files_survive(tmp_path, monkeypatch):
    seqs, ref, _ = small_reference(tmp_path, monkeypatch)
    path = tmp_path / "c"
    path.mkdir()
    unrelated = [
        "x.tmp",
        ".x.tmp",
        ".manifest.json.tmp.bak",
        ".shard-1.fkd.tmp",
        ".shard-000001.fkd.0123.tmp",
    ]
    for name in unrelated:
        (path / name).write_text("someone else's")
    with pytest.raises(FileExistsError, match="neither empty nor a teacher cache"):
        create(path, seqs[0])
    assert sorted(os.listdir(path)) == sorted(unrelated)  # not even a lock file was made
    for name in unrelated:
        (path / name).unlink()
    with monkeypatch.context() as m:
        inject(m, "replace", 5, OSError(errno.EIO, "injected"))
        write_small(path, seqs)
    for name in unrelated:
        (path / name).write_text("someone else's")
    (path / ".shard-000002.fkd.0123456789abcdef.tmp").write_bytes(b"a killed writer's")
    with monkeypatch.context() as m:
        inject(m)
        w, _ = write_small(path, seqs, resume=True)
    assert w.committed_sequences == len(seqs)
    assert sorted(n for n in os.listdir(path) if "tmp" in n) == sorted(unrelated)
    for name in unrelated:
        assert (path / name).read_text() == "someone else's"


# ---- what a manifest says is checked ----


def edit_manifest(path, edit, *, rehash):
    """Applies ``edit`` to the parsed manifest at ``path``; with ``rehash``, stores the checksum
    of the edited content too (as a tool that rewrites manifests would)."""
    m = manifest(path)
    edit(m)
    if rehash:
        rest = {k: v for k, v in m.items() if k != "manifest_sha256"}
        m["manifest_sha256"] = hashlib.sha256(
            json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "edit, rehash, match",
    [
        (lambda m: m.update(num_samples=64), False, "checksum"),
        (lambda m: m["shards"].append(m["shards"][0]), False, "checksum"),
        (lambda m: m["shards"].append(m["shards"][0]), True, "listed once"),
        (lambda m: m["shards"].reverse(), True, "listed once"),
        (lambda m: m["shards"][2].update(file="shard-000001.fkd"), True, "listed once"),
        (lambda m: m["shards"][1].update(first_sequence=1), True, "the shards before it hold 2"),
        (lambda m: m["shards"].pop(1), True, "listed once"),
        (lambda m: m["shards"][0].update(slot_bytes=True), True, "slot_bytes"),
        (lambda m: m["encoding"].update(id_bits=6.0), True, "encoding"),
        (lambda m: m.update(logprobs=0), True, "logprobs"),
        (lambda m: m.update(extra=1), True, "unexpected"),
        (lambda m: m["shards"][0].update(bytes=m["shards"][0]["bytes"] + 8), True, "imply"),
    ],
)
def test_manifest_edits_are_detected(tmp_path, edit, rehash, match, no_sync):
    seqs = count_targets(SMALL_LENGTHS, **SMALL)
    path = tmp_path / "c"
    write_small(path, seqs)
    edit_manifest(path, edit, rehash=rehash)
    with pytest.raises(CacheCorruptError, match=match):
        TeacherCache.open(path)
    with pytest.raises(CacheCorruptError):
        create(path, seqs[0], resume=True)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 200_000,
        "{" * 100_000,
        "",
        "null",
        "[]",
        '"fastkd-teacher-cache"',
        '{"format": "fastkd-teacher-cache", "version": 2, "version": 2}',
        '{"format": "fastkd-teacher-cache", "version": 3}',
        "1" * 100_000,
        b"\xff\xfe\x00",
    ],
)
def test_malformed_manifest_is_corrupt(tmp_path, text, no_sync):
    path = tmp_path / "c"
    write_small(path, count_targets([3], **SMALL))
    data = text if isinstance(text, bytes) else text.encode()
    (path / "manifest.json").write_bytes(data)
    with pytest.raises(CacheCorruptError, match="manifest.json"):
        TeacherCache.open(path)


def test_manifest_size_and_file_type(tmp_path, monkeypatch, no_sync):
    path = tmp_path / "c"
    write_small(path, count_targets([3], **SMALL))
    monkeypatch.setattr("fastkd.sparse.cache.format.MAX_MANIFEST_BYTES", 100)
    with pytest.raises(CacheCorruptError, match="manifest.json has [0-9]+ bytes; .* 1 to 100 "):
        TeacherCache.open(path)
    monkeypatch.undo()
    (path / "manifest.json").unlink()
    os.mkfifo(path / "manifest.json")  # reading it would block forever
    with pytest.raises(CacheCorruptError, match="not a regular file"):
        TeacherCache.open(path)


def test_version_1_cache_is_read_and_upgraded_on_resume(tmp_path, monkeypatch):
    seqs, ref, _ = small_reference(tmp_path, monkeypatch)
    path = tmp_path / "c"
    with monkeypatch.context() as m:
        inject(m, "replace", 5, OSError(errno.EIO, "injected"))
        write_small(path, seqs)
    edit_manifest(path, lambda m: (m.update(version=1), m.pop("manifest_sha256")), rehash=False)
    assert len(TeacherCache.open(path)) == 2
    check_prefix_and_resume(monkeypatch, path, seqs, ref, 2, 2)
    assert manifest(path)["version"] == 2


# ---- sizes are bounded when writing and checked against the files when reading ----


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(vocab_size=2**70), r"vocab_size must be an int in \[1, 2147483648\]; got 1180591620"),
        (dict(vocab_size=0), r"vocab_size .*\[1, 2147483648\]"),
        (dict(vocab_size=True), "vocab_size"),
        (dict(num_samples=2**31), r"num_samples must be an int in \[1, 2147483647\]"),
        (dict(num_samples=8.0), "num_samples"),
        (dict(seed=-1), r"seed must be an int in \[0, 18446744073709551615\]"),
        (dict(seed=2**64), "seed"),
        (dict(shard_tokens=2**31 + 1), r"shard_tokens must be an int in \[1, 2147483648\]"),
        (dict(shard_tokens=True), "shard_tokens"),
        (dict(temperature=True), "temperature"),
        (dict(temperature="0.7"), "temperature"),
        (dict(teacher_name="x" * 5000), "teacher_name must be a str of at most 4096"),
        (dict(logprobs=1), "logprobs must be True, False or None"),
    ],
)
def test_sizes_are_bounded_when_writing(tmp_path, kw, match):
    args = {"vocab_size": 64, "num_samples": 8, **kw}
    with pytest.raises(ValueError, match=match):
        TeacherCache.create(tmp_path / "c", **args)
    assert not (tmp_path / "c").exists()


def test_sequence_sizes_are_bounded_when_writing(tmp_path):
    # Expanded views: shapes past the limits with no memory behind them.
    one = torch.zeros(1, 1, dtype=torch.int32)
    with TeacherCache.create(tmp_path / "c", vocab_size=64, num_samples=8) as w:
        for t, k in ((2**31, 1), (1, 2**32)):
            huge = SparseTargets(
                ids=one.expand(t, k), weights=one.float().expand(t, k), vocab_size=64, num_samples=8
            )
            with pytest.raises(ValueError, match=f"got targets \\[T={t}, K={k}\\]"):
                w.append(huge)
        assert w.num_sequences == 0


def test_huge_shard_header_fails_without_allocating(tmp_path, no_sync):
    path = tmp_path / "c"
    write_small(path, count_targets([3, 4], **SMALL))
    shard = path / "shard-000000.fkd"
    raw = bytearray(shard.read_bytes())
    header = struct.Struct("<8sIIQQQ")  # magic, version, slot_bytes, S, T, E
    assert header.unpack_from(raw)[:5] == (b"FKDCSHRD", 1, 1, 2, 7)
    tracemalloc.start()
    try:
        # The header alone, then the header and its manifest record (checksum and all): the
        # claimed 2^33 tokens is past what a shard holds.
        struct.pack_into("<Q", raw, 24, 2**33)  # T
        shard.write_bytes(bytes(raw))
        with pytest.raises(CacheCorruptError, match="header"):
            TeacherCache.open(path)
        edit_manifest(path, lambda m: m["shards"][0].update(tokens=2**33), rehash=True)
        with pytest.raises(CacheCorruptError, match=r"tokens must be an int in \[0, 4294967295\]"):
            TeacherCache.open(path)
        # 2^26 tokens claimed by the header, the last sequence offset and the record, in a
        # (sparse) file of that size: the offset check sums the slot counts in chunks rather
        # than at once (512 MiB).
        tokens = 2**26

        def claim(m):
            r = m["shards"][0]
            # header, seq_tokens and seq_entries [3], 1 byte a slot, 2 bytes an entry
            r["tokens"], r["bytes"] = tokens, header.size + 2 * 24 + tokens + 2 * r["entries"]

        edit_manifest(path, claim, rehash=True)
        struct.pack_into("<Q", raw, 24, tokens)
        struct.pack_into("<Q", raw, header.size + 16, tokens)  # seq_tokens[2]
        shard.write_bytes(bytes(raw))
        os.truncate(shard, manifest(path)["shards"][0]["bytes"])
        cache = TeacherCache.open(path, verify=False)
        with pytest.raises(CacheCorruptError, match="inconsistent offsets"):
            cache[0]
        assert tracemalloc.get_traced_memory()[1] < 64 * 2**20
    finally:
        tracemalloc.stop()


# ---- indices are integers ----


def test_indices_must_be_integers(tmp_path, no_sync):
    seqs = count_targets([3, 4, 2], **SMALL)
    write_small(tmp_path / "c", seqs)
    cache = TeacherCache.open(tmp_path / "c")
    for index in (np.int64(1), np.uint8(1), torch.tensor(1), np.array(1), -2):
        assert_same(cache[index], seqs[1])
    targets, lengths = cache.batch(torch.tensor([2, 0]))
    assert lengths.tolist() == [2, 3]
    for index, name in (
        (1.7, "float"),
        (True, "bool"),
        (np.float64(1.0), "float64"),
        (torch.tensor(1.0), "Tensor of torch.float32"),
        (torch.tensor(True), "Tensor of torch.bool"),
        (torch.tensor([1]), "Tensor of torch.int64"),
        ("1", "str"),
    ):
        with pytest.raises(TypeError, match=f"must be an integer.*got {name}"):
            cache[index]
    with pytest.raises(IndexError, match="sequence -4 out of range for a cache of 3"):
        cache[-4]
    with TeacherCache.create(tmp_path / "d", vocab_size=64, num_samples=8) as w:
        batch = SparseTargets(
            ids=torch.stack([s.ids[:2] for s in seqs]),
            weights=torch.stack([s.weights[:2] for s in seqs]),
            vocab_size=64,
            num_samples=8,
        )
        with pytest.raises(TypeError, match="a length must be an integer"):
            w.extend(batch, lengths=[2, 1.5, 1])
        w.extend(batch, lengths=torch.tensor([2, 1, 0]))
    assert TeacherCache.open(tmp_path / "d").batch([0, 1, 2])[1].tolist() == [2, 1, 0]
