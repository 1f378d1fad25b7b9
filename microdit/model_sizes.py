"""The named MicroDiT sizes: the one table a size is added to.

Plain constructor arguments of `microdit.models.MicroDiT`, without torch, so the config schema
(`microdit.settings`) offers exactly the sizes `microdit.models.build_model` builds.
"""
from __future__ import annotations

from typing import Any

# Shared by every named size: patch 2, layer-wise scaling 0.5 -> 1 (qkv) and 0.5 -> 4 (FFN),
# a wide patch-mixer (qkv 1, FFN 4), no biases in blocks, 8 experts of capacity 2 every 2nd block.
SHARED: dict[str, Any] = dict(
    input_size=32, patch_size=2, in_channels=4, multiple_of=256, caption_channels=1024,
    pos_interp_scale=1.0, norm_eps=1e-6, depth_init=True,
    qkv_ratio_range=(0.5, 1.0), ffn_ratio_range=(0.5, 4.0),
    use_patch_mixer=True, patch_mixer_qkv_ratio=1.0, patch_mixer_ffn_ratio=4.0,
    bias=False, num_experts=8, expert_capacity=2.0, experts_every_n=2,
)

# name -> what it sets on top of SHARED
SIZES: dict[str, dict[str, Any]] = {
    # the paper's model: 1.16B parameters
    "MicroDiT_XL_2": dict(dim=1024, depth=28, head_dim=64, patch_mixer_depth=6, patch_mixer_dim=768),
    # 201M parameters
    "MicroDiT_Tiny_2": dict(dim=512, depth=16, head_dim=32, patch_mixer_depth=4, patch_mixer_dim=512),
    # CPU smoke size: every mechanism of XL (mixer at its own width with an MoE block, layer-wise
    # scaling, MoE in the backbone), small enough to train on a laptop.
    "MicroDiT_Smoke_2": dict(dim=128, depth=4, head_dim=32, patch_mixer_depth=2, patch_mixer_dim=96, multiple_of=32),
}
