"""`microdit evaluate`: sample a checkpoint on the evaluation prompts and score it.

One call evaluates one checkpoint (or the untrained model, tag `stage0`) and writes
`<out>/metrics.json` with every number and the settings that produced it:

- FID: `--num-images` captions drawn with a fixed seed from the evaluation split (paper: 30,000
  COCO-2014 val captions), one image each, against the split's real images. The real images are
  exported once into `--cache` as PNG and their feature statistics cached per (split, resolution,
  extractor). FID at the generation resolution, and at 256 px with `--fid-256` (as the paper).
- CLIP score of the FID images against their captions.
- GenEval: `--geneval-images-per-prompt` images per prompt, judged by the detector in `--detector`
  (the exact shapes detector for the smoke world; Mask2Former + CLIP colour for the paper).

Generation is resumable: image i of a set starts from noise seeded by `seed + i` and is written as
its own PNG, so a rerun only makes the images that are missing and gives the same set. Under
`torchrun` each rank generates its share of the missing images and rank 0 scores them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from microdit.cli import UserError
from microdit.io import atomic_path, read_json, write_json

PAPER_FID_IMAGES = 30_000
GRID_IMAGES = 16
MANIFEST = "manifest.json"
REAL_INDEX = "captions.jsonl"  # written last: marks a complete export of the evaluation split


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tag", required=True, help="name of what is evaluated: stage0 (untrained), stage2, stage4, ...")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, help="trained model directory (<root>/checkpoints/stageN/final)")
    which.add_argument("--untrained", action="store_true", help="a freshly initialised model (seeded by --seed): the baseline")
    p.add_argument("--ema", action="store_true", help="sample from the EMA weights of --checkpoint")
    p.add_argument("--model", default="MicroDiT_Smoke_2", help="architecture of the --untrained model")
    p.add_argument("--resolution", type=int, help="image resolution (px); required with --untrained, checked otherwise")
    p.add_argument("--caption-channels", type=int, help="caption width D of the --untrained model (default: the text encoder's)")
    p.add_argument("--no-patch-mixer", dest="patch_mixer", action="store_false",
                   help="the --untrained model without its patch-mixer (the mixer ablation's baseline)")
    p.add_argument("--eval-mds", required=True, type=Path, help="evaluation split: MDS with columns key, image, caption")
    p.add_argument("--vae", required=True, type=Path, help="VAE directory (<root>/models/vae)")
    p.add_argument("--text-encoder", required=True, type=Path, help="text encoder directory")
    p.add_argument("--clip", required=True, type=Path, help="CLIP directory for the CLIP score (and GenEval colours)")
    p.add_argument("--fid", required=True, type=Path, help="FID feature extractor directory (<root>/models/fid)")
    p.add_argument("--detector", required=True, type=Path, help="GenEval detector directory (<root>/models/detector)")
    p.add_argument("--geneval-prompts", default="shapes",
                   help="shapes (the smoke world's six tasks) | official (GenEval's 553 prompts, downloaded "
                        "once into --cache, checksum-verified) | a GenEval metadata .jsonl | none")
    p.add_argument("--geneval-per-task", type=int, help="keep at most N prompts per task (seeded sample)")
    p.add_argument("--geneval-images-per-prompt", type=int, default=4)
    p.add_argument("--num-images", type=int, default=PAPER_FID_IMAGES, help="images generated for FID and CLIP score")
    p.add_argument("--steps", type=int, default=30, help="Heun steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="caption draw, initial noise (image i: seed+i), untrained init")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, type=Path, help="output dir (<results>/eval/<tag>)")
    p.add_argument("--cache", required=True, type=Path, help="cache for the exported real images and FID statistics")
    p.add_argument("--fid-256", action="store_true", help="also FID at 256 px (the paper reports both)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="VAE/text encoder dtype and DiT autocast: auto (bfloat16 on GPU) | float32 | bfloat16")
    p.add_argument("--workers", type=int, default=0, help="data-loader workers for FID features")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    from microdit.data.latents import load_encoders

    dist = Distributed()
    t0 = time.time()
    encoders = load_encoders(args.vae, args.text_encoder, args.device, args.dtype)
    device, dtype = encoders.device, encoders.dtype
    model, model_info = load_model(args, encoders, device)
    resolution = model_info["resolution"]
    autocast = dtype if device.type == "cuda" and dtype != torch.float32 else None

    def sample(prompts: list[str], seed: int) -> list[Image.Image]:
        from microdit.generate import generate

        return generate(prompts, model, encoders.vae, encoders.text_encoder, steps=args.steps, guidance=args.guidance,
                        seed=seed, batch_size=len(prompts), device=device, autocast_dtype=autocast, progress=False)

    settings = {"steps": args.steps, "guidance": args.guidance, "seed": args.seed, "num_images": args.num_images,
                "resolution": resolution, "sampler": "heun", "batch_size": args.batch_size,
                "device": str(device), "dtype": str(dtype).replace("torch.", ""), "world_size": dist.world}
    identity = {"model": model_info["fingerprint"], "steps": args.steps, "guidance": args.guidance,
                "seed": args.seed, "resolution": resolution, "vae": str(args.vae), "text_encoder": str(args.text_encoder)}
    timing: dict[str, float] = {"load": time.time() - t0}

    # what to draw: captions of the evaluation split, GenEval prompts
    t = time.time()
    real_dir = dist.rank0_first(lambda: export_eval_split(args.eval_mds, args.cache))
    rows = [json.loads(line) for line in (real_dir / REAL_INDEX).read_text().splitlines() if line.strip()]
    fid_prompts = draw_captions([r["caption"] for r in rows], args.num_images, args.seed)
    geneval_meta = dist.rank0_first(lambda: geneval_prompt_set(args)) if args.geneval_prompts != "none" else []
    timing["prepare"] = time.time() - t

    t = time.time()
    fid_dir, geneval_dir = args.out / "images" / "fid", args.out / "images" / "geneval"
    fid_paths = [fid_dir / f"{i:06d}.png" for i in range(len(fid_prompts))]
    ipp = args.geneval_images_per_prompt
    geneval_paths = [[geneval_dir / f"{i:05d}" / "samples" / f"{k:04d}.png" for k in range(ipp)]
                     for i in range(len(geneval_meta))]
    flat_geneval = [(m["prompt"], p) for m, paths in zip(geneval_meta, geneval_paths) for p in paths]
    made = {"fid": 0, "geneval": 0}
    for name, folder, prompts, paths in (("fid", fid_dir, fid_prompts, fid_paths),
                                         ("geneval", geneval_dir, [p for p, _ in flat_geneval], [p for _, p in flat_geneval])):
        if not prompts:
            continue
        dist.on_rank0(lambda: prepare_folder(folder, identity, prompts, paths))
        if name == "geneval":
            dist.on_rank0(lambda: write_geneval_metadata(geneval_dir, geneval_meta))
        todo = dist.share(missing(paths))
        made[name] = dist.sum(generate_images(prompts, paths, todo, sample, args.seed, args.batch_size, desc=f"{name} images"))
    timing["generate"] = time.time() - t
    model = None  # free the DiT (the sampler closure holds it) before the metric networks load
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if dist.rank != 0:
        dist.close()
        return 0

    metrics = {
        "tag": args.tag,
        "checkpoint": model_info["checkpoint"],
        "ema": bool(args.ema),
        "model": {k: model_info[k] for k in ("name", "params", "latent_size", "caption_channels")},
        "settings": settings,
        "eval_split": {"path": str(args.eval_mds), "name": args.eval_mds.name, "real_images": len(rows),
                       "exported_to": str(real_dir), "captions_drawn": len(fid_prompts)},
        "generated": {"fid": len(fid_paths), "geneval": len(flat_geneval), "new_this_run": made},
    }
    t = time.time()
    metrics["fid"], metrics["fid_256"] = fid_metrics(args, fid_dir, real_dir, resolution, device)
    timing["fid"] = time.time() - t
    t = time.time()
    metrics["clip_score"] = clip_metric(args, fid_paths, fid_prompts, device)
    timing["clip_score"] = time.time() - t
    t = time.time()
    metrics["geneval"] = geneval_metric(args, geneval_meta, geneval_paths, device) if geneval_meta else None
    timing["geneval"] = time.time() - t
    metrics["timing_s"] = {k: round(v, 3) for k, v in timing.items()}

    save_grid([Image.open(p) for p in fid_paths[:GRID_IMAGES]], fid_prompts[:GRID_IMAGES], args.out / "grid.png")
    write_json(args.out / "metrics.json", metrics)  # last: the rule's output marks a finished evaluation
    print(summary_line(metrics))
    dist.close()
    return 0


def _check_args(args: argparse.Namespace) -> None:
    for flag in ("num_images", "steps", "batch_size", "geneval_images_per_prompt"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.num_images < 2:
        raise UserError("--num-images must be at least 2: FID needs a covariance")
    if args.geneval_per_task is not None and args.geneval_per_task < 1:
        raise UserError(f"--geneval-per-task must be at least 1, got {args.geneval_per_task}")
    if args.untrained and args.resolution is None:
        raise UserError("--untrained needs --resolution (image px) to size the model")
    if args.ema and not args.checkpoint:
        raise UserError("--ema applies to --checkpoint only")
    if args.checkpoint is not None and not (args.checkpoint / "config.json").is_file():
        raise UserError(f"{args.checkpoint} is not a model directory (no config.json): train the stage first")
    for flag in ("vae", "text_encoder", "clip", "fid", "detector"):
        path = getattr(args, flag)
        if not path.is_dir():
            raise UserError(f"--{flag.replace('_', '-')} {path} does not exist: run `microdit models` first")


# ---------------------------------------------------------------- torchrun


class Distributed:
    """Rank and world size under torchrun (1 process otherwise), with the few collectives needed."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        if self.world > 1:
            import torch.distributed as tdist

            if not tdist.is_initialized():
                backend = "nccl" if torch.cuda.is_available() else "gloo"
                if backend == "nccl":
                    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
                tdist.init_process_group(backend)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def rank0_first(self, fn: Callable):
        """Run `fn` on rank 0 (writes files), then on the others once it is done (reads them)."""
        if self.rank == 0:
            out = fn()
            self.barrier()
            return out
        self.barrier()
        return fn()

    def on_rank0(self, fn: Callable) -> None:
        """Run `fn` (it writes files) on rank 0 only; the others wait for it."""
        if self.rank == 0:
            fn()
        self.barrier()

    def sum(self, value: int) -> int:
        """`value` summed over ranks (the call is also a barrier)."""
        if self.world == 1:
            return value
        total = torch.tensor([value], dtype=torch.long, device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
        torch.distributed.all_reduce(total)
        return int(total.item())

    def share(self, items: list[int]) -> list[int]:
        """This rank's contiguous slice of `items` (every rank must pass the same list)."""
        out = rank_share(items, self.rank, self.world)
        self.barrier()  # every rank has listed what is missing before any of them writes
        return out

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def rank_share(items: Sequence[int], rank: int, world: int) -> list[int]:
    """Contiguous slices of `items`, one per rank, sizes differing by at most one."""
    n = len(items)
    return list(items[rank * n // world : (rank + 1) * n // world])


# ---------------------------------------------------------------- the model


def load_model(args: argparse.Namespace, encoders, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The DiT to sample, and what identifies it (for the record and for resuming)."""
    vae_config = encoders.vae.config
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    text_dim = encoders.text_encoder.dim
    if args.untrained:
        from microdit.models import build_model

        if args.resolution % factor:
            raise UserError(f"--resolution {args.resolution} is not a multiple of the VAE's downsampling factor {factor}")
        caption_channels = args.caption_channels or text_dim
        torch.manual_seed(args.seed)
        try:
            model = build_model(args.model, input_size=args.resolution // factor, caption_channels=caption_channels,
                                in_channels=int(vae_config.latent_channels),
                                **({} if args.patch_mixer else {"use_patch_mixer": False}))
        except ValueError as e:
            raise UserError(str(e)) from e
        checkpoint = f"untrained {args.model} (init seed {args.seed})"
        fingerprint = {"untrained": model.config, "seed": args.seed}
    else:
        model = load_checkpoint(args.checkpoint, args.ema)
        checkpoint = str(args.checkpoint)
        weights = sorted(args.checkpoint.glob("*.safetensors"))
        fingerprint = {"checkpoint": checkpoint, "ema": args.ema,
                       "weights": [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights]}
    if model.caption_channels != text_dim:
        raise UserError(f"the model takes {model.caption_channels}-d captions but the text encoder {args.text_encoder} "
                        f"gives {text_dim}-d ones; pass the text encoder it was trained with")
    if model.in_channels != vae_config.latent_channels:
        raise UserError(f"the model takes {model.in_channels}-channel latents but the VAE {args.vae} makes "
                        f"{vae_config.latent_channels}; pass the VAE it was trained with")
    resolution = model.input_size * factor
    if args.resolution is not None and args.resolution != resolution:
        raise UserError(f"--resolution {args.resolution} but {args.checkpoint} generates {resolution} px images "
                        f"(latent {model.input_size} x VAE factor {factor})")
    info = {"name": model.config.get("architecture", type(model).__name__), "checkpoint": checkpoint,
            "params": sum(p.numel() for p in model.parameters()), "latent_size": model.input_size,
            "caption_channels": model.caption_channels, "resolution": resolution,
            "fingerprint": hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()}
    return model.to(device).eval().requires_grad_(False), info


def load_checkpoint(directory: Path, ema: bool) -> torch.nn.Module:
    """A trained stage's `final/` directory, with its EMA weights when `ema`."""
    try:  # the training stage owns its directory format; use its loader when it has one
        from microdit.train import load_trained
    except ImportError:
        load_trained = _load_trained
    return load_trained(directory, ema=ema)


def _load_trained(directory: Path, ema: bool) -> torch.nn.Module:
    from safetensors.torch import load_file

    from microdit.checkpoint import from_pretrained

    model = from_pretrained(directory)
    if ema:
        path = directory / "ema.safetensors"
        if not path.is_file():
            raise UserError(f"--ema but {directory} has no ema.safetensors (was the stage trained without EMA?)")
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
        params = {name for name, _ in model.named_parameters()}
        if unexpected or params & set(missing):
            raise UserError(f"{path} does not match the model: missing {sorted(params & set(missing))[:3]}, "
                            f"unexpected {unexpected[:3]}")
    return model


# ---------------------------------------------------------------- the evaluation split


def export_eval_split(mds_dir: Path, cache: Path) -> Path:
    """Every readable image of the split as PNG under the cache, plus `captions.jsonl`; made once.

    The folder is named by the split and a hash of its MDS index, so a changed split gets a new
    export. Unreadable samples are skipped and counted in `export.json`.
    """
    from microdit.data.latents import input_shards, open_shard

    index = Path(mds_dir) / "index.json"
    shards = input_shards(mds_dir)
    digest = hashlib.sha256(index.read_bytes()).hexdigest()[:12]
    dest = Path(cache) / "real" / f"{Path(mds_dir).name}-{digest}"
    if (dest / REAL_INDEX).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    rows, skipped = [], {"unreadable": 0, "corrupt": 0}
    try:
        from tqdm import tqdm

        bar = tqdm(desc=f"export {Path(mds_dir).name}", unit="img", disable=None)
        for shard in shards:
            reader = open_shard(Path(mds_dir), shard, work / "scratch")
            for i in range(reader.samples):
                bar.update()
                try:
                    sample = reader.decode_sample(reader.get_sample_data(i))
                except Exception:  # truncated shard or bad offsets: count, keep going
                    skipped["unreadable"] += 1
                    continue
                image = _as_image(sample.get("image"))
                if image is None:
                    skipped["corrupt"] += 1
                    continue
                name = f"{len(rows):06d}.png"
                image.save(work / name, format="PNG", compress_level=1)
                caption = sample.get("caption")
                rows.append({"file": name, "key": str(sample.get("key", "")), "caption": "" if caption is None else str(caption)})
        bar.close()
        if not rows:
            raise UserError(f"no readable images in the evaluation split {mds_dir}; rerun `microdit mds` for it")
        shutil.rmtree(work / "scratch", ignore_errors=True)
        write_json(work / "export.json", {"source": str(mds_dir), "index_sha256": digest, "images": len(rows), "skipped": skipped})
        (work / REAL_INDEX).write_text("".join(json.dumps(r) + "\n" for r in rows))
        if dest.exists():  # an incomplete export from an interrupted run
            shutil.rmtree(dest)
        os.replace(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _as_image(value) -> Image.Image | None:
    import io

    try:
        image = Image.open(io.BytesIO(value)) if isinstance(value, (bytes, bytearray)) else value
        image.load()
        return image.convert("RGB")
    except Exception:  # PIL raises many kinds on bad bytes
        return None


def draw_captions(captions: list[str], n: int, seed: int) -> list[str]:
    """`n` non-empty captions in a seeded random order; when the split has fewer, it is gone
    through again in a new order (each caption used at most ceil(n / len) times)."""
    pool = [c for c in captions if c.strip()]
    if not pool:
        raise UserError("the evaluation split has no non-empty captions to prompt with")
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < n:
        order += rng.permutation(len(pool)).tolist()
    return [pool[i] for i in order[:n]]


# ---------------------------------------------------------------- generation


def missing(paths: Sequence[Path]) -> list[int]:
    return [i for i, p in enumerate(paths) if not p.is_file()]


def prepare_folder(folder: Path, identity: dict, prompts: Sequence[str], paths: Sequence[Path]) -> None:
    """Keep only the images in `folder` that the current model, settings and prompts would make.

    Another model or setting clears the folder; with the same ones, an image stays when its
    index still holds the same prompt (so asking for more images keeps the ones already made).
    """
    manifest = folder / MANIFEST
    identity = json.loads(json.dumps(identity, default=str))
    old = read_json(manifest) if manifest.is_file() else None
    if old is None or old.get("identity") != identity:
        stale = list(folder.rglob("*.png")) if folder.exists() else []
        if stale:
            print(f"evaluate: {folder} holds {len(stale)} images made with other settings; regenerating")
        shutil.rmtree(folder, ignore_errors=True)
    else:
        old_prompts = old.get("prompts", [])
        wanted = {p: i for i, p in enumerate(paths)}
        for png in folder.rglob("*.png"):
            i = wanted.get(png)
            if i is None or i >= len(old_prompts) or old_prompts[i] != prompts[i]:
                png.unlink()
    write_json(manifest, {"identity": identity, "prompts": list(prompts)})


def write_geneval_metadata(folder: Path, metadata: list[dict]) -> None:
    """GenEval's own layout: `<i>/metadata.jsonl` beside `<i>/samples/`, so its scripts can read ours.
    Folders of prompts no longer in the set are removed."""
    for i, meta in enumerate(metadata):
        path = folder / f"{i:05d}" / "metadata.jsonl"
        text = json.dumps(meta) + "\n"
        if not path.is_file() or path.read_text() != text:
            with atomic_path(path) as tmp:
                tmp.write_text(text)
    for extra in folder.glob("[0-9]" * 5):
        if extra.is_dir() and int(extra.name) >= len(metadata):
            shutil.rmtree(extra)


def contiguous_runs(indices: Sequence[int], max_len: int) -> list[list[int]]:
    """Split sorted indices into runs of consecutive numbers, each at most `max_len` long."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1 and len(runs[-1]) < max_len:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def generate_images(
    prompts: Sequence[str],
    paths: Sequence[Path],
    todo: Sequence[int],
    sample: Callable[[list[str], int], list[Image.Image]],
    seed: int,
    batch_size: int,
    desc: str = "generate",
) -> int:
    """Generate image i of `todo` from prompt i with noise seed `seed + i`, each saved atomically.

    `sample(prompts, first_seed)` seeds its k-th image `first_seed + k`, so batching only
    consecutive indices keeps every image independent of how the work was split.
    """
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=None)
    for run in contiguous_runs(todo, batch_size):
        images = sample([prompts[i] for i in run], seed + run[0])
        for i, image in zip(run, images):
            with atomic_path(paths[i]) as tmp:
                image.save(tmp, format="PNG", compress_level=1)
        bar.update(len(run))
    bar.close()
    return len(todo)


# ---------------------------------------------------------------- metrics


def fid_metrics(args, fid_dir: Path, real_dir: Path, resolution: int, device) -> tuple[dict, dict | None]:
    """FID at the generation resolution, and at 256 px when asked (the same numbers when they coincide)."""
    from microdit.metrics import fid as fidlib

    extractor = fidlib.load_extractor(args.fid, device)
    results = {}
    for res in sorted({resolution, 256} if args.fid_256 else {resolution}):
        ref = fidlib.reference_stats(real_dir, real_dir.name, extractor, args.cache / "fid_stats", res,
                                     args.batch_size, args.workers)
        raw = fidlib.fid(fid_dir, ref, extractor, args.batch_size, args.workers)
        results[res] = fid_record(raw, args.eval_mds.name)
    return results[resolution], (results[256] if args.fid_256 else None)


def fid_record(raw: dict, split: str) -> dict:
    """metrics.json's FID entry from `metrics.fid.fid` output: comparable only as FID-30K with Inception."""
    full = raw["n_generated"] >= PAPER_FID_IMAGES
    record = {"value": raw["fid"], "comparable": bool(raw["comparable"] and full), "extractor": raw["extractor"],
              "n_gen": raw["n_generated"], "n_ref": raw["n_reference"], "resolution": raw["resolution"],
              "reference": split, "skipped_generated": raw["skipped_generated"],
              "skipped_reference": raw["skipped_reference"]}
    notes = [raw["note"]] if raw.get("note") else []
    if not full:
        notes.append(f"FID over {raw['n_generated']} images, not 30,000: biased upwards against FID-30K")
    if notes:
        record["note"] = "; ".join(notes)
    return record


def model_origin(model_dir: Path) -> dict:
    path = Path(model_dir) / "MODEL_INFO.json"
    return read_json(path) if path.is_file() else {}


def clip_metric(args, paths: list[Path], captions: list[str], device) -> dict:
    from microdit.metrics.clip_score import clip_score

    raw = clip_score(paths, captions, args.clip, args.batch_size, device)
    origin = model_origin(args.clip)
    record = {"value": raw["clip_score"], "model": raw["model"], "n": raw["n"], "skipped": raw["skipped"],
              "comparable": origin.get("source") not in ("built", None)}
    if not record["comparable"]:
        record["note"] = "CLIP built locally with random weights: not comparable to published CLIP scores"
    return record


def geneval_prompt_set(args) -> list[dict]:
    """The GenEval metadata to generate for (`--geneval-prompts`), capped per task when asked."""
    from microdit.metrics import geneval

    if args.geneval_prompts == "shapes":
        from microdit.data.shapes import geneval_prompts

        return geneval_prompts(args.geneval_per_task, args.seed)
    if args.geneval_prompts == "official":
        path = geneval.fetch_prompts(geneval.PROMPTS_URL, geneval.PROMPTS_SHA256,
                                     args.cache / "geneval" / "evaluation_metadata.jsonl")
    else:
        path = Path(args.geneval_prompts)
        if not path.is_file():
            raise UserError(f"--geneval-prompts {path}: no such file (or use shapes, official, none)")
    return cap_per_task(geneval.load_prompts(path), args.geneval_per_task, args.seed)


def cap_per_task(metadata: list[dict], per_task: int | None, seed: int) -> list[dict]:
    """At most `per_task` prompts of each task, a seeded sample, in file order."""
    if per_task is None:
        return metadata
    rng = np.random.default_rng(seed)
    keep: set[int] = set()
    for tag in dict.fromkeys(m["tag"] for m in metadata):
        idx = [i for i, m in enumerate(metadata) if m["tag"] == tag]
        keep.update(idx if len(idx) <= per_task else rng.choice(idx, per_task, replace=False).tolist())
    return [m for i, m in enumerate(metadata) if i in keep]


def geneval_metric(args, metadata: list[dict], paths: list[list[Path]], device) -> dict:
    """GenEval task accuracies; the per-prompt verdicts go to `<out>/geneval.json`."""
    from microdit.metrics import geneval

    detector = geneval.load_detector(args.detector, device)
    colour_fn = None if detector.gives_colour else geneval.ClipColour(args.clip, device)
    result = geneval.evaluate_images(metadata, paths, detector, colour_fn)
    write_json(args.out / "geneval.json", result)
    origin = model_origin(args.detector)
    kind = origin.get("kind") or (read_json(args.detector / "config.json").get("kind")
                                  if (args.detector / "config.json").is_file() else None)
    official = args.geneval_prompts == "official" or (
        Path(args.geneval_prompts).is_file()
        and hashlib.sha256(Path(args.geneval_prompts).read_bytes()).hexdigest() == geneval.PROMPTS_SHA256)
    protocol = official and args.geneval_per_task is None and args.geneval_images_per_prompt == 4
    record = {"overall": result["overall"], "tasks": result["tasks"],
              "detector": "shapes (exact)" if kind == "shapes" else (origin.get("id") or kind or args.detector.name),
              "colour": "detector" if detector.gives_colour else getattr(colour_fn, "name", "clip"),
              "n_prompts": len(metadata), "images_per_prompt": args.geneval_images_per_prompt,
              "correct_images": result["correct_images"], "prompts": args.geneval_prompts,
              "comparable": bool(protocol and kind != "shapes")}
    if kind == "shapes":
        record["note"] = "shapes-world version of GenEval's six tasks: not comparable to published GenEval"
    elif not protocol:
        record["note"] = "not the full protocol (553 official prompts x 4 images): not comparable"
    else:
        record["note"] = "transformers Mask2Former, not GenEval's mmdetection checkpoint: may differ slightly"
    return record


# ---------------------------------------------------------------- outputs


def save_grid(images: list[Image.Image], captions: list[str], path: Path, cols: int = 4, tile: int = 192) -> None:
    """Images in a grid, each with the start of its caption underneath."""
    from PIL import ImageDraw, ImageFont

    if not images:
        return
    font = ImageFont.load_default()
    line_h, lines = 12, 3
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * tile, rows * (tile + line_h * lines + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for n, (image, caption) in enumerate(zip(images, captions)):
        x, y = (n % cols) * tile, (n // cols) * (tile + line_h * lines + 4)
        small = image.convert("RGB").resize((tile, tile), Image.NEAREST if image.width < tile else Image.BICUBIC)
        canvas.paste(small, (x, y))
        for k, text in enumerate(wrap(caption, tile // 6, lines)):
            draw.text((x + 2, y + tile + 2 + k * line_h), text, fill=(30, 30, 30), font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def wrap(text: str, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` characters, the last kept line ending in '...' when cut."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, width - 3)] + "..."
    return [ln[:width] for ln in lines]


def summary_line(m: dict) -> str:
    parts = [f"evaluate {m['tag']}: FID {m['fid']['value']:.2f} ({m['fid']['n_gen']} images, {m['fid']['resolution']} px)"]
    if m.get("fid_256"):
        parts.append(f"FID-256 {m['fid_256']['value']:.2f}")
    parts.append(f"CLIP {m['clip_score']['value']:.2f}")
    if m.get("geneval"):
        parts.append(f"GenEval {m['geneval']['overall']:.3f}")
    return ", ".join(parts)
