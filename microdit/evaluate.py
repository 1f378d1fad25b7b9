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

What is drawn comes from `microdit.eval_data`; the metrics, and the metrics.json entries they write,
from `microdit.metrics.registry.METRICS`, which `run` walks in order.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from microdit.distributed import setup_runtime
from microdit.errors import UserError
from microdit.eval_data import caption_list, draw_captions, export_eval_split, geneval_prompt_set, read_index
from microdit.image_grid import save_grid
from microdit.io import atomic_path, read_json, write_json
from microdit.metrics.registry import CAPTIONS, GENEVAL, METRICS, ImageSet, Scoring, score_sweep, sweep_set_name
from microdit.settings import add_flags

GRID_IMAGES = 16
MANIFEST = "manifest.json"


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tag", required=True, help="name of what is evaluated: stage0 (untrained), stage2, stage4, ...")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, help="trained model directory (<root>/checkpoints/stageN/final)")
    which.add_argument("--untrained", action="store_true", help="a freshly initialised model (seeded by --seed): the baseline")
    which.add_argument("--released", type=Path, help="a released checkpoint file (any layout microdit.checkpoint loads), "
                       "built as --model at --resolution with --pos-interp-scale")
    p.add_argument("--pos-interp-scale", type=float, default=1.0, help="position-embedding scale of the --released model")
    p.add_argument("--ema", action="store_true", help="sample from the EMA weights of --checkpoint")
    p.add_argument("--model", help="architecture of the --untrained model (train.model)")
    p.add_argument("--resolution", type=int, help="image resolution (px); required with --untrained, checked otherwise")
    p.add_argument("--caption-channels", type=int, help="caption width D of the --untrained model (default: the text encoder's)")
    p.add_argument("--patch-mixer", action=argparse.BooleanOptionalAction, default=True,
                   help="the --untrained model with its patch-mixer (off: the mixer ablation's baseline)")
    p.add_argument("--eval-mds", required=True, type=Path, help="evaluation split: MDS with columns key, image, caption")
    p.add_argument("--vae", required=True, type=Path, help="VAE directory (<root>/models/vae)")
    p.add_argument("--text-encoder", required=True, type=Path, help="text encoder directory")
    p.add_argument("--clip", required=True, type=Path, help="CLIP directory for the CLIP score (and GenEval colours)")
    p.add_argument("--fid", required=True, type=Path, help="FID feature extractor directory (<root>/models/fid)")
    p.add_argument("--detector", required=True, type=Path, help="GenEval detector directory (<root>/models/detector)")
    p.add_argument("--out", required=True, type=Path, help="output dir (<results>/eval/<tag>)")
    p.add_argument("--cache", required=True, type=Path, help="cache for the exported real images and FID statistics "
                   "(and GenEval's official prompts, downloaded once, checksum-verified)")
    # --num-images, --steps, --guidance, --geneval-*, ...: the `evaluate` config keys; the seed draws the
    # captions, the initial noise (image i: seed+i) and the untrained model's init
    add_flags(p, "evaluate", top=("seed", "device"))


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    from microdit.data.latents import load_encoders

    rt = setup_runtime(args.device)
    t0 = time.time()
    encoders = load_encoders(args.vae, args.text_encoder, args.device, args.dtype)
    device, dtype = encoders.device, encoders.dtype
    model, model_info = load_model(args, encoders, device)
    resolution = model_info["resolution"]
    autocast = dtype if device.type == "cuda" and dtype != torch.float32 else None

    def sample(prompts: list[str], seed: int, guidance: float = args.guidance) -> list[Image.Image]:
        from microdit.generate import generate

        return generate(prompts, model, encoders.vae, encoders.text_encoder, steps=args.steps, guidance=guidance,
                        seed=seed, batch_size=len(prompts), device=device, autocast_dtype=autocast, progress=False)

    settings = {"steps": args.steps, "guidance": args.guidance, "seed": args.seed, "num_images": args.num_images,
                "resolution": resolution, "sampler": "heun", "batch_size": args.batch_size,
                "device": str(device), "dtype": str(dtype).replace("torch.", ""), "world_size": rt.world_size}
    identity = {"model": model_info["fingerprint"], "steps": args.steps, "guidance": args.guidance,
                "seed": args.seed, "resolution": resolution, "vae": str(args.vae), "text_encoder": str(args.text_encoder)}
    timing: dict[str, float] = {"load": time.time() - t0}

    # what to draw: captions of the evaluation split, GenEval prompts (when a metric scores them)
    t = time.time()
    real_dir = rt.rank0_first(lambda: export_eval_split(args.eval_mds, args.cache))
    rows = read_index(real_dir)
    captions = (caption_list(Path(args.captions_file), args.num_images, args.captions_sha256) if args.captions_file
                else draw_captions([r["caption"] for r in rows], args.num_images, args.seed))
    wants_geneval = args.geneval_prompts != "none" and any(m.images == GENEVAL for m in METRICS.values())
    geneval_meta = rt.rank0_first(lambda: geneval_prompt_set(args)) if wants_geneval else []
    sets = image_sets(args.out, captions, geneval_meta, args.geneval_images_per_prompt)
    # the guidance sweep: the FID captions again at each other scale, in their own folders
    guidance_of = {name: args.guidance for name in sets}
    for g in dict.fromkeys(args.guidance_sweep):
        if g != args.guidance:
            name = sweep_set_name(g)
            folder = args.out / "images" / name
            sets[name] = ImageSet(folder, captions, [folder / p.name for p in sets[CAPTIONS].paths])
            guidance_of[name] = g
    timing["prepare"] = time.time() - t

    t = time.time()
    made = dict.fromkeys(sets, 0)
    for name, images in sets.items():
        if not images.prompts:
            continue
        g = guidance_of[name]
        rt.on_rank0(lambda: prepare_folder(images.folder, {**identity, "guidance": g}, images.prompts, images.paths))
        if images.metadata:
            rt.on_rank0(lambda: write_geneval_metadata(images.folder, images.metadata))
        todo = rt.share(missing(images.paths))
        made[name] = rt.sum(generate_images(images.prompts, images.paths, todo, lambda p, s: sample(p, s, g),
                                            args.seed, args.batch_size, desc=f"{name} images"))
    timing["generate"] = time.time() - t
    model = None  # free the DiT (the sampler closure holds it) before the metric networks load
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not rt.main:
        rt.close()
        return 0

    metrics = {
        "tag": args.tag,
        "checkpoint": model_info["checkpoint"],
        "ema": bool(args.ema),
        "model": {k: model_info[k] for k in ("name", "params", "latent_size", "caption_channels")},
        "settings": settings,
        "eval_split": {"path": str(args.eval_mds), "name": args.eval_mds.name, "real_images": len(rows),
                       "exported_to": str(real_dir), "captions_drawn": len(captions),
                       "captions_from": args.captions_file or "seeded draw from the split"},
        "generated": {**{name: len(images.paths) for name, images in sets.items()}, "new_this_run": made},
    }
    scoring = Scoring(args, device, resolution, real_dir, sets)
    for name, metric in METRICS.items():
        t = time.time()
        metrics.update(metric.score(scoring) if sets[metric.images].prompts else dict.fromkeys(metric.keys))
        timing[name] = time.time() - t
    sweep = {guidance_of[name]: images for name, images in sets.items() if name.startswith(sweep_set_name(""))}
    if sweep:
        t = time.time()
        metrics["guidance_sweep"] = score_sweep(scoring, metrics, sweep)
        timing["guidance_sweep"] = time.time() - t
    metrics["timing_s"] = {k: round(v, 3) for k, v in timing.items()}

    fid = sets[CAPTIONS]
    save_grid([Image.open(p) for p in fid.paths[:GRID_IMAGES]], fid.prompts[:GRID_IMAGES], args.out / "grid.png")
    write_json(args.out / "metrics.json", metrics)  # last: the rule's output marks a finished evaluation
    print(summary_line(metrics))
    rt.close()
    return 0


def summary_line(m: dict) -> str:
    return f"evaluate {m['tag']}: " + ", ".join(part for metric in METRICS.values() for part in metric.summary(m))


def _check_args(args: argparse.Namespace) -> None:
    # value ranges are the flags' own (microdit.settings); what remains relates flags to each other
    if (args.untrained or args.released) and (args.resolution is None or args.model is None):
        raise UserError(f"--{'untrained' if args.untrained else 'released'} needs --model and --resolution (image px) "
                        "to size the model")
    if args.released is not None and not args.released.is_file():
        from microdit.paper import RELEASED_FILES

        if args.released.stem not in RELEASED_FILES:  # a released name's file is fetched by load_model
            raise UserError(f"--released {args.released} does not exist")
    if args.ema and not args.checkpoint:
        raise UserError("--ema applies to --checkpoint only")
    if args.checkpoint is not None and not (args.checkpoint / "config.json").is_file():
        raise UserError(f"{args.checkpoint} is not a model directory (no config.json): train the stage first")
    for flag in ("vae", "text_encoder", "clip", "fid", "detector"):
        path = getattr(args, flag)
        if not path.is_dir():
            raise UserError(f"--{flag.replace('_', '-')} {path} does not exist: run `microdit models` first")


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
    elif args.released is not None:
        from microdit.checkpoint import CheckpointError, load_released_checkpoint
        from microdit.models import build_model

        if args.resolution % factor:
            raise UserError(f"--resolution {args.resolution} is not a multiple of the VAE's downsampling factor {factor}")
        if not args.released.is_file():  # a released name: fetched once, beside the models
            from microdit.zoo.hub import fetch_released

            fetch_released(args.released.stem, args.released.parent)
        try:
            model = build_model(args.model, input_size=args.resolution // factor, caption_channels=text_dim,
                                in_channels=int(vae_config.latent_channels), pos_interp_scale=args.pos_interp_scale)
            load_released_checkpoint(model, args.released)
        except (ValueError, CheckpointError) as e:
            raise UserError(f"--released {args.released}: {e} (a released checkpoint needs the VAE and text encoder "
                            "it was trained with: models.roles.vae / text_encoder)") from None
        checkpoint = f"released {args.released.name}"
        stat = args.released.stat()
        fingerprint = {"released": str(args.released), "size": stat.st_size, "mtime": stat.st_mtime_ns,
                       "model": model.config}
    else:
        from microdit.checkpoint import load_trained

        model = load_trained(args.checkpoint, ema=args.ema)
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
        raise UserError(f"--resolution {args.resolution} but {args.checkpoint or args.released} generates {resolution} px images "
                        f"(latent {model.input_size} x VAE factor {factor})")
    info = {"name": model.config.get("architecture", type(model).__name__), "checkpoint": checkpoint,
            "params": sum(p.numel() for p in model.parameters()), "latent_size": model.input_size,
            "caption_channels": model.caption_channels, "resolution": resolution,
            "fingerprint": hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()}
    return model.to(device).eval().requires_grad_(False), info


# ---------------------------------------------------------------- generation


def image_sets(out: Path, captions: list[str], geneval_meta: list[dict], per_prompt: int) -> dict[str, ImageSet]:
    """Where each image goes: `images/fid/<i>.png`, and GenEval's own layout for its prompts,
    `images/geneval/<prompt>/samples/<k>.png` (image k of prompt i is image `i * per_prompt + k`)."""
    fid_dir, geneval_dir = out / "images" / CAPTIONS, out / "images" / GENEVAL
    groups = [[geneval_dir / f"{i:05d}" / "samples" / f"{k:04d}.png" for k in range(per_prompt)]
              for i in range(len(geneval_meta))]
    return {CAPTIONS: ImageSet(fid_dir, captions, [fid_dir / f"{i:06d}.png" for i in range(len(captions))]),
            GENEVAL: ImageSet(geneval_dir, [m["prompt"] for m, paths in zip(geneval_meta, groups) for _ in paths],
                              [p for paths in groups for p in paths], geneval_meta, groups)}


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
