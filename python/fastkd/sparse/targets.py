"""SparseTargets: a teacher distribution kept as a few (id, weight) pairs per token.

Produced by ``fastkd.sample_teacher`` (and read back by ``fastkd.TeacherCache``), consumed by
``fastkd.sparse_kd_loss``. Row ``r`` of the leading shape holds K slots: ``ids[r, k]`` a vocabulary
id (``-1`` = padding) and ``weights[r, k]`` its target weight (0 at padding). Methods:

- ``"random"``: N draws with replacement from softmax(z / T); each distinct id keeps
  ``count / N``. With T = 1 the weights sum to 1 and their expectation is the teacher's
  distribution p = softmax(z); with T != 1 they are importance weights ``(count / N) p / r``
  (r = softmax(z / T) the proposal), whose expectation is again p.
- ``"priority"``: priority sampling (Duffield, Lund & Thorup, JACM 2007) of k distinct ids
  from p; each kept id has weight max(p_i, tau), tau the (k+1)-th largest priority p_i / u_i.
  The weights are >= p at their ids, sum to 1 only in expectation, and their expectation is p.
- ``"topk"``: the k most probable ids; ``tail`` says where the rest of the mass goes:
  ``"renorm"`` (top-k renormalized to sum 1), ``"bucket"`` (weights are p at the ids and
  ``tail_mass`` holds 1 - sum of them, matched against the student's mass outside the ids), or
  ``"label"`` (the rest is added to the gold label's slot, which may be an extra one).
- ``"support"``: given ids (e.g. the student's own top-k, ``fastkd.student_support_targets``)
  with the teacher's probabilities at them and, always ``tail="bucket"``, its exact mass
  outside them (``fastkd.fused_linear_support``): the targets of the reverse direction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["METHODS", "SparseTargets", "TAILS"]

METHODS = ("random", "priority", "topk", "support")
TAILS = ("renorm", "bucket", "label")


@dataclass(frozen=True, eq=False)
class SparseTargets:
    """Sparse teacher targets for tokens of leading shape ``[...]``.

    Attributes:
        ids: ``[..., K]`` int32 vocabulary ids, ``-1`` at padding. The samplers keep each id
            once per row; where an id repeats, the losses add its weights.
        weights: ``[..., K]`` float32 target weights, 0 at padding.
        logprobs: ``[..., K]`` float32 teacher log-probabilities log softmax(z)[id] (at
            temperature 1), 0 at padding; None when not kept.
        tail_mass: ``[...]`` float32 teacher mass outside ``ids`` (``tail="bucket"``), else None.
        vocab_size: the teacher's vocabulary size V (every id is < V).
        num_samples: draws N (``"random"``) or k (``"priority"``, ``"topk"``; the slots K of
            ``"support"``).
        temperature: the proposal temperature T of ``"random"`` (1 otherwise).
        seed: the sampler's seed (``"random"``, ``"priority"``).
        method: ``"random"``, ``"priority"``, ``"topk"`` or ``"support"``.
        tail: ``"renorm"``, ``"bucket"`` or ``"label"`` for ``"topk"``; ``"bucket"`` for
            ``"support"``; None otherwise.
    """

    ids: torch.Tensor
    weights: torch.Tensor
    logprobs: torch.Tensor | None = None
    tail_mass: torch.Tensor | None = None
    vocab_size: int = 0
    num_samples: int = 0
    temperature: float = 1.0
    seed: int = 0
    method: str = "random"
    tail: str | None = None

    def __post_init__(self):
        ids, weights = self.ids, self.weights
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int32 or ids.dim() < 1:
            raise TypeError(
                f"ids must be an int32 tensor [..., K]; got "
                f"{getattr(ids, 'dtype', type(ids).__name__)} "
                f"{tuple(getattr(ids, 'shape', ()))}"
            )
        if not isinstance(weights, torch.Tensor) or weights.dtype != torch.float32:
            raise TypeError(
                f"weights must be a float32 tensor; got "
                f"{getattr(weights, 'dtype', type(weights).__name__)}"
            )
        if weights.shape != ids.shape or weights.device != ids.device:
            raise ValueError(
                f"weights {tuple(weights.shape)} on {weights.device} must match ids "
                f"{tuple(ids.shape)} on {ids.device}"
            )
        if self.logprobs is not None and (
            self.logprobs.shape != ids.shape or self.logprobs.dtype != torch.float32
        ):
            raise ValueError(
                f"logprobs must be float32 {tuple(ids.shape)}; got "
                f"{self.logprobs.dtype} {tuple(self.logprobs.shape)}"
            )
        if self.tail_mass is not None and (
            self.tail_mass.shape != ids.shape[:-1] or self.tail_mass.dtype != torch.float32
        ):
            raise ValueError(
                f"tail_mass must be float32 {tuple(ids.shape[:-1])}; got "
                f"{self.tail_mass.dtype} {tuple(self.tail_mass.shape)}"
            )
        # The kernels read every field through the ids' device: a field elsewhere would be a
        # host pointer to device memory (or the reverse).
        for name in ("logprobs", "tail_mass"):
            field = getattr(self, name)
            if field is not None and field.device != ids.device:
                raise ValueError(f"{name} is on {field.device} but ids on {ids.device}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {self.method!r}")
        if self.method == "topk" and self.tail not in TAILS:
            raise ValueError(f"topk targets need tail in {TAILS}; got {self.tail!r}")
        if self.method == "support" and self.tail != "bucket":
            raise ValueError(f"support targets need tail='bucket'; got {self.tail!r}")
        if (self.tail == "bucket") != (self.tail_mass is not None):
            raise ValueError("tail_mass is given exactly for tail='bucket' targets")
        if (
            not isinstance(self.vocab_size, int)
            or isinstance(self.vocab_size, bool)
            or not 1 <= self.vocab_size <= 2**31
        ):
            raise ValueError(
                f"vocab_size must be an int in [1, 2**31] (ids are int32); got {self.vocab_size!r}"
            )

    @property
    def lead_shape(self) -> torch.Size:
        return self.ids.shape[:-1]

    @property
    def num_slots(self) -> int:
        """K, the slots per token (padding included)."""
        return self.ids.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def _map(self, fn, fn_lead=None) -> "SparseTargets":
        fn_lead = fn_lead or fn
        return replace(
            self,
            ids=fn(self.ids),
            weights=fn(self.weights),
            logprobs=None if self.logprobs is None else fn(self.logprobs),
            tail_mass=None if self.tail_mass is None else fn_lead(self.tail_mass),
        )

    def to(self, device: str | torch.device) -> "SparseTargets":
        return self._map(lambda t: t.to(device))

    def reshape(self, *lead: int) -> "SparseTargets":
        """The same targets with leading shape ``lead`` (e.g. ``(-1,)`` to flatten)."""
        k = self.num_slots
        return self._map(lambda t: t.reshape(*lead, k), lambda t: t.reshape(*lead))

    def __getitem__(self, index) -> "SparseTargets":
        """Index the leading dimensions, e.g. ``targets[3]`` or ``targets[:, :-1]``."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > len(self.lead_shape):
            raise IndexError(f"too many indices for leading shape {tuple(self.lead_shape)}")
        return self._map(lambda t: t[index], lambda t: t[index])

    def __len__(self) -> int:
        return self.ids.shape[0]

    def nonpadding(self) -> torch.Tensor:
        """``[...]`` int64: the number of non-padding slots of each token."""
        return (self.ids >= 0).sum(-1)
