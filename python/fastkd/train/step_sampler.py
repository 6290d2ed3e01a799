"""The order in which optimizer steps visit a dataset's sequences: which sequences each
micro-batch of each step takes, on each rank, deterministically and without state.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["StepSampler"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    return value


class StepSampler:
    """Which sequences each micro-batch of each optimizer step takes, deterministically.

    The sequences are visited epoch after epoch, epoch e in the order of a permutation of
    range(N) drawn by ``torch.randperm`` from a generator seeded by (``seed``, e) (the identity
    without ``shuffle``). Laid end to end, these orders form one sequence of positions; step s
    takes the G = ``micro_batch_size * grad_accum * world_size`` positions [s G, (s + 1) G),
    running on into the next epoch where one ends (and around again where G > N). Within a
    step, micro-batch j of rank r takes the ``micro_batch_size`` positions starting at
    ``(j * world_size + r) * micro_batch_size``. So a step's sequences, over all ranks and
    micro-batches, depend only on G: the same whatever the split of G into ranks and
    gradient-accumulation steps, which keeps a run's data the same when it resumes on a
    different number of devices. Needs no state: any step can be asked for, in any order.
    Permutations are the same for the same torch version (torch does not promise them across
    versions).
    """

    def __init__(
        self,
        num_sequences: int,
        *,
        micro_batch_size: int,
        grad_accum: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.num_sequences = _positive_int("num_sequences", num_sequences)
        self.micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
        self.grad_accum = _positive_int("grad_accum", grad_accum)
        self.world_size = _positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}); got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int; got {seed!r}")
        self.rank, self.seed, self.shuffle = rank, seed, bool(shuffle)
        self._orders: dict[int, torch.Tensor] = {}

    @property
    def global_batch_size(self) -> int:
        """G, the sequences one optimizer step consumes over all ranks and micro-batches."""
        return self.micro_batch_size * self.grad_accum * self.world_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The order of epoch ``epoch``: a permutation of range(N), ``[N]`` int64."""
        return self._order(epoch).clone()

    def _order(self, epoch: int) -> torch.Tensor:
        order = self._orders.get(epoch)
        if order is None:
            if self.shuffle:
                # One 64-bit seed per (seed, epoch) pair, for any int seed.
                mixed = hashlib.sha256(f"{self.seed},{epoch}".encode()).digest()[:8]
                generator = torch.Generator().manual_seed(int.from_bytes(mixed, "little"))
                order = torch.randperm(self.num_sequences, generator=generator)
            else:
                order = torch.arange(self.num_sequences)
            # Keeping two epochs serves the steps that straddle an epoch boundary.
            if len(self._orders) >= 2:
                del self._orders[next(iter(self._orders))]
            self._orders[epoch] = order
        return order

    def _check_step(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0; got {step!r}")

    def epoch_of(self, step: int) -> int:
        """The epoch of step ``step``'s first position (floor(s G / N))."""
        self._check_step(step)
        return step * self.global_batch_size // self.num_sequences

    def step_indices(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of step ``step``: ``grad_accum`` lists of
        ``micro_batch_size`` sequence indices in [0, N)."""
        self._check_step(step)
        mb, world = self.micro_batch_size, self.world_size
        offsets = (torch.arange(self.grad_accum)[:, None] * world + self.rank) * mb + torch.arange(
            mb
        )
        positions = step * self.global_batch_size + offsets  # [grad_accum, mb]
        epochs = positions // self.num_sequences
        indices = torch.empty_like(positions)
        for epoch in torch.unique(epochs).tolist():
            here = epochs == epoch
            indices[here] = self._order(epoch)[positions[here] % self.num_sequences]
        return indices.tolist()
