"""MicroDiT: the diffusion transformer of *Stretching Each Dollar* (Sehwag et al. 2024).

A DiT over latent patches conditioned on caption embeddings, with the paper's four changes:
  * a patch-mixer: a few full transformer blocks that see every patch first;
  * deferred masking: after the mixer a random `mask_ratio` of the patches is dropped and only
    the rest go through the backbone (a fixed mask token fills the holes at the output);
  * layer-wise scaling: attention and FFN widths grow linearly with depth;
  * expert-choice MoE FFNs in every second backbone block (never the last).
Attention uses LayerNorm on queries and keys (no affine); every block is modulated by adaLN
from timestep + pooled caption and cross-attends to the caption tokens.

Module names and shapes follow the released checkpoints, so they load with `strict=True`. The
named sizes are the table in `microdit.model_sizes`.

Longer than 500 lines because it is one architecture, read top to bottom beside the official
implementation: its blocks, the model they make and the FLOPs count that walks its modules.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from microdit import model_sizes
from microdit.moe import ExpertChoiceMoE, round_up, trunc_normal_


def layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    # Every learned norm in MicroDiT has a scale but no bias.
    return nn.LayerNorm(dim, eps=eps, bias=False)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def adaln(cond_dim: int, dim: int, chunks: int) -> nn.Sequential:
    return nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(cond_dim, chunks * dim, bias=True))


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------

def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) [sin | cos] features at geometric frequencies 1 .. 1/10000."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid: int, base_size: int, pos_interp_scale: float = 1.0) -> torch.Tensor:
    """(grid*grid, dim) float32 position embedding for a row-major grid of patches.

    Coordinates run over `base_size` units whatever the grid, then are divided by
    `pos_interp_scale`; a 512 px model (grid 32) with scale 2 thus sees positions 0, 0.5, ..., 15.5,
    the 256 px model's range (grid 16, scale 1) sampled twice as finely. The first half of the
    features encodes the column, the second half the row (the released layout).
    """
    if dim % 4:
        raise ValueError(f"sincos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float32) / (grid / base_size) / pos_interp_scale
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    return emb.float()


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of a latent -> (N, T, dim) tokens, row-major."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar noise conditioning -> dim-vector: sinusoidal features (cos | sin) then an MLP."""

    def __init__(self, dim: int, frequency_dim: int = 512, max_period: float = 10000.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, dim, bias=True), nn.GELU(approximate="tanh"), nn.Linear(dim, dim, bias=True)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t[:, None].float() * freqs[None]
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)
        if self.frequency_dim % 2:
            features = F.pad(features, (0, 1))
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class NormedMLP(nn.Module):
    """Linear -> tanh-GELU -> LayerNorm -> Linear (caption projection, pooled-caption MLP)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.norm = layer_norm(hidden_dim, eps)
        self.fc2 = nn.Linear(hidden_dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class CaptionProjection(nn.Module):
    """Caption-encoder width -> model width (kept as a wrapper for the checkpoint's `y_proj` name)."""

    def __init__(self, caption_channels: int, dim: int, eps: float):
        super().__init__()
        self.y_proj = NormedMLP(caption_channels, dim, dim, eps)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


# --------------------------------------------------------------------------------------------
# Attention and feed-forward
# --------------------------------------------------------------------------------------------

def _qk_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    # QK-LayerNorm over all heads jointly, no affine; back to the projection's dtype so the
    # attention kernel runs in the autocast precision.
    return F.layer_norm(x, (x.shape[-1],), eps=eps).to(x.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, Tq, H*hd), (N, Tk, H*hd) x2 -> (N, Tq, H*hd) multi-head softmax attention."""
    n, tq, inner = q.shape
    split = lambda z: z.view(n, -1, heads, inner // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(n, tq, inner)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool, eps: float):
        super().__init__()
        self.heads = heads
        self.eps = eps
        inner = heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=bias)
        self.proj = nn.Linear(inner, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(_attend(_qk_norm(q, self.eps), _qk_norm(k, self.eps), v, self.heads))

    def reset_parameters(self, out_std: float) -> None:
        trunc_normal_(self.qkv.weight, std=0.02)
        trunc_normal_(self.proj.weight, std=out_std)


class CrossAttention(nn.Module):
    """Patch tokens attend to caption tokens."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool, eps: float):
        super().__init__()
        self.heads = heads
        self.eps = eps
        inner = heads * head_dim
        self.q_linear = nn.Linear(dim, inner, bias=bias)
        self.kv_linear = nn.Linear(dim, 2 * inner, bias=bias)
        self.proj = nn.Linear(inner, dim, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k, v = self.kv_linear(context).chunk(2, dim=-1)
        q = _qk_norm(self.q_linear(x), self.eps)
        return self.proj(_attend(q, _qk_norm(k, self.eps), v, self.heads))

    def reset_parameters(self, out_std: float) -> None:
        trunc_normal_(self.q_linear.weight, std=0.02)
        trunc_normal_(self.kv_linear.weight, std=0.02)
        trunc_normal_(self.proj.weight, std=out_std)


class SwiGLU(nn.Module):
    """Dense gated FFN; `hidden_dim` is the nominal 4x-style width, of which 2/3 is used (rounded up)."""

    def __init__(self, dim: int, hidden_dim: int, multiple_of: int, bias: bool):
        super().__init__()
        self.hidden_dim = round_up(int(2 * hidden_dim / 3), multiple_of)
        self.w1 = nn.Linear(dim, self.hidden_dim, bias=bias)
        self.w2 = nn.Linear(dim, self.hidden_dim, bias=bias)
        self.w3 = nn.Linear(self.hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))

    def reset_parameters(self, out_std: float) -> None:
        trunc_normal_(self.w1.weight, std=0.02)
        trunc_normal_(self.w2.weight, std=out_std)
        trunc_normal_(self.w3.weight, std=out_std)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------

class CaptionBlock(nn.Module):
    """Pre-norm self-attention + SwiGLU over the caption tokens, before they condition anything."""

    def __init__(self, dim: int, head_dim: int, multiple_of: int, bias: bool, eps: float):
        super().__init__()
        self.norm1 = layer_norm(dim, eps)
        self.attn = SelfAttention(dim, dim // head_dim, head_dim, bias, eps)
        self.norm2 = layer_norm(dim, eps)
        self.mlp = SwiGLU(dim, 4 * dim, multiple_of, bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = y + self.attn(self.norm1(y))
        return y + self.mlp(self.norm2(y))

    def reset_parameters(self) -> None:
        self.attn.reset_parameters(0.02)
        self.mlp.reset_parameters(0.02)
        # Start as the identity on the caption tokens.
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.mlp.w3.weight)


def scaled_qkv_dim(dim: int, ratio: float, head_dim: int) -> int:
    """Attention width for a layer-wise-scaling ratio: dim * ratio rounded up to whole head pairs."""
    if ratio == 1:
        return dim
    return round_up(int(dim * ratio), 2 * head_dim)


class MicroDiTBlock(nn.Module):
    """adaLN-modulated self-attention, un-gated cross-attention to the caption, then a dense
    SwiGLU or expert-choice MoE FFN, each a pre-norm residual branch."""

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        head_dim: int,
        qkv_ratio: float,
        ffn_ratio: float,
        multiple_of: int,
        moe: bool,
        num_experts: int,
        expert_capacity: float,
        bias: bool,
        eps: float,
        out_std: float,
    ):
        super().__init__()
        qkv_dim = scaled_qkv_dim(dim, qkv_ratio, head_dim)
        ffn_hidden = int(dim * ffn_ratio)
        self.out_std = out_std  # init std of each branch's output projection
        self.norm1 = layer_norm(dim, eps)
        self.attn = SelfAttention(dim, qkv_dim // head_dim, head_dim, bias, eps)
        self.cross_attn = CrossAttention(dim, dim // head_dim, head_dim, bias, eps)
        self.norm2 = layer_norm(dim, eps)
        self.norm3 = layer_norm(dim, eps)
        if moe:
            self.mlp = ExpertChoiceMoE(dim, ffn_hidden, num_experts, expert_capacity, multiple_of)
        else:
            self.mlp = SwiGLU(dim, ffn_hidden, multiple_of, bias)
        self.adaLN_modulation = adaln(cond_dim, dim, 6)

    def forward(self, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_sa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_sa, scale_sa))
        x = x + self.cross_attn(self.norm2(x), y)
        x = x + gate_ff.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift_ff, scale_ff))
        return x

    def reset_parameters(self) -> None:
        for norm in (self.norm1, self.norm2, self.norm3):
            norm.reset_parameters()
        self.attn.reset_parameters(self.out_std)
        self.cross_attn.reset_parameters(self.out_std)
        self.mlp.reset_parameters(self.out_std)
        # adaLN starts at zero: every branch's gate is closed and the modulation is the identity.
        nn.init.zeros_(self.adaLN_modulation[-1].weight)


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map from tokens to p*p*C latent values."""

    def __init__(self, dim: int, cond_dim: int, patch_size: int, out_channels: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = adaln(cond_dim, dim, 2)
        self.norm_final = layer_norm(dim, eps)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------------
# Deferred masking
# --------------------------------------------------------------------------------------------

def random_patch_mask(
    batch: int,
    tokens: int,
    mask_ratio: float,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose, per sample and uniformly at random, which patches the backbone keeps.

    Returns (ids_keep (N, K), ids_restore (N, T), mask (N, T) float with 1 = dropped), where
    K = int(tokens * (1 - mask_ratio)). Without a generator the noise comes from the global RNG
    on `device`, exactly as the released code draws it.
    """
    keep = int(tokens * (1 - mask_ratio))
    if generator is None:
        noise = torch.rand(batch, tokens, device=device)
    else:
        noise = torch.rand(batch, tokens, generator=generator, device=generator.device).to(device)
    ids_shuffle = torch.argsort(noise, dim=1)  # the first `keep` of this order survive
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # each patch's rank in that order
    mask = (ids_restore >= keep).float()
    return ids_shuffle[:, :keep], ids_restore, mask


def drop_patches(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_patches(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Put kept tokens back at their positions; fill dropped positions with `mask_token`."""
    n, kept, c = x.shape
    filler = mask_token.expand(n, ids_restore.shape[1] - kept, c)
    return torch.gather(torch.cat([x, filler], dim=1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, c))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class MicroDiT(nn.Module):
    """Text-conditioned diffusion transformer with patch-mixer, deferred masking, layer-wise
    scaling and expert-choice MoE. Named sizes: `MicroDiT_XL_2`, `MicroDiT_Tiny_2`, `MicroDiT_Smoke_2`.

    `qkv_ratio_range` / `ffn_ratio_range` are the (first block, last block) width ratios of the
    backbone, interpolated linearly over depth; (r, r) gives constant widths.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        dim: int = 1152,
        depth: int = 28,
        head_dim: int = 64,
        multiple_of: int = 256,
        caption_channels: int = 1024,
        pos_interp_scale: float = 1.0,
        norm_eps: float = 1e-6,
        depth_init: bool = True,
        qkv_ratio_range: Sequence[float] = (1.0, 1.0),
        ffn_ratio_range: Sequence[float] = (4.0, 4.0),
        use_patch_mixer: bool = True,
        patch_mixer_depth: int = 4,
        patch_mixer_dim: int = 512,
        patch_mixer_qkv_ratio: float = 1.0,
        patch_mixer_ffn_ratio: float = 1.0,
        bias: bool = True,
        num_experts: int = 8,
        expert_capacity: float = 1.0,
        experts_every_n: int = 2,
    ):
        super().__init__()
        self.config: dict[str, Any] = {"architecture": "MicroDiT", **_jsonable(locals())}
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.dim = dim
        self.head_dim = head_dim
        self.caption_channels = caption_channels
        self.pos_interp_scale = pos_interp_scale
        self.use_patch_mixer = use_patch_mixer
        self.grid_size = input_size // patch_size
        self.base_size = input_size // patch_size  # position units span the build-time grid

        self.x_embedder = PatchEmbed(patch_size, in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.register_buffer("pos_embed", torch.zeros(1, self.grid_size**2, dim))
        self.y_embedder = CaptionProjection(caption_channels, dim, norm_eps)
        self.y_emb_preprocess = CaptionBlock(dim, head_dim, multiple_of, bias, norm_eps)
        self.pooled_y_emb_process = NormedMLP(dim, dim, dim, norm_eps)

        def moe_here(i: int, below: int) -> bool:  # every n-th block, only among the first `below`
            return (i + 1) % experts_every_n == 0 and i < below

        mixer_std = 0.02 / (2 * depth) ** 0.5
        if use_patch_mixer:
            self.patch_mixer = nn.ModuleList([
                MicroDiTBlock(
                    patch_mixer_dim, dim, head_dim, patch_mixer_qkv_ratio, patch_mixer_ffn_ratio, multiple_of,
                    moe=i > 0 and moe_here(i, patch_mixer_depth), num_experts=num_experts,
                    expert_capacity=expert_capacity, bias=bias, eps=norm_eps, out_std=mixer_std,
                )
                for i in range(patch_mixer_depth)
            ])
            if patch_mixer_dim != dim:
                proj = lambda a, b: nn.Sequential(layer_norm(a, norm_eps), nn.Linear(a, b, bias=bias))  # noqa: E731
                self.patch_mixer_map_xin = proj(dim, patch_mixer_dim)
                self.patch_mixer_map_xout = proj(patch_mixer_dim, dim)
                self.patch_mixer_map_y = proj(dim, patch_mixer_dim)
            else:
                self.patch_mixer_map_xin = self.patch_mixer_map_xout = self.patch_mixer_map_y = nn.Identity()

        # Layer-wise scaling: ratios ramp linearly from the first to the last block.
        qkv_ratios = np.linspace(qkv_ratio_range[0], qkv_ratio_range[1], num=depth, dtype=float)
        ffn_ratios = np.linspace(ffn_ratio_range[0], ffn_ratio_range[1], num=depth, dtype=float)
        self.blocks = nn.ModuleList([
            MicroDiTBlock(
                dim, dim, head_dim, float(qkv_ratios[i]), float(ffn_ratios[i]), multiple_of,
                moe=moe_here(i, depth - 1), num_experts=num_experts, expert_capacity=expert_capacity,
                bias=bias, eps=norm_eps,
                out_std=0.02 / (2 * (i + 1)) ** 0.5 if depth_init else mixer_std,
            )
            for i in range(depth)
        ])
        self.register_buffer("mask_token", torch.zeros(1, 1, patch_size**2 * self.out_channels))
        self.final_layer = FinalLayer(dim, dim, patch_size, self.out_channels, norm_eps)
        self.initialize_weights()

    # ---- init --------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """The released init: Xavier linears with zero bias, N(0, 0.02) embedder MLPs, truncated
        normal in blocks with depth-scaled output projections, zero adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        pos = sincos_pos_embed_2d(self.dim, self.grid_size, self.base_size, self.pos_interp_scale)
        self.pos_embed.copy_(pos.unsqueeze(0))
        # Patch conv as a linear map; its bias keeps PyTorch's default init, as released.
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(self.dim, -1))
        for linear in (
            self.t_embedder.mlp[0], self.t_embedder.mlp[2],
            self.pooled_y_emb_process.fc1, self.pooled_y_emb_process.fc2,
            self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2,
        ):
            nn.init.normal_(linear.weight, std=0.02)
        for block in [*self.blocks, *(self.patch_mixer if self.use_patch_mixer else [])]:
            block.reset_parameters()
        self.y_emb_preprocess.reset_parameters()
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.linear.weight)

    # ---- forward -----------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        mask_ratio: float = 0.0,
        cfg: float = 1.0,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """x: latents (N, C, H, W); t: noise conditioning (N,) or (1,); y: caption embeddings
        (N, L, D) or (N, 1, L, D). Returns {"sample": (N, C, H, W), "mask": (N, T) or None}.

        `mask_ratio > 0` drops that share of patches after the mixer (training only); `generator`
        makes the drop reproducible. `cfg != 1` runs conditional and zero-caption branches as one
        doubled batch and returns uncond + cfg * (cond - uncond).
        """
        t = t.reshape(-1)
        if cfg != 1.0:
            if mask_ratio > 0:
                raise ValueError("classifier-free guidance is for sampling; it cannot be combined with masking")
            t2 = t if t.numel() == 1 else torch.cat([t, t])
            out = self._denoise(torch.cat([x, x]), t2, torch.cat([y, torch.zeros_like(y)]), 0.0, None)
            cond, uncond = out["sample"].chunk(2)
            return {"sample": uncond + cfg * (cond - uncond), "mask": None}
        return self._denoise(x, t, y, mask_ratio, generator)

    def _denoise(self, x, t, y, mask_ratio, generator):
        self._check_inputs(x, t, y)
        n, _, h, w = x.shape
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t.expand(n))  # (N, D)
        y = self.y_emb_preprocess(self.y_embedder(y.reshape(n, -1, y.shape[-1])))  # (N, L, D)
        c = c + self.pooled_y_emb_process(y.mean(dim=1))

        if self.use_patch_mixer:
            x = self.patch_mixer_map_xin(x)
            y_mixer = self.patch_mixer_map_y(y)
            for block in self.patch_mixer:
                x = block(x, y_mixer, c)

        mask = None
        if mask_ratio > 0:
            ids_keep, ids_restore, mask = random_patch_mask(n, x.shape[1], mask_ratio, x.device, generator)
            x = drop_patches(x, ids_keep)
        if self.use_patch_mixer:
            x = self.patch_mixer_map_xout(x)  # after the drop: only kept tokens pay for it

        for block in self.blocks:
            x = block(x, y, c)
        x = self.final_layer(x, c)  # (N, T_kept, p*p*C)
        if mask is not None:
            x = restore_patches(x, ids_restore, self.mask_token)
        return {"sample": self.unpatchify(x, h // self.patch_size, w // self.patch_size), "mask": mask}

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"latents must be (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        tokens = (x.shape[2] // self.patch_size) * (x.shape[3] // self.patch_size)
        if tokens != self.pos_embed.shape[1] or x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(
                f"latents of {x.shape[2]}x{x.shape[3]} do not fit this model, built for "
                f"{self.input_size}x{self.input_size} (input_size={self.input_size})"
            )
        if t.numel() not in (1, x.shape[0]):
            raise ValueError(f"t must hold 1 or {x.shape[0]} noise levels, got shape {tuple(t.shape)}")
        if y.dim() not in (3, 4) or y.shape[0] != x.shape[0] or y.shape[-1] != self.caption_channels:
            raise ValueError(
                f"captions must be (N, L, {self.caption_channels}) or (N, 1, L, {self.caption_channels}) "
                f"with N={x.shape[0]}, got {tuple(y.shape)}"
            )

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(N, h*w, p*p*C) -> (N, C, h*p, w*p)."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    # ---- persistence: a model directory (microdit.weights; stage directories: microdit.checkpoint) --
    def save_pretrained(self, directory) -> None:
        from microdit.weights import write_model_dir

        write_model_dir(directory, self.config, {k: v.detach().cpu() for k, v in self.state_dict().items()})

    @classmethod
    def from_pretrained(cls, directory, device: torch.device | str = "cpu") -> "MicroDiT":
        from microdit.weights import read_model_dir

        return read_model_dir(directory, model_from_config).to(device)


def _jsonable(args: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in args.items():
        if key in ("self", "__class__"):
            continue
        if isinstance(value, (tuple, np.ndarray)):
            value = [float(v) for v in value]
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Named sizes (the table is microdit.model_sizes)
# --------------------------------------------------------------------------------------------

MODEL_CONFIGS: dict[str, dict[str, Any]] = model_sizes.SIZES  # name -> what it sets on top of model_sizes.SHARED


def build_model(name: str, **overrides: Any) -> MicroDiT:
    """A named MicroDiT ("MicroDiT_XL_2" or just "XL_2") with constructor overrides.

    The model's `config` records the name and the overrides, which is all `from_pretrained` needs.
    """
    arch = name if name in MODEL_CONFIGS else f"MicroDiT_{name}"
    if arch not in MODEL_CONFIGS:
        raise ValueError(f"unknown MicroDiT size {name!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    model = MicroDiT(**{**model_sizes.SHARED, **MODEL_CONFIGS[arch], **overrides})
    model.config = {"architecture": arch, **_jsonable(overrides)}
    return model


def _factory(name: str) -> Callable[..., MicroDiT]:
    def factory(**overrides: Any) -> MicroDiT:
        return build_model(name, **overrides)

    factory.__name__ = factory.__qualname__ = name  # pickles by name, reads as itself in tracebacks
    factory.__doc__ = f"`build_model({name!r}, **overrides)`: {MODEL_CONFIGS[name]}."
    return factory


MODELS: dict[str, Callable[..., MicroDiT]] = {name: _factory(name) for name in MODEL_CONFIGS}
MicroDiT_XL_2 = MODELS["MicroDiT_XL_2"]  # the paper's model
MicroDiT_Tiny_2 = MODELS["MicroDiT_Tiny_2"]
MicroDiT_Smoke_2 = MODELS["MicroDiT_Smoke_2"]  # the smoke preset's CPU-sized model


def model_from_config(config: dict[str, Any]) -> MicroDiT:
    """Rebuild the architecture a `model.config` describes (weights freshly initialised)."""
    config = dict(config)
    arch = config.pop("architecture", None)
    if arch == "MicroDiT":
        return MicroDiT(**config)
    if arch not in MODEL_CONFIGS:
        raise ValueError(f"config names unknown architecture {arch!r}; expected one of {', '.join(MODEL_CONFIGS)}")
    return build_model(arch, **config)


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------

def _linear_flops(m: nn.Module, tokens: int) -> int:
    return 2 * tokens * m.in_features * m.out_features if isinstance(m, nn.Linear) else 0


def _seq_flops(seq: nn.Module, tokens: int) -> int:
    return sum(_linear_flops(m, tokens) for m in seq.modules())


def _attention_flops(inner: int, tq: int, tk: int) -> int:
    return 2 * 2 * tq * tk * inner  # scores and weighted values


def _ffn_flops(mlp: nn.Module, tokens: int) -> int:
    if isinstance(mlp, ExpertChoiceMoE):
        k = mlp.tokens_per_expert(tokens)
        return _linear_flops(mlp.gate, tokens) + 2 * 2 * mlp.num_experts * k * mlp.dim * mlp.hidden_dim
    return _seq_flops(mlp, tokens)


def _block_flops(block: MicroDiTBlock, tokens: int, caption_len: int) -> int:
    sa, xa = block.attn, block.cross_attn
    return (
        _seq_flops(block.adaLN_modulation, 1)
        + _linear_flops(sa.qkv, tokens) + _attention_flops(sa.proj.in_features, tokens, tokens)
        + _linear_flops(sa.proj, tokens)
        + _linear_flops(xa.q_linear, tokens) + _linear_flops(xa.kv_linear, caption_len)
        + _attention_flops(xa.proj.in_features, tokens, caption_len) + _linear_flops(xa.proj, tokens)
        + _ffn_flops(block.mlp, tokens)
    )


def flops_per_image(model: MicroDiT, mask_ratio: float = 0.0, caption_len: int = 77) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward pass for one image at the model's input size.

    Counts linears, the patch conv, attention scores/values and expert FFNs (only the k tokens
    each expert picks); norms and elementwise ops are ignored. A training step costs ~3x this.
    """
    tokens = model.grid_size**2
    kept = int(tokens * (1 - mask_ratio)) if mask_ratio > 0 else tokens
    conv = model.x_embedder.proj
    flops = 2 * tokens * conv.in_channels * model.patch_size**2 * conv.out_channels
    flops += _seq_flops(model.t_embedder, 1) + _seq_flops(model.y_embedder, caption_len)
    cap = model.y_emb_preprocess
    flops += (
        _linear_flops(cap.attn.qkv, caption_len) + _attention_flops(cap.attn.proj.in_features, caption_len, caption_len)
        + _linear_flops(cap.attn.proj, caption_len) + _ffn_flops(cap.mlp, caption_len)
    )
    flops += _seq_flops(model.pooled_y_emb_process, 1)
    if model.use_patch_mixer:
        flops += _seq_flops(model.patch_mixer_map_xin, tokens) + _seq_flops(model.patch_mixer_map_y, caption_len)
        flops += sum(_block_flops(b, tokens, caption_len) for b in model.patch_mixer)
        flops += _seq_flops(model.patch_mixer_map_xout, kept)
    flops += sum(_block_flops(b, kept, caption_len) for b in model.blocks)
    flops += _seq_flops(model.final_layer.adaLN_modulation, 1) + _linear_flops(model.final_layer.linear, kept)
    return flops
