"""fastkd distill with a teacher that has its own tokenizer: the aligned training data (chunks
hold the same bytes on both sides, the student's sequences are those of a plain run), each
cross-tokenizer objective against its plain-PyTorch statement on the models' full logits, and
runs end to end (resume, evaluation, config errors)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from train_setup import build_cross_tokenizer_teacher  # noqa: E402
from xtok_setup import ADVERSARIAL_TEXTS  # noqa: E402

from fastkd.reference.xtok_losses import alm_reference, gold_reference  # noqa: E402
from fastkd.reference.xtok_ot import xtok_ot_loss_reference  # noqa: E402
from fastkd.train import distill  # noqa: E402
from fastkd.train.config import ConfigError, load_config  # noqa: E402
from fastkd.train.data import Document, collate, read_documents, tokenize_documents  # noqa: E402
from fastkd.train.models import load_causal_lm  # noqa: E402
from fastkd.train.objectives import COUNTS, batch_counts, make_objective  # noqa: E402
from fastkd.train.report import read_jsonl  # noqa: E402
from fastkd.train.setup import load_data  # noqa: E402
from fastkd.train.tokenizer import load_tokenizer  # noqa: E402
from fastkd.train.xtok_data import tokenize_aligned  # noqa: E402
from fastkd.xtok import token_bytes, vocab_map  # noqa: E402

PAIRS = [
    Document(prompt="Q: 日本語 and emoji 🎉?", completion=" A: ü ß ø 👩‍👩‍👧 done.\n"),
    Document(prompt="", completion="no prompt at all"),
    Document(prompt="def f(x):\n", completion="    return x + 1\n"),
    Document(prompt="a prompt ", completion=""),
]


@pytest.fixture(scope="module")
def cross(tiny):
    """(teacher tokenizer dir, teacher config) of a teacher with a tokenizer of its own."""
    return build_cross_tokenizer_teacher(tiny)


def _docs(tiny) -> list[Document]:
    corpus = read_documents([tiny.corpus])[:2]
    return corpus + [Document(text=t) for t in ADVERSARIAL_TEXTS if t] + PAIRS


def _chunks(table, ids: torch.Tensor, chunk_id: torch.Tensor) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for token, c in zip(ids.tolist(), chunk_id.tolist()):
        if c >= 0:
            out[c] = out.get(c, b"") + table[token]
    return out


@pytest.mark.parametrize("swap", [False, True], ids=["small-student", "small-teacher"])
@pytest.mark.parametrize("seq_len", [5, 32])
def test_aligned_chunks_hold_the_same_bytes_on_both_sides(tiny, cross, swap, seq_len):
    tokenizers = [load_tokenizer(tiny.tokenizer), load_tokenizer(cross[0])]
    s_tok, t_tok = tokenizers[::-1] if swap else tokenizers
    docs = _docs(tiny)
    data = tokenize_aligned(docs, s_tok, t_tok, seq_len=seq_len)
    plain = tokenize_documents(docs, s_tok, seq_len=seq_len)
    assert torch.equal(data.input_ids, plain.input_ids)
    assert torch.equal(data.labels, plain.labels)
    s_table, t_table = token_bytes(s_tok), token_bytes(t_tok)
    counted = labelled = 0
    for i in range(len(data)):
        item = data[i]
        s_ids, t_ids = item["student_chunk_id"], item["teacher_chunk_id"]
        for ids in (s_ids, t_ids):
            live = ids[ids >= 0]
            assert torch.equal(live, live.sort().values), "chunk ids must not decrease"
        s_chunks = _chunks(s_table, item["labels"], s_ids)
        t_chunks = _chunks(t_table, item["teacher_labels"], t_ids)
        assert s_chunks == t_chunks and all(s_chunks.values())
        assert int(item["chunk_count"]) == len(s_chunks)
        assert bool((item["labels"][s_ids >= 0] != -100).all())
        mask = item["teacher_attention_mask"].bool()
        assert bool((item["teacher_labels"][~mask] == -100).all())
        shifted = item["teacher_input_ids"][1:][mask[1:]]
        assert torch.equal(item["teacher_labels"][:-1][mask[1:]], shifted)
        counted += int((s_ids >= 0).sum())
        labelled += int(((item["labels"] != -100) & (item["labels"] != s_tok.eos_token_id)).sum())
    # Only tokens at a sequence's ends (bytes the other side's tokens straddle), prompt chunks
    # and each side's first token fall outside the counted chunks.
    assert counted > (0.6 if seq_len == 5 else 0.85) * labelled


def test_one_tokenizer_on_both_sides_gives_one_chunk_per_completion_token(tiny):
    tok = load_tokenizer(tiny.tokenizer)
    data = tokenize_aligned(PAIRS[:3], tok, tok, seq_len=64)
    for i in range(len(data)):
        item = data[i]
        n = int(item["attention_mask"].sum())
        assert torch.equal(item["teacher_input_ids"][:n], item["input_ids"][:n])
        completion = (item["labels"] != -100) & (item["labels"] != tok.eos_token_id)
        ids = item["student_chunk_id"]
        assert torch.equal(ids[completion], torch.arange(int(completion.sum()), dtype=ids.dtype))
        assert bool((ids[~completion] == -1).all())
        assert torch.equal(item["teacher_chunk_id"][:n], ids[:n])


def _reference_loss(kind, config, s_logits, t_logits, batch, tokenizers, hidden, projection):
    """The objective's loss from the models' full logits (``ot``: hidden states), plainly (mean
    over the batch's counted chunks, ``ot`` its sequences; the CE over its labelled tokens)."""
    c = config.objective
    labels, t_labels = batch["labels"], batch["teacher_labels"]
    s_ids, t_ids = batch["student_chunk_id"].long(), batch["teacher_chunk_id"].long()
    if kind == "ot":
        loss = xtok_ot_loss_reference(
            hidden[0],
            hidden[1],
            s_ids,
            t_ids,
            projection=projection,
            prior_weight=c.ot_prior_weight,
            eps=c.ot_eps,
        )
    elif kind in ("uld", "gold", "gold_hybrid"):
        if kind == "uld":
            # No merge: each chunk's row is its first position's distribution alone.
            def first_only(ids):
                previous = F.pad(ids[:, :-1], (1, 0), value=-1)
                return torch.where(ids == previous, -1, ids)

            s_ids, t_ids = first_only(s_ids), first_only(t_ids)
        matched = weights = None
        if kind == "gold_hybrid":
            vmap = vocab_map(*tokenizers)
            matched = (vmap.student_ids.long(), vmap.teacher_ids.long())
            share = len(vmap.student_ids) / t_logits.shape[-1]
            weights = (share, 1 - share)
        loss = gold_reference(
            s_logits,
            t_logits,
            labels.clamp(min=0),
            t_labels.clamp(min=0),
            s_ids,
            t_ids,
            temperature=c.temperature,
            matched=matched,
            beta=c.beta,
            weights=weights,
        )
    else:
        width = int(max(s_ids.max(), t_ids.max())) + 1
        s_lp = s_logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        t_lp = t_logits.log_softmax(-1).gather(-1, t_labels.clamp(min=0)[..., None])[..., 0]
        rows = [[], []]
        for b in range(labels.shape[0]):
            for c_id in range(width):
                if bool((s_ids[b] == c_id).any()):
                    rows[0].append(s_lp[b][s_ids[b] == c_id].sum())
                    rows[1].append(t_lp[b][t_ids[b] == c_id].sum())
        s, t = torch.stack(rows[0]), torch.stack(rows[1])
        loss = alm_reference(s, t, torch.ones_like(s, dtype=torch.bool), c.temperature, "bce")
    h = c.hard_weight
    ce = F.cross_entropy(s_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    return (1 - h) * loss + h * ce


@pytest.mark.parametrize(
    "kind, options",
    [
        ("uld", {}),
        ("uld", {"temperature": 2.0, "hard_weight": 0.3}),
        ("gold", {}),
        ("gold", {"temperature": 0.5}),
        ("gold_hybrid", {"beta": 0.2}),
        ("alm", {}),
        ("alm", {"temperature": 3.0, "hard_weight": 0.5}),
        ("ot", {"hard_weight": 0.4}),
        ("ot", {"ot_prior_weight": 0.0, "ot_eps": 0.5}),
    ],
)
def test_objective_equals_its_plain_statement(tiny, cross, kind, options):
    tree = tiny.config("unused", objective={"kind": kind, "backend": "torch", **options})
    tree["model"].update(teacher=cross[1], teacher_tokenizer=cross[0])
    config = load_config(tree)
    data = load_data(config)
    torch.manual_seed(0)
    student = load_causal_lm(config.model.student, seed=0)
    teacher = load_causal_lm(config.model.teacher, seed=0).eval()
    objective = make_objective(
        config.objective,
        teacher=teacher,
        student=student,
        tokenizers=(data.tokenizer, data.teacher_tokenizer),
    )
    batch = collate([data.train[i] for i in range(5)])
    counts = {k: max(int(v), 1) for k, v in zip(COUNTS, batch_counts(batch).tolist())}
    hidden = student(batch["input_ids"], batch["attention_mask"])
    loss = objective.loss(hidden, student.head(), batch, objective.prepare(batch, []), counts)
    params = list(student.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    s_hidden = student(batch["input_ids"], batch["attention_mask"])
    s_logits = student.head().logits(s_hidden)
    with torch.no_grad():
        t_hidden = teacher(batch["teacher_input_ids"], batch["teacher_attention_mask"])
        t_logits = teacher.head().logits(t_hidden)
    projection = objective.trainable().get("projection")
    expected = _reference_loss(
        kind,
        config,
        s_logits,
        t_logits,
        batch,
        (data.tokenizer, data.teacher_tokenizer),
        (s_hidden, t_hidden),
        projection,
    )
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    torch.testing.assert_close(loss, expected.float(), rtol=2e-5, atol=1e-6)
    for param, grad, want in zip(params, grads, expected_grads):
        zero = torch.zeros_like(param)
        got, want = (zero if g is None else g for g in (grad, want))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("kind", ["ce", "uld", "gold", "gold_hybrid", "alm", "ot"])
def test_cross_tokenizer_run_trains_and_evaluates_without_teacher_metrics(
    tiny, cross, tmp_path, kind
):
    out = str(tmp_path / kind)
    tree = tiny.config(out, objective={"kind": kind, "hard_weight": 0.5 if kind == "ot" else 0.0})
    tree["model"].update(teacher=cross[1], teacher_tokenizer=cross[0])
    result = distill(tree)
    losses = [r["loss"] for r in read_jsonl(os.path.join(out, "log.jsonl"))]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert "ce" in result["eval"] and "kl" not in result["eval"]
    assert os.path.isfile(os.path.join(out, "model", "model.safetensors"))


def test_ot_projection_is_trained_checkpointed_and_resumed(tiny, cross, tmp_path):
    def tree(out):
        t = tiny.config(out, objective={"kind": "ot", "hard_weight": 0.2}, train={"steps": 4})
        t["model"].update(teacher=cross[1], teacher_tokenizer=cross[0])
        return t

    whole = str(tmp_path / "whole")
    distill(tree(whole))
    part = str(tmp_path / "part")
    distill(tree(part), callbacks=[lambda step, record: step == 2])
    resumed = distill(tree(part))
    assert resumed["resumed"] and resumed["steps_run"] == 2
    losses = [[r["loss"] for r in read_jsonl(os.path.join(d, "log.jsonl"))] for d in (whole, part)]
    assert losses[0] == losses[1]
    from fastkd.train.checkpoint import latest_checkpoint, load_checkpoint

    state = load_checkpoint(latest_checkpoint(os.path.join(whole, "checkpoints")), 0)["model"]
    projection = [k for k in state if "objective_modules.projection" in k]
    assert projection, sorted(state)[:5]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"objective": {"kind": "kd"}}, "teacher_tokenizer gives the teacher a tokenizer"),
        ({"objective": {"kind": "sparse"}}, "teacher_tokenizer gives the teacher a tokenizer"),
        (
            {"objective": {"kind": "alm"}, "onpolicy": {"student_fraction": 0.5}},
            "on-policy generation",
        ),
        ({"objective": {"kind": "ot", "temperature": 2.0}}, "compares hidden states"),
        ({"objective": {"kind": "ot", "ot_eps": 0.0}}, "objective.ot_eps"),
        ({"objective": {"kind": "ot", "ot_prior_weight": -1.0}}, "objective.ot_prior_weight"),
    ],
)
def test_config_errors(tiny, cross, change, match):
    tree = tiny.config("unused")
    tree["model"].update(teacher=cross[1], teacher_tokenizer=cross[0])
    for section, values in change.items():
        tree[section] = {**tree.get(section, {}), **values}
    with pytest.raises(ConfigError, match=match):
        load_config(tree)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["uld", "gold", "gold_hybrid", "alm", "ot"])
def test_objective_on_cuda_equals_cpu(tiny, cross, kind):
    """Every cross-tokenizer objective on the GPU (its kernels: fused_linear_logprobs, the
    Sinkhorn solver) against the same loss and head gradient on the CPU."""
    tree = tiny.config("unused", objective={"kind": kind, "hard_weight": 0.25})
    tree["model"].update(teacher=cross[1], teacher_tokenizer=cross[0])
    config = load_config(tree)
    data = load_data(config)
    batch = collate([data.train[i] for i in range(4)])
    counts = {k: max(int(v), 1) for k, v in zip(COUNTS, batch_counts(batch).tolist())}
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        student = load_causal_lm(config.model.student, seed=0).to(device)
        teacher = load_causal_lm(config.model.teacher, seed=0).to(device).eval()
        objective = make_objective(
            config.objective,
            teacher=teacher,
            student=student,
            tokenizers=(data.tokenizer, data.teacher_tokenizer),
        )
        on = {k: v.to(device) for k, v in batch.items()}
        hidden = student(on["input_ids"], on["attention_mask"])
        loss = objective.loss(hidden, student.head(), on, objective.prepare(on, []), counts)
        (grad,) = torch.autograd.grad(loss, student.head().weight)
        results.append((loss.cpu(), grad.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-3, atol=1e-6)
