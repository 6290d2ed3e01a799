"""On-policy distillation in the trainer (``onpolicy`` section): the coin, the generated
sequences' layout, no wasted generation, exact resume, and GKD's loss against TRL's own."""

import json
import os

import pytest
import torch

from fastkd.train import distill
from fastkd.train.config import Config, ConfigError, OnPolicyConfig
from fastkd.train.data import IGNORE_INDEX, Document, tokenize_documents
from fastkd.train.onpolicy import OnPolicy, prompt_lengths, sequences_batch

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pairs(tiny, tmp_path_factory):
    """prompt/completion records cut from the tiny corpus."""
    path = os.path.join(tmp_path_factory.mktemp("pairs"), "pairs.jsonl")
    with open(tiny.corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            for start in range(0, min(len(text), 2000), 200):
                piece = text[start : start + 200]
                if len(piece) > 60:
                    f.write(json.dumps({"prompt": piece[:20], "completion": piece[20:]}) + "\n")
    return path


def _config(tiny, pairs, out, **onpolicy):
    tree = tiny.config(
        out,
        onpolicy=onpolicy,
        objective={"kind": "kd", "divergence": "jsd", "beta": 0.5},
        train={"steps": 4, "micro_batch_size": 2, "grad_accum": 2},
        checkpoint={"every": 1},
    )
    tree["data"]["train"] = [pairs]
    return tree


def test_prompt_lengths_end_at_the_first_label():
    labels = torch.full((3, 6), IGNORE_INDEX)
    labels[0, 2:] = 7  # the prompt's last token is at position 2
    labels[1, 0:] = 7  # a packed block: its first token is the prompt
    assert prompt_lengths(labels).tolist() == [3, 1, 6]
    assert prompt_lengths(labels, 4).tolist() == [4, 4, 6]
    assert prompt_lengths(labels, 10).tolist() == [5, 5, 6]  # one token left to generate
    # Never into the padding: row 1 has 3 real tokens (its labels end at position 2).
    labels[1, 3:] = IGNORE_INDEX
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1] * 6])
    assert prompt_lengths(labels, 5, mask).tolist() == [5, 3, 6]


def test_sequences_are_laid_out_as_the_data_pairs(tiny):
    from fastkd.train.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny.tokenizer)
    prompt, completion = "The quick brown", " fox jumps over the lazy dog"
    p = torch.tensor(tok(prompt, add_special_tokens=False)["input_ids"])
    c = torch.tensor(tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    # The completion cut after its first token, in its middle, and whole with padding after it.
    for seq_len in (len(p), len(p) + len(c) // 2, len(p) + len(c) + 3):
        data = tokenize_documents(
            [Document(prompt=prompt, completion=completion)], tok, seq_len=seq_len
        )
        got = sequences_batch([p], [c], seq_len=seq_len, pad_id=tok.pad_token_id)
        assert torch.equal(got["input_ids"], data.input_ids)
        assert torch.equal(got["labels"], data.labels)
        assert torch.equal(got["attention_mask"], data.attention_mask)
        assert prompt_lengths(got["labels"]).item() == len(p)


class _Stub:
    """A CausalLM stand-in whose ``model.generate`` records its calls and appends fixed tokens."""

    def __init__(self, tokens, fail=False):
        self.calls, self.tokens, self.fail = [], tokens, fail
        parent = self

        class Model(torch.nn.Module):
            def generate(self, input_ids, attention_mask, generation_config, **kwargs):
                if parent.fail:
                    raise AssertionError("this model must not generate")
                max_new_tokens = generation_config.max_new_tokens
                parent.calls.append((input_ids.clone(), attention_mask.clone(), max_new_tokens))
                new = torch.tensor(parent.tokens[:max_new_tokens]).expand(len(input_ids), -1)
                return torch.cat([input_ids, new], 1)

        self.model = Model()


def _onpolicy(student, teacher=None, **kwargs):
    return OnPolicy(
        OnPolicyConfig(**kwargs), student=student, teacher=teacher, seed=3, pad_id=0, eos_id=1
    )


def test_generation_uses_left_padded_prompts_and_stops_after_eos():
    student = _Stub([5, 6, 1, 0, 0, 0])
    policy = _onpolicy(student, student_fraction=1.0, max_new_tokens=5)
    labels = torch.full((2, 8), IGNORE_INDEX)
    labels[0, 1:5] = 9  # prompt of 2 tokens
    labels[1, 3:5] = 9  # prompt of 4 tokens
    batch = {
        "input_ids": torch.arange(10, 26).view(2, 8),
        "labels": labels,
        "attention_mask": torch.ones(2, 8, dtype=torch.int64),
    }
    new, source = policy.rewrite(batch, step=0, micro=0)
    assert source == "student"
    ids, mask, max_new = student.calls[0]
    assert ids.tolist() == [[0, 0, 10, 11], [18, 19, 20, 21]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert max_new == 5  # min(max_new_tokens, 8 + 1 - 2)
    # prompt + [5, 6, 1]: the eos ends the completion and is its last label
    assert new["input_ids"][0].tolist() == [10, 11, 5, 6, 0, 0, 0, 0]
    assert new["labels"][0].tolist() == [-100, 5, 6, 1] + [-100] * 4
    assert new["input_ids"][1].tolist() == [18, 19, 20, 21, 5, 6, 0, 0]
    assert new["labels"][1].tolist() == [-100] * 3 + [5, 6, 1, -100, -100]


def test_the_completion_is_cut_at_the_sequence_length():
    student = _Stub([5, 6, 7, 8, 9, 4])
    policy = _onpolicy(student, student_fraction=1.0, max_new_tokens=6)
    labels = torch.full((1, 4), IGNORE_INDEX)
    labels[0, 1:] = 9
    batch = {
        "input_ids": torch.tensor([[10, 11, 12, 13]]),
        "labels": labels,
        "attention_mask": torch.ones(1, 4, dtype=torch.int64),
    }
    new, _ = policy.rewrite(batch, step=0, micro=0)
    assert student.calls[0][2] == 3  # 4 + 1 - 2 tokens of room
    assert new["input_ids"].tolist() == [[10, 11, 5, 6]]
    assert new["labels"].tolist() == [[-100, 5, 6, 7]]


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_the_coin_is_deterministic_and_has_the_asked_probability(fraction):
    policy = _onpolicy(_Stub([1]), student_fraction=fraction)
    draws = [policy.source(step, micro) for step in range(2000) for micro in range(2)]
    assert draws == [policy.source(step, micro) for step in range(2000) for micro in range(2)]
    share = draws.count("student") / len(draws)
    # 4000 draws: the binomial standard deviation is at most 0.008
    assert abs(share - fraction) <= 0.035


def test_the_teacher_generates_only_when_the_student_does_not():
    student, teacher = _Stub([5, 1]), _Stub([7, 1])
    policy = _onpolicy(student, teacher, student_fraction=0.5, teacher_sequences=True)
    labels = torch.full((1, 6), IGNORE_INDEX)
    labels[0, 2:] = 9
    batch = {
        "input_ids": torch.arange(6)[None],
        "labels": labels,
        "attention_mask": torch.ones(1, 6, dtype=torch.int64),
    }
    sources = [policy.rewrite(batch, step, 0)[1] for step in range(40)]
    assert set(sources) == {"student", "teacher"}
    assert len(student.calls) == sources.count("student")
    assert len(teacher.calls) == sources.count("teacher")
    only_student = _onpolicy(
        _Stub([5, 1]), _Stub([7, 1], fail=True), student_fraction=1.0, teacher_sequences=True
    )
    assert {only_student.rewrite(batch, step, 0)[1] for step in range(10)} == {"student"}


@pytest.mark.parametrize(
    "section, message",
    [
        ({"student_fraction": 1.5}, "onpolicy.student_fraction = 1.5"),
        ({"top_p": 0.0}, "in (0.0, 1.0]"),
        ({"max_new_tokens": 0}, "onpolicy.max_new_tokens = 0"),
    ],
)
def test_bad_onpolicy_options_name_the_key(tiny, tmp_path, section, message):
    tree = tiny.config(str(tmp_path), onpolicy=section)
    with pytest.raises(
        ConfigError,
        match=message.replace("(", r"\(")
        .replace("[", r"\[")
        .replace("]", r"\]")
        .replace(".", r"\."),
    ):
        Config.from_dict(tree)


def test_onpolicy_needs_an_online_teacher(tiny, tmp_path):
    tree = tiny.config(str(tmp_path), objective={"kind": "ce"}, onpolicy={"student_fraction": 0.5})
    with pytest.raises(ConfigError, match="needs an online teacher"):
        Config.from_dict(tree)


def _losses(out):
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_gkd_run_generates_and_resumes_exactly(tiny, pairs, tmp_path):
    whole = str(tmp_path / "whole")
    result = distill(_config(tiny, pairs, whole, student_fraction=0.5, max_new_tokens=12))
    records = _losses(whole)
    assert result["step"] == 4 and len(records) == 4
    counts = [r["completions"] for r in records]
    assert all(sum(c.values()) == 2 and c["teacher"] == 0 for c in counts)
    assert 0 < sum(c["student"] for c in counts) < 8
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)

    parts = str(tmp_path / "parts")
    distill(
        _config(tiny, pairs, parts, student_fraction=0.5, max_new_tokens=12),
        callbacks=[lambda step, record: step == 2],
    )
    distill(_config(tiny, pairs, parts, student_fraction=0.5, max_new_tokens=12))
    assert [r["loss"] for r in _losses(parts)] == [r["loss"] for r in records]
    assert [r["completions"] for r in _losses(parts)] == counts


@pytest.mark.slow
def test_gkd_loss_equals_trls_generalized_jsd(tiny, pairs, tmp_path):
    """The kd objective with divergence jsd on a student-generated batch is TRL's GKD loss
    (its own ``generalized_jsd_loss`` on full logits) at the same beta and temperature."""
    from fastkd.bench.distill_step import _trl_loss
    from fastkd.train.distributed import init_distributed
    from fastkd.train.loop import _Run

    generalized_jsd_loss = _trl_loss()
    if generalized_jsd_loss is None:
        pytest.skip("trl is not installed")

    tree = _config(tiny, pairs, str(tmp_path / "run"), student_fraction=1.0, max_new_tokens=10)
    tree["objective"]["temperature"] = 0.7
    config = Config.from_dict(tree)
    dist_info = init_distributed("cpu")
    try:
        run = _Run(config, dist_info, None)
        batch = {k: v for k, v in run.data.train[0].items()}
        batch = {k: torch.stack([v, run.data.train[1][k]]) for k, v in batch.items()}
        new, source = run.onpolicy.rewrite(batch, 0, 0)
        assert source == "student"
        num = (new["labels"] != IGNORE_INDEX).sum()
        ours = run.step_module(new, run.objective.prepare(new, [0, 1]), {"tokens": num})
        with torch.no_grad():
            s_logits = run.student.model_logits(new["input_ids"], new["attention_mask"])
            t_logits = run.teacher.model_logits(new["input_ids"], new["attention_mask"])
        theirs = generalized_jsd_loss(
            s_logits, t_logits, labels=new["labels"], beta=0.5, temperature=0.7
        )
        torch.testing.assert_close(ours.detach(), theirs.float(), rtol=2e-5, atol=1e-6)
    finally:
        dist_info.close()


def _batch(rows, seq_len=6, first_label=2, offset=0):
    labels = torch.full((rows, seq_len), IGNORE_INDEX)
    labels[:, first_label:] = 9
    return {
        "input_ids": torch.arange(rows * seq_len).view(rows, seq_len) + offset,
        "labels": labels,
        "attention_mask": torch.ones(rows, seq_len, dtype=torch.int64),
    }


def test_the_replay_buffer_is_first_in_first_out_and_draws_distinct_rows():
    from fastkd.train.onpolicy import ReplayBuffer

    buffer = ReplayBuffer(5)
    for i in range(4):
        buffer.push(_batch(2, offset=100 * i))
    assert len(buffer) == 5 and buffer.full
    # the newest five rows: the last of batch 1, both of batches 2 and 3
    assert buffer.rows["input_ids"][:, 0].tolist() == [106, 200, 206, 300, 306]
    drawn = buffer.sample(5, seed=1, device=torch.device("cpu"))
    assert sorted(drawn["input_ids"][:, 0].tolist()) == [106, 200, 206, 300, 306]
    assert torch.equal(
        buffer.sample(3, 7, torch.device("cpu"))["labels"],
        buffer.sample(3, 7, torch.device("cpu"))["labels"],
    )
    again = ReplayBuffer(5)
    again.load_state_dict(buffer.state_dict())
    assert all(torch.equal(again.rows[k], buffer.rows[k]) for k in buffer.rows)
    with pytest.raises(ValueError, match="cannot draw 6 sequences"):
        buffer.sample(6, 0, torch.device("cpu"))


def test_the_adaptive_schedule_fills_the_buffer_then_replays_it():
    student = _Stub([5, 1])
    policy = _onpolicy(student, student_fraction=0.5, schedule="adaptive", buffer_size=4)
    steps = 100
    first = [policy.rewrite(_batch(2), s, 0, steps)[1] for s in range(40)]
    # Until the buffer holds 4 sequences, every r < 0.5 generates afresh.
    assert first.count("replay") > 0
    assert first[: first.index("replay")].count("student") >= 2
    # Late in the run (replay "decreasing": fresh below 0.5 * (1 - 0.9) = 0.05) the student's
    # micro-batches are nearly all replays.
    late = [policy.source(s, m, steps) for s in range(90, 100) for m in range(4)]
    assert late.count("replay") >= 10 and late.count("student") <= 4

    # The share only grows on a held-out CE at least the tolerance above the reference.
    assert policy.share == 0.5
    policy.observe_heldout(3.0)
    policy.observe_heldout(3.05)
    assert policy.share == 0.5 and policy.reference == 3.0
    policy.observe_heldout(3.1)
    assert policy.share == pytest.approx(0.6) and policy.reference == 3.1
    for _ in range(10):
        policy.observe_heldout(policy.reference + 1)
    assert policy.share == 1.0


@pytest.mark.slow
def test_adaptive_run_replays_and_resumes_exactly(tiny, pairs, tmp_path, monkeypatch):
    # Every evaluation reports a held-out CE 1 nat above the reference, so the share grows at
    # each one and its restoring on resume is tested (the tiny student's CE only falls).
    real = OnPolicy.observe_heldout
    monkeypatch.setattr(
        OnPolicy,
        "observe_heldout",
        lambda self, ce: real(self, ce if self.reference is None else self.reference + 1.0),
    )

    def config(out):
        tree = _config(
            tiny,
            pairs,
            out,
            student_fraction=0.6,
            schedule="adaptive",
            buffer_size=2,
            max_new_tokens=8,
            adaptive_tolerance=0.0,
        )
        tree["train"]["steps"] = 6
        tree["eval"] = {"every": 2, "batch_size": 4, "max_batches": 1}
        return tree

    whole = str(tmp_path / "whole")
    distill(config(whole))
    records = _losses(whole)
    assert sum(r["completions"]["replay"] for r in records) > 0
    shares = [r["student_share"] for r in records]
    assert shares == pytest.approx([0.6, 0.6, 0.7, 0.7, 0.8, 0.8])
    parts = str(tmp_path / "parts")
    distill(config(parts), callbacks=[lambda step, record: step == 3])
    distill(config(parts))
    resumed = _losses(parts)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in records]
    assert [r["completions"] for r in resumed] == [r["completions"] for r in records]
    assert [r["student_share"] for r in resumed] == [r["student_share"] for r in records]


def test_an_external_generate_hook_replaces_hugging_face_generate():
    calls = []

    def engine(model, prompts, *, source, max_new_tokens, temperature, top_p, eos_id):
        calls.append((source, [p.tolist() for p in prompts], max_new_tokens, eos_id))
        return [[7, 8, eos_id, 9]] + [torch.tensor([6] * 20)] * (len(prompts) - 1)

    student = _Stub([5], fail=True)
    policy = OnPolicy(
        OnPolicyConfig(student_fraction=1.0, max_new_tokens=4),
        student=student,
        teacher=None,
        seed=0,
        pad_id=0,
        eos_id=1,
        generate=engine,
    )
    new, source = policy.rewrite(_batch(2, seq_len=8), 0, 0)
    assert calls == [("student", [[0, 1, 2], [8, 9, 10]], 4, 1)]
    assert new["labels"][0].tolist() == [-100, -100, 7, 8, 1, -100, -100, -100]
    assert new["labels"][1].tolist() == [-100, -100, 6, 6, 6, 6, -100, -100]
    with pytest.raises(ValueError, match="returned 1 completions for 2 prompts"):
        OnPolicy(
            policy.config,
            student=student,
            teacher=None,
            seed=0,
            pad_id=0,
            eos_id=1,
            generate=lambda *a, **k: [[1]],
        ).rewrite(_batch(2, seq_len=8), 0, 0)


def _run(tiny, pairs, tmp_path, **objective):
    from fastkd.train.distributed import init_distributed
    from fastkd.train.loop import _Run

    tree = _config(tiny, pairs, str(tmp_path / "run"), student_fraction=1.0, max_new_tokens=10)
    tree["objective"] = objective
    dist_info = init_distributed("cpu")
    run = _Run(Config.from_dict(tree), dist_info, None)
    batch = {k: torch.stack([run.data.train[i][k] for i in range(3)]) for k in run.data.train[0]}
    new, source = run.onpolicy.rewrite(batch, 0, 0)
    assert source == "student"
    return run, dist_info, new


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "reward"])
def test_sampled_reverse_kl_objective_equals_the_plain_estimator(tiny, pairs, tmp_path, estimator):
    run, dist_info, batch = _run(tiny, pairs, tmp_path, kind="sampled_rkl", estimator=estimator)
    try:
        num = (batch["labels"] != IGNORE_INDEX).sum()
        ours = run.step_module(batch, run.objective.prepare(batch, [0, 1, 2]), {"tokens": num})
        ours.backward()
        got = {n: p.grad.clone() for n, p in run.student.named_parameters()}
        run.student.zero_grad()
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        safe = labels.clamp(min=0)[..., None]
        log_q = torch.log_softmax(
            run.student.model_logits(batch["input_ids"], batch["attention_mask"]).float(), -1
        ).gather(-1, safe)[..., 0]
        with torch.no_grad():
            log_p = torch.log_softmax(
                run.teacher.model_logits(batch["input_ids"], batch["attention_mask"]).float(), -1
            ).gather(-1, safe)[..., 0]
        r = log_p - log_q
        per_token = {
            "k1": -r,
            "k2": 0.5 * r * r,
            "k3": torch.exp(r) - 1 - r,
            "reward": -r.detach() - r.detach() * (log_q - log_q.detach()),
        }[estimator]
        want = per_token[mask].sum() / num
        want.backward()
        torch.testing.assert_close(ours.detach(), want.detach(), rtol=2e-5, atol=1e-6)
        for n, p in run.student.named_parameters():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    finally:
        dist_info.close()


def test_teacher_topk_of_the_whole_vocabulary_is_the_forward_kl(tiny, pairs, tmp_path):
    """With every id kept the tail is empty and the sparse loss is KL(teacher || student)."""
    run, dist_info, batch = _run(tiny, pairs, tmp_path, kind="teacher_topk", topk=tiny.vocab_size)
    try:
        num = (batch["labels"] != IGNORE_INDEX).sum()
        ours = run.step_module(batch, run.objective.prepare(batch, [0, 1, 2]), {"tokens": num})
        from fastkd import kd_loss

        with torch.no_grad():
            s_logits = run.student.model_logits(batch["input_ids"], batch["attention_mask"])
            t_logits = run.teacher.model_logits(batch["input_ids"], batch["attention_mask"])
        want = kd_loss(
            s_logits, t_logits, labels=batch["labels"], divergence="fkl", backend="torch"
        )
        torch.testing.assert_close(ours.detach(), want, rtol=1e-4, atol=1e-6)
    finally:
        dist_info.close()


@pytest.mark.parametrize(
    "section, message",
    [
        (
            {"objective": {"kind": "sampled_rkl"}, "onpolicy": {"student_fraction": 0.5}},
            "set onpolicy.student_fraction = 1",
        ),
        (
            {
                "objective": {"kind": "sampled_rkl"},
                "onpolicy": {"student_fraction": 1.0, "temperature": 0.7},
            },
            "onpolicy.temperature = 1 and top_p = 1",
        ),
        (
            {
                "objective": {"kind": "sampled_rkl", "hard_weight": 0.1},
                "onpolicy": {"student_fraction": 1.0},
            },
            "no data label",
        ),
        ({"objective": {"kind": "teacher_topk", "temperature": 2.0}}, "at temperature 1"),
        ({"objective": {"kind": "teacher_topk", "topk": 0}}, "objective.topk = 0"),
    ],
)
def test_bad_sparse_onpolicy_configs_say_why(tiny, tmp_path, section, message):
    tree = tiny.config(str(tmp_path), **section)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Config.from_dict(tree)
