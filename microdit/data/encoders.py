"""The frozen VAE and text encoder that turn images and captions into what training sees.

`load_encoders` loads both from their HF-format directories and records a digest of each
directory's files (`model_digest`), so the latents stage knows its parts by the models' bytes;
`Encoders` holds the settings that decide what a latent is (dtype, posterior sampling, the VAE's
scaling and shift). Used by the latents stage and by evaluation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from microdit.distributed import Runtime
from microdit.errors import UserError


@dataclass
class Encoders:
    """The frozen VAE and text encoder, with the settings that decide what a latent is."""

    vae: Any
    text_encoder: Any
    device: torch.device
    dtype: torch.dtype
    posterior: str = "sample"
    digests: dict = field(default_factory=dict)  # {"vae": ..., "text_encoder": ...}: model_digest of each

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float | None:
        shift = getattr(self.vae.config, "shift_factor", None)
        return None if shift is None else float(shift)

    def latent_shape(self, resolution: int) -> list[int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution % factor:
            raise UserError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
        return [int(self.vae.config.latent_channels), resolution // factor, resolution // factor]

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] -> scaled float16 latents on the CPU."""
        posterior = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        z = posterior.sample(generator=generator) if self.posterior == "sample" else posterior.mode()
        if self.shift_factor is not None:
            z = z - self.shift_factor
        return (z.float() * self.scaling_factor).to(torch.float16).cpu()

    @torch.inference_mode()
    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, 77, D) float16 on the CPU."""
        return self.text_encoder.encode(list(captions)).float().to(torch.float16).cpu()


def resolve_device(device: str) -> torch.device:
    """A --device value as a device: "auto" is this process's GPU (cuda:LOCAL_RANK) if any, else the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", Runtime.from_env().local_rank)
    return torch.device("cpu")


def load_encoders(vae_path: str | os.PathLike, text_encoder_path: str | os.PathLike, device: str = "auto",
                  dtype: str = "auto", posterior: str = "sample") -> Encoders:
    """Load both models with `from_pretrained`; dtype "auto" is bfloat16 on a GPU, float32 on CPU."""
    from diffusers import AutoencoderKL

    from microdit.text import TextEncoder

    dev = resolve_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    torch_dtype = getattr(torch, dtype)
    for role, path in (("VAE", vae_path), ("text encoder", text_encoder_path)):
        if not (Path(path) / "config.json").is_file() and not (Path(path) / "vae" / "config.json").is_file():
            raise UserError(f"{role} directory {path} has no config.json: run `microdit models` first")
    vae_dir = Path(vae_path) / "vae" if (Path(vae_path) / "vae" / "config.json").is_file() else Path(vae_path)
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch_dtype).to(dev).eval().requires_grad_(False)
    text_encoder = TextEncoder.from_pretrained(text_encoder_path, device=dev, dtype=torch_dtype)
    digests = {"vae": model_digest(vae_dir), "text_encoder": model_digest(text_encoder_path)}
    return Encoders(vae=vae, text_encoder=text_encoder, device=dev, dtype=torch_dtype, posterior=posterior,
                    digests=digests)


def model_digest(directory: str | os.PathLike) -> str:
    """xxh3-128 of every file of a model directory (names and bytes), so retrained weights or a new
    tokenizer give new latents. MODEL_INFO.json is left out: it records when, not what."""
    import xxhash

    directory = Path(directory)
    digest = xxhash.xxh3_128()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory)
        if name.as_posix() == "MODEL_INFO.json" or any(part.startswith(".") for part in name.parts):
            continue  # provenance, and hidden download/cache debris
        digest.update(f"{name.as_posix()}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()
