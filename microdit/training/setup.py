"""A training stage built from its flags: the run `--out` should hold, the model (fresh, from
`--init`, or resumed from the newest readable checkpoint), its distribution over the processes,
EMA, optimizer and schedule, and the data, with every piece of a resumed run's state restored.
"""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from microdit.checkpoint import (
    CKPT_ROOT, CONFIG_FILE, EMA_FILE, MODEL_FILE, CheckpointError, Resumed, check_state_dict, checkpoints,
    load_newest_checkpoint, load_previous_stage, model_config, read_train_state,
)
from microdit.errors import UserError
from microdit.training.runtime import Runtime, bf16_wanted, distribute, peak_tflops
from microdit.training.state import (
    EMA, describe_changes, load_optimizer_state, optimizer_groups, run_changes, set_rng_state, switch_runs,
)


@dataclass
class Plan:
    """What the command makes of a stage's flags before anything is built (see microdit.train)."""
    accumulation: int  # micro-batches per optimizer step and process
    number: int | None  # the stage's number, for logs and the summary
    overrides: dict[str, Any]  # architecture switches on top of --model
    fingerprint: Callable[[dict, int], dict]  # (model config, latent size) -> what defines the run


@dataclass
class Stage:
    """Everything one stage trains with; the loop advances `step` and the counters after it."""
    args: argparse.Namespace
    rt: Runtime
    plan: Plan
    out: Path
    latent_shape: list[int]
    fingerprint: dict
    config: dict
    identity: dict  # the settings a resumed run reports when they changed
    model: torch.nn.Module
    network: torch.nn.Module  # what the forward pass goes through: DDP / compile wrappers, or the model
    sharded: bool
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Any
    batches: Batches
    bf16: bool
    n_params: int
    flops: int  # forward FLOPs per image
    peak: float | None  # bf16 TFLOPS of one accelerator, when known
    resumed: bool
    generator: torch.Generator  # the loss's draws, re-seeded for every micro-batch
    step: int = 0
    eval_tools: Any = None  # what in-training evaluation loads once (microdit.training.evals)
    images_seen: int = 0
    train_s: float = 0.0
    window: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "grad_norm": 0.0, "n": 0})

    def say(self, *a, **k) -> None:
        if self.rt.main:
            print(*a, **k)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.bf16 else None

    def amp(self):
        return torch.autocast(self.rt.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def mfu(self, images_per_s: float | None) -> float | None:
        """Model FLOPs utilisation (forward + backward = 3x forward) over every process."""
        if not (self.peak and images_per_s):
            return None
        return 3 * self.flops * images_per_s / (self.peak * 1e12 * self.rt.world_size)


def build_stage(args: argparse.Namespace, rt: Runtime, plan: Plan) -> Stage:
    """The stage `args` describe, resumed from the newest readable checkpoint of its run in --out."""
    from microdit.data.loader import source_layout
    from microdit.models import flops_per_image, model_from_config
    from microdit.schedules import build_scheduler

    out = Path(args.out)
    say = print if rt.main else (lambda *a, **k: None)
    if not args.latents:
        raise UserError("no --latents source given")
    latent_shape, caption_shape = source_layout(args.latents[0], args.resolution)
    weights = source_weights(args.latents, args.weights)
    out.mkdir(parents=True, exist_ok=True)

    fingerprint = choose_run(args, rt, plan, out, latent_shape, caption_shape[-1], say)
    resumed = load_newest_checkpoint(out, args.ema, say)
    if resumed is None:
        model = build_stage_model(args, plan, latent_shape, caption_shape[-1])
    else:
        model = model_from_config(resumed.config)
    config = dict(model.config)
    identity = {"model": config["architecture"], "latent_size": latent_shape[-1], "mask_ratio": args.mask_ratio,
                "global_batch": args.global_batch, "steps": args.steps, "lr": args.lr, "schedule": args.schedule}
    if resumed is not None:
        load_resumed_weights(model, resumed, identity, args.ema, say)
        say(f"resuming {out} from {resumed.directory.name}")
    model.to(rt.device).train()
    n_params = sum(p.numel() for p in model.parameters())
    flops = flops_per_image(model, args.mask_ratio, caption_len=caption_shape[0])

    network, sharded = distribute(model, rt, args.fsdp, args.compile, say)
    ema = EMA(model, args.ema_decay, args.ema_start) if args.ema else None
    if ema is not None and resumed is not None and resumed.ema_state is not None:
        ema.load(resumed.ema_state)
    optimizer = build_optimizer(model, args, rt, take_init=resumed is None and args.init_optimizer, say=say)
    scheduler = build_scheduler(optimizer, args.schedule, args.steps, args.warmup, args.final_lr_ratio)
    loader = build_loader(args, rt, weights)

    s = Stage(args=args, rt=rt, plan=plan, out=out, latent_shape=latent_shape, fingerprint=fingerprint,
              config=config, identity=identity, model=model, network=network, sharded=sharded, ema=ema,
              optimizer=optimizer, scheduler=scheduler, loader=loader, batches=Batches(loader),
              bf16=bf16_wanted(args.bf16, rt.device), n_params=n_params, flops=flops, peak=peak_tflops(rt.device),
              resumed=resumed is not None, generator=torch.Generator(device=rt.device))
    if resumed is not None:
        restore_train_state(s, resumed.train_state)
    return s


def choose_run(args: argparse.Namespace, rt: Runtime, plan: Plan, out: Path, latent_shape: list[int],
               caption_dim: int, say: Callable[[str], None]) -> dict:
    """This run's fingerprint, once `out` holds this run (another one set aside, or a superseded one back)."""
    with torch.device("meta"):
        wanted = build_stage_model(args, plan, latent_shape, caption_dim, load_init=False).config
    fingerprint = plan.fingerprint(wanted, latent_shape[-1])
    current = run_changes(out, fingerprint, wanted)
    if current is not None and current[0] and args.on_change == "error":
        raise UserError(f"{out / CKPT_ROOT} holds another run's checkpoints ({describe_changes(current[0])}); use "
                        "another --out, delete them, or pass --on-change restart")
    rt.barrier()  # every process has read the old checkpoints before they move
    note = switch_runs(out, fingerprint, current, args.keep_superseded) if rt.main else None
    rt.barrier()
    if note:
        say(note)
    return fingerprint


def build_stage_model(args: argparse.Namespace, plan: Plan, latent_shape: list[int], caption_dim: int,
                      load_init: bool = True):
    """The MicroDiT for this stage's latents, with --init's weights when given and `load_init`."""
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
        prev = model_config(init_dir)
        if scale is None:  # keep position units: the previous grid's span, sampled more finely
            prev_size = prev.get("input_size", 32)
            scale = float(prev.get("pos_interp_scale", 1.0)) * size / prev_size
    torch.manual_seed(args.seed)
    try:
        model = build_model(args.model, input_size=size, in_channels=channels, caption_channels=caption_dim,
                            pos_interp_scale=1.0 if scale is None else scale, **plan.overrides)
    except ValueError as e:
        raise UserError(str(e)) from None
    if init_dir is not None and load_init:
        load_previous_stage(model, init_dir / (EMA_FILE if args.init_weights == "ema" else MODEL_FILE))
    return model


def load_resumed_weights(model: torch.nn.Module, resumed: Resumed, identity: dict, ema: bool,
                         say: Callable[[str], None]) -> None:
    saved = resumed.train_state.get("identity", {})
    changed = [k for k in identity if k in saved and saved[k] != identity[k]]
    if changed:
        say(f"note: resuming with changed {', '.join(f'{k} {saved[k]} -> {identity[k]}' for k in changed)}")
    check_state_dict(model, resumed.state, source=str(resumed.directory / MODEL_FILE))
    model.load_state_dict(resumed.state, strict=True)
    if ema and resumed.ema_state is None:
        say(f"note: {resumed.directory.name} has no EMA weights; the EMA starts from the current weights")


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace, rt: Runtime, take_init: bool,
                    say: Callable[[str], None]) -> torch.optim.Optimizer:
    """AdamW over `optimizer_groups`; with `take_init`, its state from the newest checkpoint beside --init."""
    optimizer = torch.optim.AdamW(optimizer_groups(model, args.lr, args.moe_lr_scale), lr=args.lr,
                                  betas=tuple(args.betas), eps=args.eps, weight_decay=args.weight_decay,
                                  fused=rt.device.type == "cuda" or None)
    if not take_init:
        return optimizer
    prev = checkpoints(Path(args.init).parent)
    if not prev:
        raise UserError(f"--init-optimizer: no checkpoint in {Path(args.init).parent / CKPT_ROOT} to take the "
                        "optimizer state from")
    prev_state = read_train_state(prev[-1][1])
    try:
        for group in prev_state["optimizer"]["param_groups"]:
            group.pop("initial_lr", None)  # the previous schedule's; ours is set up after this
        load_optimizer_state(model, optimizer, prev_state["optimizer"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{prev[-1][1]}: optimizer state does not fit this model: {e}") from e
    for group, base in zip(optimizer.param_groups, (args.lr, args.lr * args.moe_lr_scale)):
        group.update(lr=base, initial_lr=base, betas=tuple(args.betas), eps=args.eps, weight_decay=args.weight_decay)
    say(f"optimizer state from {prev[-1][1]}")
    return optimizer


def restore_train_state(s: Stage, train_state: dict[str, Any]) -> None:
    """Where a resumed run was: optimizer, schedule, data order, RNG, counters and the open log window."""
    load_optimizer_state(s.model, s.optimizer, train_state["optimizer"])
    s.scheduler.load_state_dict(train_state["scheduler"])
    s.loader.load_state_dict(train_state["loader"])
    set_rng_state(train_state["rng"])
    s.step, s.images_seen, s.train_s = train_state["step"], train_state["images_seen"], train_state["train_s"]
    s.window = dict(train_state["window"])


# ---- data -----------------------------------------------------------------------------------------

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


def build_loader(args: argparse.Namespace, rt: Runtime, weights: list[float] | None):
    """This process's streaming loader over the latents sources, `--micro-batch` samples a batch."""
    from microdit.data.loader import build_latent_loader

    if args.clean_shm and rt.local_rank == 0:
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()  # a killed run leaves shared memory that would hang this one
    rt.barrier()
    num_workers = args.num_workers if args.num_workers is not None else (2 if rt.device.type == "cuda" else 0)
    return build_latent_loader(args.latents, args.resolution, args.micro_batch, weights=weights,
                               weighting=args.weighting, seed=args.seed, caption_drop=args.caption_drop,
                               num_workers=num_workers, clean_shm=False, pin_memory=rt.device.type == "cuda",
                               persistent_workers=num_workers > 0)


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
