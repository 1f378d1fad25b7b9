"""EDM pieces: preconditioning, loss (incl. deferred-masking average), sigma schedule, Heun sampler."""
import math

import pytest
import torch
import torch.nn as nn

from microdit import edm

torch.set_num_threads(1)


class ToyNet(nn.Module):
    """A small per-sample network with the MicroDiT call signature and official-style masking/CFG."""

    patch_size = 2

    def __init__(self, channels: int = 4, caption_dim: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.t_proj = nn.Linear(1, channels)
        self.y_proj = nn.Linear(caption_dim, channels)
        self.register_buffer("mask_token", torch.zeros(channels))

    def forward(self, x, t, y, mask_ratio=0.0, cfg=1.0, generator=None):
        if cfg != 1.0:  # the released model's guidance: doubled batch, zeroed captions, mix on F
            t2 = t if len(t) == 1 else torch.cat([t, t])
            out = self.forward(torch.cat([x, x]), t2, torch.cat([y, torch.zeros_like(y)]), mask_ratio)
            cond, uncond = out["sample"].chunk(2)
            return {"sample": uncond + cfg * (cond - uncond), "mask": None}
        n, c, h, w = x.shape
        cond = self.t_proj(t.expand(n)[:, None]) + self.y_proj(y.reshape(n, -1, y.shape[-1]).mean(1))
        out = self.conv(x) + cond[:, :, None, None]
        mask = None
        if mask_ratio > 0:
            p = self.patch_size
            tokens = (h // p) * (w // p)
            keep = int(tokens * (1 - mask_ratio))
            order = torch.rand(n, tokens, generator=generator).argsort(dim=1)
            mask = torch.ones(n, tokens).scatter(1, order[:, :keep], 0.0)
            dropped = mask.view(n, 1, h // p, w // p).repeat_interleave(p, 2).repeat_interleave(p, 3).bool()
            out = torch.where(dropped, self.mask_token.view(1, c, 1, 1), out)
        return {"sample": out, "mask": mask}


class ZeroNet(nn.Module):
    """F = 0, so D(x; sigma) = c_skip * x."""

    def forward(self, x, t, y, mask_ratio=0.0, cfg=1.0):
        return {"sample": torch.zeros_like(x), "mask": None}


class GaussianDataDenoiser(nn.Module):
    """Ideal denoiser for data ~ N(mu, s^2) elementwise, expressed as a raw network F."""

    def __init__(self, mu: float, s: float):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x_in, t, y, mask_ratio=0.0, cfg=1.0):
        sigma = torch.exp(4 * t.double()).view(-1, 1, 1, 1)
        sd = edm.SIGMA_DATA
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        x = x_in.double() * (sigma**2 + sd**2).sqrt()
        ideal = self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)
        return {"sample": ((ideal - c_skip * x) / c_out).float(), "mask": None}


def _latents(n=3, c=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g), torch.randn(n, 5, 8, generator=g)


# ---------------------------------------------------------------- preconditioning


def test_precondition_matches_closed_form():
    sigma = torch.tensor([0.002, 0.5, 0.9, 3.0, 80.0], dtype=torch.float64)
    sd = 0.9
    c_skip, c_out, c_in, c_noise = edm.edm_precondition(sigma, sd)
    for k, s in enumerate(sigma.tolist()):
        assert c_skip[k].item() == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-12)
        assert c_out[k].item() == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert c_in[k].item() == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert c_noise[k].item() == pytest.approx(math.log(s) / 4, rel=1e-12)
    # at sigma = sigma_data the skip and the network share the signal equally
    c_skip, c_out, c_in, _ = edm.edm_precondition(torch.tensor(sd, dtype=torch.float64), sd)
    assert c_skip.item() == pytest.approx(0.5)
    assert c_out.item() == pytest.approx(sd / math.sqrt(2))
    assert c_in.item() == pytest.approx(1 / (sd * math.sqrt(2)))


def test_paper_constants():
    assert (edm.SIGMA_DATA, edm.SIGMA_MIN, edm.SIGMA_MAX, edm.RHO) == (0.9, 0.002, 80.0, 7.0)
    assert (edm.P_MEAN, edm.P_STD, edm.CAPTION_DROP_PROB) == (-0.6, 1.2, 0.1)


def test_denoise_combines_skip_and_network():
    net = ToyNet()
    x, y = _latents()
    sigma = torch.tensor([0.1, 1.0, 10.0])
    d, mask = edm.edm_denoise(net, x, sigma, y)
    assert mask is None
    s = sigma.view(-1, 1, 1, 1).double()
    sd = 0.9
    c_in = 1 / (s**2 + sd**2).sqrt()
    f = net(x * c_in.float(), (s.log() / 4).flatten().float(), y)["sample"].double()
    expected = sd**2 / (s**2 + sd**2) * x.double() + s * sd / (s**2 + sd**2).sqrt() * f
    torch.testing.assert_close(d.double(), expected, rtol=1e-5, atol=1e-5)


def test_denoise_guidance_mixes_branches_with_zeroed_captions():
    net = ToyNet()
    x, y = _latents()
    sigma = torch.tensor(2.0)
    d_cond, _ = edm.edm_denoise(net, x, sigma, y)
    d_uncond, _ = edm.edm_denoise(net, x, sigma, torch.zeros_like(y))
    d_cfg, _ = edm.edm_denoise(net, x, sigma, y, cfg=5.0)
    torch.testing.assert_close(d_cfg, d_uncond + 5.0 * (d_cond - d_uncond), rtol=1e-5, atol=1e-5)
    # guidance placed where the model itself would place it: identical bits
    d_model_cfg = _official_style_denoise(net, x.float(), sigma.float(), y, cfg=5.0)
    assert torch.equal(d_cfg, d_model_cfg)


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("seeded", [True, False])
def test_loss_equals_hand_computation(seeded):
    x, y = _latents(n=4)
    gen = torch.Generator().manual_seed(123) if seeded else None
    if not seeded:
        torch.manual_seed(123)
    loss = edm.edm_loss(ZeroNet(), x, y, generator=gen)

    # the draws, in order: one log-normal sigma per sample, then the noise
    draw = torch.Generator().manual_seed(123) if seeded else None
    if not seeded:
        torch.manual_seed(123)
    rnd = torch.randn(4, 1, 1, 1, generator=draw).double()
    noise = torch.randn(x.shape, generator=draw).double()
    sigma = torch.exp(rnd * 1.2 - 0.6)
    weight = (sigma**2 + 0.81) / (sigma * 0.9) ** 2
    denoised = 0.81 / (sigma**2 + 0.81) * (x.double() + noise * sigma)
    expected = (weight * (denoised - x.double()) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_reproducible_and_per_sample():
    net = ToyNet()
    x, y = _latents(n=4)
    a = edm.edm_loss(net, x, y, generator=torch.Generator().manual_seed(7))
    b = edm.edm_loss(net, x, y, generator=torch.Generator().manual_seed(7))
    c = edm.edm_loss(net, x, y, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    per = edm.edm_loss(net, x, y, generator=torch.Generator().manual_seed(7), reduction="none")
    assert per.shape == (4,)
    assert per.mean().item() == pytest.approx(a.item(), rel=1e-6)
    a.backward()
    assert net.conv.weight.grad is not None and net.conv.weight.grad.abs().sum() > 0


def test_masked_patch_mean_by_hand():
    # one sample, 1 channel, 4x4 latent, 2x2 patches numbered row-major: means 1, 2, 3, 4
    patch_means = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    loss = patch_means.repeat_interleave(2, 0).repeat_interleave(2, 1)[None, None].clone()
    loss[0, 0, 0, 0] += 0.4  # patch 0 pixels now 1.4, 1, 1, 1 -> mean 1.1
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])  # keep patches 0 and 3
    assert edm.masked_patch_mean(loss, mask).item() == pytest.approx((1.1 + 4.0) / 2)
    # channel mean first: a second channel of zeros halves every patch
    two = torch.cat([loss, torch.zeros_like(loss)], dim=1)
    assert edm.masked_patch_mean(two, mask).item() == pytest.approx((1.1 + 4.0) / 4)


def test_masked_loss_ignores_dropped_patches():
    net = ToyNet()
    x, y = _latents(n=4, size=8)

    def loss_with(fill: float) -> torch.Tensor:
        net.mask_token.fill_(fill)
        return edm.edm_loss(net, x, y, mask_ratio=0.75, generator=torch.Generator().manual_seed(5))

    base = loss_with(0.0)
    assert torch.equal(base, loss_with(1e3))  # output on dropped patches never counts
    # ...but the unmasked loss does see them, and the masked one sees kept patches
    net.mask_token.fill_(0.0)
    full = edm.edm_loss(net, x, y, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(base, full)
    with torch.no_grad():
        net.conv.bias.add_(1.0)
    assert not torch.equal(base, loss_with(0.0))


def test_masked_loss_seeded_by_generator_alone():
    net = ToyNet()
    x, y = _latents(n=4, size=8)
    torch.manual_seed(1)
    a = edm.edm_loss(net, x, y, mask_ratio=0.5, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(2)  # the global RNG plays no part once a generator is given
    b = edm.edm_loss(net, x, y, mask_ratio=0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # without a generator the model's mask follows the global RNG
    torch.manual_seed(1)
    c = edm.edm_loss(net, x, y, mask_ratio=0.5)
    torch.manual_seed(1)
    assert torch.equal(c, edm.edm_loss(net, x, y, mask_ratio=0.5))


def test_masked_loss_needs_a_mask():
    x, y = _latents()
    with pytest.raises(ValueError, match="no mask"):
        edm.edm_loss(ZeroNet(), x, y, mask_ratio=0.5)


def test_drop_captions():
    y = torch.randn(400, 5, 8) + 3.0
    assert torch.equal(edm.drop_captions(y, 0.0), y)
    assert torch.count_nonzero(edm.drop_captions(y, 1.0)) == 0
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    out = edm.drop_captions(y, 0.1, generator=g())
    assert torch.equal(out, edm.drop_captions(y, 0.1, generator=g()))
    zeroed = (out.flatten(1) == 0).all(dim=1)
    assert torch.equal(out[~zeroed], y[~zeroed])  # a caption is dropped whole or kept whole
    assert 20 <= zeroed.sum().item() <= 60  # ~10% of 400


# ---------------------------------------------------------------- schedule


def test_sigma_steps_endpoints_and_monotonic():
    s = edm.edm_sigma_steps(30)
    assert s.dtype == torch.float64 and s.shape == (31,)
    assert s[0].item() == pytest.approx(80.0, rel=1e-12)
    assert s[-2].item() == pytest.approx(0.002, rel=1e-12)
    assert s[-1].item() == 0.0
    assert (s[1:] < s[:-1]).all()
    # rho = 7 spacing: sigma^(1/rho) is evenly spaced
    r = s[:-1] ** (1 / 7)
    torch.testing.assert_close(r[1:] - r[:-1], torch.full((29,), (r[-1] - r[0]).item() / 29, dtype=torch.float64))
    with pytest.raises(ValueError):
        edm.edm_sigma_steps(1)


# ---------------------------------------------------------------- sampler


def _official_style_denoise(net, x, sigma, y, cfg):
    """Preconditioning written out as in EDM's reference wrapper; the model does the guidance."""
    sd = 0.9
    sigma = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1 / (sd**2 + sigma**2).sqrt()
    f = net((c_in * x).to(x.dtype), (sigma.log() / 4).flatten(), y, cfg=cfg)["sample"]
    return c_skip * x + c_out * f


def _reference_heun(net, noise, y, steps, cfg):
    """EDM Algorithm 2 without churn, float64 state, float32 network calls."""
    i = torch.arange(steps, dtype=torch.float64)
    t = (80 ** (1 / 7) + i / (steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    x = noise.double() * t[0]
    for k in range(steps):
        d = (x - _official_style_denoise(net, x.float(), t[k].float(), y, cfg).double()) / t[k]
        x_next = x + (t[k + 1] - t[k]) * d
        if k < steps - 1:
            d2 = (x_next - _official_style_denoise(net, x_next.float(), t[k + 1].float(), y, cfg).double()) / t[k + 1]
            x_next = x + (t[k + 1] - t[k]) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x.float()


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_heun_matches_reference_bitwise(guidance):
    net = ToyNet()
    noise, y = _latents(n=2)
    ours = edm.heun_sample(net, noise, y, steps=6, guidance=guidance)
    assert ours.dtype == torch.float32 and ours.shape == noise.shape
    assert torch.equal(ours, _reference_heun(net, noise, y, steps=6, cfg=guidance))


def test_heun_deterministic():
    net = ToyNet()
    noise, y = _latents(n=2)
    a = edm.heun_sample(net, noise, y, steps=5)
    b = edm.heun_sample(net, noise, y, steps=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, edm.heun_sample(net, noise + 1e-2, y, steps=5))


def test_guidance_one_is_conditional_only():
    net = ToyNet()
    noise, y = _latents(n=2)
    cond = edm.heun_sample(net, noise, y, steps=4, guidance=1.0)
    assert not torch.equal(cond, edm.heun_sample(net, noise, y, steps=4, guidance=3.0))
    # guidance <= 1 is ignored, as in the released sampler
    assert torch.equal(cond, edm.heun_sample(net, noise, y, steps=4, guidance=0.5))

    class CaptionBlind(ToyNet):
        def forward(self, x, t, y, mask_ratio=0.0, cfg=1.0):
            return super().forward(x, t, torch.zeros_like(y), mask_ratio, cfg)

    blind = CaptionBlind()
    blind.load_state_dict(net.state_dict())
    # with identical branches, any guidance scale reproduces the conditional sampler exactly
    assert torch.equal(
        edm.heun_sample(blind, noise, y, steps=4, guidance=1.0),
        edm.heun_sample(blind, noise, y, steps=4, guidance=7.5),
    )


def test_heun_single_point_data_is_exact():
    x0 = 0.37
    noise = torch.randn(2, 4, 4, 4)
    out = edm.heun_sample(GaussianDataDenoiser(x0, 0.0), noise, torch.zeros(2, 3, 8), steps=8, guidance=1.0)
    torch.testing.assert_close(out, torch.full_like(out, x0), atol=1e-4, rtol=0)


def test_heun_converges_on_gaussian_data():
    mu, s = 0.5, 0.3
    net = GaussianDataDenoiser(mu, s)
    noise = torch.randn(4, 2, 4, 4)
    # probability-flow ODE solution from sigma_max to 0 for Gaussian data
    exact = mu + (noise.double() * 80.0 - mu) * s / math.sqrt(s**2 + 80.0**2)

    def err(steps):
        out = edm.heun_sample(net, noise, torch.zeros(4, 3, 8), steps=steps, guidance=1.0)
        return (out.double() - exact).abs().max().item()

    e10, e30, e60 = err(10), err(30), err(60)
    assert e30 < 0.1 * s  # within 10% of the data's spread (max over elements) at 30 steps
    assert e60 < e30 / 3  # second order: halving the step size cuts the error ~4x
    assert e30 < e10 / 6


def test_heun_churn_uses_generator():
    net = ToyNet()
    noise, y = _latents(n=2)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    a = edm.heun_sample(net, noise, y, steps=5, s_churn=10.0, generator=g())
    b = edm.heun_sample(net, noise, y, steps=5, s_churn=10.0, generator=g())
    assert torch.equal(a, b)
    assert not torch.equal(a, edm.heun_sample(net, noise, y, steps=5))


# ---------------------------------------------------------------- the real model


def _smoke_model():
    models = pytest.importorskip("microdit.models")
    torch.manual_seed(0)
    model = models.MicroDiT_Smoke_2(input_size=8, caption_channels=8, in_channels=4)
    with torch.no_grad():  # the zero-initialised output layers would make F constant
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def test_microdit_smoke_loss_and_sampler():
    model = _smoke_model()
    x, y = _latents(n=2, size=8)
    for ratio in (0.0, 0.75):
        model.train()
        loss = edm.edm_loss(model, x, y, mask_ratio=ratio, generator=torch.Generator().manual_seed(0))
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
    model.eval()
    out = edm.heun_sample(model, x, y, steps=3, guidance=5.0)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out, edm.heun_sample(model, x, y, steps=3, guidance=5.0))
    assert not torch.allclose(out, edm.heun_sample(model, x, y, steps=3, guidance=1.0))
    # our guidance equals the model's own CFG batching
    assert torch.equal(
        edm.edm_denoise(model, x, torch.tensor(3.0), y, cfg=5.0)[0],
        _official_style_denoise(model, x, torch.tensor(3.0), y, cfg=5.0),
    )


def test_microdit_smoke_masked_loss_ignores_mask_token():
    model = _smoke_model()
    if not hasattr(model, "mask_token"):
        pytest.skip("model has no mask_token buffer")
    model.train()
    x, y = _latents(n=2, size=8)

    def loss_with(fill: float) -> torch.Tensor:
        with torch.no_grad():
            model.mask_token.fill_(fill)
        return edm.edm_loss(model, x, y, mask_ratio=0.75, generator=torch.Generator().manual_seed(0))

    assert torch.equal(loss_with(0.0), loss_with(50.0))
    # the placeholder does reach the output, so the equality above is the loss's doing
    d, mask = edm.edm_denoise(model, x, torch.tensor(1.0), y, mask_ratio=0.75)
    assert mask.sum() > 0 and (d.abs() > 10).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_generator_seeds_a_gpu_run_like_a_cpu_run():
    model = _smoke_model()
    x, y = _latents(n=2, size=8)
    cpu = edm.edm_loss(model, x, y, mask_ratio=0.75, generator=torch.Generator().manual_seed(0))
    model.cuda()
    gpu = edm.edm_loss(model, x.cuda(), y.cuda(), mask_ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert gpu.item() == pytest.approx(cpu.item(), rel=1e-2)
    model.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = edm.heun_sample(model, x.cuda(), y.cuda(), steps=3, guidance=5.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
