"""The paper's facts, written once: Sehwag et al. 2024, "Stretching Each Dollar: Diffusion Training
from Scratch on a Micro-Budget" (MicroDiT).

The training schedule in the keys of a preset's `train.stages.stageN` (the paper preset must equal
it: tests/test_paper.py), what the paper's run cost, and the released checkpoints' results.
`microdit cost` projects the schedule onto measured throughput; `microdit report` sets a run
beside all three.
"""
from __future__ import annotations

MODEL = "MicroDiT_XL_2"
GLOBAL_BATCH = 2048
VAE_FACTOR = 8  # SDXL-VAE: latents are 1/8 of the image side
CAPTION_CHANNELS = 1024  # DFN5B CLIP ViT-H/14 caption embeddings, 77 x 1024
# AdamW and the rest of training, as the official configs have them (MoE parameters at half lr)
OPTIMIZER = dict(weight_decay=0.1, betas=[0.9, 0.999], eps=1e-8)
CAPTION_DROP = 0.1  # captions zeroed in training, for classifier-free guidance
MOE_LR_SCALE = 0.5
EMA_DECAY = 0.99975
MIN_IMAGE_SIZE = 256  # images with a shorter side are dropped
# sampling and evaluation: Heun steps, guidance scale, COCO FID-30K, GenEval's images per prompt
SAMPLER = dict(steps=30, guidance=5.0)
FID_IMAGES = 30_000
GENEVAL_IMAGES_PER_PROMPT = 4

# Stages 3-4: the configs ask for EMA (from step 25K of stage 3) and the released code does none;
# `ema` here is what was intended. `init_optimizer`: the stage starts with a fresh optimizer.
STAGES: dict[int, dict] = {
    1: dict(resolution=256, mask_ratio=0.75, steps=250_000, global_batch=GLOBAL_BATCH, lr=2.4e-4,
            schedule="cosine", warmup=2_500, final_lr_ratio=0.33, p_mean=-0.6, p_std=1.2, grad_clip=0.25,
            init_optimizer=False, ema_start=0, ema=False),
    2: dict(resolution=256, mask_ratio=0.0, steps=30_000, global_batch=GLOBAL_BATCH, lr=8.0e-5,
            schedule="constant", warmup=0, final_lr_ratio=1.0, p_mean=-0.6, p_std=1.2, grad_clip=0.25,
            init_optimizer=True, ema_start=0, ema=False),
    3: dict(resolution=512, mask_ratio=0.75, steps=50_000, global_batch=GLOBAL_BATCH, lr=8.0e-5,
            schedule="constant", warmup=500, final_lr_ratio=1.0, p_mean=0.0, p_std=0.6, grad_clip=0.5,
            init_optimizer=False, ema_start=25_000, ema=True),
    4: dict(resolution=512, mask_ratio=0.0, steps=5_000, global_batch=GLOBAL_BATCH, lr=8.0e-5,
            schedule="constant", warmup=0, final_lr_ratio=1.0, p_mean=0.0, p_std=0.6, grad_clip=0.5,
            init_optimizer=True, ema_start=0, ema=True),
}
EMA_NOTE = "configs: yes; released code: no"

# 2.6 days on one 8xH100 machine at $3.75 per H100-hour; the paper rounds the product to $1,890
COST = {"days": 2.6, "gpus": 8, "gpu_type": "H100", "dollars": 1890, "pixart_alpha_dollars": 28400,
        "price_per_gpu_hour": 3.75, "gpu_hours": 2.6 * 24 * 8}

# released 512 px checkpoints: (training data and VAE, COCO FID-30K, GenEval overall)
RESULTS: list[tuple[str, float, float]] = [
    ("22M real, SDXL-VAE", 12.72, 0.46),
    ("37M real + synthetic, SDXL-VAE", 12.66, 0.46),
    ("37M real + synthetic, 16-channel VAE", 13.04, 0.40),
    ("490M synthetic", 13.26, 0.52),
]


# the released checkpoints: files under ckpts/ of the hub repo, the RESULTS row each reproduces, and
# how they load (MicroDiT_XL_2 at 512 px, the position embedding interpolated by 2 from 256 px)
RELEASED_REPO = "VSehwag24/MicroDiT"
RELEASED_FILES = {
    "dit_4_channel_22M_real_only_data": RESULTS[0][0],
    "dit_4_channel_37M_real_and_synthetic_data": RESULTS[1][0],
    "dit_16_channel_37M_real_and_synthetic_data": RESULTS[2][0],
    "dit_4_channel_0.5B_synthetic_data": RESULTS[3][0],
}
RELEASED_ARCHITECTURE = dict(model=MODEL, resolution=512, pos_interp_scale=2.0)


def schedule_text(stage: dict) -> str:
    """A stage's learning-rate schedule as the paper states it: '2.5K warmup, cosine to 0.33x'."""
    warmup = stage.get("warmup") or 0
    shape = f"cosine to {stage['final_lr_ratio']:g}x" if stage["schedule"] == "cosine" else stage["schedule"]
    if not warmup:
        return shape
    return f"{warmup / 1000:g}K warmup, {shape}" if warmup >= 1000 else f"{warmup} warmup, {shape}"
