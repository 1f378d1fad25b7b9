"""What a training checkpoint carries beside the weights, and which run a stage directory holds.

* The EMA of the weights, optimizer groups and state (portable between plain, DDP and FSDP runs),
  RNG states and the loss generator's seeds: all a resumed run needs to continue exactly.
* A run is defined by its fingerprint (`microdit.train.run_fingerprint`). A rerun whose
  fingerprint differs from the checkpoints' sets them aside and starts afresh, or brings back
  the superseded run with its own settings (A -> B -> A resumes A).
* `stage_lock`: one trainer per stage directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from microdit.checkpoint import (
    CKPT_ROOT, LOCK_FILE, checkpoints, model_config, prune_superseded, restore_superseded, saved_fingerprint,
    set_aside, superseded_runs,
)
from microdit.errors import UserError
from microdit.training.runtime import Runtime


# ---- optimizer and EMA ----------------------------------------------------------------------------

def optimizer_groups(model: torch.nn.Module, lr: float, moe_lr_scale: float) -> list[dict[str, Any]]:
    """Dense parameters at `lr`, the MoE layers' parameters (gate, w1, w2) at lr x moe_lr_scale."""
    from microdit.moe import ExpertChoiceMoE

    moe = {id(p) for m in model.modules() if isinstance(m, ExpertChoiceMoE) for p in m.parameters()}
    dense_params = [p for p in model.parameters() if id(p) not in moe]
    moe_params = [p for p in model.parameters() if id(p) in moe]
    groups = [{"params": dense_params, "lr": lr}]
    if moe_params:
        groups.append({"params": moe_params, "lr": lr * moe_lr_scale})
    return groups


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor on the CPU, gathering it if it is an FSDP shard (collective)."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def _like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) laid out like `ref`: sharded the same way if `ref` is an FSDP shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(device=ref.device, dtype=ref.dtype)
    if isinstance(ref, DTensor):
        return distribute_tensor(value, ref.device_mesh, ref.placements)
    return value.clone()


class EMA:
    """fp32 exponential moving average of a model's parameters.

    For the first `start` optimizer steps it is a copy of the weights; from then on
    ema <- decay * ema + (1 - decay) * weights after every step. Buffers (the fixed position
    table, the mask token) are not averaged: `full_state` takes them from the model.
    """

    def __init__(self, model: torch.nn.Module, decay: float, start: int = 0):
        self.decay, self.start = decay, start
        self.names = [name for name, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, steps_done: int) -> None:
        live = [p.detach() for p in model.parameters()]
        if steps_done <= self.start:
            for s, p in zip(self.shadow, live):
                s.copy_(p)
        else:
            torch._foreach_lerp_(self.shadow, live, 1.0 - self.decay)

    def full_state(self, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A complete state dict (EMA parameters + the model's buffers) on the CPU; collective under FSDP."""
        averaged = {name: _full(s) for name, s in zip(self.names, self.shadow)}
        return {k: averaged.get(k, v) for k, v in model_state.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise UserError(f"EMA weights lack '{missing[0]}'; the checkpoint is from another model")
        self.shadow = [_like(state[n], s) for n, s in zip(self.names, self.shadow)]


def full_model_state(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The whole state dict on the CPU (gathered from the shards under FSDP; empty off rank 0 then)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state keyed by parameter name (portable between plain, DDP and FSDP runs)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# ---- random numbers -------------------------------------------------------------------------------

def loss_seed(seed: int, step: int, part: int) -> int:
    """Seed of the loss generator for micro-batch `part` (rank * accumulation + micro) of optimizer
    step `step`: a pure function of where we are in training, so a resumed run draws the same."""
    return int(np.random.SeedSequence([seed, step, part]).generate_state(1, np.uint64)[0])


def rng_state() -> dict[str, Any]:
    """torch / CUDA / numpy / python RNG states in types `torch.load(weights_only=True)` accepts."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# ---- which run --out holds ------------------------------------------------------------------------

def fingerprint_changes(saved: dict, wanted: dict) -> list[str]:
    """Readable differences between a checkpoint's fingerprint and this run's ('lr 0.001 -> 0.0003')."""
    changes = []
    for key in sorted(set(saved) | set(wanted)):
        old, new = saved.get(key), wanted.get(key)
        if old == new:
            continue
        if key == "init_sha256":
            changes.append("the --init weights changed (previous stage retrained)")
        elif key == "data":
            changes.append("the training data changed")
        elif key == "model":
            changes.append(f"the architecture changed ({old} -> {new})")
        else:
            changes.append(f"{key} {old} -> {new}")
    return changes


def fingerprint_key(fingerprint: dict | None) -> str:
    """A short name for a run: the hash of its fingerprint (a checkpoint without one gets the time)."""
    if fingerprint is None:
        return f"unknown-{time.strftime('%Y%m%d-%H%M%S')}"
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_changes(out: Path, fingerprint: dict, wanted_model: dict) -> tuple[list[str], dict | None] | None:
    """How the run in out/ckpt differs from this one, and its fingerprint; None when it holds no checkpoint."""
    for _, directory in reversed(checkpoints(out)):
        try:
            saved = saved_fingerprint(directory)
            if saved is not None:
                return fingerprint_changes(saved, fingerprint), saved
            # from before fingerprints were recorded: only the architecture is known
            return fingerprint_changes({"model": model_config(directory)}, {"model": wanted_model}), None
        except (OSError, ValueError, KeyError):
            continue  # unreadable: resuming falls back past it as well
    return None


def describe_changes(changes: list[str]) -> str:
    return "; ".join(changes[:4]) + ("; ..." if len(changes) > 4 else "")


def restore_run(out: Path, fingerprint: dict) -> Path | None:
    """Bring the newest superseded run with this fingerprint back into `out`; its entry, or None."""
    match = next((entry for _, entry, saved in reversed(superseded_runs(out))
                  if saved is not None and not fingerprint_changes(saved, fingerprint)), None)
    if match is not None:
        restore_superseded(out, match)
    return match


def switch_runs(out: Path, fingerprint: dict, current: tuple[list[str], dict | None] | None, keep: int) -> str | None:
    """Make out/ hold this fingerprint's run: set another run aside and bring back a superseded run
    with these settings (settings A -> B -> A resumes A). Returns a note for the log."""
    if current is not None and not current[0]:
        return None  # the same run: resume it
    aside = set_aside(out, fingerprint_key(current[1]), current[1]) if current is not None else None
    back = restore_run(out, fingerprint)
    prune_superseded(out, keep)
    if aside is None:
        return f"note: resuming the earlier run with these settings, kept in {back}" if back else None
    then = f"the earlier run with these settings resumes (kept in {back})" if back else "this stage starts afresh"
    where = f"moved to {aside}" if aside.exists() else "deleted (--keep-superseded 0)"
    return (f"note: {out / CKPT_ROOT} held another run's checkpoints ({describe_changes(current[0])}); {then} and "
            f"they were {where}")


# ---- one trainer per stage directory --------------------------------------------------------------

@contextlib.contextmanager
def stage_lock(out: Path, rt: Runtime) -> Iterator[None]:
    """Hold an exclusive lock on `out` for the whole run, so one process group at a time trains there.

    Rank 0 takes it (flock, released by the kernel however the process ends) and every rank learns
    whether it did; a second trainer is refused before it reads or writes anything in `out`."""
    import fcntl
    import socket

    fd, owner = None, "named by rank 0"
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 256).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            fd = None
        else:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    held = bool(rt.broadcast(torch.tensor([float(fd is not None)], device=rt.device)).item())
    if not held:
        raise UserError(f"{out} is in use: another trainer ({owner}) holds {out / LOCK_FILE}; wait for it to "
                        "finish or stop it, then rerun")
    try:
        yield
    finally:
        if fd is not None:
            os.ftruncate(fd, 0)  # an idle stage directory's lock file is empty (and hashes the same)
            os.close(fd)
