"""Latent precompute throughput of `microdit latents`: images/s at batch 1 vs larger batches.

Default: a tiny factor-8 AutoencoderKL and a tiny CLIP text model, random weights, on CPU
(the smoke preset's scale). `--vae <dir>` measures a real VAE (e.g. the SDXL VAE in bfloat16 on
a GPU); `--vae-arch sdxl` builds a randomly initialised VAE with the SDXL VAE's architecture,
which runs at the same speed, for machines without the weights. Timing covers the stage's own
loop (MDS reading, JPEG decoding, crops, VAE + text encoder, MDS writing) with the models loaded
and one warm-up run done, so ratios compare batching only.

    python benchmarks/bench_latents.py                                   # tiny, CPU, 1 thread
    python benchmarks/bench_latents.py --vae-arch sdxl --device cuda --resolutions 256 512 \\
        --images 256 --batch-sizes 1 32
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from microdit.data import latents as latents_stage

VAE_ARCHS = {
    # factor 8 like the SD/SDXL VAEs, a few thousand parameters per block
    "tiny": dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=1.0),
    # the SDXL VAE's encoder/decoder shape (stabilityai/sdxl-vae config.json)
    "sdxl": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                 scaling_factor=0.13025, sample_size=1024),
}


def build_vae(directory: Path, arch: str) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    cfg = VAE_ARCHS[arch]
    n = len(cfg["block_out_channels"])
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * n,
                  up_block_types=("UpDecoderBlock2D",) * n, **cfg).save_pretrained(directory)
    return directory


def build_text_encoder(directory: Path, hidden: int = 64) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    words = "a an the red green blue yellow circle square triangle left right of above below".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 2), ("<eos>", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                            eos_token="<eos>", model_max_length=77).save_pretrained(directory)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            pad_token_id=0, bos_token_id=2, eos_token_id=3)
    CLIPTextModel(config).save_pretrained(directory)
    return directory


def random_source(directory: Path, n: int, size: int) -> Path:
    """An MDS source (data contract 4) of random JPEGs, short side `size`."""
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    columns = {"key": "str", "image": "jpeg", "caption": "str", "width": "int", "height": "int"}
    with MDSWriter(out=str(directory), columns=columns) as writer:
        for i in range(n):
            w = size + int(rng.integers(0, size // 2))
            image = Image.fromarray(rng.integers(0, 255, (size, w, 3), dtype=np.uint8))
            writer.write({"key": f"{i:06d}", "image": image, "caption": "a red circle left of a blue square",
                          "width": w, "height": size})
    return directory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", default=None, help="AutoencoderKL dir; default: build a random one of --vae-arch")
    p.add_argument("--vae-arch", default="tiny", choices=sorted(VAE_ARCHS))
    p.add_argument("--text-encoder", default=None, help="CLIP text model dir; default: a tiny random one")
    p.add_argument("--resolutions", type=int, nargs="+", default=[64])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--workers", type=int, default=0, help="image decoding processes")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vae = args.vae or build_vae(tmp / "vae", args.vae_arch)
        text = args.text_encoder or build_text_encoder(tmp / "text_encoder")
        source = random_source(tmp / "mds", args.images, max(args.resolutions))
        encoders = latents_stage.load_encoders(vae, text, args.device, args.dtype)
        sync = torch.cuda.synchronize if encoders.device.type == "cuda" else (lambda: None)
        print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{encoders.device} {encoders.dtype}, threads {torch.get_num_threads()}"
              + (f", {torch.cuda.get_device_name(encoders.device)}" if encoders.device.type == "cuda" else ""))
        print(f"# vae {args.vae or 'random ' + args.vae_arch}, resolutions {args.resolutions}, "
              f"{args.images} images, workers {args.workers}")
        warm = random_source(tmp / "warm", max(args.batch_sizes), max(args.resolutions))
        latents_stage.precompute(warm, tmp / "warm_out", encoders, args.resolutions,
                                 batch_size=max(args.batch_sizes), progress=False)
        print("batch_size\timages_per_s\tratio_vs_first")
        baseline = None
        for bs in args.batch_sizes:
            sync()
            start = time.perf_counter()
            summary = latents_stage.precompute(source, tmp / f"out_{bs}", encoders, args.resolutions, batch_size=bs,
                                               workers=args.workers, progress=False)
            sync()
            rate = summary["encoded"] / (time.perf_counter() - start)
            baseline = baseline or rate
            print(f"{bs}\t{rate:.1f}\t{rate / baseline:.2f}")


if __name__ == "__main__":
    main()
