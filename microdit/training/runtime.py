"""Training's side of processes and devices: DDP/FSDP wrapping, bf16 autocast, accelerator peaks,
and stop signals. Rank, world size and collectives are `microdit.distributed.Runtime`'s, which
latents and evaluation share.
"""
from __future__ import annotations

import contextlib
import signal
import sys
from typing import Callable

import torch

from microdit.distributed import Runtime

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16, per GPU


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of one accelerator, None when unknown (and on CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def bf16_wanted(choice: str, device: torch.device) -> bool:
    """`--bf16 on | off | auto` (auto: on GPUs)."""
    return choice == "on" or (choice == "auto" and device.type == "cuda")


# ---- several processes, one model ---------------------------------------------------------------

def distribute(model: torch.nn.Module, rt: Runtime, fsdp: bool, compile: bool,
               say: Callable[[str], None] = print) -> tuple[torch.nn.Module, bool]:
    """(the module to train through, whether `model` is sharded): `model` itself alone, its DDP
    wrapper under torchrun, or `model` sharded in place with `fsdp`; torch.compile'd when `compile`."""
    sharded = bool(fsdp and rt.world_size > 1)
    if fsdp and not sharded:
        say("note: --fsdp needs several processes (torchrun); training unsharded")
    if sharded:
        from torch.distributed.fsdp import fully_shard

        # SHARD_GRAD_OP, as the released configs: parameters stay gathered between forward and backward.
        for block in [*getattr(model, "patch_mixer", []), *model.blocks]:
            fully_shard(block, reshard_after_forward=False)
        fully_shard(model, reshard_after_forward=False)
        network = model
    elif rt.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        network = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    else:
        network = model
    if compile:
        network = torch.compile(network)
    return network, sharded


def gradient_sync(network: torch.nn.Module, model: torch.nn.Module, sharded: bool, sync: bool):
    """A context for one micro-batch's backward: gradients are reduced across processes only when
    `sync` (an optimizer step's last micro-batch)."""
    if sharded:
        model.set_requires_gradient_sync(sync)
    return network.no_sync() if (not sync and hasattr(network, "no_sync")) else contextlib.nullcontext()


# ---- preemption ---------------------------------------------------------------------------------

class StopRequest:
    """SIGTERM / SIGUSR1 / SIGINT set a flag; the loop checkpoints at the end of the step and exits.
    A second Ctrl-C stops at once (KeyboardInterrupt), losing only the steps since the last checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signal: int | None = None
        self.previous = {}

    def __enter__(self) -> StopRequest:
        for s in self.SIGNALS:
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        again = " (Ctrl-C again to stop now)" if signum == signal.SIGINT else ""
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step{again}", file=sys.stderr,
              flush=True)
