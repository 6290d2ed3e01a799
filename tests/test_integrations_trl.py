"""fastkd.integrations.trl: TRL's GKDTrainer (trl from PyPI, the `test` extra) trained a few
steps on tiny random Llama models with TRL's own loss and with fastkd's, on the same seed and
data; and the peak memory of one step at a large vocabulary."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import extra_peak_kb

VOCAB, SEQ, ROWS = 96, 16, 12


def _llama(vocab, hidden, seed, init=0.2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # initializer_range 0.2 (10x the default) spreads the logits, so that the losses are not
    # ~1e-3 nats of near-uniform distributions where fp32 cancellation dominates TRL's value.
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
            initializer_range=init,
        )
    )


def _dataset():
    """Rows with a masked prompt (labels -100) and, every third row, right padding."""
    import datasets

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(ROWS):
        ids = torch.randint(2, VOCAB, (SEQ,), generator=g)
        labels, mask = ids.clone(), torch.ones(SEQ, dtype=torch.long)
        labels[:5] = -100
        if i % 3 == 0:
            mask[-3:], labels[-3:] = 0, -100
        rows.append(
            {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
        )
    return datasets.Dataset.from_list(rows)


def _collate(batch):
    return {
        k: torch.tensor([r[k] for r in batch]) for k in ("input_ids", "attention_mask", "labels")
    }


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t2")),
        pad_token="t0",
        eos_token="t1",
    )


def _train(kind, student, teacher, tmp_path, beta):
    """(logged losses, trained student) of 3 steps of GKDTrainer, fastkd's subclass, or a
    GKDTrainer patched by apply_fastkd_to_gkd_trainer."""
    from fastkd.integrations import trl as fastkd_trl

    gkd = fastkd_trl.gkd_trainer_class()
    from trl.experimental.gkd import GKDConfig

    # SGD: its update is lr x gradient, so parameters differ as the gradients do (AdamW's
    # g / sqrt(v) turns fp32 noise in near-zero gradients into steps of size lr).
    args = GKDConfig(
        output_dir=str(tmp_path / kind),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        lmbda=0.0,
        seq_kd=False,
        beta=beta,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        max_length=SEQ,
        disable_dropout=True,
        bf16=False,
    )  # TRL's configs default to bf16 autocast
    cls = fastkd_trl.FastKDGKDTrainer if kind == "subclass" else gkd
    trainer = cls(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=_dataset(),
        processing_class=_tokenizer(),
        data_collator=_collate,
    )
    if kind == "apply":
        assert fastkd_trl.apply_fastkd_to_gkd_trainer(trainer) is trainer
    losses, compute_loss = [], trainer.compute_loss

    def recorded(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recorded
    trainer.train()
    return losses, trainer.model


@pytest.mark.slow  # about 40 s: importing trl, then three trainings
@pytest.mark.parametrize("beta", [0.3])
def test_gkd_trainer_with_fastkd_trains_like_trl_s_own_loss(tmp_path, beta):
    pytest.importorskip("trl")
    student, teacher = _llama(VOCAB, 32, 0), _llama(VOCAB, 48, 1)
    trl_losses, trl_model = _train("trl", copy.deepcopy(student), teacher, tmp_path, beta)
    assert len(trl_losses) == 3 and min(trl_losses) > 0.05  # spread distributions (see _llama)
    for kind in ("subclass", "apply"):
        losses, model = _train(kind, copy.deepcopy(student), teacher, tmp_path, beta)
        torch.testing.assert_close(losses, trl_losses, rtol=1e-5, atol=0)
        for (name, p), q in zip(model.named_parameters(), trl_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow  # about 10 s: importing trl, one step with each loss
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_compute_loss_equals_trl_s_value_and_gradient(beta):
    """One compute_loss of each on the same batch: the value and the student's gradients, with
    and without num_items_in_batch (the Trainer's count for gradient accumulation)."""
    pytest.importorskip("trl")
    from types import SimpleNamespace

    from fastkd.integrations.trl import gkd_compute_loss, gkd_trainer_class

    gkd = gkd_trainer_class()
    student, teacher = _llama(VOCAB, 32, 0).double(), _llama(VOCAB, 48, 1).double()
    student_32, teacher_32 = copy.deepcopy(student).float(), copy.deepcopy(teacher).float()
    inputs = _collate(_dataset().select(range(5)))
    for num_items in (None, torch.tensor(37)):
        # TRL's own compute_loss in float64 is the exact value; fastkd runs in fp32.
        stub = SimpleNamespace(
            teacher_model=teacher, beta=beta, generalized_jsd_loss=gkd.generalized_jsd_loss
        )
        exact = gkd.compute_loss(stub, student, inputs, num_items_in_batch=num_items)
        exact_grads = torch.autograd.grad(exact, list(student.parameters()))
        stub32 = SimpleNamespace(teacher_model=teacher_32, beta=beta)
        ours = gkd_compute_loss(stub32, student_32, inputs, num_items_in_batch=num_items)
        grads = torch.autograd.grad(ours, list(student_32.parameters()))
        torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-7)
        for g, e in zip(grads, exact_grads):
            torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6)


_PEAK_SCRIPT = r"""
import sys, types, torch
sys.path.insert(0, "tests")
from test_integrations_trl import _llama
which = sys.argv[1]
vocab, rows, seq = 32000, 2, 256
student, teacher = _llama(vocab, 64, 0, init=0.02), _llama(vocab, 64, 1, init=0.02)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, vocab, (rows, seq), generator=g)
inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
stub = types.SimpleNamespace(teacher_model=teacher, beta=0.5)
if which == "trl":
    from trl.experimental.gkd import GKDTrainer
    stub.generalized_jsd_loss = GKDTrainer.generalized_jsd_loss
    compute_loss = lambda: GKDTrainer.compute_loss(stub, student, inputs)
else:
    from fastkd.integrations.trl import gkd_compute_loss
    compute_loss = lambda: gkd_compute_loss(stub, student, inputs)

def rss_kb(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))

compute_loss().backward()  # warm-up: first-call allocations, the adapter's one-time check
student.zero_grad(set_to_none=False)
base = rss_kb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
compute_loss().backward()
print(rss_kb("VmHWM") - base)
"""


@pytest.mark.slow  # about 70 s: two fresh processes (one importing trl), 512 tokens at V = 32000
def test_fastkd_step_peaks_lower_than_trl_s_at_a_large_vocabulary():
    pytest.importorskip("trl")
    extra = {which: extra_peak_kb(_PEAK_SCRIPT, which) for which in ("trl", "fastkd")}
    # TRL builds both models' [2, 256, 32000] fp32 logits (33 MB each) and several
    # intermediates of that size; fastkd builds none: its chunk workspace is bounded by the
    # 256 MiB budget.
    logits_kb = 2 * 256 * 32000 * 4 // 1024
    assert extra["trl"] > 4 * logits_kb, extra
    assert extra["fastkd"] < extra["trl"] / 2, extra
