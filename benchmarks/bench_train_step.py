"""One MicroDiT training step (EDM loss, backward, grad clip, AdamW): s/step, images/s, MFU.

Every mask ratio (and, with --moe-baseline, the same model with the released one-hot MoE) is
timed in the same process, steps interleaved, so the printed ratios compare like with like.
MFU counts matmul FLOPs of the architecture (`microdit.models.flops_per_image`, x3 for
forward + backward) against the accelerator's dense bf16 peak.

    python benchmarks/bench_train_step.py                                   # CPU: Tiny_2, 256 px, batch 2
    python benchmarks/bench_train_step.py --model XL_2 --res 512 --bf16 --compile --batch 64
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from microdit.models import build_model, flops_per_image
from microdit.moe import ExpertChoiceMoE

H100_H200_BF16_DENSE_TFLOPS = 989.0

try:
    from microdit.edm import edm_loss

    LOSS = "microdit.edm.edm_loss"
except ImportError:  # the EDM module is optional for this benchmark
    edm_loss = None
    LOSS = "MSE on sample (microdit.edm not available)"


def loss_fn(model, latents, captions, mask_ratio):
    if edm_loss is not None:
        return edm_loss(model, latents, captions, mask_ratio=mask_ratio)
    return model(latents, torch.zeros(latents.shape[0], device=latents.device), captions, mask_ratio=mask_ratio)["sample"].square().mean()


def use_one_hot_moe(model: torch.nn.Module) -> None:
    """Swap every MoE forward for the released one-hot einsum formulation (same weights)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference_moe import one_hot_expert_choice

    for m in model.modules():
        if isinstance(m, ExpertChoiceMoE):
            m.forward = lambda x, m=m: one_hot_expert_choice(x, m.gate.weight, m.w1, m.w2, m.capacity)


def make_variant(args, moe: str):
    torch.manual_seed(0)
    with torch.device(args.device):
        model = build_model(args.model, input_size=args.res // 8, caption_channels=args.caption_channels,
                            pos_interp_scale=args.res / 256)
    if moe == "one-hot":
        use_one_hot_moe(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                            fused=args.device.startswith("cuda"))
    forward = torch.compile(model) if args.compile else model
    return model, forward, opt


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Tiny_2", help="XL_2, Tiny_2 or Smoke_2")
    p.add_argument("--res", type=int, default=256, help="image resolution in px (latent = res / 8)")
    p.add_argument("--mask-ratios", type=float, nargs="+", default=[0.75, 0.0])
    p.add_argument("--batch", type=int, help="images per step (default 2 on CPU, 64 on GPU)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--caption-len", type=int, default=77)
    p.add_argument("--caption-channels", type=int, default=1024)
    p.add_argument("--moe-baseline", action="store_true", help="also time the one-hot MoE formulation")
    p.add_argument("--peak-tflops", type=float, help="accelerator peak for MFU (default: 989 on CUDA, none on CPU)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batch = args.batch or (64 if args.device.startswith("cuda") else 2)
    peak = args.peak_tflops or (H100_H200_BF16_DENSE_TFLOPS if args.device.startswith("cuda") else None)
    autocast = (lambda: torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16)) if args.bf16 else nullcontext

    variants = {moe: make_variant(args, moe) for moe in (["fast", "one-hot"] if args.moe_baseline else ["fast"])}
    model = variants["fast"][0]
    latents = torch.randn(batch, model.in_channels, args.res // 8, args.res // 8, device=args.device)
    captions = torch.randn(batch, args.caption_len, args.caption_channels, device=args.device)

    def step(moe: str, mask_ratio: float) -> float:
        _, forward, opt = variants[moe]
        sync(args.device)
        start = time.perf_counter()
        with autocast():
            loss = loss_fn(forward, latents, captions, mask_ratio)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(variants[moe][0].parameters(), 0.25)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        return time.perf_counter() - start

    configs = [(moe, m) for moe in variants for m in args.mask_ratios]
    for c in configs:
        for _ in range(args.warmup):
            step(*c)
    times = {c: [] for c in configs}
    for _ in range(args.steps):
        for c in configs:
            times[c].append(step(*c))

    params = sum(p.numel() for p in model.parameters())
    print(f"MicroDiT_{args.model.removeprefix('MicroDiT_')} ({params / 1e6:.1f}M params), {args.res} px "
          f"(latent {args.res // 8}), batch {batch}, {args.device}{' bf16' if args.bf16 else ' fp32'}"
          f"{' compiled' if args.compile else ''}, threads {args.threads}; loss: {LOSS}; median of {args.steps} steps")
    print(f"{'moe':>8} {'mask':>5} {'s/step':>8} {'img/s':>8} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>7}")
    rows = []
    for (moe, mask), ts in times.items():
        sec = statistics.median(ts)
        fwd = flops_per_image(model, mask, args.caption_len)
        tflops = 3 * fwd * batch / sec / 1e12
        row = dict(moe=moe, mask_ratio=mask, s_per_step=sec, images_per_s=batch / sec, fwd_gflop_per_image=fwd / 1e9,
                   tflops=tflops, mfu=tflops / peak if peak else None)
        rows.append(row)
        mfu = f"{row['mfu']:.1%}" if peak else "-"
        print(f"{moe:>8} {mask:>5.2f} {sec:>8.3f} {row['images_per_s']:>8.2f} {fwd / 1e9:>10.1f} {tflops:>8.3f} {mfu:>7}")
    base = {(r["moe"], r["mask_ratio"]): r["s_per_step"] for r in rows}
    for moe, mask in configs:
        if mask > 0 and (moe, 0.0) in base:
            print(f"masking {mask:.2f} vs none ({moe} MoE): {base[(moe, 0.0)] / base[(moe, mask)]:.2f}x faster per step")
        if moe == "one-hot":
            print(f"fast MoE vs one-hot MoE at mask {mask:.2f}: {base[(moe, mask)] / base[('fast', mask)]:.2f}x faster per step")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "res": args.res, "batch": batch, "device": args.device,
                                         "bf16": args.bf16, "compile": args.compile, "loss": LOSS, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
