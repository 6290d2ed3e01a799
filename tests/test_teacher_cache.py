"""TeacherCache: bit-exact round trips of sparse targets, sharding and random access, atomic and
resumable writes, and clear errors on bad, corrupt and mismatched caches."""

import json
import os

import numpy as np
import pytest
import torch

from fastkd.sparse import SparseTargets, TeacherCache
from fastkd.sparse.cache import CacheCorruptError


def count_targets(lengths, *, vocab_size=32000, num_samples=50, slots=(1, 40), seed=0,
                  logprobs=False):
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
        out.append(SparseTargets(ids=torch.from_numpy(ids), weights=torch.from_numpy(weights),
                                 logprobs=torch.from_numpy(lp) if logprobs else None,
                                 vocab_size=vocab_size, num_samples=n))
    return out


def float_targets(lengths, *, vocab_size=1000, k=8, method="topk", tail="bucket",
                  temperature=1.0, seed=1):
    """Hand-built targets with arbitrary float32 weights, logprobs and (bucket) tail_mass; some
    tokens keep fewer than k ids."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t_len in lengths:
        ids = torch.stack([torch.randperm(vocab_size, generator=gen)[:k]
                           for _ in range(t_len)]).int()
        weights = torch.rand(t_len, k, generator=gen) ** 3
        weights[:, 0] = torch.tensor([1e-40, -0.0, 3.0e38, 1.0])[torch.arange(t_len) % 4]
        logprobs = torch.log(torch.rand(t_len, k, generator=gen))
        short = torch.arange(t_len) % 3 == 0
        ids[short, k // 2:] = -1
        weights[short, k // 2:] = 0
        logprobs[short, k // 2:] = 0
        tail_mass = torch.rand(t_len, generator=gen) if tail == "bucket" else None
        out.append(SparseTargets(ids=ids, weights=weights, logprobs=logprobs,
                                 tail_mass=tail_mass, vocab_size=vocab_size, num_samples=k,
                                 temperature=temperature, method=method, tail=tail))
    return out


def create(path, like: SparseTargets, **kw):
    return TeacherCache.create(path, vocab_size=like.vocab_size, num_samples=like.num_samples,
                               method=like.method, temperature=like.temperature,
                               seed=like.seed, tail=like.tail, **kw)


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


@pytest.mark.parametrize("vocab_size, num_samples, word_bytes, logprobs", [
    (32000, 50, 3, False),      # 15 + 6 bits
    (262144, 64, 3, True),      # 18 + 6 bits: the widest that fits 3 bytes
    (262144, 100, 4, False),    # 18 + 7 bits
    (1 << 31, 1000, 6, False),  # 31 + 10 bits
])
def test_round_trip_counts(tmp_path, vocab_size, num_samples, word_bytes, logprobs):
    seqs = count_targets([1, 7, 30, 2], vocab_size=vocab_size, num_samples=num_samples,
                         logprobs=logprobs)
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


@pytest.mark.parametrize("method, tail, temperature", [
    ("topk", "bucket", 1.0), ("topk", "label", 1.0), ("random", None, 0.7)])
def test_round_trip_float_weights(tmp_path, method, tail, temperature):
    seqs = float_targets([5, 1, 12], method=method, tail=tail, temperature=temperature)
    write(tmp_path / "c", seqs)
    assert manifest(tmp_path / "c")["encoding"] == {"kind": "float", "id_bits": 10,
                                                    "count_bits": 0}
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
    batch = SparseTargets(ids=torch.stack([s.ids for s in seqs]),
                          weights=torch.stack([s.weights for s in seqs]),
                          vocab_size=32000, num_samples=50)
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
        for field, value in [("num_samples", 64), ("vocab_size", 50000), ("seed", 7),
                             ("temperature", 2.0)]:
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
    (path / "manifest.json").write_text(text[:len(text) // 2])
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
        for s in seqs[w.num_sequences:]:
            w.append(s)
    assert sorted(os.listdir(path)) == [".lock", "manifest.json"] + [
        f"shard-{i:06d}.fkd" for i in range(len(manifest(path)["shards"]))]
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
    draws = torch.multinomial(torch.softmax(logits, -1), num_samples, replacement=True,
                              generator=gen).sort(-1).values
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = new.cumsum(-1) - 1
    ids = torch.full(draws.shape, -1, dtype=torch.int32).scatter_(1, slot, draws.int())
    counts = torch.zeros_like(slot).scatter_add_(1, slot, torch.ones_like(slot))
    weights = torch.from_numpy(counts.numpy().astype(np.float32) / np.float32(num_samples))
    return SparseTargets(ids=ids, weights=weights, vocab_size=logits.shape[-1],
                         num_samples=num_samples)


def teacher_cache_size(path, sharpness, *, tokens=2000, seq_len=500, vocab_size=32000,
                       num_samples=50, seed=0):
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


def test_bytes_per_token(tmp_path):
    # A strong LM's predictions average about 2 nats of entropy, confident on some tokens and
    # broad on others: per-token sharpness uniform in [3, 10] gives that.
    bpt, distinct, entropy = teacher_cache_size(
        tmp_path / "lm", lambda t, gen: 3 + 7 * torch.rand(t, 1, generator=gen))
    print(f"\nLM-like teacher (mean entropy {entropy:.2f} nats): {distinct:.2f} distinct ids "
          f"per token at N=50, {bpt:.2f} bytes per token")
    assert 1.5 < entropy < 2.5
    assert bpt <= 40

    # A flatter teacher (sharpness 3 on every token) keeps more ids; the format still costs
    # 3 bytes per id plus about 1 byte per token.
    bpt, distinct, entropy = teacher_cache_size(tmp_path / "flat", lambda t, gen: 3.0)
    print(f"flat teacher (mean entropy {entropy:.2f} nats): {distinct:.2f} distinct ids per "
          f"token at N=50, {bpt:.2f} bytes per token")
    assert bpt <= 3 * distinct + 1.5
