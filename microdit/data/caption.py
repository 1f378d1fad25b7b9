"""`microdit caption`: caption an uncaptioned source (SA-1B's role) with LLaVA.

The paper captions SA-1B with `llava-hf/llava-1.5-7b-hf`; the smoke preset uses a tiny random
LLaVA built locally. Both load through `from_pretrained(path)` and run the same code: the
processor's chat template (one image + the prompt as the user turn), left-padded batches,
greedy decoding, only the new tokens decoded.

Output `<out>.parquet` (key, caption, model) and `<out stem>.stats.json`
{images, captioned, empty, failed, ...}. An empty caption is kept as "" (counted as `empty`):
the MDS stage then drops that image as `empty_caption`, and a rerun does not caption it again.
Images that cannot be decoded are counted as `failed` and left out.

Resumable: rows go to `<out>.parts/part-NNNNN.parquet` every `--chunk-size` images (each
written atomically); a rerun skips every key already in a part or in an existing `<out>`.
The final parquet is assembled from both, one row per key, and the parts are then removed.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from microdit.errors import UserError
from microdit.settings import add_flags
from microdit.data.webdataset import ReadStats, iter_samples, list_shards
from microdit.io import atomic_path, read_json, write_json

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw", required=True, help="raw webdataset source directory (tar shards)")
    p.add_argument("--out", required=True, help="output parquet, e.g. <root>/captions/SRC.parquet")
    p.add_argument("--model", required=True, help="LLaVA directory (HF format) or hub id")
    add_flags(p, "caption", top=("device",))  # the `caption` config keys, and `device`
    p.add_argument("--min-size", type=int, default=0,
                   help="skip images whose short side is below this (the MDS stage drops them anyway)")
    p.add_argument("--max-images", type=int, default=None,
                   help="caption at most this many images of the source, in shard order (debugging)")


class Captioner:
    """LLaVA + its processor, captioning a batch of PIL images with one fixed prompt."""

    def __init__(self, model_path: str, prompt: str, max_new_tokens: int, device: str = "auto", dtype: str = "auto"):
        import transformers
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        # transformers renamed `torch_dtype` to `dtype` in 4.56
        dtype_kw = "dtype" if _version_at_least(transformers.__version__, (4, 56)) else "torch_dtype"
        try:
            self.processor = AutoProcessor.from_pretrained(model_path)
            self.model = LlavaForConditionalGeneration.from_pretrained(model_path, **{dtype_kw: DTYPES[dtype]})
        except (OSError, ValueError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{model_path}: cannot load a LLaVA captioner ({reason}); "
                            "run `microdit models` or point --model at an HF-format LLaVA directory") from e
        # decoder-only generation continues from the last position, so pad on the left
        self.processor.tokenizer.padding_side = "left"
        self.model.to(self.device).eval()
        self.dtype = DTYPES[dtype]
        self.max_new_tokens = max_new_tokens
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        self.text = self.processor.apply_chat_template(turn, add_generation_prompt=True)
        tok = self.processor.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        inputs = self.processor(images=images, text=[self.text] * len(images), return_tensors="pt", padding=True)
        # some tokenizers add token_type_ids, which LLaVA's generate() rejects
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k != "token_type_ids"}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
            pad_token_id=self.pad_token_id,
        )
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return [c.strip() for c in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


def _version_at_least(version: str, wanted: tuple[int, ...]) -> bool:
    parts = tuple(int(p) for p in version.split(".")[: len(wanted)] if p.isdigit())
    return parts >= wanted


def model_id(model_path: str) -> str:
    """The hub id recorded by the models stage, else the directory's name."""
    info = Path(model_path) / "MODEL_INFO.json"
    if info.is_file():
        found = read_json(info).get("id")
        if found:
            return str(found)
    return Path(model_path).name or str(model_path)


def stats_path(out: Path) -> Path:
    return out.with_name(out.stem + ".stats.json")


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def load_done(out: Path, model: str) -> pd.DataFrame:
    """Rows already captioned (final parquet + parts), refusing to mix two captioners."""
    frames = [pd.read_parquet(out)] if out.is_file() else []
    frames += [pd.read_parquet(p) for p in sorted(parts_dir(out).glob("part-*.parquet"))]
    done = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"key": [], "caption": [], "model": []})
    done = done.astype({"key": str, "caption": str, "model": str}).drop_duplicates("key", keep="first")
    others = sorted(set(done["model"]) - {model})
    if others:
        raise UserError(f"{out}: already holds captions by {others[0]!r}, not {model!r}; "
                        f"delete {out} and {parts_dir(out)} to recaption, or choose another --out")
    return done.reset_index(drop=True)


def caption_source(args: argparse.Namespace, captioner: Captioner | None = None) -> dict:
    raw, out = Path(args.raw), Path(args.out)
    if not list_shards(raw):
        raise UserError(f"{raw}: no .tar shards; run `microdit download` for this source first")
    model = model_id(args.model)
    done = load_done(out, model)
    done_keys = set(done["key"])
    parts = parts_dir(out)
    next_part = 1 + max((int(p.stem.split("-")[1]) for p in parts.glob("part-*.parquet")), default=-1)

    def flush(rows: list[dict]) -> None:
        nonlocal next_part
        if rows:
            parts.mkdir(parents=True, exist_ok=True)
            with atomic_path(parts / f"part-{next_part:05d}.parquet") as tmp:
                pd.DataFrame(rows, columns=["key", "caption", "model"]).to_parquet(tmp, index=False)
            next_part += 1
            rows.clear()

    reader = ReadStats()
    counts = {"images": 0, "failed": 0, "too_small": 0, "new": 0}
    pending: list[dict] = []
    batch_keys: list[str] = []
    batch_images: list[Image.Image] = []
    t0 = time.perf_counter()
    bar = tqdm(desc=f"caption {raw.name}", unit="img", disable=None)

    def run_batch() -> None:
        nonlocal captioner
        if captioner is None:  # loaded lazily: a finished source never pays for loading LLaVA
            captioner = Captioner(args.model, args.prompt, args.max_new_tokens, args.device, args.dtype)
        for key, text in zip(batch_keys, captioner(batch_images)):
            pending.append({"key": key, "caption": text, "model": model})
        counts["new"] += len(batch_keys)
        bar.update(len(batch_keys))
        batch_keys.clear()
        batch_images.clear()
        if len(pending) >= args.chunk_size:
            flush(pending)

    for sample in iter_samples(raw, reader):
        if args.max_images is not None and counts["images"] >= args.max_images:
            break
        counts["images"] += 1
        if sample.key in done_keys:
            continue
        try:
            with Image.open(io.BytesIO(sample.image)) as im:
                image = im.convert("RGB")
        except Exception:  # PIL raises many types on bad bytes; every one means "not an image"
            counts["failed"] += 1
            continue
        if min(image.size) < args.min_size:
            counts["too_small"] += 1
            continue
        done_keys.add(sample.key)  # a key repeated in the source is captioned once
        batch_keys.append(sample.key)
        batch_images.append(image)
        if len(batch_images) == args.batch_size:
            run_batch()
    if batch_images:
        run_batch()
    flush(pending)
    bar.close()
    seconds = time.perf_counter() - t0

    final = load_done(out, model)
    if counts["images"] - counts["failed"] - counts["too_small"] <= 0:
        raise UserError(f"{raw.name}: no image could be captioned ({counts['images']} samples read, "
                        f"{counts['failed']} undecodable, {counts['too_small']} below --min-size, "
                        f"truncated shards: {reader.truncated_shards or 'none'})")
    with atomic_path(out) as tmp:
        final.to_parquet(tmp, index=False)
    shutil.rmtree(parts, ignore_errors=True)

    empty = int((final["caption"] == "").sum())
    stats = {
        "source": raw.name,
        "model": model,
        "images": counts["images"],
        "captioned": len(final) - empty,
        "empty": empty,
        "failed": counts["failed"],
        "too_small": counts["too_small"],
        "new_this_run": counts["new"],
        "images_per_s": round(counts["new"] / seconds, 3) if counts["new"] else None,
        "prompt": args.prompt,
        "max_new_tokens": args.max_new_tokens,
        "reader": reader.as_dict(),
    }
    write_json(stats_path(out), stats)
    return stats


def run(args: argparse.Namespace) -> int:
    stats = caption_source(args)
    print(json.dumps({k: stats[k] for k in ("source", "images", "captioned", "empty", "failed")}))
    return 0
