"""The smoke VAE of `microdit models`: a small AutoencoderKL trained briefly on the world's images.

SD-style, 4 latent channels, downsampling 8 with the default four blocks; trained long enough
that decoded latents are recognisable shapes in their colours, with `scaling_factor` = 1 / std of
its latents.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from microdit.zoo.inputs import load_images
from microdit.zoo.plan import builder
from microdit.zoo.smoke import count_parameters


@builder("vae")
def build_vae(dest: Path, args) -> dict:
    """Train a small AutoencoderKL on the world's images; scaling_factor = 1 / std(latents)."""
    t0 = time.time()
    images, skipped = load_images(args.images, args.vae_resolution, args.vae_max_images)
    x = images.float() / 127.5 - 1
    held = x[: min(16, len(x))]  # a fixed batch to see the reconstruction error fall
    vae = new_vae(args.vae_channels, args.vae_resolution, args.seed)
    recon_before = recon_l1(vae, held)
    history = train_vae(vae, x, args)
    recon_after = recon_l1(vae, held)

    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # the official precompute scales latent_dist.sample(), so measure that
        latents = torch.cat([vae.encode(x[i:i + 64]).latent_dist.sample(generator=gen)
                             for i in range(0, min(len(x), 256), 64)])
    std = latents.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(dest, safe_serialization=True)

    grid, _ = load_images(args.images, args.vae_grid_res, 8, min_size=1)
    grid = grid.float() / 127.5 - 1
    grid_l1, grid_recon = recon_l1(vae, grid, keep=True)
    objects = colour_weight(grid, 1.0) > 1.25  # saturated pixels: the shapes, not the background
    object_l1 = (grid_recon - grid).abs().mean(dim=1, keepdim=True)[objects].mean().item()
    save_recon_grid(grid, grid_recon, dest / "recon.png")
    print(f"models: vae recon L1 {recon_before:.4f} -> {recon_after:.4f} after {args.vae_steps} steps "
          f"({len(x)} images at {args.vae_resolution} px); at {args.vae_grid_res} px {grid_l1:.4f}, "
          f"on object pixels {object_l1:.4f}; scaling_factor {1.0 / std:.4f}")
    return {"scaling_factor": 1.0 / std, "latent_std": std, "latent_channels": vae.config.latent_channels,
            "downsample_factor": 2 ** (len(args.vae_channels) - 1), "block_out_channels": list(args.vae_channels),
            "recon_l1_before": recon_before, "recon_l1_after": recon_after,
            "recon_grid": {"file": "recon.png", "resolution": args.vae_grid_res, "l1": grid_l1,
                           "object_l1": object_l1},
            "train": {"steps": args.vae_steps, "batch": args.vae_batch_size, "lr": args.vae_lr,
                      "kl_weight": args.vae_kl, "colour_weight": args.vae_colour_weight,
                      "resolution": args.vae_resolution, "images": len(x), "skipped": skipped,
                      "seconds": round(time.time() - t0, 1), "l1_history": history},
            "parameters": count_parameters(vae)}


def new_vae(channels: list[int], sample_size: int, seed: int):
    """A small SD-style AutoencoderKL: 4 latent channels, downsampling 2^(len(channels)-1)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1, norm_num_groups=8, sample_size=sample_size)


def train_vae(vae, x: torch.Tensor, args) -> list[list]:
    """Adam, warmup then cosine to 0.1x; (L1 + L2) weighted towards object pixels, + a small KL.

    Returns [step, unweighted L1] every 25 steps.
    """
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(args.seed)
    steps = args.vae_steps
    warmup = max(1, steps // 20)
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))))
    history = []
    vae.train()
    bar = tqdm(range(steps), desc="vae", disable=None)
    for step in bar:
        batch = x[torch.randint(len(x), (args.vae_batch_size,), generator=gen)]
        flip = torch.rand(len(batch), generator=gen) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        posterior = vae.encode(batch).latent_dist
        err = vae.decode(posterior.sample(generator=gen)).sample - batch
        weight = colour_weight(batch, args.vae_colour_weight)
        loss = ((err.abs() + err ** 2) * weight).mean() / weight.mean() + args.vae_kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            l1 = err.abs().mean().item()
            history.append([step, round(l1, 5)])
            bar.set_postfix(l1=f"{l1:.4f}")
    vae.eval()
    return history


def colour_weight(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-pixel loss weight 1 + strength * saturation (x in [-1, 1]).

    Shapes-world images are mostly pale background; an unweighted loss is happy to get an object's
    hue wrong (yellow -> orange, purple -> blue), and object colours are exactly what the shapes
    detector and GenEval's colour tasks read from decoded samples.
    """
    saturation = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / 2
    return 1 + strength * saturation


@torch.no_grad()
def recon_l1(vae, x: torch.Tensor, keep: bool = False):
    """Mean |x - decode(encode(x).mode())| in [-1, 1] units (and the reconstructions if `keep`)."""
    was_training = vae.training
    vae.eval()
    recon = torch.cat([vae.decode(vae.encode(x[i:i + 16]).latent_dist.mode()).sample
                       for i in range(0, len(x), 16)]).clamp(-1, 1)
    vae.train(was_training)
    err = (recon - x).abs().mean().item()
    return (err, recon) if keep else err


def save_recon_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path) -> None:
    """Two rows: originals on top, their reconstructions below."""
    from PIL import Image

    rows = [torch.cat(list(t), dim=2) for t in (originals, recons)]
    grid = ((torch.cat(rows, dim=1) + 1) * 127.5).round().clamp(0, 255).byte()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
