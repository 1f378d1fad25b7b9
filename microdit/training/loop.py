"""The training loop of one stage: optimizer steps over accumulated micro-batches, checkpoints on
schedule and on a stop request, and at the end the final weights, the sample grid and the summary.

Every process takes the same decisions: the loss and the stop votes are all-reduced once a step.
"""
from __future__ import annotations

import argparse
import math
import signal
import time

import torch

from microdit.checkpoint import checkpoint_dir, checkpoints, save_checkpoint, save_final
from microdit.errors import UserError
from microdit.training import evals
from microdit.training.log import Progress, sample_prompts, write_samples, write_summary
from microdit.training.runtime import Runtime, StopRequest, device_name, gradient_sync
from microdit.training.setup import Plan, Stage, build_stage
from microdit.training.state import full_model_state, full_optimizer_state, loss_seed, rng_state


class NonFiniteLossError(UserError):
    """The loss or the gradient norm is NaN/inf; the step was not applied and nothing was saved."""


def train(args: argparse.Namespace, rt: Runtime, plan: Plan) -> bool:
    """Train the stage to its end (True), or until a stop request with a checkpoint saved (False)."""
    s = build_stage(args, rt, plan)
    s.say(f"stage {plan.number}: {s.config['architecture']} ({s.n_params / 1e6:.1f}M params) at {args.resolution} px "
          f"(latent {s.latent_shape}), mask {args.mask_ratio}, {args.steps} steps x {args.global_batch} images "
          f"= {args.micro_batch} x {plan.accumulation} accumulation x {rt.world_size} processes on "
          f"{device_name(rt.device)}")
    saved_at = s.step if s.resumed else None
    steps_this_run, stop_reason = 0, None
    if args.eval_every and rt.main:
        evals.forget_after(s.out, s.step)
    progress = Progress(s)
    try:
        with StopRequest() as stop:
            while s.step < args.steps:
                t0, lr = time.perf_counter(), s.optimizer.param_groups[0]["lr"]
                loss, grad_norm = forward_backward(s)
                steps_this_run += 1
                wants_stop = stop.signal is not None or steps_this_run == args.max_steps_this_run
                stop_votes = apply_step(s, loss, grad_norm, wants_stop)
                s.train_s += time.perf_counter() - t0
                progress.step(lr)
                if stop_votes > 0 and s.step < args.steps:
                    stop_reason = (signal.Signals(stop.signal).name if stop.signal is not None
                                   else "--max-steps-this-run" if wants_stop else "a signal to another process")
                if s.step % args.ckpt_every == 0 or stop_reason:
                    save(s)
                    saved_at = s.step
                    progress.resume_clock()
                if not stop_reason and evals.due(s.step, args.eval_every, args.steps):
                    row = evals.evaluate_now(s)
                    if row and "geneval" in row:
                        progress.note(f"step {s.step}: in-training GenEval {row['geneval']:.3f} (small-n)")
                    progress.resume_clock()
                if stop_reason:
                    break
    finally:
        progress.close()
    if stop_reason:
        s.say(f"stopped at step {s.step}/{args.steps} ({stop_reason}); checkpoint {checkpoint_dir(s.out, s.step)}; "
              "rerun the same command to resume")
        return False
    finish(s, saved_at)
    return True


def forward_backward(s: Stage) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward over the step's micro-batches and clip; returns (mean loss here, grad norm)."""
    from torch.distributed.tensor import DTensor

    from microdit.edm import edm_loss

    args, rt, accum = s.args, s.rt, s.plan.accumulation
    loss_sum = torch.zeros((), device=rt.device)
    for micro in range(accum):
        batch = s.batches.next()
        latents = batch["latents"].to(rt.device, non_blocking=True)
        captions = batch["captions"].to(rt.device, non_blocking=True)
        s.generator.manual_seed(loss_seed(args.seed, s.step, rt.rank * accum + micro))
        with gradient_sync(s.network, s.model, s.sharded, sync=micro == accum - 1), s.amp():
            loss = edm_loss(s.network, latents, captions, mask_ratio=args.mask_ratio, p_mean=args.p_mean,
                            p_std=args.p_std, generator=s.generator)
        (loss / accum).backward()
        loss_sum += loss.detach().float()
    grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
    grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
    return loss_sum / accum, grad_norm.float()


def apply_step(s: Stage, loss: torch.Tensor, grad_norm: torch.Tensor, wants_stop: bool) -> float:
    """Agree on the loss and on stopping with the other processes, then take the optimizer step
    (unless the loss or gradient is not finite); returns the processes' votes to stop."""
    # One all-reduce per step: every process sees the same loss and the same stop decision.
    shared = s.rt.all_reduce(torch.stack([loss, torch.tensor(float(wants_stop), device=s.rt.device)]))
    loss_value, stop_votes, grad_value = torch.cat([shared, grad_norm.reshape(1)]).tolist()
    loss_value /= s.rt.world_size
    if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
        what, value = ("loss", loss_value) if not math.isfinite(loss_value) else ("gradient norm", grad_value)
        last_good = checkpoints(s.out)
        raise NonFiniteLossError(
            f"stage {s.plan.number} step {s.step + 1}: {what} is {value}; the step was not applied and nothing was "
            f"saved (last good checkpoint: {last_good[-1][1] if last_good else 'none'}); lower --lr or "
            "--grad-clip, or check the data")
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.step += 1
    s.images_seen += s.args.global_batch
    if s.ema is not None:
        s.ema.update(s.model, s.step)
    s.window["loss"] += loss_value
    s.window["grad_norm"] += grad_value
    s.window["n"] += 1
    return stop_votes


def snapshot(s: Stage) -> tuple[dict, dict | None, dict]:
    """Full model, EMA and optimizer state on rank 0 (gathered from every process under FSDP)."""
    if not s.sharded and not s.rt.main:  # replicas: rank 0 alone has all it needs
        return {}, None, {}
    state = full_model_state(s.model, s.sharded)
    ema_full = s.ema.full_state(state) if s.ema is not None else None
    return state, ema_full, full_optimizer_state(s.model, s.optimizer)


def save(s: Stage) -> tuple[dict, dict | None, dict]:
    """Save ckpt/step-N (rank 0 writes); returns the snapshot it saved."""
    state, ema_full, optim_state = snapshot(s)
    if s.rt.main:
        train_state = {
            "step": s.step, "images_seen": s.images_seen, "train_s": s.train_s, "window": dict(s.window),
            "optimizer": optim_state, "scheduler": s.scheduler.state_dict(), "loader": s.loader.state_dict(),
            "rng": rng_state(), "identity": s.identity, "world_size": s.rt.world_size, "stage": s.plan.number,
        }
        save_checkpoint(s.out, s.step, s.config, state, ema_full, train_state, s.args.keep, s.fingerprint)
    s.rt.barrier()
    return state, ema_full, optim_state


def finish(s: Stage, saved_at: int | None) -> None:
    """The last checkpoint (unless the stop saved it), final weights, the sample grid and the summary."""
    args = s.args
    state, ema_full, _ = save(s) if saved_at != s.step else snapshot(s)
    if s.rt.main:
        final = save_final(s.out, s.config, state, ema_full)
        if args.vae and sample_prompts(args):
            write_samples(s.out, final, args, s.rt.device, s.autocast_dtype)
        elif args.vae:
            s.say("note: no --sample-prompt / --sample-prompts given; no sample grid")
        summary = write_summary(s)
        s.say(f"stage {s.plan.number} done: {s.step} steps, final loss {summary['final_loss']}, {final}")
    s.rt.barrier()
