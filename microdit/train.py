"""`microdit train`: one of MicroDiT's four training stages, resumable, preemptible, multi-GPU.

A stage trains a MicroDiT on precomputed latents with the EDM loss (deferred patch masking at
`--mask-ratio`), AdamW and a warmup/cosine/constant lr schedule; the paper chains four of them:
256 px mask 0.75 -> 256 px mask 0 -> 512 px mask 0.75 -> 512 px mask 0, each started with
`--init <previous stage>/final`. Launch it plainly on a CPU or a GPU, or under `torchrun` for
DDP (default) or FSDP (`--fsdp`, gradients and optimizer state sharded, like the released
configs' SHARD_GRAD_OP).

Everything a stage writes lives under `--out`:
    metrics.jsonl, metrics.csv, tb/   per log step: loss, lr, grad norm, images/s, MFU (GPU), time
    ckpt/step-000100/                 model.safetensors, ema.safetensors, config.json, train_state.pt
    final/                            config.json, model.safetensors (+ ema.safetensors)
    samples.png, samples.json         a sample grid on fixed prompts (with --vae and --text-encoder)
    summary.json                      written last: its presence means the stage is complete
    train.lock                        flock'ed by the one trainer running here (a second is refused)
    ckpt.superseded/<run>/            earlier runs with other settings (all of the above), resumable
Rerunning the same command resumes from the newest checkpoint that reads back (a truncated one is
skipped, with a note); rerunning with the settings of a superseded run resumes that run. SIGTERM,
SIGUSR1 (Slurm preemption) or Ctrl-C finishes the current step, saves a checkpoint and exits with
code 143 so the job is rerun; the trainer gets SIGTERM when its parent process dies. Resumption
is exact: the data order lives in the loader's state, and every random draw of the loss (noise
level, noise, patch mask) comes from a generator re-seeded from (seed, step, micro-batch), so the
resumed loss curve equals the uninterrupted one.

Where we differ from the released code, on purpose and behind flags:
  * `--ema` (default on): the 512 px configs ask for an EMA of the weights (composer's EMA
    algorithm), which the released training script never applies. We keep an fp32 EMA, updated
    after every optimizer step once `--ema-start` steps have passed (before that it tracks the
    weights exactly); evaluation samples from it.
  * `--moe-lr-scale 0.5`: the released script halves the lr of parameters whose name contains
    "moe", but no MicroDiT parameter is named so and nothing is halved. We put every parameter of
    the expert-choice MoE layers (gate, w1, w2) in a group with lr x scale.
Like the released code, weight decay applies to every parameter, and a stage started from
`--init` takes the previous stage's raw (non-EMA) weights, unless `--init-weights ema`.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from microdit.cli import UserError
from microdit.checkpoint import save_safetensors
from microdit.io import atomic_path, naming_full_disk, read_json, write_json

EXIT_RESUMABLE = 143  # stopped early with a checkpoint saved: rerun the same command to continue
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16, per GPU
METRIC_FIELDS = ("step", "loss", "lr", "grad_norm", "images_per_s", "mfu", "time", "images_seen")
CKPT_DIR = re.compile(r"^step-(\d+)$")
MODEL_FILE, EMA_FILE, CONFIG_FILE, STATE_FILE = "model.safetensors", "ema.safetensors", "config.json", "train_state.pt"
RUN_FILE = "run.json"  # beside each checkpoint: what defines the run (see run_fingerprint)
LOCK_FILE = "train.lock"  # flock'ed by the one trainer writing --out (holds its pid; empty when none runs)
SUPERSEDED_DIR = "ckpt.superseded"  # <fingerprint key>/: earlier runs with other settings, resumable
# What one run writes into --out; a superseded run takes all of it along, so nothing mixes two runs.
RUN_OUTPUTS = ("ckpt", "final", "summary.json", "samples.png", "samples.json", "metrics.jsonl", "metrics.csv", "tb")
# Flags that define a stage's trajectory; a checkpoint made with other values belongs to another run.
# Not here, so a rerun may change them and resume: --steps under a constant schedule (train longer),
# micro-batch, devices, compile/FSDP, checkpoint and logging cadence, sample prompts.
RUN_DEFINING = ("mask_ratio", "global_batch", "lr", "schedule", "warmup", "final_lr_ratio", "p_mean", "p_std",
                "grad_clip", "weight_decay", "betas", "eps", "caption_drop", "ema", "ema_decay", "ema_start",
                "moe_lr_scale", "weighting", "init_weights", "init_optimizer", "seed")


class NonFiniteLossError(UserError):
    """The loss or the gradient norm is NaN/inf; the step was not applied and nothing was saved."""


# --------------------------------------------------------------------------------------------
# Processes and devices
# --------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_runtime(device: str) -> Runtime:
    """Rank and device from torchrun's environment (a single process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda but no GPU is visible; use --device cpu")
        dev = torch.device("cuda", local) if device == "cuda" else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(rank, world, local, dev)


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of one accelerator, None when unknown (and on CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def loss_seed(seed: int, step: int, part: int) -> int:
    """Seed of the loss generator for micro-batch `part` (rank * accumulation + micro) of optimizer
    step `step`: a pure function of where we are in training, so a resumed run draws the same."""
    return int(np.random.SeedSequence([seed, step, part]).generate_state(1, np.uint64)[0])


# --------------------------------------------------------------------------------------------
# Model, optimizer, EMA
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Checkpoints and model directories
# --------------------------------------------------------------------------------------------

def write_model_dir(directory: Path, config: dict, state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor] | None) -> None:
    """`config.json` + `model.safetensors` (+ `ema.safetensors`): what `MicroDiT.from_pretrained` reads."""
    meta = {"format": "pt", "architecture": str(config["architecture"])}
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.contiguous() for k, v in state.items()}, directory / MODEL_FILE, metadata=meta)
    if ema_state is not None:
        save_safetensors({k: v.contiguous() for k, v in ema_state.items()}, directory / EMA_FILE, metadata=meta)
    write_json(directory / CONFIG_FILE, config)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a completely written `tmp` directory to `final`, replacing an older one."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A temp dir beside `final` that replaces it once the block has written it completely.

    A failed write (a full disk, a kill) removes the temp dir: no half-written `final` ever exists,
    what was there before stays, and a full disk is reported naming `final`'s directory."""
    tmp = final.parent / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with naming_full_disk(final.parent):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def run_fingerprint(args: argparse.Namespace, model_config: dict, latent_size: int) -> dict[str, Any]:
    """Everything that decides what a stage's checkpoints hold: the architecture, the trajectory
    flags, each data source (its summary's hash and weight) and the hash of the --init weights.

    A rerun whose fingerprint differs is another run (a changed key, retrained data or a retrained
    previous stage): its old checkpoints must not be resumed."""
    from microdit.io import sha256_file

    def jsonable(v):
        return list(v) if isinstance(v, tuple) else v

    weights = source_weights(args.latents, args.weights) or [1.0] * len(args.latents)
    data = {}
    for path, weight in zip(args.latents, weights):
        # the summary and every shard index (which holds each shard's xxh3): the data's content
        files = sorted(p for p in Path(path).rglob("*.json") if p.name in ("_summary.json", "index.json"))
        digest = hashlib.sha256()
        for f in files:
            digest.update(f"{f.relative_to(path)}\0{sha256_file(f)}\0".encode())
        data[Path(path).name] = {"weight": weight, "sha256": digest.hexdigest() if files else None}
    init = None
    if args.init:
        weights_file = Path(args.init) / (EMA_FILE if args.init_weights == "ema" else MODEL_FILE)
        init = sha256_file(weights_file) if weights_file.is_file() else None
    # more steps extend a constant schedule exactly; any other schedule is shaped by its length
    horizon = None if args.schedule == "constant" else args.steps
    return {"model": model_config, "latent_size": latent_size, "schedule_steps": horizon,
            **{k: jsonable(getattr(args, k, None)) for k in RUN_DEFINING}, "data": data, "init_sha256": init}


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


def set_aside(out: Path, fingerprint: dict | None) -> Path:
    """Move the current run (its checkpoints, final weights, summary, metrics, samples) to
    ckpt.superseded/<fingerprint key>/, where a rerun with its settings finds it again."""
    entry = out / SUPERSEDED_DIR / fingerprint_key(fingerprint)
    tmp = entry.with_name(f".{entry.name}.tmp")
    for stale in (tmp, entry):  # an entry with the same key is an older copy of this very run
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    for name in RUN_OUTPUTS:
        if (out / name).exists():
            os.replace(out / name, tmp / name)
    write_json(tmp / RUN_FILE, {"fingerprint": fingerprint, "set_aside": time.time()})
    os.replace(tmp, entry)
    return entry


def superseded_runs(out: Path) -> list[tuple[float, Path, dict | None]]:
    """(when set aside, entry, fingerprint) of each run under ckpt.superseded/, oldest first."""
    runs = []
    for entry in (out / SUPERSEDED_DIR).glob("*"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            info = read_json(entry / RUN_FILE)
            runs.append((float(info["set_aside"]), entry, info["fingerprint"]))
    return sorted(runs, key=lambda run: run[0])


def restore_superseded(out: Path, fingerprint: dict) -> Path | None:
    """Move the superseded run with this fingerprint back into `out`; its entry, or None if there is none.

    `out` holds no checkpoint here (the current run was set aside, or never saved one), so what of
    a run lies there (metrics of a run killed before its first checkpoint) is replaced."""
    match = next((entry for _, entry, saved in reversed(superseded_runs(out))
                  if saved is not None and not fingerprint_changes(saved, fingerprint)), None)
    if match is None:
        return None
    for name in RUN_OUTPUTS:
        left = out / name
        if left.is_dir():
            shutil.rmtree(left)
        elif left.exists():
            left.unlink()
        if (match / name).exists():
            os.replace(match / name, left)
    shutil.rmtree(match)
    return match


def prune_superseded(out: Path, keep: int) -> None:
    """Keep the `keep` most recently superseded runs."""
    runs = superseded_runs(out)
    for _, entry, _ in runs[: max(len(runs) - keep, 0)]:
        shutil.rmtree(entry, ignore_errors=True)


def run_changes(out: Path, fingerprint: dict, wanted_model: dict) -> tuple[list[str], dict | None] | None:
    """How the run in out/ckpt differs from this one, and its fingerprint; None when it holds no checkpoint."""
    for _, directory in reversed(checkpoints(out)):
        try:
            if (directory / RUN_FILE).is_file():
                saved = read_json(directory / RUN_FILE)["fingerprint"]
                return fingerprint_changes(saved, fingerprint), saved
            # from before fingerprints were recorded: only the architecture is known
            return fingerprint_changes({"model": read_json(directory / CONFIG_FILE)}, {"model": wanted_model}), None
        except (OSError, ValueError, KeyError):
            continue  # unreadable: resuming falls back past it as well
    return None


def describe_changes(changes: list[str]) -> str:
    return "; ".join(changes[:4]) + ("; ..." if len(changes) > 4 else "")


def switch_runs(out: Path, fingerprint: dict, current: tuple[list[str], dict | None] | None, keep: int) -> str | None:
    """Make out/ hold this fingerprint's run: set another run aside and bring back a superseded run
    with these settings (settings A -> B -> A resumes A). Returns a note for the log."""
    if current is not None and not current[0]:
        return None  # the same run: resume it
    aside = set_aside(out, current[1]) if current is not None else None
    back = restore_superseded(out, fingerprint)
    prune_superseded(out, keep)
    if aside is None:
        return f"note: resuming the earlier run with these settings, kept in {back}" if back else None
    then = f"the earlier run with these settings resumes (kept in {back})" if back else "this stage starts afresh"
    where = f"moved to {aside}" if aside.exists() else "deleted (--keep-superseded 0)"
    return (f"note: {out / 'ckpt'} held another run's checkpoints ({describe_changes(current[0])}); {then} and "
            f"they were {where}")


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `out/ckpt`, oldest first."""
    found = []
    for d in (out / "ckpt").glob("step-*"):
        m = CKPT_DIR.match(d.name)
        if m and (d / STATE_FILE).is_file() and (d / MODEL_FILE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


@dataclass
class Resumed:
    """A checkpoint read back whole: where it is, the model config, train state and weights."""
    directory: Path
    config: dict
    train_state: dict[str, Any]
    state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None


def read_checkpoint(directory: Path, ema: bool) -> Resumed:
    from microdit.checkpoint import read_state_dict

    # mmap: the processes of one node share the pages instead of each holding a copy
    train_state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    ema_state = read_state_dict(directory / EMA_FILE) if ema and (directory / EMA_FILE).is_file() else None
    return Resumed(directory, read_json(directory / CONFIG_FILE), train_state,
                   read_state_dict(directory / MODEL_FILE), ema_state)


def load_newest_checkpoint(out: Path, ema: bool, say=print) -> Resumed | None:
    """The newest checkpoint that reads back whole, falling back past truncated or corrupt ones (and
    saying so); None when there is none. Raises CheckpointError when every checkpoint is unreadable."""
    from microdit.checkpoint import CheckpointError

    unreadable: list[tuple[Path, str]] = []
    found = checkpoints(out)
    for _, directory in reversed(found):
        try:
            resumed = read_checkpoint(directory, ema)
        except Exception as e:  # any failure to read it back: truncated, corrupt, half-copied
            unreadable.append((directory, (str(e).strip().splitlines() or [type(e).__name__])[0]))
            continue
        if unreadable:
            newest, why = unreadable[0]
            more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
            say(f"note: checkpoint {newest} is unreadable ({why}){more}; resuming from the previous one, "
                f"{directory.name}")
        return resumed
    if unreadable:
        newest, why = unreadable[0]
        raise CheckpointError(f"{out / 'ckpt'}: no checkpoint reads back (newest {newest.name}: {why}); move "
                              "the directory away to start the stage afresh")
    return None


def save_checkpoint(out: Path, step: int, config: dict, state: dict, ema_state: dict | None,
                    train_state: dict, keep: int, fingerprint: dict | None = None) -> Path:
    """Write ckpt/step-N via a temp dir and a rename, then drop all but the newest `keep`."""
    final = out / "ckpt" / f"step-{step:06d}"
    with staged_dir(final) as tmp:
        write_model_dir(tmp, config, state, ema_state)
        torch.save(train_state, tmp / STATE_FILE)
        if fingerprint is not None:
            write_json(tmp / RUN_FILE, {"step": step, "fingerprint": fingerprint})
    for saved, old in checkpoints(out):
        if saved > step:  # an unreadable newer checkpoint we resumed past: its trajectory is abandoned
            shutil.rmtree(old, ignore_errors=True)
    for stale in (out / "ckpt").glob(".step-*.tmp"):  # left by a killed save (we hold the lock: none is live)
        shutil.rmtree(stale, ignore_errors=True)
    for _, old in checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def load_trained(final_dir: str | os.PathLike, ema: bool = False, device: torch.device | str = "cpu"):
    """The MicroDiT a stage wrote to `final/` (or a checkpoint dir); `ema=True` loads the EMA weights."""
    from microdit.checkpoint import CheckpointError, check_state_dict, from_pretrained, read_state_dict

    final_dir = Path(final_dir)
    model = from_pretrained(final_dir, device="cpu")
    if ema:
        path = final_dir / EMA_FILE
        if not path.is_file():
            raise CheckpointError(f"{final_dir}: no {EMA_FILE}; the stage ran without EMA, load it with ema=False")
        state = read_state_dict(path)
        check_state_dict(model, state, source=str(path))
        model.load_state_dict(state, strict=True)
    return model.to(device)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl + metrics.csv (+ TensorBoard) on rank 0. Rows past the step training resumes
    from are dropped first, so a rerun after a crash never logs a step twice."""

    def __init__(self, out: Path, resume_step: int, tensorboard: bool):
        self.jsonl, self.csv = out / "metrics.jsonl", out / "metrics.csv"
        rows = [r for r in self.read(self.jsonl) if r["step"] <= resume_step]
        with atomic_path(self.jsonl) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with atomic_path(self.csv) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("note: the tensorboard package is not installed; metrics go to metrics.jsonl/csv only")
            else:
                self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1)

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        return rows

    def log(self, row: dict[str, Any]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS).writerow(row)
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "images_per_s", "mfu"):
                if row[key] is not None:
                    self.tb.add_scalar(f"train/{key}", row[key], row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------------------------
# Sample grid
# --------------------------------------------------------------------------------------------

def image_grid(images: list, columns: int):
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return grid


def write_samples(out: Path, final_dir: Path, args: argparse.Namespace, rt: Runtime, autocast: torch.dtype | None) -> None:
    """samples.png from the stage's final weights (EMA when kept) on the fixed prompts."""
    from diffusers import AutoencoderKL

    from microdit.generate import generate
    from microdit.text import TextEncoder

    prompts = sample_prompts(args)
    model = load_trained(final_dir, ema=args.ema, device=rt.device)
    vae = AutoencoderKL.from_pretrained(args.vae).to(rt.device).eval()
    text_encoder = TextEncoder.from_pretrained(args.text_encoder, device=rt.device)
    images = generate(prompts, model, vae, text_encoder, steps=args.sample_steps, guidance=args.sample_guidance,
                      seed=args.seed if args.sample_seed is None else args.sample_seed, autocast_dtype=autocast)
    with atomic_path(out / "samples.png") as tmp:
        image_grid(images, columns=min(4, len(images))).save(tmp, format="PNG")
    write_json(out / "samples.json", {"prompts": prompts, "weights": "ema" if args.ema else "raw",
                                      "steps": args.sample_steps, "guidance": args.sample_guidance,
                                      "seed": args.seed if args.sample_seed is None else args.sample_seed})


def sample_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.sample_prompt or [])
    if args.sample_prompts:
        path = Path(args.sample_prompts)
        if not path.is_file():
            raise UserError(f"--sample-prompts {path}: file not found")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def source_weights(sources: list[str], specs: list[str] | None) -> list[float] | None:
    """NAME=W flags (NAME = a latents dir's basename) -> one weight per source, 1.0 when unnamed."""
    if not specs:
        return None
    names = [Path(s).name for s in sources]
    weights = dict.fromkeys(names, 1.0)
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep:
            raise UserError(f"--weights {spec!r}: expected NAME=WEIGHT, e.g. {names[0]}=2.0")
        if name not in weights:
            raise UserError(f"--weights {spec!r}: no --latents source named {name!r} (have {', '.join(names)})")
        try:
            weights[name] = float(value)
        except ValueError:
            raise UserError(f"--weights {spec!r}: {value!r} is not a number") from None
    return [weights[n] for n in names]


class Batches:
    """Endless batches from a streaming loader, starting the next epoch when one runs out."""

    def __init__(self, loader):
        self.loader, self.it = loader, None

    def next(self) -> dict[str, Any]:
        for _ in range(2):  # a resumed epoch may already be used up; then one fresh epoch
            if self.it is None:
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it = None
        raise UserError("the training data yield no batch: each rank needs at least --micro-batch samples")


# --------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------

class StopRequest:
    """SIGTERM / SIGUSR1 / SIGINT set a flag; the loop checkpoints at the end of the step and exits.
    A second Ctrl-C stops at once (KeyboardInterrupt), losing only the steps since the last checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signal: int | None = None
        self.previous = {}

    def __enter__(self) -> "StopRequest":
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


# --------------------------------------------------------------------------------------------
# One trainer per stage directory
# --------------------------------------------------------------------------------------------

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
    held = fd is not None
    if rt.world_size > 1:
        flag = torch.tensor([float(held)], device=rt.device)
        dist.broadcast(flag, src=0)
        held = bool(flag.item())
    if not held:
        raise UserError(f"{out} is in use: another trainer ({owner}) holds {out / LOCK_FILE}; wait for it to "
                        "finish or stop it, then rerun")
    try:
        yield
    finally:
        if fd is not None:
            os.ftruncate(fd, 0)  # an idle stage directory's lock file is empty (and hashes the same)
            os.close(fd)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------

def check_args(args: argparse.Namespace, world_size: int) -> int:
    """Validate flags; returns gradient-accumulation steps per optimizer step."""
    from microdit.schedules import check_schedule

    micro = args.micro_batch or args.global_batch // world_size
    if min(args.steps, args.global_batch, micro, args.ckpt_every, args.keep, args.log_every) < 1:
        raise UserError("--steps, --global-batch, --micro-batch, --ckpt-every, --keep and --log-every must be >= 1")
    if args.keep_superseded < 0:
        raise UserError(f"--keep-superseded must be >= 0, got {args.keep_superseded}")
    if args.global_batch % (micro * world_size):
        raise UserError(f"--global-batch {args.global_batch} is not a multiple of --micro-batch {micro} x "
                        f"{world_size} processes; change one so that it divides")
    if not 0.0 <= args.mask_ratio < 1.0:
        raise UserError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise UserError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.lr < 0 or args.moe_lr_scale < 0:
        raise UserError("--lr and --moe-lr-scale must be >= 0")
    try:
        check_schedule(args.schedule, args.steps, args.warmup, args.final_lr_ratio)
    except ValueError as e:
        raise UserError(str(e)) from None
    if bool(args.vae) != bool(args.text_encoder):
        raise UserError("the sample grid needs both --vae and --text-encoder (or neither)")
    if args.init_optimizer and not args.init:
        raise UserError("--init-optimizer needs --init")
    args.micro_batch = micro
    return args.global_batch // (micro * world_size)


def stage_number(args: argparse.Namespace) -> int | None:
    if args.stage is not None:
        return args.stage
    m = re.search(r"stage[_-]?(\d+)$", Path(args.out).name)
    return int(m.group(1)) if m else None


def architecture_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Ablation switches on top of the named size (recorded in the model's config only when set)."""
    return {} if getattr(args, "patch_mixer", True) else {"use_patch_mixer": False}


def build_stage_model(args: argparse.Namespace, latent_shape: list[int], caption_dim: int, load_init: bool = True):
    """The MicroDiT for this stage's latents, with --init's weights when given and `load_init`."""
    from microdit.checkpoint import load_previous_stage
    from microdit.models import build_model

    channels, size = latent_shape[0], latent_shape[-1]
    if args.caption_channels is not None and args.caption_channels != caption_dim:
        raise UserError(f"--caption-channels {args.caption_channels} but the latents hold {caption_dim}-d caption "
                        "embeddings; drop the flag or re-encode the captions")
    scale = args.pos_interp_scale
    init_dir = Path(args.init) if args.init else None
    if init_dir is not None:
        if not (init_dir / CONFIG_FILE).is_file():
            raise UserError(f"--init {init_dir}: no {CONFIG_FILE}; point it at the previous stage's final/ directory")
        prev = read_json(init_dir / CONFIG_FILE)
        if scale is None:  # keep position units: the previous grid's span, sampled more finely
            prev_size = prev.get("input_size", 32)
            scale = float(prev.get("pos_interp_scale", 1.0)) * size / prev_size
    torch.manual_seed(args.seed)
    try:
        model = build_model(args.model, input_size=size, in_channels=channels, caption_channels=caption_dim,
                            pos_interp_scale=1.0 if scale is None else scale, **architecture_overrides(args))
    except ValueError as e:
        raise UserError(str(e)) from None
    if init_dir is not None and load_init:
        load_previous_stage(model, init_dir / (EMA_FILE if args.init_weights == "ema" else MODEL_FILE))
    return model


def run(args: argparse.Namespace) -> int:
    from microdit.lifetime import die_with_parent

    # SIGTERM when our parent dies: a trainer orphaned by a killed workflow manager checkpoints and
    # stops, instead of training on beside the rerun
    die_with_parent(os.getppid(), signal.SIGTERM)
    rt = setup_runtime(args.device)
    try:
        with stage_lock(Path(args.out), rt):
            return train(args, rt)
    finally:
        if rt.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train(args: argparse.Namespace, rt: Runtime) -> int:
    from tqdm.auto import tqdm

    from torch.distributed.tensor import DTensor

    from microdit.checkpoint import CheckpointError, check_state_dict
    from microdit.data.loader import build_latent_loader, source_layout
    from microdit.edm import edm_loss
    from microdit.models import flops_per_image, model_from_config
    from microdit.schedules import build_scheduler

    accum = check_args(args, rt.world_size)
    out = Path(args.out)
    stage = stage_number(args)
    say = print if rt.main else (lambda *a, **k: None)
    if not args.latents:
        raise UserError("no --latents source given")
    latent_shape, caption_shape = source_layout(args.latents[0], args.resolution)
    weights = source_weights(args.latents, args.weights)
    out.mkdir(parents=True, exist_ok=True)

    # ---- model, resumed or fresh -------------------------------------------------------------
    with torch.device("meta"):
        wanted = build_stage_model(args, latent_shape, caption_shape[-1], load_init=False).config
    fingerprint = run_fingerprint(args, wanted, latent_shape[-1])
    current = run_changes(out, fingerprint, wanted)
    if current is not None and current[0] and args.on_change == "error":
        raise UserError(f"{out / 'ckpt'} holds another run's checkpoints ({describe_changes(current[0])}); use "
                        "another --out, delete them, or pass --on-change restart")
    rt.barrier()  # every process has read the old checkpoints before they move
    note = switch_runs(out, fingerprint, current, args.keep_superseded) if rt.main else None
    rt.barrier()
    if note:
        say(note)
    resumed = load_newest_checkpoint(out, args.ema, say)
    train_state: dict[str, Any] | None = None
    if resumed is None:
        model = build_stage_model(args, latent_shape, caption_shape[-1])
    else:
        model = model_from_config(resumed.config)
    config = dict(model.config)
    identity = {"model": config["architecture"], "latent_size": latent_shape[-1], "mask_ratio": args.mask_ratio,
                "global_batch": args.global_batch, "steps": args.steps, "lr": args.lr, "schedule": args.schedule}
    ema_state = None
    if resumed is not None:
        train_state = resumed.train_state
        saved = train_state.get("identity", {})
        changed = [k for k in identity if k in saved and saved[k] != identity[k]]
        if changed:
            say(f"note: resuming with changed {', '.join(f'{k} {saved[k]} -> {identity[k]}' for k in changed)}")
        check_state_dict(model, resumed.state, source=str(resumed.directory / MODEL_FILE))
        model.load_state_dict(resumed.state, strict=True)
        ema_state = resumed.ema_state
        if args.ema and ema_state is None:
            say(f"note: {resumed.directory.name} has no EMA weights; the EMA starts from the current weights")
        say(f"resuming {out} from {resumed.directory.name}")
    model.to(rt.device).train()
    n_params = sum(p.numel() for p in model.parameters())
    flops = flops_per_image(model, args.mask_ratio, caption_len=caption_shape[0])

    # ---- distribution ------------------------------------------------------------------------
    sharded = bool(args.fsdp and rt.world_size > 1)
    if args.fsdp and not sharded:
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
    if args.compile:
        network = torch.compile(network)

    ema = EMA(model, args.ema_decay, args.ema_start) if args.ema else None
    if ema is not None and ema_state is not None:
        ema.load(ema_state)

    # ---- optimizer and schedule --------------------------------------------------------------
    optimizer = torch.optim.AdamW(optimizer_groups(model, args.lr, args.moe_lr_scale), lr=args.lr,
                                  betas=tuple(args.betas), eps=args.eps, weight_decay=args.weight_decay,
                                  fused=rt.device.type == "cuda" or None)
    if train_state is None and args.init_optimizer:
        prev = checkpoints(Path(args.init).parent)
        if not prev:
            raise UserError(f"--init-optimizer: no checkpoint in {Path(args.init).parent / 'ckpt'} to take the "
                            "optimizer state from")
        prev_state = torch.load(prev[-1][1] / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
        try:
            for group in prev_state["optimizer"]["param_groups"]:
                group.pop("initial_lr", None)  # the previous schedule's; ours is set up below
            load_optimizer_state(model, optimizer, prev_state["optimizer"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{prev[-1][1]}: optimizer state does not fit this model: {e}") from e
        for group, base in zip(optimizer.param_groups, (args.lr, args.lr * args.moe_lr_scale)):
            group.update(lr=base, initial_lr=base, betas=tuple(args.betas), eps=args.eps,
                         weight_decay=args.weight_decay)
        say(f"optimizer state from {prev[-1][1]}")
    scheduler = build_scheduler(optimizer, args.schedule, args.steps, args.warmup, args.final_lr_ratio)

    # ---- data --------------------------------------------------------------------------------
    if args.clean_shm and rt.local_rank == 0:
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()  # a killed run leaves shared memory that would hang this one
    rt.barrier()
    num_workers = args.num_workers if args.num_workers is not None else (2 if rt.device.type == "cuda" else 0)
    loader = build_latent_loader(args.latents, args.resolution, args.micro_batch, weights=weights,
                                 weighting=args.weighting, seed=args.seed, caption_drop=args.caption_drop,
                                 num_workers=num_workers, clean_shm=False,
                                 pin_memory=rt.device.type == "cuda",
                                 persistent_workers=num_workers > 0)

    step, images_seen, train_s = 0, 0, 0.0
    window = {"loss": 0.0, "grad_norm": 0.0, "n": 0}
    if train_state is not None:
        load_optimizer_state(model, optimizer, train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        loader.load_state_dict(train_state["loader"])
        set_rng_state(train_state["rng"])
        step, images_seen, train_s = train_state["step"], train_state["images_seen"], train_state["train_s"]
        window = dict(train_state["window"])
    batches = Batches(loader)

    use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and rt.device.type == "cuda")
    autocast_dtype = torch.bfloat16 if use_bf16 else None
    amp = (lambda: torch.autocast(rt.device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    generator = torch.Generator(device=rt.device)
    peak = peak_tflops(rt.device)
    log = MetricsLog(out, step, args.tensorboard) if rt.main else None
    say(f"stage {stage}: {config['architecture']} ({n_params / 1e6:.1f}M params) at {args.resolution} px "
        f"(latent {latent_shape}), mask {args.mask_ratio}, {args.steps} steps x {args.global_batch} images "
        f"= {args.micro_batch} x {accum} accumulation x {rt.world_size} processes on {device_name(rt.device)}")

    def snapshot() -> tuple[dict, dict | None, dict]:
        """Full model, EMA and optimizer state on rank 0 (gathered from every process under FSDP)."""
        if not sharded and not rt.main:  # replicas: rank 0 alone has all it needs
            return {}, None, {}
        state = full_model_state(model, sharded)
        ema_full = ema.full_state(state) if ema is not None else None
        return state, ema_full, full_optimizer_state(model, optimizer)

    def checkpoint() -> tuple[dict, dict | None, dict]:
        """Save ckpt/step-N (rank 0 writes); returns the snapshot it saved."""
        state, ema_full, optim_state = snapshot()
        if rt.main:
            train_state_now = {
                "step": step, "images_seen": images_seen, "train_s": train_s, "window": dict(window),
                "optimizer": optim_state, "scheduler": scheduler.state_dict(), "loader": loader.state_dict(),
                "rng": rng_state(), "identity": identity, "world_size": rt.world_size, "stage": stage,
            }
            save_checkpoint(out, step, config, state, ema_full, train_state_now, args.keep, fingerprint)
        rt.barrier()
        return state, ema_full, optim_state

    def train_step(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over `accum` micro-batches and clip; returns (mean loss here, grad norm)."""
        loss_sum = torch.zeros((), device=rt.device)
        for micro in range(accum):
            batch = batches.next()
            latents = batch["latents"].to(rt.device, non_blocking=True)
            captions = batch["captions"].to(rt.device, non_blocking=True)
            generator.manual_seed(loss_seed(args.seed, step, rt.rank * accum + micro))
            last = micro == accum - 1
            # Gradients are reduced across processes once, on the last micro-batch.
            no_sync = network.no_sync if (not last and hasattr(network, "no_sync")) else contextlib.nullcontext
            if sharded:
                model.set_requires_gradient_sync(last)
            with no_sync(), amp():
                loss = edm_loss(network, latents, captions, mask_ratio=args.mask_ratio, p_mean=args.p_mean,
                                p_std=args.p_std, generator=generator)
            (loss / accum).backward()
            loss_sum += loss.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        return loss_sum / accum, grad_norm.float()

    # ---- the loop ----------------------------------------------------------------------------
    saved_at = step if train_state is not None else None
    steps_this_run, stop_reason = 0, None
    bar = tqdm(total=args.steps, initial=step, desc=f"stage {stage}", disable=None if rt.main else True,
               dynamic_ncols=True)
    window_start, window_images = time.perf_counter(), 0
    try:
        with StopRequest() as stop:
            while step < args.steps:
                t0 = time.perf_counter()
                lr_now = optimizer.param_groups[0]["lr"]
                loss, grad_norm = train_step(step)
                steps_this_run += 1
                wants_stop = stop.signal is not None or steps_this_run == args.max_steps_this_run
                # One all-reduce per step: every process sees the same loss and the same stop decision.
                shared = torch.stack([loss, torch.tensor(float(wants_stop), device=rt.device)])
                if rt.world_size > 1:
                    dist.all_reduce(shared)
                loss_value, stop_votes, grad_value = torch.cat([shared, grad_norm.reshape(1)]).tolist()
                loss_value /= rt.world_size
                if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                    what, value = ("loss", loss_value) if not math.isfinite(loss_value) else ("gradient norm", grad_value)
                    last_good = checkpoints(out)
                    raise NonFiniteLossError(
                        f"stage {stage} step {step + 1}: {what} is {value}; the step was not applied and nothing was "
                        f"saved (last good checkpoint: {last_good[-1][1] if last_good else 'none'}); lower --lr or "
                        "--grad-clip, or check the data")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                images_seen += args.global_batch
                if ema is not None:
                    ema.update(model, step)
                window["loss"] += loss_value
                window["grad_norm"] += grad_value
                window["n"] += 1
                window_images += args.global_batch
                train_s += time.perf_counter() - t0

                if step % args.log_every == 0 or step == args.steps:
                    elapsed = time.perf_counter() - window_start
                    ips = window_images / elapsed if elapsed > 0 else None
                    row = {"step": step, "loss": window["loss"] / window["n"], "lr": lr_now,
                           "grad_norm": window["grad_norm"] / window["n"], "images_per_s": ips,
                           "mfu": 3 * flops * ips / (peak * 1e12 * rt.world_size) if peak and ips else None,
                           "time": train_s, "images_seen": images_seen}
                    if rt.main:
                        log.log(row)
                        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{ips or 0:.1f}")
                        if bar.disable:  # no terminal (Slurm logs): one line per log step instead
                            print(f"step {step}/{args.steps} loss {row['loss']:.4f} lr {lr_now:.3g} "
                                  f"grad {row['grad_norm']:.3g} {ips or 0:.1f} img/s", flush=True)
                    window = {"loss": 0.0, "grad_norm": 0.0, "n": 0}
                    window_start, window_images = time.perf_counter(), 0
                bar.update(1)

                if stop_votes > 0 and step < args.steps:
                    stop_reason = (signal.Signals(stop.signal).name if stop.signal is not None
                                   else "--max-steps-this-run" if wants_stop else "a signal to another process")
                if step % args.ckpt_every == 0 or stop_reason:
                    checkpoint()
                    saved_at = step
                    window_start = time.perf_counter()  # saving is not training
                if stop_reason:
                    break
    finally:
        bar.close()
        if log is not None and (stop_reason or step < args.steps):
            log.close()
    if stop_reason:
        say(f"stopped at step {step}/{args.steps} ({stop_reason}); checkpoint {out / 'ckpt' / f'step-{step:06d}'}; "
            "rerun the same command to resume")
        return EXIT_RESUMABLE

    # ---- the end: last checkpoint, final weights, samples, summary ----------------------------
    state, ema_full, _ = checkpoint() if saved_at != step else snapshot()
    if rt.main:
        with staged_dir(out / "final") as tmp:
            write_model_dir(tmp, config, state, ema_full)
        if args.vae and sample_prompts(args):
            write_samples(out, out / "final", args, rt, autocast_dtype)
        elif args.vae:
            say("note: no --sample-prompt / --sample-prompts given; no sample grid")
        logged = MetricsLog.read(out / "metrics.jsonl")
        tail = [r["loss"] for r in logged[-10:]]
        ips = images_seen / train_s if train_s > 0 else None
        summary = {
            "stage": stage, "model": config["architecture"], "resolution": args.resolution,
            "latent_size": latent_shape[-1], "mask_ratio": args.mask_ratio, "steps": args.steps,
            "global_batch": args.global_batch, "micro_batch": args.micro_batch, "accumulation": accum,
            "lr": args.lr, "schedule": args.schedule, "warmup": args.warmup, "final_lr_ratio": args.final_lr_ratio,
            "p_mean": args.p_mean, "p_std": args.p_std, "grad_clip": args.grad_clip,
            "weight_decay": args.weight_decay, "ema": bool(args.ema), "ema_decay": args.ema_decay if args.ema else None,
            "ema_start": args.ema_start if args.ema else None, "moe_lr_scale": args.moe_lr_scale,
            "pos_interp_scale": config.get("pos_interp_scale"), "init": args.init, "init_weights": args.init_weights,
            "wall_s": train_s, "images_seen": images_seen, "images_per_s": ips,
            "final_loss": sum(tail) / len(tail) if tail else None, "device": device_name(rt.device),
            "gpus": rt.world_size if rt.device.type == "cuda" else 0, "world_size": rt.world_size,
            "fsdp": sharded, "bf16": use_bf16, "compile": bool(args.compile),
            "params": n_params, "flops_per_image": flops,
            "mfu": 3 * flops * ips / (peak * 1e12 * rt.world_size) if peak and ips else None,
        }
        write_json(out / "summary.json", summary)
        log.close()
        say(f"stage {stage} done: {step} steps, final loss {summary['final_loss']}, {out / 'final'}")
    rt.barrier()
    return 0


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="stage directory (checkpoints, metrics, final/, summary.json)")
    p.add_argument("--latents", action="append", required=True, help="a `microdit latents` output dir (repeatable)")
    p.add_argument("--weights", nargs="+", metavar="NAME=W", help="mixing weight per source (NAME = dir basename)")
    p.add_argument("--weighting", choices=("proportion", "repeat"), default="proportion",
                   help="weights are shares of an epoch (proportion) or times each source is seen (repeat)")
    p.add_argument("--model", default="MicroDiT_XL_2", help="MicroDiT_XL_2 | MicroDiT_Tiny_2 | MicroDiT_Smoke_2")
    p.add_argument("--no-patch-mixer", dest="patch_mixer", action="store_false",
                   help="ablation: no patch-mixer, patches are masked straight after the embedding")
    p.add_argument("--caption-channels", type=int, help="expected caption embedding width (checked against the data)")
    p.add_argument("--resolution", type=int, required=True, help="image resolution in px (picks the latents column)")
    p.add_argument("--stage", type=int, help="stage number for logs and summary (default: from --out, e.g. stage3)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="share of patches dropped after the patch-mixer")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps in this stage")
    p.add_argument("--global-batch", type=int, required=True, help="images per optimizer step, all processes")
    p.add_argument("--micro-batch", type=int, help="images per forward pass per process (default: no accumulation)")
    p.add_argument("--lr", type=float, default=2.4e-4, help="base learning rate")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps from lr 0")
    p.add_argument("--final-lr-ratio", type=float, default=0.33, help="cosine: lr multiplier reached at the end")
    p.add_argument("--p-mean", type=float, default=-0.6, help="EDM log-normal noise level mean")
    p.add_argument("--p-std", type=float, default=1.2, help="EDM log-normal noise level std")
    p.add_argument("--grad-clip", type=float, default=0.25, help="gradient norm clip (0: off)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999])
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--caption-drop", type=float, default=0.1, help="probability of zeroing a caption (for CFG)")
    p.add_argument("--init", help="previous stage's final/ directory to start from")
    p.add_argument("--init-weights", choices=("raw", "ema"), default="raw",
                   help="which weights of --init to start from (the paper continues from the raw ones)")
    p.add_argument("--init-optimizer", action="store_true",
                   help="also take the AdamW state from the newest checkpoint beside --init (the released "
                        "configs do this for stages 2 and 4)")
    p.add_argument("--pos-interp-scale", type=float,
                   help="position-embedding interpolation scale (default: keep --init's position range, e.g. 2.0 "
                        "for 512 px after 256 px; 1.0 without --init)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="keep an EMA of the weights (evaluation samples from it)")
    p.add_argument("--ema-decay", type=float, default=0.99975)
    p.add_argument("--ema-start", type=int, default=0, help="steps during which the EMA just copies the weights")
    p.add_argument("--moe-lr-scale", type=float, default=0.5, help="lr multiplier for the MoE layers' parameters")
    p.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--keep-superseded", type=int, default=2,
                   help="earlier runs with other settings to keep in ckpt.superseded/ (a rerun with one's settings "
                        "resumes it); the oldest beyond this are deleted")
    p.add_argument("--log-every", type=int, default=10, help="log averaged metrics every N steps")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto", help="bf16 autocast (auto: on GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="shard gradients and optimizer state (under torchrun)")
    p.add_argument("--num-workers", type=int, help="data loader workers per process (default: 2 on GPU, 0 on CPU)")
    p.add_argument("--clean-shm", action=argparse.BooleanOptionalAction, default=True,
                   help="first remove shared memory left by killed streaming jobs (all of this machine's)")
    p.add_argument("--sample-prompt", action="append", help="a prompt for the end-of-stage sample grid (repeatable)")
    p.add_argument("--sample-prompts", help="file with one prompt per line for the sample grid")
    p.add_argument("--vae", help="HF-format VAE directory (for the sample grid)")
    p.add_argument("--text-encoder", help="HF-format text encoder directory (for the sample grid)")
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--sample-guidance", type=float, default=5.0)
    p.add_argument("--sample-seed", type=int, help="default: --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--on-change", choices=("restart", "error"), default="restart",
                   help="when --out holds checkpoints of another run (a run-defining flag, the data or the --init "
                        "weights changed): start afresh, moving them to ckpt.superseded/<run>/ (default), or stop")
    p.add_argument("--max-steps-this-run", type=int,
                   help="stop after N steps as if preempted (checkpoint, exit code 143)")
