"""Multi-process set-up of the trainer: process group, rank facts, collectives and the DDP wrapper.

Under torchrun (WORLD_SIZE > 1) each process trains on its shard of every batch. Only the FDN's generator
(encoder, quantisers, decoders) is wrapped in DistributedDataParallel, through ``GeneratorOnly``; the
critic is trained by its own optimiser and its gradients are all-reduced explicitly
(``average_gradients``). The EMA codebooks stay identical on every rank: their quantisers all-reduce
their statistics themselves, and DDP broadcasts rank 0's buffers before each forward pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from fdn_core.device import select_device
from fdn_core.errors import ConfigError
from fdn_core.model import FDN

__all__ = [
    "SINGLE_PROCESS",
    "DistInfo",
    "GeneratorOnly",
    "all_reduce_sum",
    "average_gradients",
    "barrier",
    "gather_objects",
    "setup_distributed",
    "teardown_distributed",
    "wrap_generator",
]


@dataclass(frozen=True)
class DistInfo:
    """Process-group facts of this process (world_size 1 when not distributed)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs and writes the run folder."""
        return self.rank == 0


#: The DistInfo of a single process (no process group).
SINGLE_PROCESS = DistInfo()


def setup_distributed(device_arg: str) -> tuple[DistInfo, torch.device]:
    """Read torchrun's WORLD_SIZE / RANK / LOCAL_RANK; join the process group (nccl for CUDA tensors and gloo
    for CPU tensors on GPUs, gloo alone on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), select_device(device_arg)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    choice = (device_arg or "auto").lower()
    if choice == "mps":
        raise ConfigError(
            "multi-process training (WORLD_SIZE > 1) supports CUDA (nccl) and CPU (gloo), not MPS"
        )
    if choice in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = select_device(choice if choice.startswith("cuda") or choice == "cpu" else "cpu")
    # On GPUs: NCCL for CUDA tensors and gloo beside it for the small CPU tensors the trainer all-reduces
    # (validation sums, critic activity, codebook usage counts, the wall-clock stop flag).
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank)
    return DistInfo(world, rank, local_rank), device


def teardown_distributed(dist: DistInfo) -> None:
    """Leave the process group joined by ``setup_distributed`` (nothing to do in a single process)."""
    if dist.distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: DistInfo) -> None:
    """Wait for every process (no-op in a single process)."""
    if dist.distributed:
        torch_dist.barrier()


def all_reduce_sum(values: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Sum ``values`` over the processes, in place; returns it."""
    if dist.distributed:
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM)
    return values


def gather_objects(obj: Any, dist: DistInfo) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    if not dist.distributed:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def average_gradients(params: list[nn.Parameter], dist: DistInfo, divisor: float) -> None:
    """All-reduce the gradients of ``params`` in one flat buffer, then divide by ``divisor``."""
    if not dist.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    flat /= divisor
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


class GeneratorOnly(nn.Module):
    """The FDN without its critic, for DistributedDataParallel: DDP then syncs the generator alone.

    It registers the FDN's submodules except ``critic`` (the same objects, not copies) and its forward is
    the FDN's forward. The FDN itself is held as a bound method, not as a submodule, so the critic's
    parameters are not among this module's.
    """

    def __init__(self, fdn: FDN) -> None:
        super().__init__()
        for name, child in fdn.named_children():
            if name != "critic":
                self.add_module(name, child)
        self._run_fdn = fdn.__call__
        critic = {id(p) for p in fdn.critic.parameters()}
        mine = {id(p) for p in self.parameters()}
        if mine & critic or mine | critic != {id(p) for p in fdn.parameters()}:
            raise RuntimeError("GeneratorOnly: the FDN's parameters are not its critic's plus its children's")

    def forward(self, x: torch.Tensor) -> Any:
        """The FDN's forward pass (an FDNOutput)."""
        return self._run_fdn(x)


def wrap_generator(model: FDN, device: torch.device, dist: DistInfo) -> nn.Module:
    """What the generator's forward pass runs through: ``model`` itself, or under several processes a
    DistributedDataParallel wrapper of its generator (``GeneratorOnly``), leaving the critic out."""
    if not dist.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        GeneratorOnly(model), device_ids=[device.index] if device.type == "cuda" else None
    )
