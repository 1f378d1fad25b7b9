"""EDM (Karras et al. 2022) as MicroDiT uses it: preconditioning, training loss, Heun sampler.

Symbols follow the EDM paper: x is a noisy latent, sigma its noise level, F the raw network,
D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) the denoiser. The constants and the order of
operations (float32 network calls inside a float64 sampler, guidance applied to F) follow the
released MicroDiT code, so the same weights, noise and captions give the same samples.

The network is any callable `model(x, t, y, mask_ratio=0.0) -> {"sample": F, "mask": mask|None}`
where `mask` is (N, T) with 1 marking a patch the backbone never saw.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from microdit.paper import SAMPLER

SIGMA_DATA = 0.9
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
P_MEAN = -0.6  # log-normal training noise for the 256 px stages; 512 px uses 0.0 / 0.6
P_STD = 1.2
CAPTION_DROP_PROB = 0.1

Model = Callable[..., dict]


def edm_precondition(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """EDM's scalings for noise level `sigma`: returns (c_skip, c_out, c_in, c_noise)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_denoise(
    model: Model,
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    y: torch.Tensor,
    cfg: float = 1.0,
    mask_ratio: float = 0.0,
    sigma_data: float = SIGMA_DATA,
    **model_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """D(x; sigma) and the model's patch mask (None unless masking).

    `sigma` is a scalar or one level per sample. With `cfg != 1` the conditional and the
    unconditional (zeroed captions) branches run as one doubled batch and are mixed on the raw
    network output F, before the skip connection, which is where the released model mixes them.
    `model_kwargs` go to the model as they are.
    """
    sigma = torch.as_tensor(sigma, device=x.device).to(x.dtype).reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = edm_precondition(sigma, sigma_data)
    x_in = (c_in * x).to(x.dtype)
    t = c_noise.flatten()

    if cfg != 1.0:
        if mask_ratio > 0:
            raise ValueError("classifier-free guidance is for sampling; it cannot be combined with masking")
        t2 = t if len(t) == 1 else torch.cat([t, t])
        out = model(torch.cat([x_in, x_in]), t2, torch.cat([y, torch.zeros_like(y)]), mask_ratio=0.0, **model_kwargs)
        f_cond, f_uncond = out["sample"].chunk(2)
        f_x, mask = f_uncond + cfg * (f_cond - f_uncond), None
    else:
        out = model(x_in, t, y, mask_ratio=mask_ratio, **model_kwargs)
        f_x, mask = out["sample"], out.get("mask")

    dev = f_x.device
    return c_skip.to(dev) * x.to(dev) + c_out.to(dev) * f_x, mask


def _randn(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # With a generator, draw on the generator's device so a CPU generator seeds a GPU run the
    # same way; without one, use the global RNG on `device` exactly as the released code does.
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def _patch_size_from_mask(h: int, w: int, tokens: int) -> int:
    p = math.isqrt(h * w // tokens)
    if p < 1 or (h // p) * (w // p) != tokens or h % p or w % p:
        raise ValueError(f"mask with {tokens} patches does not tile a {h}x{w} latent into square patches")
    return p


def masked_patch_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of a pixel-wise loss (N, C, H, W) over kept patches only.

    The loss is averaged over channels and over each patch's pixels, then over the patches the
    backbone saw (mask == 0); the network's output on dropped patches is a placeholder token.
    """
    n, _, h, w = loss.shape
    p = _patch_size_from_mask(h, w, mask.shape[1])
    per_patch = F.avg_pool2d(loss.mean(dim=1), p).flatten(1)  # (N, T)
    kept = 1 - mask.to(per_patch.dtype)
    return (per_patch * kept).sum(dim=1) / kept.sum(dim=1)


def edm_loss(
    model: Model,
    latents: torch.Tensor,
    captions: torch.Tensor,
    mask_ratio: float = 0.0,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    sigma_data: float = SIGMA_DATA,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """EDM training loss: log-normal sigma, weight (sigma^2 + sd^2) / (sigma sd)^2.

    `reduction="mean"` gives the scalar the optimiser sees, "none" the per-sample losses (N,).
    `generator` seeds sigma and the noise, and, when masking, is handed to the model as
    `generator=` for its patch mask (MicroDiT accepts it). Without one, every draw comes from
    the global RNG in the released code's order: sigma, noise, then the model's mask.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    x, y = latents.float(), captions.float()
    rnd_normal = _randn([x.shape[0], 1, 1, 1], generator, x.device)
    sigma = (rnd_normal * p_std + p_mean).exp()
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    noise = _randn(x.shape, generator, x.device) * sigma

    mask_kwargs = {"generator": generator} if generator is not None and mask_ratio > 0 else {}
    denoised, mask = edm_denoise(model, x + noise, sigma, y, mask_ratio=mask_ratio, sigma_data=sigma_data, **mask_kwargs)
    loss = weight * (denoised - x) ** 2  # (N, C, H, W)

    if mask_ratio > 0:
        if mask is None:
            raise ValueError("mask_ratio > 0 but the model returned no mask; is it in training mode?")
        per_sample = masked_patch_mean(loss, mask)
        return per_sample.mean() if reduction == "mean" else per_sample
    return loss.mean() if reduction == "mean" else loss.mean(dim=(1, 2, 3))


def drop_captions(y: torch.Tensor, p: float = CAPTION_DROP_PROB, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero each sample's caption embeddings with probability p (trains the unconditional branch)."""
    keep = _rand(y.shape[0], generator, y.device) >= p
    return y * keep.to(y.dtype).view(-1, *([1] * (y.dim() - 1)))


def edm_sigma_steps(
    steps: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Karras noise levels sigma_0 = sigma_max > ... > sigma_{steps-1} = sigma_min, then 0 (float64)."""
    if steps < 2:
        raise ValueError(f"the sampler needs at least 2 steps, got {steps}")
    i = torch.arange(steps, dtype=torch.float64, device=device)
    inv_rho = 1 / rho
    sigmas = (sigma_max**inv_rho + i / (steps - 1) * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    return torch.cat([sigmas, torch.zeros_like(sigmas[:1])])


@torch.no_grad()
def heun_sample(
    model: Model,
    noise: torch.Tensor,
    captions: torch.Tensor,
    steps: int = SAMPLER["steps"],
    guidance: float = SAMPLER["guidance"],
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    sigma_data: float = SIGMA_DATA,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = float("inf"),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """EDM's 2nd-order Heun sampler from unit Gaussian `noise` (N, C, H, W) to latents (float32).

    Deterministic by default (s_churn = 0). The state is float64 and each network call float32;
    the last step to sigma = 0 is a plain Euler step. Guidance applies only when `guidance > 1`
    (as in the released sampler); otherwise the conditional model alone is used.
    `generator` seeds the churn noise, used only when s_churn > 0.
    """
    from tqdm.auto import tqdm

    cfg = guidance if guidance > 1.0 else 1.0
    t_steps = edm_sigma_steps(steps, sigma_min, sigma_max, rho, device=noise.device)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        d, _ = edm_denoise(model, x.to(torch.float32), t.to(torch.float32), captions, cfg=cfg, sigma_data=sigma_data)
        return d.to(torch.float64)

    x_next = noise.to(torch.float64) * t_steps[0]
    for i in tqdm(range(steps), desc="heun", disable=not progress, leave=False):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur = x_next

        # Optional stochastic churn: raise the noise level to t_hat by adding fresh noise.
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_min <= t_cur <= s_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * s_noise * _randn(x_cur.shape, generator, x_cur.device)

        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < steps - 1:  # trapezoidal correction, except into sigma = 0
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(torch.float32)
