"""Data-parallel training on PyTorch's own engine: ``torchrun`` + DDP or FSDP2 (gloo on CPU, nccl on GPU).

``gmsa train`` reads the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``);
without it everything here is a no-op for a single process. Each rank reads its share of
every global batch (``BatchStream`` shards), DDP averages gradients (or FSDP reduce-scatters
them), and only rank 0 logs and writes checkpoints. Under FSDP, parameters, gradients and
Adam states are DTensor shards: ``gathered`` turns them into full tensors for a checkpoint
(a collective: every rank calls it), ``shard_like`` turns a full tensor back into a shard.
See ``docs/distributed.md``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


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


def fully_sharded(root: nn.Module, units: list[nn.Module], context: Context, bf16: bool = False) -> nn.Module:
    """FSDP2 on ``root``: each of ``units`` (e.g. transformer layers) is one shard group, ``root`` holds the rest.

    Parameters move to ``context.device`` unit by unit while being sharded, so the whole model
    never sits on one GPU. ``bf16`` computes in bfloat16 with fp32 shards and fp32 gradient
    reduction (CUDA only; on the CPU everything stays as it is).
    """
    mesh = init_device_mesh(context.device.type, (context.world,))
    policy = MixedPrecisionPolicy()
    if bf16 and context.device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    return root


def reshard(root: nn.Module) -> None:
    """Free unsharded parameters an FSDP forward left behind (the root keeps its own after a forward-only pass)."""
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gathered(value):
    """``value`` (a tensor, or dicts / lists / tuples of them) with every DTensor gathered to a full CPU tensor.

    A collective under FSDP: every rank must call it on the same structure, in the same order.
    """
    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    if isinstance(value, dict):
        return {key: gathered(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(gathered(item) for item in value)
    return value


def shard_like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``reference``: this rank's shard when it is a DTensor, else ``full`` on its device.

    Every rank holds ``full`` (read from the same file), so no communication is needed.
    """
    if not isinstance(reference, DTensor):
        return full.to(reference.device)
    local = full.to(reference.device, reference.dtype)
    return distribute_tensor(local, reference.device_mesh, reference.placements, src_data_rank=None)


def shard_optimizer_state(state: dict, params: list[torch.Tensor]) -> dict:
    """A full ``optimizer.state_dict()`` with each per-parameter tensor (Adam's moments) sharded like its parameter."""
    per_param = {
        index: {
            key: shard_like(value, params[index])
            if torch.is_tensor(value) and value.shape == params[index].shape and value.dim()
            else value
            for key, value in entries.items()
        }
        for index, entries in state["state"].items()
    }
    return state | {"state": per_param}
