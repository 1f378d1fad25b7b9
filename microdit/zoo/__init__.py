"""`microdit models`: every model the DAG needs, materialised as an HF-format directory.

`<out>/<role>/` for each role below holds what `from_pretrained(path)` needs plus MODEL_INFO.json
saying where it came from. Later stages load models only from these directories, so the tiny smoke
models exercise the same code path as the paper's hub checkpoints.

Where a role comes from (first match wins):
  --local role=/dir                     an HF directory already on disk (copied, or --link'ed)
  --id role=repo_id[@revision][:sub]    a snapshot of a hub repository (folder `sub` of it);
                                        `--id role=built` builds the smoke model, `--id fid=cleanfid`
                                        fetches clean-fid's Inception (`--hub` is the same flag)
  --preset paper (or --source hub)      the paper's hub ids, PAPER_MODELS
  --preset smoke (or --source build)    tiny models built here, offline, in a minute or two on a CPU

Smoke models: a CLIP BPE tokenizer trained on the world's captions; a CLIPTextModel (its hidden
size is the caption embedding width D the DiT sees) warmed up on the captioned images; a small
AutoencoderKL (factor 8, 4 channels) trained briefly on the world's images so decoded latents are
recognisable shapes; a random LLaVA and a random CLIPModel with their processors; a random
Inception-v3 for FID (numbers not comparable with the paper's); the exact shapes detector.

This module is the command; the package's other modules each hold one part of it:
  plan.py       roles, sources, `--id`/`--local` parsing, the builder registry, staged directories
  hub.py        hub snapshots (and clean-fid's Inception weights)
  local.py      `--local` directories
  openclip.py   OpenCLIP text tower -> transformers CLIPTextModel + tokenizer
  inputs.py     the world's captions and images, as the smoke builders read them
  smoke.py      the smoke tokenizer, text encoder, CLIP, captioner, FID network and detector
  smoke_vae.py  the smoke VAE
The FID network is read back by `microdit.metrics.fid_extractor`.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from microdit.errors import UserError
from microdit.io import read_json, write_json
from microdit.settings import add_flags
from microdit.metrics.fid_extractor import load_fid_extractor
from microdit.zoo.hub import fetch_hub, hub_offline, weight_patterns
from microdit.zoo.inputs import read_captions
from microdit.zoo.local import bring_local
from microdit.zoo.plan import (BUILDERS, INFO_FILE, PAPER_MODELS, ROLES, Source, parse_local_spec,
                               parse_model_spec, plan_sources, remove_stale_staging, staged_dir)
# importing the builders registers them in BUILDERS
from microdit.zoo.smoke import (build_captioner, build_clip, build_detector, build_fid, build_text_encoder,
                                train_caption_tokenizer)
from microdit.zoo.smoke_vae import build_vae

__all__ = [  # the command, and what other stages and tests use of the zoo
    "BUILDERS", "INFO_FILE", "PAPER_MODELS", "ROLES", "Source", "add_arguments", "build_captioner", "build_clip",
    "build_detector", "build_fid", "build_text_encoder", "build_vae", "describe", "load_fid_extractor",
    "parse_local_spec", "parse_model_spec", "plan_sources", "run", "staged_dir", "train_caption_tokenizer",
    "weight_patterns",
]


# --------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="models root; writes <out>/<role>/")
    p.add_argument("--preset", choices=("smoke", "paper"), default=None,
                   help="default source of roles not given by --id/--local: smoke builds, paper = PAPER_MODELS")
    p.add_argument("--source", choices=("build", "hub"), default=None, help="same as --preset smoke|paper")
    p.add_argument("--roles", nargs="+", choices=ROLES, default=list(ROLES), help="only these roles")
    p.add_argument("--id", "--hub", dest="ids", action="append", default=[], metavar="ROLE=SPEC",
                   help="what ROLE is: built[:name], cleanfid (fid), or a hub repo_id[@revision][:subfolder]"
                        " (repeatable)")
    p.add_argument("--local", action="append", default=[], metavar="ROLE=DIR",
                   help="take ROLE from a local HF dir (or OpenCLIP dir / Inception .pt) (repeatable)")
    p.add_argument("--link", action="store_true", help="symlink --local files instead of copying them")
    p.add_argument("--force", action="store_true", help="rebuild roles already materialised")
    p.add_argument("--released", nargs="+", metavar="NAME", default=[],
                   help="instead: fetch these released MicroDiT checkpoints into <out>/released/NAME.pt")
    g = p.add_argument_group("built (smoke) models")
    g.add_argument("--captions", nargs="+", action="extend", default=[],
                   help="world parquet files (caption column) or .txt files, for the tokenizer")
    g.add_argument("--images", nargs="+", action="extend", default=[],
                   help="world parquet files (url column) or image dirs, for the VAE (default: --captions)")
    add_flags(p, "models.build", top=("seed",))  # --text-dim, --vae-steps, ...: the `models.build` keys; seed


def describe(role: str, dest: Path) -> dict:
    """Facts later stages and the report need whatever the source: D, scaling_factor, kind."""
    config = read_json(dest / "config.json") if (dest / "config.json").is_file() else {}
    if role == "text_encoder":
        text = config.get("text_config", config)  # a full CLIPModel config also loads as CLIPTextModel
        return {"hidden_size": text.get("hidden_size"), "max_length": text.get("max_position_embeddings")}
    if role == "vae":
        return {"scaling_factor": config.get("scaling_factor"), "shift_factor": config.get("shift_factor"),
                "latent_channels": config.get("latent_channels"),
                "downsample_factor": 2 ** (len(config.get("block_out_channels", [0])) - 1)}
    if role in ("detector", "fid"):
        return {"kind": config.get("kind", config.get("model_type", "unknown"))}
    return {}


def _identity(source: str | None, id: str | None, revision: str | None, subfolder: str | None) -> tuple:
    """What a materialised role must match to be reused: where it came from, and which revision."""
    pinned = source == "hub" and id != "cleanfid"
    return source, id, (revision or "main") if pinned else None, subfolder


def _materialise(role: str, src: Source, dest: Path, args: argparse.Namespace, inputs: dict) -> dict:
    """Fill `dest` with `role` from where the plan says; returns MODEL_INFO facts."""
    how = {"local": lambda: bring_local(role, src, dest, args.link),
           "hub": lambda: fetch_hub(role, src, dest),
           "built": lambda: BUILDERS[role](dest, inputs, args)}
    return how[src.kind]()


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.released:  # only the named released checkpoints, into <out>/released/
        from microdit.zoo.hub import fetch_released

        for name in args.released:
            print(f"models: released checkpoint {name} -> {fetch_released(name, out / 'released')}")
        return 0
    if args.preset and args.source and args.preset != {"build": "smoke", "hub": "paper"}[args.source]:
        raise UserError(f"--preset {args.preset} contradicts --source {args.source}")
    args.preset = args.preset or {"build": "smoke", "hub": "paper", None: "smoke"}[args.source]
    args.images = args.images or args.captions
    plan = plan_sources(args.roles, args.preset, args.ids, args.local)
    todo = []
    for role, src in plan.items():
        info_path = out / role / INFO_FILE
        if info_path.is_file() and not args.force:
            have = read_json(info_path)
            held = _identity(have.get("source"), have.get("id"), have.get("revision"), have.get("subfolder"))
            if held != _identity(src.kind, src.id, src.revision, src.subfolder):
                raise UserError(f"{out / role} holds {have.get('source')} {have.get('id')!r}, not {src.kind} "
                                f"{src.id!r}; pass --force to replace it")
            print(f"models: {role} present ({have.get('source')} {have.get('id')}), skipped")
            continue
        todo.append(role)

    offline = [r for r in todo if plan[r].kind == "hub"] if hub_offline() else []
    if offline:
        r = offline[0]
        raise UserError(f"{r}: HF_HUB_OFFLINE=1 and no local copy of {plan[r].id}; pass --local {r}=/path/to/model_dir "
                        f"or unset HF_HUB_OFFLINE to download it" + (f" (also needed: {', '.join(offline[1:])})"
                                                                      if len(offline) > 1 else ""))
    built = [r for r in todo if plan[r].kind == "built"]
    tokenized = [r for r in built if BUILDERS[r].needs]  # the text models: they share one tokenizer
    if tokenized and not args.captions:
        raise UserError("smoke text models need --captions <root>/world/<source>.parquet ... to train the tokenizer")
    if "vae" in built and not args.images:
        raise UserError("the smoke VAE needs --images (or --captions) <root>/world/<source>.parquet to train on")

    with tempfile.TemporaryDirectory(prefix="microdit-tokenizer-") as scratch:
        inputs: dict = {}  # what builders share, by the names their registrations need
        if tokenized:
            captions = read_captions(args.captions)
            tokenizer = train_caption_tokenizer(captions, args.vocab_size, Path(scratch) / "bpe")
            tokenizer.save_pretrained(Path(scratch) / "tokenizer")
            inputs = {"tokenizer": tokenizer, "tokenizer_dir": Path(scratch) / "tokenizer"}
            print(f"models: tokenizer trained on {len(captions)} captions, {len(tokenizer)} tokens")
        for role in todo:
            src = plan[role]
            remove_stale_staging(out, role)
            t0 = time.time()
            with staged_dir(out / role) as dest:
                facts = _materialise(role, src, dest, args, inputs)
                facts = describe(role, dest) | facts  # read from what was just written
                info = {"role": role, "source": src.kind, "id": src.id, "preset": args.preset,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **facts}
                write_json(dest / INFO_FILE, info)
            extra = f", D={facts['hidden_size']}" if role == "text_encoder" else ""
            print(f"models: {role} {src.kind} {src.id} ready in {time.time() - t0:.1f}s{extra}")
    return 0
