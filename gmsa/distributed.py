"""Data-parallel training on PyTorch's own engine: ``torchrun`` + DDP (gloo on CPU, nccl on GPU).

``gmsa train`` reads the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``);
without it everything here is a no-op for a single process. Each rank reads its share of
every global batch (``BatchStream`` shards), DDP averages gradients, and only rank 0 logs,
validates and writes checkpoints.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """Where this process sits: ``rank`` of ``world`` processes, on ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.active:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on at least one (so all ranks stop together)."""
        return self.sum([float(flag)])[0] > 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` is this rank's GPU when there is one, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def setup(device: str = "auto", timeout_minutes: float = 120.0) -> Context:
    """Join the process group torchrun describes in the environment, if any.

    The long timeout covers rank 0's validation and checkpointing while the others wait.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if world == 1:
        return Context(device=chosen)
    if not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return Context(rank=dist.get_rank(), world=dist.get_world_size(), device=chosen)


def teardown(context: Context) -> None:
    if context.active and dist.is_initialized():
        dist.destroy_process_group()
