"""Prompts to images: encode captions, Heun-sample latents, decode them with the VAE.

Image i of a call starts from noise seeded by `seed + i`, so it is the same image whatever the
batch size or the other prompts in the call.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from PIL import Image

from microdit.edm import heun_sample
from microdit.paper import SAMPLER
from microdit.text import TextEncoder


def initial_noise(n: int, shape: tuple[int, int, int], seed: int, start: int = 0) -> torch.Tensor:
    """Unit Gaussian noise (n, C, H, W) on the CPU; row k drawn from a generator seeded seed+start+k."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(seed + start + k)) for k in range(n)]
    return torch.stack(rows)


def latent_size_of(model: torch.nn.Module) -> int:
    """The latent side length the DiT was built for."""
    size = getattr(model, "input_size", None)
    if size is None:
        size = (getattr(model, "config", None) or {}).get("input_size")
    if size is None:
        raise ValueError("cannot tell the model's latent size; pass latent_size=")
    return int(size)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE-space latents (the DiT's scaled space) to images in [0, 1], float32 (N, 3, H, W)."""
    z = latents * (1 / vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z + shift
    images = vae.decode(z.to(device=vae.device, dtype=vae.dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float images in [0, 1] (N, 3, H, W) to RGB PIL images."""
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


@torch.no_grad()
def generate(
    prompts: list[str],
    model: torch.nn.Module,
    vae,
    text_encoder: TextEncoder,
    *,
    steps: int = SAMPLER["steps"],
    guidance: float = SAMPLER["guidance"],
    seed: int = 0,
    batch_size: int = 16,
    latent_size: int | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> list[Image.Image]:
    """Text to images with the paper's sampler (30 Heun steps, guidance 5 by default).

    `model` is a MicroDiT (or any network with its call signature), `vae` a diffusers
    `AutoencoderKL`, `text_encoder` a `TextEncoder`. `device` defaults to the model's. With
    `autocast_dtype` (e.g. torch.bfloat16 on a GPU) the DiT runs under autocast, as in training.
    """
    from tqdm.auto import tqdm

    if isinstance(prompts, str):
        raise TypeError("generate expects a list of prompts, not a single string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    device = torch.device(device)
    size = latent_size or latent_size_of(model)
    shape = (vae.config.latent_channels, size, size)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()

    images: list[Image.Image] = []
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=None if progress else True):
            chunk = list(prompts[start : start + batch_size])
            captions = text_encoder.encode(chunk).to(device, torch.float32)
            noise = initial_noise(len(chunk), shape, seed, start).to(device)
            with amp:
                latents = heun_sample(model, noise, captions, steps=steps, guidance=guidance)
            images += to_pil(decode_latents(vae, latents))
    finally:
        model.train(was_training)
    return images


@dataclass
class Pipeline:
    """A DiT, a VAE and a text encoder that together turn prompts into images."""

    model: torch.nn.Module
    vae: object
    text_encoder: TextEncoder

    def __call__(self, prompts: list[str], **kwargs) -> list[Image.Image]:
        return generate(prompts, self.model, self.vae, self.text_encoder, **kwargs)


def load_pipeline(
    model: str | os.PathLike | torch.nn.Module,
    vae_dir: str | os.PathLike,
    text_encoder_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Pipeline:
    """A Pipeline from a MicroDiT directory (save_pretrained format) or a built model, plus the
    HF-format VAE and text encoder directories. `dtype` applies to the frozen VAE and text encoder."""
    from diffusers import AutoencoderKL

    if not isinstance(model, torch.nn.Module):
        from microdit.models import MicroDiT

        model = MicroDiT.from_pretrained(model, device=device)
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=dtype).to(device).eval()
    text_encoder = TextEncoder.from_pretrained(text_encoder_dir, device=device, dtype=dtype)
    return Pipeline(model.to(device).eval(), vae, text_encoder)
