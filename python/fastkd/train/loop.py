"""``fastkd distill``: the training loop.

A step takes ``micro_batch_size * grad_accum * world_size`` sequences (``data.StepSampler``).
Its loss is normalized by the number of counted tokens of the whole step, summed over its
micro-batches and all-reduced over ranks before the first backward, so that the step's gradient
is that of one big batch's mean whatever the split: each micro-batch's loss is its token sum
divided by that count, times the world size (DDP and FSDP average gradients over ranks). The
optimizer and its schedule are in ``optimizer``, the stop on a signal in ``stop_signals``, the
result files in ``run_results``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings

import torch

from ..sparse.cache import TeacherCache
from . import checkpoint as ckpt
from .config import ONLINE_KINDS, Config
from .data import StepSampler, collate
from .distributed import Distributed, gradient_sync, init_distributed, unsharded_root, wrap_student
from .engine import StudentStep
from .evaluate import evaluate
from .objectives import COUNTS, batch_counts, make_objective
from .onpolicy import SOURCES, OnPolicy
from .optimizer import _lr_lambda, _optimizer
from .report import JsonlLog, Progress
from .run_files import RunLock, export_model, write_json_atomic
from .run_results import _write_report
from .setup import as_config, autocast_context, cache_fingerprint, load_data, load_models
from .stop_signals import _StopSignals

__all__ = ["distill"]


def _autocast_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    choice = config.train.precision
    if choice == "bfloat16" or (
        choice == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    ):
        return torch.bfloat16
    return None


class _Run:
    def __init__(self, config: Config, dist_info: Distributed, callbacks, generate=None):
        self.config, self.dist, self.callbacks = config, dist_info, list(callbacks or [])
        c = config
        self.out = c.output.dir
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        device = dist_info.device
        self.autocast = _autocast_dtype(c, device)
        torch.manual_seed(c.train.seed)
        self.data = load_data(c)
        # KL to the teacher and top-1 agreement compare the models on one vocabulary.
        self.eval_teacher = (
            bool(c.model.teacher) and c.eval.teacher_metrics and not c.model.teacher_tokenizer
        )
        self.student, self.teacher = load_models(
            c, device, with_teacher=c.objective.kind in ONLINE_KINDS or self.eval_teacher
        )
        cache = self._open_cache() if c.objective.kind == "sparse" else None
        self.objective = make_objective(
            c.objective,
            teacher=self.teacher,
            cache=cache,
            autocast=self.autocast,
            student=self.student,
            tokenizers=(self.data.tokenizer, self.data.teacher_tokenizer),
        )
        self.onpolicy = None
        if c.onpolicy.enabled:
            tok = self.data.tokenizer
            self.onpolicy = OnPolicy(
                c.onpolicy,
                student=self.student,
                teacher=self.teacher,
                seed=c.train.seed,
                pad_id=tok.pad_token_id,
                eos_id=tok.eos_token_id,
                synced=dist_info.world_size > 1,
                generate=generate,
            )
        self.step_module = StudentStep(self.student, self.objective, self.autocast)
        if c.train.compile:
            self.student.compile()
        self.module = wrap_student(self.step_module, dist_info, c.train.distributed)
        self.optimizer = _optimizer(self.module, c)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(c))
        self.sampler = StepSampler(
            len(self.data.train),
            micro_batch_size=c.train.micro_batch_size,
            grad_accum=c.train.grad_accum,
            world_size=dist_info.world_size,
            rank=dist_info.rank,
            seed=c.train.seed,
            shuffle=c.data.shuffle,
        )
        self.step = 0
        self.saved_step = -1
        self.evals: list[dict] = []
        # Dropout and other randomness differ per rank; the initialization above did not.
        torch.manual_seed(c.train.seed + 1 + dist_info.rank)

    def _open_cache(self) -> TeacherCache:
        c = self.config
        vocab = self.student.vocab_size
        if not os.path.isdir(c.cache.path):
            raise FileNotFoundError(
                f"cache.path: no teacher cache at {c.cache.path}; write it "
                f"with `fastkd cache` on this config first"
            )
        cache = TeacherCache.open(c.cache.path)
        meta = cache.metadata
        expected = cache_fingerprint(self.data)
        if meta["tokenizer_fingerprint"] != expected:
            have = dict(
                p.split("=", 1) for p in meta["tokenizer_fingerprint"].split(";") if "=" in p
            )
            want = dict(p.split("=", 1) for p in expected.split(";"))
            what = [k for k in want if have.get(k) != want[k]] or ["its fingerprint"]
            raise ValueError(
                f"the teacher cache at {c.cache.path} was written for other "
                f"{' and '.join(what)} (tokenizer and training sequences in order "
                f"must be the ones of this config); rebuild it with `fastkd cache`"
            )
        if meta["vocab_size"] != vocab:
            raise ValueError(
                f"the teacher cache at {c.cache.path} has vocab_size "
                f"{meta['vocab_size']}; the student's head has {vocab}"
            )
        if len(cache) < len(self.data.train):
            raise ValueError(
                f"the teacher cache at {c.cache.path} holds {len(cache)} of the "
                f"{len(self.data.train)} training sequences: finish it with "
                f"`fastkd cache` (it resumes)"
            )
        return cache

    # ---- checkpoints --------------------------------------------------------------------

    def _full_states(self):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = get_model_state_dict(self.module, options=options)
        optim = get_optimizer_state_dict(self.module, self.optimizer, options=options)
        return model, optim

    def save(self) -> None:
        """Checkpoint of the current step, once per step."""
        if self.saved_step == self.step:
            return
        model, optim = self._full_states()
        main = self.dist.is_main
        trainer = {"scheduler": self.scheduler.state_dict(), "evals": json.dumps(self.evals)}
        rank_state = None
        if self.onpolicy is not None:
            trainer["onpolicy"] = self.onpolicy.state_dict()
            rank_state = {"replay_buffer": self.onpolicy.buffer.state_dict()}
        ckpt.save_checkpoint(
            self.ckpt_dir,
            self.step,
            model_state=model if main else None,
            optimizer_state=optim if main else None,
            trainer_state=trainer,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            barrier=self.dist.barrier,
            keep=self.config.checkpoint.keep,
            rank_state=rank_state,
        )
        self.saved_step = self.step

    def resume(self) -> bool:
        path = ckpt.latest_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        if self.config.checkpoint.resume == "never":
            raise FileExistsError(
                f"{self.out} holds checkpoints of an earlier run and "
                f'checkpoint.resume = "never": choose another output.dir, '
                f"or delete {self.ckpt_dir} to start over"
            )
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = ckpt.load_checkpoint(path, self.dist.rank)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.module, state["model"], options=options)
        set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"], options=options)
        self.scheduler.load_state_dict(state["trainer"]["scheduler"])
        self.step = int(state["trainer"]["step"])
        self.evals = json.loads(state["trainer"]["evals"])
        if self.onpolicy is not None and "onpolicy" in state["trainer"]:
            self.onpolicy.load_state_dict(state["trainer"]["onpolicy"])
            saved_world = int(state["trainer"]["world_size"])
            if saved_world == self.dist.world_size:
                buffer = (state["rank"] or {}).get("replay_buffer", {})
                self.onpolicy.buffer.load_state_dict(buffer)
            else:
                # Each rank kept its own generations: with another number of ranks there is no
                # rank's buffer to give each (copies of one would replay the same sequences).
                warnings.warn(
                    f"the checkpoint was written by {saved_world} ranks and this run "
                    f"has {self.dist.world_size}: the replay buffers start empty",
                    stacklevel=2,
                )
        ckpt.set_rng_state(state["rng"])
        self.saved_step = self.step
        return True

    # ---- steps --------------------------------------------------------------------------

    def train_step(self) -> dict:
        c, device = self.config, self.dist.device
        t0 = time.perf_counter()
        micro = self.sampler.step_indices(self.step)
        batches = [
            {
                k: v.to(device, non_blocking=True)
                for k, v in collate([self.data.train[i] for i in idx]).items()
            }
            for idx in micro
        ]
        sources = None
        if self.onpolicy is not None:
            # Before counting: generated completions change the step's number of tokens.
            sources = dict.fromkeys(SOURCES, 0)
            # FSDP gathers the root's parameters only for a step that generates. The plan is
            # the same on every rank; a planned generation may still turn into a replay once
            # the step's earlier generations fill the buffer, never the reverse.
            plan = [self.onpolicy.source(self.step, j, c.train.steps) for j in range(len(batches))]
            generates = any(source in ("student", "teacher") for source in plan)
            gathered = unsharded_root(self.module) if generates else contextlib.nullcontext()
            with gathered, autocast_context(device, self.autocast):
                for j, batch in enumerate(batches):
                    batches[j], source = self.onpolicy.rewrite(batch, self.step, j, c.train.steps)
                    sources[source] += 1
        counted = sum(batch_counts(b) for b in batches)
        step_counts = self.dist.all_reduce_sum(counted.to(device)).tolist()
        counts = {k: max(int(v), 1) for k, v in zip(COUNTS, step_counts)}
        num_items = int(step_counts[0])
        total = torch.zeros((), dtype=torch.float64, device=device)
        world = self.dist.world_size
        for j, (idx, batch) in enumerate(zip(micro, batches)):
            teacher_inputs = self.objective.prepare(batch, idx)
            with gradient_sync(self.module, j == len(micro) - 1):
                loss = self.module(batch, teacher_inputs, counts)
                (loss * world).backward()
            total += loss.detach().double()
        grad_norm = None
        params = [p for p in self.module.parameters() if p.grad is not None]
        if c.train.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, c.train.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss_value = float(self.dist.all_reduce_sum(total))
        seconds = time.perf_counter() - t0
        record = {
            "step": self.step,
            "loss": loss_value,
            "lr": lr,
            "tokens": num_items,
            "tokens_per_s": num_items / seconds if seconds > 0 else None,
            "seconds": seconds,
        }
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if sources is not None:
            record["completions"] = sources
            if c.onpolicy.schedule == "adaptive":
                record["student_share"] = self.onpolicy.share
        return record

    def run_eval(self) -> dict | None:
        """Held-out metrics at this step (None when the held-out split has no labelled
        token)."""
        c = self.config
        with unsharded_root(self.module):
            metrics = evaluate(
                self.student,
                self.data.eval,
                teacher=self.teacher if self.eval_teacher else None,
                batch_size=c.eval.batch_size,
                max_batches=c.eval.max_batches,
                ece_bins=c.eval.ece_bins,
                device=self.dist.device,
                autocast=self.autocast,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                all_reduce=self.dist.all_reduce_sum_cpu,
            )
        if metrics is None:
            return None
        metrics["step"] = self.step
        self.evals = [e for e in self.evals if e["step"] != self.step] + [metrics]
        return metrics

    # ---- the run ------------------------------------------------------------------------

    def run(self) -> dict:
        c, main = self.config, self.dist.is_main
        log = JsonlLog(os.path.join(self.out, "log.jsonl"))
        if main:
            ckpt.remove_partial(self.ckpt_dir)
        self.dist.barrier()
        resumed = self.resume()
        if main:
            write_json_atomic(os.path.join(self.out, "config.json"), c.to_dict())
            log.truncate_after(self.step)
        if (
            self.onpolicy is not None
            and c.onpolicy.schedule == "adaptive"
            and self.onpolicy.reference is None
        ):
            # The adaptive schedule's first reference: the held-out CE before training.
            metrics = self.run_eval()
            if metrics is None:
                raise ValueError(
                    'onpolicy.schedule = "adaptive" follows the held-out CE, but '
                    "the held-out split has no labelled token"
                )
            self.onpolicy.observe_heldout(metrics["ce"])
        progress = Progress(
            c.train.steps,
            start=self.step,
            enabled=main and c.output.progress,
            every=c.output.log_every,
        )
        stop = None
        tokens0, seconds0, steps0 = 0, 0.0, self.step
        with _StopSignals() as signals:
            while self.step < c.train.steps:
                record = self.train_step()
                tokens0 += record["tokens"]
                seconds0 += record["seconds"]
                if c.eval.every and self.step % c.eval.every == 0:
                    metrics = self.run_eval()
                    if metrics is not None:
                        record["eval"] = metrics
                        if self.onpolicy is not None:
                            self.onpolicy.observe_heldout(metrics["ce"])
                if main:
                    log.write(record)
                progress.update(
                    self.step, loss=record["loss"], tok_s=int(record["tokens_per_s"] or 0)
                )
                asked = any(cb(self.step, record) for cb in self.callbacks)
                stop = signals.requested or ("callback" if asked else None)
                if self.dist.any(stop is not None):
                    stop = stop or "another rank"
                    break
                if c.checkpoint.every and self.step % c.checkpoint.every == 0:
                    self.save()
        self.save()
        # Training tokens/s: the counted tokens over the time of the optimizer steps themselves
        # (teacher forward included; evaluations and checkpoints not).
        result = {
            "output_dir": self.out,
            "step": self.step,
            "resumed": resumed,
            "stopped": stop,
            "tokens_per_s": tokens0 / seconds0 if seconds0 else None,
            "steps_run": self.step - steps0,
        }
        if stop is not None:
            return result
        # The model first: an evaluation that fails must not cost the trained weights.
        state = self._full_states()[0]  # a collective gather under FSDP: every rank calls it
        if main:
            export_model(self.student, self.data.tokenizer, os.path.join(self.out, "model"), state)
        del state
        done = self.evals and self.evals[-1]["step"] == self.step
        result["eval"] = self.evals[-1] if done else self.run_eval()
        if main:
            _write_report(c, self.out, self.evals, log.path, result)
        return result


def distill(config, overrides=None, *, callbacks=None, generate=None) -> dict:
    """Runs ``fastkd distill``: trains the student of ``config`` (a ``Config``, a config file or
    a nested dict; ``overrides`` as ``--set`` strings or a dict) and writes its output folder
    (resolved config, JSONL log, checkpoints, final model, eval results, plots).

    ``callbacks``: functions ``(step, record) -> bool`` called after every step on every rank;
    True asks the run to stop there with a checkpoint, as SIGINT does.

    ``generate``: for on-policy runs, a function replacing Hugging Face ``generate`` (an
    external engine such as vLLM serving the current weights): ``generate(model, prompts, *,
    source, max_new_tokens, temperature, top_p, eos_id)`` with ``model`` the student or
    teacher ``CausalLM``, ``prompts`` a list of 1-D int64 tensors and ``source`` "student" or
    "teacher", returning one 1-D int64 tensor of new tokens per prompt (longer ones are cut
    to ``max_new_tokens`` and after the first eos).

    Returns a dict with the final step, evaluation metrics (absent when stopped early), training
    tokens/s and whether the run resumed or stopped.
    """
    config = as_config(config, overrides)
    dist_info = init_distributed(config.train.device)
    try:
        with RunLock(config.output.dir, enabled=dist_info.is_main):
            return _Run(config, dist_info, callbacks, generate).run()
    finally:
        dist_info.close()
