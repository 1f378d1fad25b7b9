"""Every config key, declared once: its name, type, default, valid range and help.

One dataclass per config section. From these declarations come
- the JSON schema `microdit.config` validates a resolved config with (`json_schema()`),
- the defaults under the presets (`with_defaults()`): a key a preset leaves out takes its default,
- each command's flags for the section it reads (`add_flags()`): flag `--mask-ratio` is key
  `mask_ratio`, with the key's default and range, so `microdit train --help` is config.yaml's help,
- the words a Snakemake rule passes to its command (`flags()`): a rule hands over the resolved
  section and never lists keys itself,
- what defines a training run (`run_defining()`: the checkpoint fingerprint) and which keys each
  command reads (`command_keys()`: DVC's per-stage `params`).

A key marked `flag=False` is read by the workflow itself (paths, which stages and sources exist,
resources); its `used` says where. Everything else reaches its command under the same name.

Longer than 500 lines because it is the one table of every key (about 150 of them, each declared
on a line or two) together with what reads it; split, a key's declaration and its use in flags
and schema would sit in two files again.

Standard library dataclasses, not pydantic: the validation stays jsonschema's, whose one-line
messages the config errors are built on, and nothing here imports torch or a new dependency.
Defaults that are the paper's numbers come from `microdit.paper`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import shlex
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal

from microdit import model_sizes
from microdit import paper

OMIT = object()  # an optional key: not required, and absent unless set (e.g. resources.<group>.nodes)

MODEL_SIZES = tuple(model_sizes.SIZES)  # the names of microdit.models.MODEL_CONFIGS
STAGE_NAME = "^stage[1-9][0-9]*$"
SOURCE_NAME = "^[a-z][a-z0-9_]*$"


def key(default: Any = MISSING, help: str = "", *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, multiple_of: int | None = None,
        min_items: int | None = None, max_items: int | None = None, min_length: int | None = None,
        unique: bool = False,
        flag: bool = True, used: str = "", defines_run: bool = False, names: str | None = None,
        items_ge: float | None = None, items_multiple_of: int | None = None, pattern: str | None = None) -> Any:
    """A config key. `flag`: passed to its section's command as `--<key>`; `used`: who else reads it;
    `defines_run`: a checkpoint made with another value belongs to another training run."""
    meta = dict(help=help, ge=ge, gt=gt, le=le, lt=lt, multiple_of=multiple_of, min_items=min_items, max_items=max_items,
                min_length=min_length, unique=unique, flag=flag, used=used, defines_run=defines_run,
                names=names, items_ge=items_ge, items_multiple_of=items_multiple_of, pattern=pattern,
                optional=default is OMIT)
    if default is OMIT:
        return field(default=None, metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(_copy, default), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value):
    return type(value)(value)


# ---- the sections -------------------------------------------------------------------------------

@dataclass(kw_only=True)
class World:
    """The smoke preset's synthetic shapes world (`microdit world`)."""
    image_size: int = key(128, "side of every good image, in pixels", ge=32)
    counts: dict[str, int] = key({}, "images per source (empty: no world, e.g. the paper preset)", ge=0,
                                 names=SOURCE_NAME, flag=False, used="workflow: the world's files; --count NAME=N")
    bad_per_source: int = key(3, "deliberately bad rows per source, cycling dead URL, corrupt file, too-small "
                              "image (exercise the counted skips)", ge=0)
    small_size: int = key(32, "side of the too-small images, below the pipeline's minimum", ge=1)


@dataclass(kw_only=True)
class Role:
    """One model the DAG needs (`models.roles.<role>`)."""
    id: str = key(help="hub id (repo[@revision][:subfolder]) or built:<name>", min_length=1, flag=False,
                  used="workflow: microdit models --id ROLE=ID")
    path: str | None = key(None, "local HF-format directory used instead of the id", flag=False,
                           used="workflow: microdit models --local ROLE=PATH")


@dataclass(kw_only=True)
class Roles:
    vae: Role = key(help="the latent autoencoder")
    text_encoder: Role = key(help="the caption encoder")
    captioner: Role = key(help="LLaVA, for sources captioned by us")
    clip: Role = key(help="CLIP for the CLIP score and GenEval colours")
    fid: Role = key(help="the FID feature extractor")
    detector: Role = key(help="GenEval's object detector")


@dataclass(kw_only=True)
class Build:
    """Tiny local models of the smoke preset (`models.source: build`)."""
    vocab_size: int = key(1024, "tokenizer vocabulary upper bound", ge=16)
    text_dim: int = key(64, "text encoder hidden size = caption embedding width D", ge=8)
    text_layers: int = key(2, "text encoder layers", ge=1)
    text_steps: int = key(300, "contrastive warm-up steps of the text encoder on the captioned images (0: random)",
                          ge=0)
    text_lr: float = key(1e-3, "learning rate of the text encoder's warm-up", gt=0)
    text_image_res: int = key(64, "image side for the warm-up", ge=16, multiple_of=16)
    vae_steps: int = key(500, "training steps of the tiny VAE", ge=0)
    vae_resolution: int = key(64, "image size the tiny VAE trains at", ge=16)
    vae_batch_size: int = key(16, "batch size of the tiny VAE", ge=1)
    vae_lr: float = key(2e-3, "learning rate of the tiny VAE", gt=0)
    vae_kl: float = key(1e-6, "KL weight of the tiny VAE", ge=0)
    vae_colour_weight: float = key(9.0, "extra loss weight on saturated (object) pixels", ge=0)
    vae_channels: list[int] = key([32, 32, 64, 64], "block_out_channels; the downsampling factor is 2^(len-1)",
                                  min_items=1, items_ge=1)
    vae_max_images: int = key(512, "images the tiny VAE trains on, at most", ge=1)
    vae_grid_res: int = key(128, "resolution of the recon.png grid", ge=16)
    clip_image_size: int = key(64, "image side of the tiny CLIP", ge=16)
    fid_input_size: int = key(299, "input size of the smoke Inception", ge=75)


@dataclass(kw_only=True)
class Models:
    source: Literal["build", "hub"] = key("hub", "build tiny local models or snapshot hub ids", flag=False,
                                          used="workflow: microdit models --source")
    roles: Roles = key(help="every model the DAG needs", flag=False, used="workflow: --id/--local per role")
    build: Build = key(help="the tiny models' training (build only)", flag=False, used="models --<key>")


@dataclass(kw_only=True)
class Source:
    """One data source (`sources.<name>`)."""
    kind: Literal["urls", "sa1b", "textcaps", "journeydb", "diffusiondb", "coco"] = key(
        help="how it is downloaded", used="download --kind")
    role: Literal["train", "eval"] = key(help="training data or the evaluation split", flag=False,
                                          used="workflow: which rules read it")
    input: str = key(help="URL list file/URL, links file, or base URL/dir of the archives", min_length=1,
                     used="download --input")
    options: dict[str, str | int | float | bool] = key(help="img2dataset/fetcher options", used="download --opt K=V")
    captions: Literal["source", "llava"] = key(help="keep the source's captions or caption with LLaVA",
                                               flag=False, used="workflow: whether the caption rule runs")
    weight: float = key(help="mixing weight in training", ge=0, used="train --weights NAME=W")
    raw_from: str = key(OMIT, "reuse another source's download (e.g. a min-size-512 split)", flag=False,
                        used="workflow: the raw directory read")
    min_size: int = key(OMIT, "overrides mds.min_size for this source", ge=1, used="mds/caption --min-size")
    stages: list[int] = key(OMIT, "training stages that use it (default: all)", unique=True, items_ge=1,
                            flag=False, used="workflow: the stages whose --latents include it")


@dataclass(kw_only=True)
class Download:
    """`microdit download`: img2dataset, or a fetcher writing the same webdataset format."""
    image_size: int = key(512, "target size of resize_mode (0: no resizing)", ge=0)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = key(
        "keep_ratio", "img2dataset's resize mode")
    min_image_size: int = key(0, "drop (and count) images with a shorter side", ge=0)
    processes: int = key(1, "img2dataset processes / parallel fetcher shards", ge=1)
    threads: int = key(16, "img2dataset download threads per process", ge=1)
    timeout: float = key(10.0, "network timeout in seconds", gt=0)
    retries: int = key(0, "retries per URL (urls) or per archive (fetchers)", ge=0)
    samples_per_shard: int = key(10000, "samples per shard (urls, coco, textcaps)", ge=1)


@dataclass(kw_only=True)
class Caption:
    """`microdit caption`: LLaVA captions for sources without good ones."""
    prompt: str = key("Describe this image and its style in a very detailed manner.",
                      "instruction given with every image", min_length=1)
    max_new_tokens: int = key(77, "caption length limit in tokens", ge=1)
    batch_size: int = key(8, "images per generate call", ge=1)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = key(
        "auto", "LLaVA weights dtype (auto: bfloat16 on GPU, float32 on CPU)")
    chunk_size: int = key(512, "images per resumable part file (work lost on a crash is at most this)", ge=1)


@dataclass(kw_only=True)
class Mds:
    """`microdit mds`: images + captions into mosaicml-streaming shards."""
    min_size: int = key(paper.MIN_IMAGE_SIZE, "drop images whose short side is below this", ge=1)
    max_size: int = key(512, "downscale so the short side is at most this", ge=1)
    image_format: Literal["jpeg", "png"] = key("jpeg", "image encoding in the shards")
    quality: int = key(95, "JPEG quality for re-encoded images", ge=1, le=100)
    resample: Literal["bicubic", "lanczos"] = key("bicubic", "downscaling filter")
    shard_size: str = key("256mb", "MDS shard size limit (bytes or e.g. 256mb)", min_length=1)


@dataclass(kw_only=True)
class Latents:
    """`microdit latents`: VAE latents and caption embeddings, precomputed."""
    resolutions: list[int] = key([256, 512], "center-crop sizes in pixels (one latents column each)",
                                 min_items=1, items_ge=8, items_multiple_of=8)
    batch_size: int = key(32, "images per encoder call, per process", ge=1)
    dtype: Literal["auto", "float32", "bfloat16"] = key(
        "auto", "VAE/text encoder dtype (auto: bfloat16 on GPU, float32 on CPU); latents are stored float16")
    workers: int | None = key(None, "image decoding processes per rank (null: 4 on a GPU, 0 on CPU)", ge=0)
    posterior: Literal["sample", "mode"] = key("sample", "sample the VAE posterior (official precompute) or take "
                                               "its mean")
    wait_timeout: float = key(3600.0, "seconds rank 0 waits for the other ranks' parts before failing", gt=0)


FIRST = paper.STAGES[1]  # a stage key left out takes the paper's first stage's value


@dataclass(kw_only=True)
class Stage:
    """One training stage (`train.stages.stageN`); the paper has four."""
    resolution: int = key(help="image px; latents are resolution/8", ge=16, multiple_of=16)
    mask_ratio: float = key(FIRST["mask_ratio"], "share of patches dropped after the patch-mixer", ge=0, lt=1, defines_run=True)
    steps: int = key(help="optimizer steps in this stage", ge=1)
    global_batch: int = key(paper.GLOBAL_BATCH, "images per optimizer step, all processes", ge=1, defines_run=True)
    lr: float = key(FIRST["lr"], "base learning rate", gt=0, defines_run=True)
    schedule: Literal["cosine", "constant"] = key(FIRST["schedule"], "learning-rate schedule", defines_run=True)
    warmup: int = key(0, "linear warmup steps from lr 0", ge=0, defines_run=True)
    final_lr_ratio: float = key(FIRST["final_lr_ratio"], "cosine: lr multiplier reached at the end", ge=0, le=1, defines_run=True)
    p_mean: float = key(FIRST["p_mean"], "EDM log-normal noise level mean", defines_run=True)
    p_std: float = key(FIRST["p_std"], "EDM log-normal noise level std", gt=0, defines_run=True)
    grad_clip: float = key(FIRST["grad_clip"], "gradient norm clip (0: off)", ge=0, defines_run=True)
    init_optimizer: bool = key(False, "carry the previous stage's AdamW state over (official stages 2 and 4)",
                               defines_run=True)
    ema_start: int = key(0, "steps during which the EMA only copies the weights", ge=0, defines_run=True)
    ema: bool = key(True, "keep an EMA of the weights (evaluated instead of the raw weights)", defines_run=True)


@dataclass(kw_only=True)
class Train:
    """`microdit train`: settings shared by every stage."""
    model: Literal[MODEL_SIZES] = key(paper.MODEL, "model size (microdit.models.MODEL_CONFIGS)")  # type: ignore[valid-type]
    patch_mixer: bool = key(True, "the patch-mixer before masking (off: the paper's ablation)")
    caption_channels: int | None = key(None, "caption embedding width D, checked against the latents (null: the "
                                       f"latents' own; paper: {paper.CAPTION_CHANNELS})", ge=1)
    micro_batch: int = key(256, "images per forward pass per process (gradient accumulation above it)", ge=1)
    ema_decay: float = key(paper.EMA_DECAY, "EMA decay per step", ge=0, lt=1, defines_run=True)
    moe_lr_scale: float = key(paper.MOE_LR_SCALE, "lr multiplier for the MoE layers' parameters", ge=0, defines_run=True)
    weight_decay: float = key(paper.OPTIMIZER["weight_decay"], "AdamW weight decay", ge=0, defines_run=True)
    betas: list[float] = key(paper.OPTIMIZER["betas"], "AdamW betas", min_items=2, max_items=2, items_ge=0,
                             defines_run=True)
    eps: float = key(paper.OPTIMIZER["eps"], "AdamW epsilon", gt=0, defines_run=True)
    caption_drop: float = key(paper.CAPTION_DROP, "probability of zeroing a caption (trains classifier-free guidance)",
                              ge=0, le=1, defines_run=True)
    weighting: Literal["proportion", "repeat"] = key(
        "proportion", "source mixing: weights as shares of a batch, or as repeats of each source", defines_run=True)
    init_weights: Literal["raw", "ema"] = key("raw", "which of the previous stage's weights a stage starts from",
                                              defines_run=True)
    bf16: Literal["auto", "on", "off"] = key("auto", "bf16 autocast (auto: on GPUs)")
    compile: bool = key(False, "torch.compile the model")
    fsdp: bool = key(False, "shard gradients and optimizer state (under torchrun)")
    num_workers: int | None = key(None, "data loader workers per process (null: 2 on GPU, 0 on CPU)", ge=0)
    ckpt_every: int = key(1000, "checkpoint every N steps (and at the end)", ge=1)
    keep: int = key(2, "checkpoints to keep", ge=1)
    keep_superseded: int = key(2, "runs with other settings kept aside, resumable when the settings return", ge=0)
    log_every: int = key(10, "log averaged metrics every N steps", ge=1)
    tensorboard: bool = key(True, "also write TensorBoard event files")
    sample_prompts: list[str] = key(["a photo of a cat"], "prompts of the end-of-stage sample grid",
                                    min_items=1, min_length=1)
    sample_steps: int = key(paper.SAMPLER["steps"], "Heun steps of the sample grid", ge=2)
    sample_guidance: float = key(paper.SAMPLER["guidance"], "guidance scale of the sample grid", ge=0)
    eval_every: int = key(0, "every N steps (and at a stage's end): a sample grid on the sample prompts and a "
                          "small-n GenEval, plotted per stage in the report (0: off)", ge=0)
    eval_prompts: str = key("shapes", "GenEval prompts of the in-training evaluation: shapes | none | a GenEval "
                            "metadata .jsonl", min_length=1)
    eval_per_task: int = key(2, "in-training GenEval prompts per task, one image each (0: all)", ge=0)
    on_change: Literal["restart", "error"] = key(
        "restart", "when a stage's settings changed since its checkpoints: set them aside and restart, or stop")
    stages: dict[str, Stage] = key(help="the stages, trained in order; each starts from the previous one's weights",
                                   names=STAGE_NAME, flag=False, used="workflow: one train job per stage")


@dataclass(kw_only=True)
class Released:
    """A released checkpoint to evaluate (`evaluate.released` entries that are mappings)."""
    path: str = key(help="the checkpoint file (any layout microdit.checkpoint loads) or a released name",
                    min_length=1)
    model: Literal[MODEL_SIZES] = key(paper.RELEASED_ARCHITECTURE["model"], "its size")  # type: ignore[valid-type]
    resolution: int = key(paper.RELEASED_ARCHITECTURE["resolution"], "the image px it generates", ge=16, multiple_of=16)
    pos_interp_scale: float = key(paper.RELEASED_ARCHITECTURE["pos_interp_scale"], "its position-embedding scale",
                                  gt=0)


def released_tag(name: str) -> str:
    """The evaluation tag of a released checkpoint (a released name or a file's stem): released-<slug>."""
    return "released-" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@dataclass(kw_only=True)
class Evaluate:
    """`microdit evaluate`: FID, CLIP score and GenEval of trained stages."""
    stages: list[int] = key([], "stages evaluated besides the untrained baseline (stage0)", unique=True,
                            items_ge=1, flag=False, used="workflow: one evaluate job per stage")
    released: list[str | Released] = key(
        [], "released checkpoints evaluated beside ours, as tag released-<name>: a released name ("
        + ", ".join(paper.RELEASED_FILES) + f"; fetched from {paper.RELEASED_REPO}), a checkpoint file, or a "
        "mapping {path, model, resolution, pos_interp_scale}", flag=False, used="workflow: one evaluate job each")
    num_images: int = key(paper.FID_IMAGES, "images generated for FID and CLIP score", ge=2)
    steps: int = key(paper.SAMPLER["steps"], "Heun steps", ge=2)
    captions_file: str | None = key(None, "a fixed caption list for FID and CLIP score (one per line, or JSON lines "
                                    "with a 'caption'): its first num_images, in order, instead of a seeded draw "
                                    "from the evaluation split (null: the draw)", min_length=1)
    captions_sha256: str | None = key(None, "the list's sha256, checked before use (null: not checked)",
                                      pattern="^[0-9a-f]{64}$")
    guidance_sweep: list[float] = key([], "more guidance scales, each with its own FID and CLIP score images: the "
                                      "report draws FID against CLIP score over them (empty: none)", items_ge=0)
    guidance: float = key(paper.SAMPLER["guidance"], "classifier-free guidance scale", ge=0)
    batch_size: int = key(16, "images per sampler call", ge=1)
    geneval_prompts: str = key("shapes", "shapes | official | none | path to a GenEval metadata jsonl", min_length=1)
    geneval_per_task: int = key(0, "keep at most N prompts per task, a seeded sample (0: all)", ge=0)
    geneval_images_per_prompt: int = key(paper.GENEVAL_IMAGES_PER_PROMPT, "images per GenEval prompt", ge=1)
    fid_256: bool = key(False, "also FID at 256 px (the paper reports both)")
    dtype: Literal["auto", "float32", "bfloat16"] = key("auto", "VAE/text encoder dtype and DiT autocast "
                                                        "(auto: bfloat16 on GPU)")
    workers: int = key(0, "data-loader workers for FID features", ge=0)
    bootstrap: int = key(1000, "bootstrap draws of the 95% interval on every metric (0: none)", ge=0)


@dataclass(kw_only=True)
class Cost:
    """`microdit cost`: what the run cost."""
    gpu_type: str = key(paper.COST["gpu_type"], "the GPU the price is for", min_length=1)
    price_per_gpu_hour: float = key(paper.COST["price_per_gpu_hour"], "dollars per GPU-hour (paper: $3.75 per H100)", ge=0)


@dataclass(kw_only=True)
class Resources:
    """Snakemake/Slurm resources of one rule group."""
    threads: int = key(help="CPU threads", ge=1, flag=False, used="workflow: rule threads")
    mem_mb: int = key(help="memory in MB", ge=100, flag=False, used="workflow: rule resources")
    runtime: int = key(help="minutes", ge=1, flag=False, used="workflow: rule resources")
    gpu: int = key(help="GPUs per node", ge=0, flag=False, used="workflow: rule resources; torchrun")
    nodes: int = key(OMIT, "nodes for a torchrun job (Slurm)", ge=1, flag=False, used="workflow: srun + torchrun")


@dataclass(kw_only=True)
class Groups:
    models: Resources = key(help="microdit models")
    world: Resources = key(help="microdit world")
    download: Resources = key(help="microdit download")
    caption: Resources = key(help="microdit caption")
    mds: Resources = key(help="microdit mds")
    latents: Resources = key(help="microdit latents")
    train: Resources = key(help="microdit train")
    evaluate: Resources = key(help="microdit evaluate")
    report: Resources = key(help="microdit funnel, cost, report")


@dataclass(kw_only=True)
class Config:
    """The whole config: a preset with the user's config.yaml on top."""
    preset: Literal["smoke", "paper"] = key("smoke", "which preset supplies the keys not set here", flag=False,
                                            used="microdit.config")
    root: str = key(help="data root: models, raw data, latents, checkpoints", min_length=1, flag=False,
                    used="workflow: every path")
    results: str = key(help="results: metrics, cost, report", min_length=1, flag=False, used="workflow: every path")
    seed: int = key(0, "seed of every command that draws", ge=0)
    device: str = key("auto", "where commands run: auto (a GPU when there is one), cpu, cuda, cuda:N",
                      pattern="^(auto|cpu|cuda(:[0-9]+)?)$")
    world: World = key(help="the smoke world")
    models: Models = key(help="the models")
    sources: dict[str, Source] = key(help="the data sources", names=SOURCE_NAME, flag=False,
                                     used="workflow: one download/mds (/caption/latents) chain per source")
    download: Download = key(help="downloading")
    caption: Caption = key(help="captioning")
    mds: Mds = key(help="MDS conversion")
    latents: Latents = key(help="latent precompute")
    train: Train = key(help="training")
    evaluate: Evaluate = key(help="evaluation")
    cost: Cost = key(help="cost accounting")
    resources: Groups = key(help="resources per rule group")


# Which sections each command reads: `microdit <command>` takes the flag keys of these (a path into
# Config; `train.stages.*` is the stage being trained), plus the top-level keys named.
COMMAND_SECTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "world": (("world",), ("seed",)),
    "models": (("models.build",), ("seed",)),  # models.source and the roles: --source, --id, --local
    "download": (("download",), ()),
    "caption": (("caption",), ("device",)),
    "mds": (("mds",), ()),
    "latents": (("latents",), ("device", "seed")),
    "train": (("train", "train.stages.*"), ("seed", "device")),
    "evaluate": (("evaluate",), ("seed", "device")),
    "cost": (("cost",), ()),
}


# ---- reading the declarations ---------------------------------------------------------------------

@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) of each key of a section, in declaration order."""
    hints = _hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _without_none(tp: Any) -> tuple[Any, bool]:
    if _is_union(tp) and type(None) in _args(tp):
        rest = [a for a in _args(tp) if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def section(path: str) -> type:
    """The dataclass of a dotted section path: 'train', 'models.build', 'train.stages.*'."""
    cls: Any = Config
    for part in path.split("."):
        cls = _args(cls)[1] if part == "*" else _without_none({f.name: tp for f, tp in fields(cls)}[part])[0]
    return cls


# ---- the JSON schema ------------------------------------------------------------------------------

_SCALARS = {int: "integer", float: "number", bool: "boolean", str: "string"}


def _type_schema(tp: Any, meta: dict) -> dict:
    tp, nullable = _without_none(tp)
    if dataclasses.is_dataclass(tp):
        out = _class_schema(tp)
    elif typing.get_origin(tp) is Literal:
        out = {"enum": list(_args(tp))}
    elif typing.get_origin(tp) is list:
        item_meta = dict(meta, ge=meta.get("items_ge"), multiple_of=meta.get("items_multiple_of"),
                         min_items=None, max_items=None, unique=False, help="")
        out = {"type": "array", "items": _type_schema(_args(tp)[0], item_meta)}
        if meta.get("min_items") is not None:
            out["minItems"] = meta["min_items"]
        if meta.get("max_items") is not None:
            out["maxItems"] = meta["max_items"]
        if meta.get("unique"):
            out["uniqueItems"] = True
        return {**out, "type": ["array", "null"]} if nullable else out
    elif typing.get_origin(tp) is dict:
        out = {"type": "object", "additionalProperties": _type_schema(_args(tp)[1], dict(meta, names=None))}
        if meta.get("names"):
            out["propertyNames"] = {"pattern": meta["names"]}
        if dataclasses.is_dataclass(_args(tp)[1]) and meta.get("names"):
            out["minProperties"] = 1
    elif _is_union(tp) and all(a in _SCALARS for a in _args(tp)):
        out = {"type": [_SCALARS[a] for a in _args(tp)]}
    elif _is_union(tp):  # e.g. a name or a mapping
        out = {"anyOf": [_type_schema(a, dict(meta, help="")) for a in _args(tp)]}
    else:
        out = {"type": _SCALARS[tp]}
        bounds = (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum"), ("lt", "exclusiveMaximum"),
                  ("multiple_of", "multipleOf"))
        out.update({name: meta[k] for k, name in bounds if meta.get(k) is not None and tp in (int, float)})
        if meta.get("min_length") is not None and tp is str:
            out["minLength"] = meta["min_length"]
        if meta.get("pattern") and tp is str:
            out["pattern"] = meta["pattern"]
    if nullable:
        if "type" in out:
            out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
        elif "enum" in out:
            out["enum"] = [*out["enum"], None]
    if meta.get("help"):
        out["description"] = meta["help"]
    return out


def _class_schema(cls: type) -> dict:
    props = {f.name: _type_schema(tp, dict(f.metadata)) for f, tp in fields(cls)}
    required = [f.name for f, _ in fields(cls) if not _has_default(f) and not f.metadata.get("optional")]
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    return out


@functools.cache
def _schema() -> dict:
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "description": "microdit config after the preset is merged with the user's config.yaml",
            **_class_schema(Config)}


def json_schema() -> dict:
    """The JSON schema of a resolved config (a fresh copy)."""
    import copy

    return copy.deepcopy(_schema())


# ---- defaults -------------------------------------------------------------------------------------

def with_defaults(config: dict, cls: type = Config) -> dict:
    """`config` with every key it leaves out that has a default filled in (recursively; entries of
    `sources` and `train.stages` each get their section's defaults). Wrong types are left for the schema."""
    out = dict(config)
    for f, tp in fields(cls):
        tp, _ = _without_none(tp)
        if f.name not in out:
            if dataclasses.is_dataclass(tp):
                out[f.name] = with_defaults({}, tp)
            elif _has_default(f) and not f.metadata.get("optional"):
                out[f.name] = _default(f)
            continue
        value = out[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            out[f.name] = with_defaults(value, tp)
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(_args(tp)[1]) and isinstance(value, dict):
            out[f.name] = {k: with_defaults(v, _args(tp)[1]) if isinstance(v, dict) else v for k, v in value.items()}
    return out


# ---- command-line flags ---------------------------------------------------------------------------

def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _checked(kind: type, meta: dict, name: str):
    """argparse `type=`: parse, then the key's own range check, worded like the config error."""
    def parse(text: str):
        value = kind(text)
        for k, op, ok in (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
                          ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)):
            bound = meta.get(k)
            if bound is not None and not ok(value, bound):
                raise argparse.ArgumentTypeError(f"{text} is out of range: {flag_name(name)} takes {op} {bound}")
        if meta.get("pattern") and not re.fullmatch(meta["pattern"], text):
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {meta['pattern']}")
        if meta.get("multiple_of") and value % meta["multiple_of"]:
            raise argparse.ArgumentTypeError(f"{text} is not a multiple of {meta['multiple_of']}")
        return value
    parse.__name__ = kind.__name__
    return parse


def add_flags(parser: argparse.ArgumentParser, path: str, *, top: tuple[str, ...] = (),
              required: bool = True) -> None:
    """Add a flag for every flag key of section `path` (and the named top-level keys). A key without
    a default is a required flag (when `required`)."""
    group = parser.add_argument_group(f"config keys ({path.replace('*', 'stageN')}.*)")
    todo = [(f, tp) for f, tp in fields(section(path)) if f.metadata.get("flag", True)]
    todo += [(f, tp) for f, tp in fields(Config) if f.name in top]
    for f, tp in todo:
        meta, inner = dict(f.metadata), _without_none(tp)[0]
        kw: dict[str, Any] = {"dest": f.name, "help": meta.get("help", "")}
        if _has_default(f):
            kw["default"] = _default(f)
            if kw["default"] is not None and not isinstance(kw["default"], bool):
                kw["help"] += f" (default: {kw['default']})"
        elif required:
            kw["required"] = True
        if inner is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(inner) is Literal:
            kw["choices"] = list(_args(inner))
        elif typing.get_origin(inner) is list:
            item = _args(inner)[0]
            same = meta.get("min_items") is not None and meta.get("min_items") == meta.get("max_items")
            kw["nargs"] = meta["min_items"] if same else "+" if meta.get("min_items") else "*"  # "*": may be empty
            kw["type"] = _checked(item, {**meta, "ge": meta.get("items_ge"),
                                         "multiple_of": meta.get("items_multiple_of")}, f.name) \
                if item in (int, float) else item
        elif inner in (int, float) or meta.get("pattern"):
            kw["type"] = _checked(inner, meta, f.name)
        else:
            kw["type"] = inner
        group.add_argument(flag_name(f.name), **kw)


def flags(path: str, values: dict, *, top: dict | None = None, **overrides: Any) -> str:
    """The shell words passing section `path`'s flag keys with `values` (a resolved config section),
    each quoted; `overrides` replace single values (e.g. a source's own `min_size`)."""
    values = {**values, **overrides}
    todo = [f for f, _ in fields(section(path)) if f.metadata.get("flag", True)]
    words: list[str] = []
    pairs = [(f.name, values.get(f.name)) for f in todo if f.name in values]
    pairs += sorted((top or {}).items())
    for name, value in pairs:
        if value is None:
            continue
        if isinstance(value, bool):
            words.append(flag_name(name) if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, list):
            words.append(" ".join([flag_name(name), *(shlex.quote(str(v)) for v in value)]))
        else:
            words.append(f"{flag_name(name)} {shlex.quote(str(value))}")
    return " ".join(words)


# ---- what keys mean to other code -----------------------------------------------------------------

def received(args: argparse.Namespace, *paths: str, top: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flag keys of these sections as a command received them (its summary records them)."""
    names = [f.name for p in paths for f, _ in fields(section(p)) if f.metadata.get("flag", True)] + list(top)
    return {name: getattr(args, name) for name in names}


def run_defining() -> tuple[str, ...]:
    """The training keys whose value defines a run's trajectory (the checkpoint fingerprint), and the seed."""
    names = [f.name for cls in (Train, Stage) for f, _ in fields(cls) if f.metadata.get("defines_run")]
    return (*names, "seed")


def section_keys(path: str) -> list[str]:
    """Dotted names of the flag keys of a section ('train.model', ...); the section's own name when
    all its keys are flags."""
    names = [f"{path}.{f.name}" for f, _ in fields(section(path)) if f.metadata.get("flag", True)]
    return [path] if len(names) == len(fields(section(path))) else names


def command_keys(command: str, stage: str | None = None) -> list[str]:
    """The config keys `microdit <command>` receives as flags (DVC's `params` of its stage)."""
    paths, top = COMMAND_SECTIONS[command]
    keys = list(top)
    for path in paths:
        if path.endswith(".*"):
            if stage is not None:
                keys.append(path.replace("*", stage))
        else:
            keys += section_keys(path)
    return keys
