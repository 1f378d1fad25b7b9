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

This module is the command: its flags, what of them defines a run, and `run`. The machinery is in
`microdit.training` (runtime, state, setup, loop, log); the stage directory's format, and the
loader of what it holds, in `microdit.checkpoint`.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
import signal
from pathlib import Path
from typing import Any

from microdit.checkpoint import EMA_FILE, MODEL_FILE
from microdit.errors import UserError
from microdit.settings import add_flags, run_defining
from microdit.training.loop import train
from microdit.distributed import setup_runtime
from microdit.training.setup import Plan, source_weights
from microdit.training.state import stage_lock

EXIT_RESUMABLE = 143  # stopped early with a checkpoint saved: rerun the same command to continue

# Keys that define a stage's trajectory (`defines_run` in microdit.settings); a checkpoint made with
# other values belongs to another run. Not among them, so a rerun may change them and resume: steps
# under a constant schedule (train longer), micro-batch, devices, compile/FSDP, checkpoint and
# logging cadence, sample prompts.
RUN_DEFINING = run_defining()


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


def check_args(args: argparse.Namespace, world_size: int) -> int:
    """Validate flags; returns gradient-accumulation steps per optimizer step."""
    from microdit.schedules import check_schedule

    # each flag's own range is checked as it is parsed (microdit.settings); what remains relates flags
    # to each other and to the number of processes. A micro-batch above a process's share is that share.
    micro = min(args.micro_batch, args.global_batch // world_size) if args.micro_batch else args.global_batch // world_size
    if micro < 1:
        raise UserError(f"--global-batch {args.global_batch} is smaller than the {world_size} processes")
    if args.global_batch % (micro * world_size):
        raise UserError(f"--global-batch {args.global_batch} is not a multiple of --micro-batch {micro} x "
                        f"{world_size} processes; change one so that it divides")
    try:
        check_schedule(args.schedule, args.steps, args.warmup, args.final_lr_ratio)
    except ValueError as e:
        raise UserError(str(e)) from None
    if bool(args.vae) != bool(args.text_encoder):
        raise UserError("the sample grid needs both --vae and --text-encoder (or neither)")
    if args.eval_every and not args.vae:
        raise UserError("--eval-every needs --vae and --text-encoder to sample with (or set it to 0)")
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


def run(args: argparse.Namespace) -> int:
    from microdit.lifetime import die_with_parent

    # SIGTERM when our parent dies: a trainer orphaned by a killed workflow manager checkpoints and
    # stops, instead of training on beside the rerun
    die_with_parent(os.getppid(), signal.SIGTERM)
    rt = setup_runtime(args.device)
    try:
        with stage_lock(Path(args.out), rt):
            plan = Plan(check_args(args, rt.world_size), stage_number(args), architecture_overrides(args),
                        functools.partial(run_fingerprint, args))
            return 0 if train(args, rt, plan) else EXIT_RESUMABLE
    finally:
        rt.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="stage directory (checkpoints, metrics, final/, summary.json)")
    p.add_argument("--latents", action="append", required=True, help="a `microdit latents` output dir (repeatable)")
    p.add_argument("--weights", nargs="+", metavar="NAME=W", help="mixing weight per source (NAME = dir basename; "
                   "sources.<name>.weight)")
    p.add_argument("--stage", type=int, help="stage number for logs and summary (default: from --out, e.g. stage3)")
    p.add_argument("--init", help="previous stage's final/ directory to start from")
    p.add_argument("--pos-interp-scale", type=float,
                   help="position-embedding interpolation scale (default: keep --init's position range, e.g. 2.0 "
                        "for 512 px after 256 px; 1.0 without --init)")
    p.add_argument("--vae", help="HF-format VAE directory (for the sample grid)")
    p.add_argument("--text-encoder", help="HF-format text encoder directory (for the sample grid)")
    p.add_argument("--detector", help="GenEval detector directory (for the in-training GenEval, --eval-every)")
    p.add_argument("--clip", help="CLIP directory (GenEval colours, when the detector gives none)")
    p.add_argument("--sample-prompts-file", help="file with one prompt per line for the sample grid, besides "
                   "--sample-prompts")
    p.add_argument("--sample-seed", type=int, help="default: --seed")
    p.add_argument("--clean-shm", action=argparse.BooleanOptionalAction, default=True,
                   help="first remove shared memory left by killed streaming jobs (all of this machine's)")
    p.add_argument("--max-steps-this-run", type=int,
                   help="stop after N steps as if preempted (checkpoint, exit code 143)")
    # every other flag is a config key of `train` or of the stage (`train.stages.stageN`), same name
    add_flags(p, "train", top=("seed", "device"))
    add_flags(p, "train.stages.*")
