"""fastkd.integrations.hf_trainer: the distillation loss from hidden states (online teacher or a
TeacherCache) against the plain loss on the models' logits, and num_items_in_batch making
accumulated micro-batches give one big batch's gradients, in the loss and through the Trainer."""

from __future__ import annotations

import sys

import pytest
import torch

import fastkd
from fastkd.reference import kd_loss_reference

pytest.importorskip("transformers")

from fastkd.integrations.hf_trainer import distillation_loss  # noqa: E402

VOCAB, SEQ = 96, 12


def _llama(hidden, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,
            initializer_range=0.2,
        )
    )


@pytest.fixture(scope="module")
def models():
    return _llama(32, 0), _llama(48, 1).eval()


def _batch(rows=4, seed=0):
    """Hugging Face labels (aligned with input_ids) with a different number of counted tokens
    per row, so a mean of per-micro-batch means would differ from the big batch's mean."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, SEQ), generator=g)
    labels = ids.clone()
    for r in range(rows):
        labels[r, : 2 + 3 * r] = -100
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    labels[0, -2:] = -100
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "sequence_index": torch.arange(rows),
    }


def _half(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def _counted(batch):
    return int((batch["labels"][:, 1:] != -100).sum())


OPTIONS = [
    dict(divergence="fkl"),
    dict(divergence="jsd", beta=0.3, temperature=2.0),
    dict(divergence="rkl", hard_weight=0.2, t2_scale=True, temperature=1.5),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: o["divergence"])
def test_online_loss_equals_the_plain_loss_on_the_models_logits(models, options):
    student, teacher = models
    batch = _batch()
    loss = distillation_loss(student, batch, teacher=teacher, **options)
    grads = torch.autograd.grad(loss, list(student.parameters()))

    exact_student = _llama(32, 0).double()
    zs = exact_student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        zt = teacher.double()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    teacher.float()
    exact = kd_loss_reference(zs[:, :-1], zt[:, :-1], labels=batch["labels"][:, 1:], **options)
    exact_grads = torch.autograd.grad(exact, list(exact_student.parameters()))
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-7)
    for g, e in zip(grads, exact_grads):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6)


def _cache(tmp_path, teacher, batch):
    """A TeacherCache of the teacher's random sparse targets over the batch's sequences."""
    with torch.no_grad():
        zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = fastkd.sample_teacher(zt, num_samples=16, seed=3)
    path = str(tmp_path / "cache")
    with fastkd.TeacherCache.create(path, vocab_size=VOCAB, num_samples=16, seed=3) as writer:
        writer.extend(targets)
    return fastkd.TeacherCache.open(path), targets


@pytest.mark.parametrize("teacher_kind", ["online", "cache"])
def test_two_micro_batches_with_num_items_give_the_big_batch_s_gradients(
    models, tmp_path, teacher_kind
):
    student, teacher = models
    batch = _batch()
    source = (
        dict(teacher=teacher)
        if teacher_kind == "online"
        else dict(teacher_cache=_cache(tmp_path, teacher, batch)[0])
    )
    params = list(student.parameters())
    options = dict(hard_weight=0.1) if teacher_kind == "cache" else dict(divergence="jsd")
    big = distillation_loss(student, batch, **source, **options)
    big_grads = torch.autograd.grad(big, params)
    n = _counted(batch)
    halves = [_half(batch, slice(0, 1)), _half(batch, slice(1, 4))]
    assert _counted(halves[0]) != _counted(halves[1])
    total, summed = 0.0, [torch.zeros_like(p) for p in params]
    for half in halves:
        loss = distillation_loss(
            student, half, num_items_in_batch=torch.tensor(n), **source, **options
        )
        total += loss
        for s, g in zip(summed, torch.autograd.grad(loss, params)):
            s += g
    torch.testing.assert_close(total, big, rtol=1e-6, atol=1e-7)
    for s, g in zip(summed, big_grads):
        torch.testing.assert_close(s, g, rtol=1e-5, atol=1e-7)


def test_cache_loss_is_the_sparse_loss_of_the_cached_targets(models, tmp_path):
    student, teacher = models
    batch = _batch()
    cache, targets = _cache(tmp_path, teacher, batch)
    loss = distillation_loss(student, batch, teacher_cache=cache, hard_weight=0.3)
    hidden = student.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    expected = fastkd.sparse_kd_loss(
        student.lm_head(hidden)[:, :-1],
        targets[:, :-1],
        labels=batch["labels"][:, 1:],
        hard_weight=0.3,
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_unshifted_labels_compare_every_position(models):
    """shift_labels=False: labels already aligned with the predictions."""
    student, teacher = models
    batch = _batch()
    shifted = dict(batch, input_ids=batch["input_ids"], labels=batch["labels"].roll(-1, 1))
    shifted["labels"][:, -1] = -100
    torch.testing.assert_close(
        distillation_loss(student, shifted, teacher=teacher, shift_labels=False),
        distillation_loss(student, batch, teacher=teacher),
    )


def test_bad_use_says_what_is_needed(models, tmp_path):
    student, teacher = models
    batch = _batch()
    with pytest.raises(ValueError, match="exactly one of teacher"):
        distillation_loss(student, batch)
    cache, _ = _cache(tmp_path, teacher, batch)
    with pytest.raises(ValueError, match="sequence_index"):
        distillation_loss(
            student, {k: v for k, v in batch.items() if k != "sequence_index"}, teacher_cache=cache
        )


def test_missing_host_library_names_the_extra(monkeypatch):
    from fastkd.integrations import hf_trainer, trl

    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(ImportError, match=r"pip install 'fastkd\[train\]'"):
        hf_trainer._trainer_class()
    with pytest.raises(ImportError, match=r"pip install 'fastkd\[trl\]'"):
        trl.gkd_trainer_class()


@pytest.mark.slow  # about 5 s: two Trainer runs
def test_trainer_with_accumulation_steps_like_one_big_batch(models, tmp_path):
    """One optimizer step of the Trainer: 2 micro-batches of 2 rows with gradient accumulation
    against 1 batch of 4 rows, SGD: the same parameters; then the Trainer's evaluation loss
    (compute_loss with return_outputs) is the loss of the evaluation batch."""
    import datasets
    from transformers import TrainingArguments

    from fastkd.integrations.hf_trainer import DistillationTrainer

    student, teacher = models
    batch = _batch()
    rows = [{k: v[r].tolist() for k, v in batch.items()} for r in range(4)]

    def collate(items):
        return {k: torch.tensor([it[k] for it in items]) for k in items[0]}

    def train(micro, accumulate):
        model = _llama(32, 0)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{micro}"),
            max_steps=1,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=accumulate,
            learning_rate=1.0,
            optim="sgd",
            lr_scheduler_type="constant",
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            seed=0,
            remove_unused_columns=False,
            max_grad_norm=0.0,
            per_device_eval_batch_size=4,
        )
        trainer = DistillationTrainer(
            model=model,
            args=args,
            teacher_model=teacher,
            train_dataset=datasets.Dataset.from_list(rows),
            eval_dataset=datasets.Dataset.from_list(rows),
            data_collator=collate,
            divergence="jsd",
            beta=0.5,
        )
        trainer.train()
        evaluated = trainer.evaluate()["eval_loss"]
        with torch.no_grad():
            expected = distillation_loss(model.eval(), batch, teacher=teacher, divergence="jsd")
        assert evaluated == pytest.approx(float(expected), rel=1e-6)
        return model

    accumulated, big = train(2, 2), train(4, 1)
    start = _llama(32, 0)
    for (name, a), b, s in zip(
        accumulated.named_parameters(), big.parameters(), start.parameters()
    ):
        assert not torch.equal(b, s), name  # the step moved it
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_more_than_one_process_is_refused_rather_than_left_unsynchronized():
    """The loss runs the unwrapped decoder: under DDP its gradients would not be all-reduced."""
    from types import SimpleNamespace

    from fastkd.integrations._models import refuse_distributed

    refuse_distributed(SimpleNamespace(num_processes=1), "x")
    refuse_distributed(None, "x")
    with pytest.raises(NotImplementedError, match="with 2 processes"):
        refuse_distributed(SimpleNamespace(num_processes=2), "DistillationTrainer")
