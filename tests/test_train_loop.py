"""fastkd distill on tiny models: a step equals a hand-written loop on the models' own logits,
token normalization across micro-batches, resume equality, interrupted checkpoints, the run lock
and the offline cache."""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("transformers")

from fastkd import kd_loss  # noqa: E402
from fastkd.train import build_cache, distill  # noqa: E402
from fastkd.train.config import load_config  # noqa: E402
from fastkd.train.data import StepSampler, collate  # noqa: E402
from fastkd.train.models import load_causal_lm  # noqa: E402
from fastkd.train.report import read_jsonl  # noqa: E402
from fastkd.train.setup import load_data  # noqa: E402


def _losses(out: str) -> list[float]:
    return [r["loss"] for r in read_jsonl(os.path.join(out, "log.jsonl"))]


def _params(out: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "model", "model.safetensors"))


def _hand_written_run(tree: dict, steps: int) -> tuple[list[float], dict]:
    """The same training written plainly: full logits from the models' own forward, the
    torch-reference kd_loss summed per micro-batch over the step's counted tokens, AdamW with
    decay on matrices, linear warmup then cosine reaching 10 % at the last step, clipping at
    norm 1."""
    config = load_config(tree)
    t = config.train
    torch.manual_seed(t.seed)
    data = load_data(config)
    student = load_causal_lm(config.model.student, seed=t.seed)
    teacher = load_causal_lm(config.model.teacher, seed=t.seed).eval()
    decay = [p for p in student.parameters() if p.dim() >= 2]
    rest = [p for p in student.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
    )

    def lr_factor(step):
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / (t.steps - t.warmup_steps - 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    sampler = StepSampler(
        len(data.train), micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, seed=t.seed
    )
    losses = []
    for step in range(steps):
        batches = [collate([data.train[i] for i in idx]) for idx in sampler.step_indices(step)]
        n = sum(int((b["labels"] != -100).sum()) for b in batches)
        total = 0.0
        for b in batches:
            zs = student.model_logits(b["input_ids"], b["attention_mask"])
            with torch.no_grad():
                zt = teacher.model_logits(b["input_ids"], b["attention_mask"])
            loss = kd_loss(zs, zt, labels=b["labels"], reduction="sum", backend="torch") / n
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(student.parameters(), t.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total)
    return losses, {k: v.detach() for k, v in student.model.state_dict().items()}


@pytest.mark.slow  # 11 s of the full run's 1,025 s
def test_steps_match_a_hand_written_loop(tiny, tmp_path):
    tree = tiny.config(str(tmp_path / "run"), train={"steps": 3})
    result = distill(tree)
    expected, params = _hand_written_run(tree, 3)
    torch.testing.assert_close(
        torch.tensor(_losses(result["output_dir"])), torch.tensor(expected), rtol=1e-5, atol=1e-6
    )
    trained = _params(result["output_dir"])
    for key, value in params.items():
        torch.testing.assert_close(trained[key], value, rtol=2e-4, atol=2e-5, msg=key)


@pytest.mark.slow  # 14 s of the full run's 1,025 s
def test_micro_batch_split_does_not_change_the_step(tiny, tmp_path):
    """A step's gradient is that of one big batch's mean: (4 x 1), (2 x 2), (1 x 4) micro-batches
    of a 4-sequence step give the same losses and weights (to fp32 rounding)."""
    runs = []
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        out = str(tmp_path / f"m{micro}a{accum}")
        distill(
            tiny.config(
                out,
                train={"steps": 3, "micro_batch_size": micro, "grad_accum": accum},
                objective={"kind": "kd", "divergence": "jsd", "hard_weight": 0.2},
            )
        )
        runs.append((_losses(out), _params(out)))
    for losses, params in runs[1:]:
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(runs[0][0]), rtol=1e-5, atol=1e-6
        )
        for key, value in params.items():
            torch.testing.assert_close(value, runs[0][1][key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.slow  # 8 s of the full run's 1,025 s
def test_resumed_run_equals_the_uninterrupted_one(tiny, tmp_path):
    """With attention dropout on, so that the student trains in training mode and the restored
    RNG states decide the masks after the resume."""
    model = {"student": tiny.student_dropout}
    whole = str(tmp_path / "whole")
    distill(tiny.config(whole, train={"steps": 5}, model=model))
    part = str(tmp_path / "part")
    stopped = distill(
        tiny.config(part, train={"steps": 5}, model=model), callbacks=[lambda s, r: s == 2]
    )
    assert stopped["stopped"] == "callback" and stopped["step"] == 2 and "eval" not in stopped
    resumed = distill(tiny.config(part, train={"steps": 5}, model=model))
    assert resumed["resumed"] and resumed["steps_run"] == 3
    assert _losses(part) == _losses(whole)
    for key, value in _params(whole).items():
        assert torch.equal(_params(part)[key], value), key
    # Dropout was on: the same run without it trains differently.
    plain = str(tmp_path / "plain")
    distill(tiny.config(plain, train={"steps": 5}))
    assert _losses(plain) != _losses(whole)


def test_student_trains_in_training_mode_with_fp32_weights(tiny, tmp_path, monkeypatch):
    from fastkd.train.engine import StudentStep

    seen = []
    forward = StudentStep.forward

    def spy(self, batch, teacher_inputs, counts):
        seen.append(
            (
                self.student.training,
                self.student.model.training,
                {p.dtype for p in self.student.parameters()},
            )
        )
        return forward(self, batch, teacher_inputs, counts)

    monkeypatch.setattr(StudentStep, "forward", spy)
    distill(
        tiny.config(str(tmp_path / "run"), train={"steps": 1}, model={"teacher_dtype": "bfloat16"})
    )
    assert seen and all(s == (True, True, {torch.float32}) for s in seen)


@pytest.mark.slow  # 4 s of the full run's 1,025 s
def test_bf16_teacher_evaluates_and_writes_a_cache(tiny, tmp_path):
    """A bf16 teacher (the default on a GPU with bf16) gives fp32 logits for evaluation and
    sampling, from the GEMM."""
    tree = tiny.config(
        str(tmp_path / "run"),
        train={"steps": 1},
        model={"teacher_dtype": "bfloat16"},
        cache={"path": str(tmp_path / "cache"), "num_samples": 8},
    )
    assert math.isfinite(distill(tree)["eval"]["kl"])
    assert build_cache(tree)["sequences"] > 0


def test_each_step_is_checkpointed_once_and_pruning_keeps_the_newest(tiny, tmp_path):
    from fastkd.train import checkpoint as ckpt

    out = str(tmp_path / "run")
    distill(tiny.config(out, train={"steps": 3}, checkpoint={"every": 1, "keep": 2}))
    root = os.path.join(out, "checkpoints")
    assert ckpt.checkpoint_dirs(root) == ["step-000002", "step-000003"]
    again = distill(tiny.config(out, train={"steps": 3}, checkpoint={"every": 1, "keep": 1}))
    assert again["resumed"] and again["steps_run"] == 0
    assert os.path.basename(ckpt.latest_checkpoint(root)) == "step-000003"
    with pytest.raises(FileExistsError, match='resume = "never"'):
        distill(tiny.config(out, train={"steps": 2}, checkpoint={"resume": "never"}))
    assert os.path.basename(ckpt.latest_checkpoint(root)) == "step-000003"


def test_a_run_without_held_out_data_trains_and_exports(tiny, tmp_path):
    out = str(tmp_path / "run")
    result = distill(
        tiny.config(out, train={"steps": 2}, data={"eval_fraction": 0.0}, eval={"every": 1})
    )
    assert result["eval"] is None and result["step"] == 2
    assert os.path.isfile(os.path.join(out, "model", "model.safetensors"))
    assert "No held-out evaluation" in open(os.path.join(out, "results.md")).read()


@pytest.mark.slow  # 9 s of the full run's 1,025 s
def test_an_interrupted_checkpoint_leaves_the_previous_one(tiny, tmp_path, monkeypatch):
    from fastkd.train import checkpoint as ckpt

    out = str(tmp_path / "run")
    distill(
        tiny.config(out, train={"steps": 3}, checkpoint={"every": 1}),
        callbacks=[lambda s, r: s == 2],
    )
    root = os.path.join(out, "checkpoints")
    assert os.path.basename(ckpt.latest_checkpoint(root)) == "step-000002"

    real = ckpt._save_tensors

    def full_disk(state, path):
        real(state, path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_save_tensors", full_disk)
    with pytest.raises(OSError, match="No space left"):
        distill(tiny.config(out, train={"steps": 3}, checkpoint={"every": 1}))
    assert os.path.basename(ckpt.latest_checkpoint(root)) == "step-000002"
    monkeypatch.setattr(ckpt, "_save_tensors", real)
    result = distill(tiny.config(out, train={"steps": 3}))
    assert result["resumed"] and result["step"] == 3
    assert not [n for n in os.listdir(root) if n.startswith(".tmp")]


@pytest.mark.slow  # 5 s of the full run's 1,025 s
def test_a_second_run_on_the_same_output_is_refused(tiny, tmp_path):
    out = str(tmp_path / "run")

    def nested(step, record):
        with pytest.raises(RuntimeError, match="another fastkd run is writing"):
            distill(tiny.config(out, train={"steps": 2}))
        return False

    distill(tiny.config(out, train={"steps": 1}), callbacks=[nested])


@pytest.mark.parametrize("method", ["random", "topk"])
@pytest.mark.slow  # 2 cases, 20 s of the full run's 1,025 s
def test_offline_cache_run(tiny, tmp_path, method):
    cache = str(tmp_path / "cache")
    tree = tiny.config(
        str(tmp_path / "run"),
        objective={"kind": "sparse"},
        cache={"path": cache, "method": method, "num_samples": 16, "k": 8, "batch_size": 3},
    )
    info = build_cache(tree)
    assert info["sequences"] > 0 and info["bytes_per_token"] < 200
    assert build_cache(tree)["sequences"] == info["sequences"]  # complete: resumes
    result = distill(tree)
    assert math.isfinite(result["eval"]["kl"]) and _losses(result["output_dir"])[-1] > 0
    other = tiny.config(
        str(tmp_path / "run2"),
        objective={"kind": "sparse"},
        cache={"path": cache},
        data={"seq_len": 24},
    )
    with pytest.raises(ValueError, match="written for other data"):
        distill(other)


def test_ce_objective_is_the_cross_entropy(tiny, tmp_path):
    """kind = "ce" trains on the next tokens only: its first loss is the mean CE of the initial
    student, computed here from the model's own logits."""
    tree = tiny.config(str(tmp_path / "run"), objective={"kind": "ce"}, train={"steps": 1})
    result = distill(tree)
    config = load_config(tree)
    torch.manual_seed(0)
    data = load_data(config)
    student = load_causal_lm(config.model.student, seed=0)
    sampler = StepSampler(len(data.train), micro_batch_size=2, grad_accum=2, seed=0)
    batch = collate([data.train[i] for idx in sampler.step_indices(0) for i in idx])
    with torch.no_grad():
        logits = student.model_logits(batch["input_ids"], batch["attention_mask"])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    assert _losses(result["output_dir"])[0] == pytest.approx(float(expected), rel=1e-5)
