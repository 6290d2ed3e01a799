"""sparse_kd_loss benchmark: fastkd's fused loss against sparse teacher targets, against the same
loss in plain PyTorch (eager and torch.compile), with dense KD as a reference point.

The targets are sampled once per case with ``fastkd.sample_teacher`` from LM-like teacher logits;
every implementation runs forward+backward w.r.t. the student logits. The dense reference point
is ``fastkd.kd_loss`` (forward KL) against the full teacher logits, marked as a peer so that the
ratio column also says how the sparse loss compares with dense KD. The table adds what the
teacher takes in storage per token: the sampled targets in a ``TeacherCache`` against the dense
logits in bf16.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace

import torch

from ..ops import kd_loss, sample_teacher, sparse_kd_loss
from ..ops._registry import kernel_backends
from ..sparse.cache import TeacherCache
from ..sparse.targets import SparseTargets
from .harness import Result, add_loss_impl, format_table, measure

__all__ = [
    "SparseCase",
    "cache_bytes_per_token",
    "lm_like_logits",
    "plain_sparse_kd_loss",
    "run_sparse_kd_loss_case",
]

# Rows of teacher logits made and sampled at a time, which bounds the memory of the ranking's
# argsort and, off CPU, of the reference sampler (several float64 copies of its rows).
_CHUNK_ROWS = 1024
_SEQ_TOKENS = 512  # tokens per sequence written to the TeacherCache
_DENSE = "fastkd kd_loss (dense)"
_BYTES_COL = "teacher bytes/token"
_BYTES_NOTE = (
    f"{_BYTES_COL}: for the sparse rows, the size on disk (shards and manifest) of the "
    f"sampled targets written to a TeacherCache as sequences of {_SEQ_TOKENS} tokens, "
    f"per token; for the dense row, V x 2: the teacher's logits in bf16."
)


@dataclass(frozen=True)
class SparseCase:
    rows: int = 2048
    vocab: int = 32000
    dtype: str = "float32"
    num_samples: int = 50
    device: str = "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def title(self) -> str:
        return (
            f"sparse_kd_loss N={self.num_samples} rows={self.rows} V={self.vocab} "
            f"{self.dtype} on {self.device}"
        )


def lm_like_logits(
    rows: int, vocab: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """LM-like teacher logits ``[rows, vocab]`` float32: a Zipf-like prior -1.1 log(rank) over a
    per-row random ranking, plus noise of per-row scale s ~ U(3, 10)."""
    prior = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32, device=device))
    ranks = torch.argsort(torch.rand(rows, vocab, generator=generator, device=device), dim=-1)
    scale = torch.empty(rows, 1, device=device).uniform_(3.0, 10.0, generator=generator)
    return prior[ranks] + scale * torch.randn(rows, vocab, generator=generator, device=device)


def plain_sparse_kd_loss(s: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The sparse loss as users write it in plain PyTorch: -sum_k w_k log q_{s_k} over the
    non-padding slots (id >= 0), mean over rows, with q = softmax(s) in float32.

    It leaves out fastkd's sum_k w_k log w_k, a constant of the targets with no gradient.
    """
    present = ids >= 0
    lq = torch.log_softmax(s.float(), dim=-1).gather(-1, torch.where(present, ids, 0).long())
    return -torch.where(present, weights * lq, 0.0).sum(-1).mean()


def cache_bytes_per_token(targets: SparseTargets) -> float:
    """Bytes per token that ``targets [T, K]`` take in a TeacherCache (shards plus manifest),
    written as sequences of 512 tokens."""
    with tempfile.TemporaryDirectory() as path:
        with TeacherCache.create(
            path,
            vocab_size=targets.vocab_size,
            num_samples=targets.num_samples,
            method=targets.method,
            temperature=targets.temperature,
            seed=targets.seed,
            tail=targets.tail,
        ) as writer:
            for start in range(0, len(targets), _SEQ_TOKENS):
                writer.append(targets[start : start + _SEQ_TOKENS])
        return TeacherCache.open(path).bytes_per_token()


def _teacher(
    case: SparseCase, generator: torch.Generator, seed: int
) -> tuple[torch.Tensor, SparseTargets]:
    """(dense teacher logits ``[rows, V]`` in the case's dtype, targets sampled from them with
    sampler seed ``seed``)."""
    device = torch.device(case.device)
    teacher = torch.empty(case.rows, case.vocab, dtype=case.torch_dtype, device=device)
    pieces = []
    for start in range(0, case.rows, _CHUNK_ROWS):
        chunk = teacher[start : start + _CHUNK_ROWS]
        chunk.copy_(lm_like_logits(chunk.shape[0], case.vocab, generator, device))
        # token_offset keys each chunk's draws by global token index: the same targets as one
        # call on all rows.
        pieces.append(
            sample_teacher(chunk, num_samples=case.num_samples, seed=seed, token_offset=start)
        )
    targets = replace(
        pieces[0],
        ids=torch.cat([p.ids for p in pieces]),
        weights=torch.cat([p.weights for p in pieces]),
    )
    return teacher, targets


def _impls(case: SparseCase, student: torch.Tensor, teacher: torch.Tensor, targets: SparseTargets):
    """(implementations, forward-only steps) for one case."""
    device = torch.device(case.device)

    impls, fwd = [], {}
    for backend in kernel_backends("sparse_kd_loss", device):
        add_loss_impl(
            impls,
            fwd,
            f"fastkd[{backend}]",
            (lambda b: lambda: sparse_kd_loss(student, targets, backend=b))(backend),
        )

    def eager(s):
        return plain_sparse_kd_loss(s, targets.ids, targets.weights)

    add_loss_impl(impls, fwd, "torch eager (sparse)", lambda: eager(student), peer=True)
    torch._dynamo.reset()  # a fresh compile cache per case: cases share the function's code
    compiled = torch.compile(eager)
    add_loss_impl(impls, fwd, "torch.compile (sparse)", lambda: compiled(student), peer=True)
    add_loss_impl(
        impls, fwd, _DENSE, lambda: kd_loss(student, teacher, divergence="fkl"), peer=True
    )
    return impls, fwd


def run_sparse_kd_loss_case(
    case: SparseCase, *, warmup: int = 2, reps: int = 5, seed: int = 0
) -> tuple[list[Result], str]:
    """Measures one case; returns the results and a markdown table, with the teacher's bytes per
    token as an extra column defined in a note under the table."""
    device = torch.device(case.device)
    g = torch.Generator(device=device).manual_seed(seed)
    teacher, targets = _teacher(case, g, seed)
    student = (
        (torch.randn(case.rows, case.vocab, generator=g, device=device) * 2)
        .to(case.torch_dtype)
        .requires_grad_()
    )
    impls, fwd = _impls(case, student, teacher, targets)

    def drop_grad():
        student.grad = None

    results = measure(
        impls, device, warmup=warmup, reps=reps, forward_only=fwd, before_each=drop_grad
    )
    sparse_bytes = f"{cache_bytes_per_token(targets):.1f}"
    for r in results:
        r.extra[_BYTES_COL] = str(case.vocab * 2) if r.impl == _DENSE else sparse_bytes
    table = format_table(case.title(), results, (_BYTES_COL,))
    return results, f"{table}\n\n{_BYTES_NOTE}"
