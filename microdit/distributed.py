"""A command's place among torchrun's processes, and the few collectives the stages need.

Shared by training, latent precompute and evaluation: `Runtime.from_env()` reads rank, world size
and local rank; `setup_runtime(device)` also picks the device and joins the process group. Every
collective is a no-op for a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from microdit.errors import UserError

T = TypeVar("T")


@dataclass
class Runtime:
    """Rank, world size, local rank and device of this process (0, 1, 0 when it runs alone)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls, device: torch.device | str = "cpu") -> Runtime:
        """From torchrun's environment; joins no process group (see `setup_runtime`)."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")), torch.device(device))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def connected(self) -> bool:
        """Several processes in one process group: collectives reach the others."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.connected:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the processes, in place."""
        if self.connected:
            dist.all_reduce(tensor)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """`tensor` as rank `src` has it, in place."""
        if self.connected:
            dist.broadcast(tensor, src=src)
        return tensor

    def sum(self, value: int) -> int:
        """A count summed over the processes (the call is also a barrier)."""
        if not self.connected:
            return value
        on = "cuda" if dist.get_backend() == "nccl" else "cpu"  # where the backend reduces
        return int(self.all_reduce(torch.tensor([value], dtype=torch.long, device=on)).item())

    def rank0_first(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 (it writes files), then on the others once it is done (they read them)."""
        if self.main:
            out = fn()
            self.barrier()
            return out
        self.barrier()
        return fn()

    def on_rank0(self, fn: Callable[[], object]) -> None:
        """Run `fn` (it writes files) on rank 0 only; the others wait for it."""
        if self.main:
            fn()
        self.barrier()

    def close(self) -> None:
        if self.connected:
            dist.destroy_process_group()

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's contiguous slice of `items` (every process passes the same list). Also a
        barrier: every process has listed the work before any of them starts changing files for it."""
        out = rank_share(items, self.rank, self.world_size)
        self.barrier()
        return out


def rank_share(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Contiguous slices of `items`, one per rank, sizes differing by at most one."""
    n = len(items)
    return list(items[rank * n // world : (rank + 1) * n // world])


def setup_runtime(device: str) -> Runtime:
    """Rank and device from torchrun's environment (a single process without it), in its process group."""
    rt = Runtime.from_env()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda but no GPU is visible; use --device cpu")
        rt.device = torch.device("cuda", rt.local_rank) if device == "cuda" else torch.device(device)
        torch.cuda.set_device(rt.device)
    else:
        rt.device = torch.device(device)
    if rt.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if rt.device.type == "cuda" else "gloo")
    return rt
