"""fastkd.integrations.trl with TRL's GOLD trainer (trl from PyPI, the `test` extra): a student
and a teacher with their own byte-level BPE tokenizers (trained here), GOLD's ULD, hybrid ULD
and same-tokenizer JSD losses computed by TRL's code and by fastkd's, on batches made by TRL's
own dataset preparation and collator; a few training steps with each; the peak memory of one
step at a large vocabulary."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from helpers import extra_peak_kb

pytestmark = pytest.mark.slow  # importing trl and building a GOLDTrainer take seconds each

PAIRS = [
    ("The quick brown fox", " jumps over the lazy dog."),
    ("Translate: chat", " le chat noir, 猫, 🐈 and naïve café"),
    ("def f(x):", "\n    return x * 2  # twice"),
    ("Q: 2+2?", " A: 4"),
    ("Zen:", " Beautiful is better than ugly. Explicit is better than implicit."),
    ("Spaces", "   three leading, two trailing  "),
]


def _corpus():
    """Text that ships with Python: the builtins' docstrings, and the pairs themselves."""
    docs = [inspect.getdoc(t) for t in (str, dict, list, int, bytes, set, open, print)]
    return docs + [p + c for p, c in PAIRS]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from fastkd.train.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("gold_tokenizers")
    student = train_bpe_tokenizer(_corpus(), 300, str(root / "student"))
    teacher = train_bpe_tokenizer(_corpus() * 2, 420, str(root / "teacher"))
    return student, teacher, str(root / "teacher")


def _llama(vocab, hidden, seed):
    from test_integrations_trl import _llama as llama

    return llama(vocab, hidden, seed)


def _dataset():
    import datasets

    return datasets.Dataset.from_list([{"prompt": p, "completion": c} for p, c in PAIRS])


def _config(tmp_path, **overrides):
    from trl.experimental.gold import GOLDConfig

    settings = dict(
        output_dir=str(tmp_path / "gold"),
        max_steps=3,
        per_device_train_batch_size=3,
        learning_rate=0.5,
        optim="sgd",  # parameters differ as gradients do (see test_integrations_trl)
        lr_scheduler_type="constant",
        lmbda=0.0,  # off-policy: the data's completions, no generation
        seq_kd=False,
        use_uld_loss=True,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        max_length=64,
        max_completion_length=32,
        disable_dropout=True,
        bf16=False,  # TRL's configs default to bf16 autocast
        gradient_checkpointing=False,  # GOLD's default is True: tiny models need none
        dataset_num_proc=None,
    )
    settings.update(overrides)
    return GOLDConfig(**settings)


def _trainer(kind, tokenizers, tmp_path, student, teacher, **overrides):
    from fastkd.integrations import trl as fastkd_trl

    s_tok, _, teacher_path = tokenizers
    gold = fastkd_trl.gold_trainer_class()
    cls = fastkd_trl.FastKDGOLDTrainer if kind == "subclass" else gold
    trainer = cls(
        model=student,
        teacher_model=teacher,
        args=_config(tmp_path, teacher_tokenizer_name_or_path=teacher_path, **overrides),
        train_dataset=_dataset(),
        processing_class=s_tok,
    )
    if kind == "apply":
        assert fastkd_trl.apply_fastkd_to_gold_trainer(trainer) is trainer
    return trainer


# (GOLDConfig overrides): ULD by byte-offset groups (GOLD's default), positional ULD, the hybrid
# with TRL's default and with fixed weights, temperatures and the cross-entropy term, EOS kept.
CASES = [
    {},
    {"use_extended_uld": False},
    {"uld_use_hybrid_loss": True, "beta": 0.3},
    {
        "uld_use_hybrid_loss": True,
        "uld_hybrid_matched_weight": 0.7,
        "uld_hybrid_unmatched_weight": 0.4,
    },
    {
        "uld_student_temperature": 0.7,
        "uld_teacher_temperature": 1.6,
        "uld_crossentropy_weight": 0.25,
        "uld_distillation_weight": 2.0,
    },
    {"uld_skip_student_eos": False, "uld_skip_teacher_eos": False},
    {"use_uld_loss": False, "temperature": 0.8, "beta": 0.4},
]


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: ",".join(o) or "defaults")
def test_compute_loss_equals_trl_s_value_and_gradient(tokenizers, tmp_path, overrides):
    """TRL's own compute_loss in float64 (the exact value) against fastkd's in float32, on a
    batch from the trainer's own data pipeline: the loss and every student gradient."""
    pytest.importorskip("trl")
    from fastkd.integrations.trl import gold_compute_loss

    s_tok, t_tok, _ = tokenizers
    same = overrides.get("use_uld_loss") is False
    student = _llama(len(s_tok), 32, 0)
    teacher = _llama(len(s_tok) if same else len(t_tok), 48, 1)
    # Copied before the trainer exists: accelerate's prepare replaces the instance's forward by
    # one bound to the instance, which a later deepcopy would keep calling.
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    trainer = _trainer("trl", tokenizers, tmp_path, student, teacher, **overrides)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["labels"].ne(-100).any(1).all()
    gold = type(trainer)
    trainer.teacher_model = teacher64
    exact = gold.compute_loss(trainer, student64, batch)
    exact_grads = torch.autograd.grad(exact, list(student64.parameters()))
    trainer.teacher_model = teacher
    ours = gold_compute_loss(trainer, student, batch)
    grads = torch.autograd.grad(ours, list(student.parameters()))
    assert ours.dtype == torch.float32 and exact.dtype == torch.float64 and float(exact) > 1e-3
    torch.testing.assert_close(ours.double(), exact, rtol=2e-5, atol=1e-7)
    for (name, _), g, e in zip(student.named_parameters(), grads, exact_grads):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6, msg=name)


def _train(kind, tokenizers, tmp_path, student, teacher):
    trainer = _trainer(kind, tokenizers, tmp_path, student, teacher)
    losses, compute_loss = [], trainer.compute_loss

    def recorded(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recorded
    trainer.train()
    return losses, trainer.model


def test_gold_trainer_with_fastkd_trains_like_trl_s_own_loss(tokenizers, tmp_path):
    pytest.importorskip("trl")
    s_tok, t_tok, _ = tokenizers
    student, teacher = _llama(len(s_tok), 32, 0), _llama(len(t_tok), 48, 1)
    trl_losses, trl_model = _train("trl", tokenizers, tmp_path, copy.deepcopy(student), teacher)
    assert len(trl_losses) == 3 and min(trl_losses) > 1e-3
    for kind in ("subclass", "apply"):
        losses, model = _train(kind, tokenizers, tmp_path, copy.deepcopy(student), teacher)
        torch.testing.assert_close(losses, trl_losses, rtol=1e-5, atol=0)
        for (name, p), q in zip(model.named_parameters(), trl_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_refuses_what_it_does_not_compute(tokenizers, tmp_path):
    pytest.importorskip("trl")
    from fastkd.integrations.trl import apply_fastkd_to_gold_trainer, gold_compute_loss

    s_tok, t_tok, _ = tokenizers
    trainer = _trainer(
        "trl",
        tokenizers,
        tmp_path,
        _llama(len(s_tok), 32, 0),
        _llama(len(t_tok), 48, 1),
        uld_token_merge_strategy="bayesian",
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with pytest.raises(NotImplementedError, match="uld_token_merge_strategy='observed'"):
        gold_compute_loss(trainer, trainer.model, batch)
    with pytest.raises(TypeError, match="takes a trl GOLDTrainer; got object"):
        apply_fastkd_to_gold_trainer(object())


_PEAK_SCRIPT = r"""
import copy, sys, tempfile, torch
sys.path.insert(0, "tests")
import test_integrations_trl_gold as t
from test_integrations_trl import _llama
which = sys.argv[1]
with tempfile.TemporaryDirectory() as root:
    from fastkd.train.tokenizer import train_bpe_tokenizer
    s_tok = train_bpe_tokenizer(t._corpus(), 300, root + "/s")
    t_tok = train_bpe_tokenizer(t._corpus() * 2, 420, root + "/t")
    # Large head vocabularies over the small tokenizers: the logits are what differs.
    vocab = 32000
    student, teacher = _llama(vocab, 64, 0, init=0.02), _llama(vocab, 64, 1, init=0.02)
    trainer = t._trainer("trl", (s_tok, t_tok, root + "/t"), __import__("pathlib").Path(root),
                         student, teacher, per_device_train_batch_size=6, max_length=256)
    batch = next(iter(trainer.get_train_dataloader()))
    if which == "trl":
        compute_loss = lambda: type(trainer).compute_loss(trainer, student, batch)
    else:
        from fastkd.integrations.trl import gold_compute_loss
        compute_loss = lambda: gold_compute_loss(trainer, student, batch)

    def rss_kb(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))

    compute_loss().backward()  # warm-up: first-call allocations
    student.zero_grad(set_to_none=False)
    base = rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    compute_loss().backward()
    print(rss_kb("VmHWM") - base)
"""


def test_fastkd_step_peaks_lower_than_trl_s_at_a_large_vocabulary():
    pytest.importorskip("trl")
    extra = {which: extra_peak_kb(_PEAK_SCRIPT, which) for which in ("trl", "fastkd")}
    assert extra["fastkd"] < extra["trl"] / 2, extra
