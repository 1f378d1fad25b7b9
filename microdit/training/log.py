"""What a stage reports: metrics per log step (metrics.jsonl, metrics.csv, TensorBoard), progress on
the terminal or one line per log step without one, the sample grid and summary.json."""
from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from microdit.checkpoint import SUMMARY_FILE, load_trained
from microdit.errors import UserError
from microdit.io import atomic_path, write_json
from microdit.settings import received
from microdit.training.runtime import device_name
from microdit.training.setup import Stage

METRIC_FIELDS = ("step", "loss", "lr", "grad_norm", "images_per_s", "mfu", "time", "images_seen")


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


class Progress:
    """The loop's reporting: a progress bar, and on rank 0 the metrics log, one row per log window
    (losses and gradient norms averaged over its steps, throughput over its training time)."""

    def __init__(self, s: Stage):
        from tqdm.auto import tqdm

        self.s = s
        self.log = MetricsLog(s.out, s.step, s.args.tensorboard) if s.rt.main else None
        self.bar = tqdm(total=s.args.steps, initial=s.step, desc=f"stage {s.plan.number}",
                        disable=None if s.rt.main else True, dynamic_ncols=True)
        self.restart()

    def restart(self) -> None:
        """A new window from now on."""
        self.start, self.images = time.perf_counter(), 0

    def resume_clock(self) -> None:
        """Time the window from now on (saving a checkpoint is not training)."""
        self.start = time.perf_counter()

    def step(self, lr: float) -> None:
        """After each optimizer step (`lr`: the one it used); writes a row at the end of a window."""
        s, args = self.s, self.s.args
        self.images += args.global_batch
        if s.step % args.log_every == 0 or s.step == args.steps:
            elapsed = time.perf_counter() - self.start
            ips = self.images / elapsed if elapsed > 0 else None
            w = s.window
            row = {"step": s.step, "loss": w["loss"] / w["n"], "lr": lr, "grad_norm": w["grad_norm"] / w["n"],
                   "images_per_s": ips, "mfu": s.mfu(ips), "time": s.train_s, "images_seen": s.images_seen}
            if self.log is not None:
                self.log.log(row)
                self.bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{ips or 0:.1f}")
                if self.bar.disable:  # no terminal (Slurm logs): one line per log step instead
                    print(f"step {s.step}/{args.steps} loss {row['loss']:.4f} lr {lr:.3g} "
                          f"grad {row['grad_norm']:.3g} {ips or 0:.1f} img/s", flush=True)
            s.window = {"loss": 0.0, "grad_norm": 0.0, "n": 0}
            self.restart()
        self.bar.update(1)

    def note(self, text: str) -> None:
        """A line beside the bar (rank 0)."""
        if self.s.rt.main:
            (print if self.bar.disable else self.bar.write)(text)

    def close(self) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close()


# ---- the end of a stage ---------------------------------------------------------------------------

def write_summary(s: Stage) -> dict[str, Any]:
    """summary.json, written last: its presence means the stage is complete."""
    args = s.args
    tail = [r["loss"] for r in MetricsLog.read(s.out / "metrics.jsonl")[-10:]]
    ips = s.images_seen / s.train_s if s.train_s > 0 else None
    summary = {
        "stage": s.plan.number, "model": s.config["architecture"], "resolution": args.resolution,
        "latent_size": s.latent_shape[-1], "mask_ratio": args.mask_ratio, "steps": args.steps,
        "global_batch": args.global_batch, "micro_batch": args.micro_batch, "accumulation": s.plan.accumulation,
        "lr": args.lr, "schedule": args.schedule, "warmup": args.warmup, "final_lr_ratio": args.final_lr_ratio,
        "p_mean": args.p_mean, "p_std": args.p_std, "grad_clip": args.grad_clip,
        "weight_decay": args.weight_decay, "ema": bool(args.ema), "ema_decay": args.ema_decay if args.ema else None,
        "ema_start": args.ema_start if args.ema else None, "moe_lr_scale": args.moe_lr_scale,
        "pos_interp_scale": s.config.get("pos_interp_scale"), "init": args.init, "init_weights": args.init_weights,
        "wall_s": s.train_s, "images_seen": s.images_seen, "images_per_s": ips,
        "final_loss": sum(tail) / len(tail) if tail else None, "device": device_name(s.rt.device),
        "gpus": s.rt.world_size if s.rt.device.type == "cuda" else 0, "world_size": s.rt.world_size,
        "fsdp": s.sharded, "bf16": s.bf16, "compile": bool(args.compile),
        "params": s.n_params, "flops_per_image": s.flops, "mfu": s.mfu(ips),
        # every config key the stage ran with, under its name (microdit.settings)
        "settings": received(args, "train", "train.stages.*", top=("seed",)),
    }
    write_json(s.out / SUMMARY_FILE, summary)
    return summary


def image_grid(images: list, columns: int):
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return grid


def write_samples(out: Path, final_dir: Path, args: argparse.Namespace, device: torch.device,
                  autocast: torch.dtype | None) -> None:
    """samples.png from the stage's final weights (EMA when kept) on the fixed prompts."""
    from diffusers import AutoencoderKL

    from microdit.generate import generate
    from microdit.text import TextEncoder

    prompts = sample_prompts(args)
    model = load_trained(final_dir, ema=args.ema, device=device)
    vae = AutoencoderKL.from_pretrained(args.vae).to(device).eval()
    text_encoder = TextEncoder.from_pretrained(args.text_encoder, device=device)
    images = generate(prompts, model, vae, text_encoder, steps=args.sample_steps, guidance=args.sample_guidance,
                      seed=args.seed if args.sample_seed is None else args.sample_seed, autocast_dtype=autocast)
    with atomic_path(out / "samples.png") as tmp:
        image_grid(images, columns=min(4, len(images))).save(tmp, format="PNG")
    write_json(out / "samples.json", {"prompts": prompts, "weights": "ema" if args.ema else "raw",
                                      "steps": args.sample_steps, "guidance": args.sample_guidance,
                                      "seed": args.seed if args.sample_seed is None else args.sample_seed})


def sample_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.sample_prompts or [])
    if args.sample_prompts_file:
        path = Path(args.sample_prompts_file)
        if not path.is_file():
            raise UserError(f"--sample-prompts-file {path}: file not found")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts
