"""Captioning throughput of `microdit caption`: images/s at batch 1 vs larger batches.

Default: the tiny random LLaVA the tests build, on CPU (what the smoke preset runs). With
`--model <dir>` (e.g. a snapshot of llava-hf/llava-1.5-7b-hf) and a GPU this measures the
paper's captioner. Timing covers the stage's own loop (tar reading, decoding, generate, parquet
parts) with the model already loaded and one warm-up batch done, so ratios compare batching only.

    python benchmarks/bench_caption.py                       # tiny LLaVA, CPU, 1 thread
    python benchmarks/bench_caption.py --model <dir> --device cuda --images 64 --size 512
"""
from __future__ import annotations

import argparse
import io
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from microdit.data import caption as caption_stage
from microdit.data.webdataset import write_shard


def random_source(raw: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
        samples.append({"key": f"{i:06d}", "image": buf.getvalue()})
    raw.mkdir(parents=True)
    write_shard(raw / "00000.tar", samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="LLaVA dir; default: build the tests' tiny random LLaVA")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=int, default=64, help="side of the random square test images")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from test_caption import build_tiny_llava

            model = tmp / "tiny_llava"
            build_tiny_llava(model)
        captioner = caption_stage.Captioner(str(model), caption_stage.DEFAULT_PROMPT, args.max_new_tokens,
                                            args.device, args.dtype)
        random_source(tmp / "raw" / "bench", args.images, args.size)
        warm = Image.new("RGB", (args.size, args.size))
        captioner([warm] * max(args.batch_sizes))

        rates = {}
        for batch in args.batch_sizes:
            stage_args = argparse.Namespace(
                raw=str(tmp / "raw" / "bench"), out=str(tmp / f"captions_b{batch}.parquet"), model=str(model),
                prompt=caption_stage.DEFAULT_PROMPT, max_new_tokens=args.max_new_tokens, batch_size=batch,
                chunk_size=10**9, min_size=0, max_images=None, device=args.device, dtype=args.dtype)
            rates[batch] = caption_stage.caption_source(stage_args, captioner=captioner)["images_per_s"]
        name = caption_stage.model_id(str(model))

    base = rates[args.batch_sizes[0]]
    print(f"machine: {platform.processor() or platform.machine()}, device {captioner.device}, "
          f"dtype {captioner.dtype}, threads {args.threads}, model {name}, "
          f"{args.images} images {args.size}px, {args.max_new_tokens} new tokens")
    print("| batch | images/s | vs batch %d |" % args.batch_sizes[0])
    print("|---|---|---|")
    for batch, rate in rates.items():
        print(f"| {batch} | {rate:.2f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
