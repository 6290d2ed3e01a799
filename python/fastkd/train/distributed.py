"""Processes and devices: a single process, or ranks started by ``torchrun`` (DDP, or FSDP2's
``fully_shard`` for students that do not fit one device).

The student and its objective run inside one module's forward (``train.engine.StudentStep``),
which is what DDP or FSDP wraps: DDP's reducer is prepared there, and FSDP gathers a sharded
head there, where the fused loss reads it. Teachers are not wrapped: each rank holds one for
its own micro-batches under no_grad.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "Distributed",
    "decoder_layers",
    "gradient_sync",
    "init_distributed",
    "unsharded_root",
    "wrap_student",
]


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this object initialized the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over ranks, in place (itself with one rank)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_sum_cpu(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU ``tensor`` summed over ranks in place, through this rank's device (NCCL reduces
        device tensors only)."""
        if self.enabled:
            tensor.copy_(self.all_reduce_sum(tensor.to(self.device)).cpu())
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (a signal seen by one rank stops all at one
        step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce_sum(t).item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError(
                "train.device = 'cuda' but CUDA is not available here "
                "(torch.cuda.is_available() is False)"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> Distributed:
    """The process's rank and device: from torchrun's environment (``WORLD_SIZE`` > 1), joining
    or creating the default process group (NCCL on CUDA, gloo on CPU), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return Distributed(rank, world, local_rank, dev, owns)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer (the longest ``nn.ModuleList`` of modules of one
    type: ``model.layers``, ``transformer.h``, ...): FSDP shards each on its own, so that one
    block's parameters are gathered at a time."""
    best: list[nn.Module] = []
    for module in model.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > len(best)
            and len({type(m) for m in module}) == 1
        ):
            best = list(module)
    return best


def wrap_student(module: nn.Module, dist_info: Distributed, strategy: str) -> nn.Module:
    """``module`` (a ``StudentStep``) wrapped for ``strategy`` ("auto" or "ddp": DDP; "fsdp":
    FSDP2 on every decoder layer and the root) across ranks; itself with one rank."""
    if not dist_info.enabled:
        return module
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(module):
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist_info.local_rank] if dist_info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def gradient_sync(module: nn.Module, enabled: bool):
    """A context in which backward passes reduce gradients across ranks (``enabled``) or only
    accumulate them locally (the micro-batches before a step's last)."""
    if hasattr(module, "no_sync"):  # DDP
        return contextlib.nullcontext() if enabled else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


@contextlib.contextmanager
def unsharded_root(module: nn.Module):
    """Within it, the parameters FSDP keeps on the root module (embeddings, final norm, head)
    are gathered, so that the student can be called outside the wrapped module's forward (for
    evaluation and generation); the decoder layers gather their own on their forward as usual."""
    if not hasattr(module, "unshard"):
        yield
        return
    # FSDP2 makes the first module to run forward a root: a decoder layer called here before
    # the root's first forward (on-policy generation precedes a run's first loss) would become
    # one and the root's forward would then fail. The root claims its layers first
    # (idempotent); FSDP2 has no public call for it in torch 2.6-2.13.
    module._get_fsdp_state()._lazy_init()
    module.unshard()
    try:
        yield
    finally:
        module.reshard()
