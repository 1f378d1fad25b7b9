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

Smoke models: a CLIP BPE tokenizer trained on the world's captions; a random CLIPTextModel (its
hidden size is the caption embedding width D the DiT sees); a small AutoencoderKL (factor 8,
4 channels) trained briefly on the world's images so decoded latents are recognisable shapes;
a random LLaVA and a random CLIPModel with their processors; a random Inception-v3 for FID
(numbers not comparable with the paper's); the exact shapes detector.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch
import torch.nn.functional as F
from torch import nn

from microdit.cli import UserError
from microdit.checkpoint import save_safetensors
from microdit.io import read_json, sha256_file, write_json

ROLES = ("vae", "text_encoder", "captioner", "clip", "fid", "detector")
INFO_FILE = "MODEL_INFO.json"
CLEANFID_WEIGHTS = "inception-2015-12-05.pt"

# The paper's models. The text encoder repo holds OpenCLIP weights, which the official precompute
# used; they are converted to a transformers CLIPTextModel (see zoo_convert.py).
PAPER_MODELS = {
    "vae": "stabilityai/sdxl-vae",
    "text_encoder": "apple/DFN5B-CLIP-ViT-H-14-378",
    "captioner": "llava-hf/llava-1.5-7b-hf",
    "clip": "openai/clip-vit-large-patch14",
    "fid": "cleanfid",  # the Inception weights clean-fid itself downloads
    "detector": "facebook/mask2former-swin-small-coco-instance",
}

# llava-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), for the tiny captioner.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


# --------------------------------------------------------------------------- sources and specs

@dataclass(frozen=True)
class Source:
    kind: str  # "built" | "hub" | "local"
    id: str  # repo id, local path, "cleanfid" or the name of a built model
    revision: str | None = None
    subfolder: str | None = None


def parse_model_spec(text: str, flag: str = "--id") -> tuple[str, Source]:
    """`role=SPEC` -> (role, Source). SPEC is `built[:name]` (made here), `cleanfid[:...]` (the
    Inception weights clean-fid downloads; role fid) or a hub `repo_id[@revision][:subfolder]`."""
    role, sep, spec = text.partition("=")
    if not sep or not spec:
        raise UserError(f"{flag} {text!r}: expected role=repo_id[@revision][:subfolder] or role=built")
    role = _check_role(role, flag)
    head, _, tail = spec.partition(":")
    if head == "built":
        return role, Source("built", tail or f"microdit-smoke/{role}")
    if head == "cleanfid":
        if role != "fid":
            raise UserError(f"{flag} {text!r}: cleanfid weights are for the fid role only")
        return role, Source("hub", "cleanfid")
    repo, _, revision = head.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"{flag} {text!r}: hub repo id must look like owner/name")
    return role, Source("hub", repo, revision or None, tail.strip("/") or None)


def parse_local_spec(text: str) -> tuple[str, Source]:
    role, sep, path = text.partition("=")
    if not sep or not path:
        raise UserError(f"--local {text!r}: expected role=/path/to/model_dir")
    return _check_role(role, "--local"), Source("local", str(Path(path).expanduser().resolve()))


def _check_role(role: str, flag: str) -> str:
    if role not in ROLES:
        raise UserError(f"{flag}: unknown role {role!r}; roles are {', '.join(ROLES)}")
    return role


def plan_sources(roles, preset: str, ids: list[str], local: list[str]) -> dict[str, Source]:
    chosen = dict(parse_model_spec(s) for s in ids)
    chosen.update(dict(parse_local_spec(s) for s in local))
    plan = {}
    for role in roles:
        if role in chosen:
            plan[role] = chosen[role]
        elif preset == "paper":
            plan[role] = Source("hub", PAPER_MODELS[role])
        else:
            plan[role] = Source("built", f"microdit-smoke/{role}")
    return plan


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


# --------------------------------------------------------------------------- atomic directories

@contextlib.contextmanager
def staged_dir(final: Path):
    """Yield an empty temp dir beside `final`; on success it replaces `final` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _readable_like_umask(tmp)
        old = None
        if final.exists() or final.is_symlink():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _readable_like_umask(root: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries; give the tree the modes a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def remove_stale_staging(out: Path, role: str) -> None:
    """A killed run leaves `.<role>.*.tmp` behind; nothing reads them, so they go."""
    for p in [*out.glob(f".{role}.*.tmp"), *out.glob(f".{role}.old-*")]:
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- smoke inputs

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def read_captions(paths: list[str]) -> list[str]:
    """Caption strings from world parquet files (`caption` column) or text files (one per line)."""
    captions: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise UserError(f"--captions: no such file {p}")
        if p.suffix == ".parquet":
            column = _parquet_column(p, "caption", "--captions")
            # the uncaptioned source has no caption column (or only nulls): nothing to learn from
            captions += [c for c in column or [] if isinstance(c, str) and c.strip()]
        else:
            captions += [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not captions:
        raise UserError(f"--captions: no caption strings in {', '.join(paths)}; give the world parquet files")
    return captions


def _parquet_column(path: Path, column: str, flag: str) -> list | None:
    """One column of a parquet file as a list; None when the file has no such column."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        return pq.read_table(path, columns=[column]).column(column).to_pylist() if column in schema.names else None
    except Exception as e:  # pyarrow raises several types for a truncated or non-parquet file
        raise UserError(f"{flag}: cannot read {path} as parquet ({type(e).__name__}: {e})") from e


def _image_files(paths: list[str]):
    """Yield image file paths from directories and from parquet URL lists (file:// or plain paths)."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from (f for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.suffix == ".parquet":
            urls = _parquet_column(p, "url", "--images")
            if urls is None:
                raise UserError(f"--images: {p} has no url column; give a world parquet file or an image dir")
            for url in urls:
                parsed = urlparse(url or "")
                if parsed.scheme in ("file", ""):
                    yield Path(unquote(parsed.path))
                else:
                    yield None  # remote URL: not for a local smoke build
        elif p.is_file():
            yield p
        else:
            raise UserError(f"--images: no such file or directory {p}")


def load_images(paths: list[str], res: int, limit: int, min_size: int | None = None
                ) -> tuple[torch.Tensor, dict[str, int]]:
    """Up to `limit` images, short side resized to `res` and centre-cropped: uint8 (N, 3, res, res).

    Bad entries (remote, missing, corrupt, short side below `min_size`, default `res`) are skipped
    and counted.
    """
    from PIL import Image, UnidentifiedImageError

    min_size = res if min_size is None else min_size
    out, skipped, seen = [], {"not_local": 0, "missing": 0, "corrupt": 0, "too_small": 0}, set()
    for f in _image_files(paths):
        if len(out) >= limit:
            break
        if f is None:
            skipped["not_local"] += 1
            continue
        if f in seen:  # the same world file named twice (captions and images) is one image set
            continue
        seen.add(f)
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
        except FileNotFoundError:
            skipped["missing"] += 1
            continue
        except (UnidentifiedImageError, OSError, SyntaxError):
            skipped["corrupt"] += 1
            continue
        if min(im.size) < min_size:
            skipped["too_small"] += 1
            continue
        out.append(_center_square(im, res))
    if not out:
        raise UserError(f"--images: no usable image in {', '.join(paths)} (skipped: {skipped})")
    return torch.stack(out), {k: v for k, v in skipped.items() if v}


def _center_square(im, res: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    w, h = im.size
    scale = res / min(w, h)
    im = im.resize((max(res, round(w * scale)), max(res, round(h * scale))), Image.BICUBIC)
    left, top = (im.width - res) // 2, (im.height - res) // 2
    im = im.crop((left, top, left + res, top + res))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------- smoke: tokenizer

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenisation: contractions, letter runs, single digits, punctuation runs.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def train_caption_tokenizer(captions: list[str], vocab_size: int, work_dir: Path, max_length: int = 77):
    """A CLIP-format BPE tokenizer (vocab.json + merges.txt) learned from the captions.

    The vocabulary is laid out exactly like CLIP's: 256 byte symbols, the same with `</w>`, the
    merges in order, then <|startoftext|> and <|endoftext|>. So it is an ordinary
    `CLIPTokenizerFast`, like the paper's, and like OpenCLIP it pads with id 0.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    from microdit.zoo_convert import build_clip_tokenizer

    byte_symbols = list(bytes_to_unicode().values())
    max_merges = max(0, vocab_size - 2 * len(byte_symbols) - 2)
    bpe = Tokenizer(models.BPE(unk_token=EOT, end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=2 * len(byte_symbols) + max_merges + 2, special_tokens=[SOT, EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>")
    bpe.train_from_iterator(captions, trainer)
    work_dir.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(work_dir))
    merges = [m for m in (work_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
              if m and not m.startswith("#")][:max_merges]

    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    seen = set(vocab)
    kept = []
    for merge in merges:
        token = merge.replace(" ", "")
        if token not in seen:
            seen.add(token)
            vocab.append(token)
            kept.append(merge)
    vocab += [SOT, EOT]
    (work_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (work_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(kept) + "\n", encoding="utf-8")
    return build_clip_tokenizer(work_dir / "vocab.json", work_dir / "merges.txt", pad_id=0, max_length=max_length)


def check_tokenizer(path: Path, max_length: int = 77) -> None:
    """The saved tokenizer reloads through AutoTokenizer and pads/truncates to `max_length`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(["a red circle", "word " * 200], padding="max_length", truncation=True,
              max_length=max_length, return_tensors="pt").input_ids
    if ids.shape != (2, max_length) or ids[1, -1].item() != tok.eos_token_id:
        raise RuntimeError(f"tokenizer in {path} does not pad/truncate to {max_length}")


# --------------------------------------------------------------------------- smoke builders

def build_text_encoder(dest: Path, tokenizer, args) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(args.seed)
    dim = args.text_dim
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=4 * dim,
        num_hidden_layers=args.text_layers, num_attention_heads=_heads(dim),
        max_position_embeddings=77, projection_dim=dim, hidden_act="quick_gelu",
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    model = CLIPTextModel(config).eval()
    alignment = align_text_encoder(model, tokenizer, args) if args.text_steps > 0 else None
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    check_tokenizer(dest)
    return {"hidden_size": dim, "max_length": 77, "vocab_size": len(tokenizer),
            "num_hidden_layers": args.text_layers, "parameters": _count(model), "alignment": alignment}


def load_pairs(paths: list[str], res: int, limit: int) -> tuple[torch.Tensor, list[str]]:
    """(image, caption) pairs from world parquet files that have both a url and a caption column;
    rows without a caption or a readable local image are left out."""
    from PIL import Image, UnidentifiedImageError

    images, captions = [], []
    for p in (Path(p) for p in paths if str(p).endswith(".parquet")):
        urls, texts = _parquet_column(p, "url", "--captions"), _parquet_column(p, "caption", "--captions")
        for url, text in zip(urls or [], texts or []):
            if len(images) >= limit:
                break
            parsed = urlparse(url or "")
            if not (isinstance(text, str) and text.strip()) or parsed.scheme not in ("file", ""):
                continue
            try:
                with Image.open(unquote(parsed.path)) as im:
                    im = im.convert("RGB")
            except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError):
                continue
            if min(im.size) >= res:
                images.append(_center_square(im, res))
                captions.append(text)
    return (torch.stack(images) if images else torch.empty(0, 3, res, res, dtype=torch.uint8)), captions


def align_text_encoder(model, tokenizer, args) -> dict | None:
    """A short CLIP-style warm-up of the smoke text encoder on the world's captioned images.

    A random text transformer gives nearly the same embedding to every caption (cosine ~0.97 between
    "a blue circle" and "a yellow triangle"), so a tiny DiT on a CPU budget barely learns to follow
    prompts. Here the text tower and a small convolutional image tower (thrown away afterwards) learn
    to pick each image's caption within a batch (symmetric InfoNCE on the EOS token, as CLIP), which
    makes colours, shapes, counts and places tell apart in the caption embeddings. No flips: they
    would swap "left of" and "right of"."""
    from tqdm import tqdm

    images, captions = load_pairs(args.captions, args.text_image_res, args.vae_max_images)
    if len(captions) < 8:
        print(f"models: text encoder left random: only {len(captions)} captioned images to align on")
        return None
    x = images.float() / 127.5 - 1
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    dim, side = model.config.hidden_size, args.text_image_res // 16
    torch.manual_seed(args.seed)
    image_tower = nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
        nn.Conv2d(64, 64, 3, 2, 1), nn.GELU(), nn.Conv2d(64, 64, 3, 2, 1), nn.GELU(),
        nn.Flatten(), nn.Linear(64 * side * side, dim))  # flattened, not pooled: positions matter
    text_proj = nn.Linear(dim, dim, bias=False)
    log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
    params = [*model.parameters(), *image_tower.parameters(), *text_proj.parameters(), log_scale]
    opt = torch.optim.AdamW(params, lr=args.text_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    batch = min(64, len(captions))

    def step_loss(idx):
        text = F.normalize(text_proj(model(input_ids=ids[idx]).pooler_output), dim=-1)
        image = F.normalize(image_tower(x[idx]), dim=-1)
        logits = log_scale.clamp(max=math.log(100.0)).exp() * text @ image.T
        target = torch.arange(len(idx))
        accuracy = (logits.argmax(dim=1) == target).float().mean().item()
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2, accuracy

    held = torch.arange(batch)
    model.train()
    with torch.no_grad():
        loss_before, acc_before = step_loss(held)
    for _ in tqdm(range(args.text_steps), desc="text encoder", disable=None):
        loss, _ = step_loss(torch.randperm(len(captions), generator=gen)[:batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        loss_after, acc_after = step_loss(held)
    print(f"models: text encoder aligned on {len(captions)} captioned images in {args.text_steps} steps: "
          f"loss {loss_before.item():.3f} -> {loss_after.item():.3f}, caption picked in a batch of {batch} "
          f"{acc_before:.0%} -> {acc_after:.0%}")
    return {"steps": args.text_steps, "pairs": len(captions), "batch": batch, "lr": args.text_lr,
            "loss_before": round(loss_before.item(), 4), "loss_after": round(loss_after.item(), 4),
            "batch_accuracy_before": acc_before, "batch_accuracy_after": acc_after}


def _heads(dim: int, head_dim: int = 32) -> int:
    """The most attention heads of about `head_dim` channels that divide `dim`."""
    return next(h for h in range(max(1, dim // head_dim), 0, -1) if dim % h == 0)


def build_clip(dest: Path, tokenizer, args) -> dict:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(args.seed + 1)
    width = 32
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(image_size=args.clip_image_size, patch_size=8, hidden_size=width,
                           intermediate_size=4 * width, num_hidden_layers=2, num_attention_heads=2),
        projection_dim=width)
    model = CLIPModel(config).eval()
    size = args.clip_image_size
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer)
    model.save_pretrained(dest, safe_serialization=True)
    processor.save_pretrained(dest)
    return {"image_size": size, "projection_dim": width, "parameters": _count(model)}


def build_captioner(dest: Path, tokenizer_dir: Path, args) -> dict:
    from tokenizers import processors
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, GenerationConfig,
                              LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    # `<image>` must match as a special token here, and padding only needs some id under a zero
    # attention mask, so this tokenizer pads with <|endoftext|> as stock CLIP tokenizers do.
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, split_special_tokens=False, pad_token=EOT)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B",
        special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.padding_side = "left"  # batched generation appends to the right end
    tok.model_max_length = 2048
    image_id = tok.convert_tokens_to_ids("<image>")

    image_size, patch = 32, 8
    num_patches = (image_size // patch) ** 2
    torch.manual_seed(args.seed + 2)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=32,
                                       intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_index=image_id, image_seq_length=num_patches,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        pad_token_id=tok.pad_token_id)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS position the "default" strategy drops
        chat_template=LLAVA_CHAT_TEMPLATE)
    model.save_pretrained(dest, safe_serialization=True)
    processor.save_pretrained(dest)
    sample = check_captioner(dest)
    return {"image_size": image_size, "image_tokens": num_patches, "parameters": _count(model),
            "sample_output": sample}


def check_captioner(path: Path, max_new_tokens: int = 4) -> str:
    """Run the caption stage's calls (chat template, processor, generate) once on a blank image."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path, use_fast=False)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (48, 40), (200, 30, 30))], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def _calibrate_batchnorm(net: nn.Module, images: list[str] | None, size: int, count: int = 32) -> None:
    """Set every BatchNorm's running statistics from one batch of world images (noise if none).

    A freshly initialised Inception has unit running statistics, so its activations grow layer by
    layer to ~1e10 and FIDs come out near 1e20. Statistics of real inputs keep every layer near unit
    scale, which gives FIDs in a readable range; the weights stay random (not comparable).
    """
    if images:
        batch = load_images(images, size, count, min_size=1)[0].float()
    else:
        batch = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1) * 255
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics exactly
    net.train()
    with torch.no_grad():
        net((batch - mean) / std)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1


def build_fid(dest: Path, args) -> dict:
    """A random-init Inception-v3 (seeded): a fixed feature map for smoke FID, not comparable."""
    from torchvision.models import inception_v3

    torch.manual_seed(args.seed + 3)
    net = inception_v3(weights=None, aux_logits=False, init_weights=True)
    _calibrate_batchnorm(net, getattr(args, "images", None), args.fid_input_size)
    net.eval()
    dest.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.contiguous() for k, v in net.state_dict().items()}, dest / "model.safetensors")
    config = {"kind": "torchvision_inception_v3", "feature_dim": 2048, "comparable": False,
              "input_size": args.fid_input_size, "seed": args.seed + 3}
    write_json(dest / "config.json", config)
    return {"kind": config["kind"], "feature_dim": 2048, "comparable": False, "parameters": _count(net)}


def build_detector(dest: Path, args) -> dict:
    write_json(dest / "config.json", {"kind": "shapes", "module": "microdit.data.shapes_detect"})
    return {"kind": "shapes"}


# --------------------------------------------------------------------------- smoke: the VAE

def build_vae(dest: Path, args) -> dict:
    """Train a small AutoencoderKL on the world's images; scaling_factor = 1 / std(latents)."""
    t0 = time.time()
    images, skipped = load_images(args.images, args.vae_res, args.vae_max_images)
    x = images.float() / 127.5 - 1
    held = x[: min(16, len(x))]  # a fixed batch to see the reconstruction error fall
    vae = new_vae(args.vae_channels, args.vae_res, args.seed)
    recon_before = recon_l1(vae, held)
    history = train_vae(vae, x, args)
    recon_after = recon_l1(vae, held)

    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # the official precompute scales latent_dist.sample(), so measure that
        latents = torch.cat([vae.encode(x[i:i + 64]).latent_dist.sample(generator=gen)
                             for i in range(0, min(len(x), 256), 64)])
    std = latents.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(dest, safe_serialization=True)

    grid, _ = load_images(args.images, args.vae_grid_res, 8, min_size=1)
    grid = grid.float() / 127.5 - 1
    grid_l1, grid_recon = recon_l1(vae, grid, keep=True)
    objects = colour_weight(grid, 1.0) > 1.25  # saturated pixels: the shapes, not the background
    object_l1 = (grid_recon - grid).abs().mean(dim=1, keepdim=True)[objects].mean().item()
    save_recon_grid(grid, grid_recon, dest / "recon.png")
    print(f"models: vae recon L1 {recon_before:.4f} -> {recon_after:.4f} after {args.vae_steps} steps "
          f"({len(x)} images at {args.vae_res} px); at {args.vae_grid_res} px {grid_l1:.4f}, "
          f"on object pixels {object_l1:.4f}; scaling_factor {1.0 / std:.4f}")
    return {"scaling_factor": 1.0 / std, "latent_std": std, "latent_channels": vae.config.latent_channels,
            "downsample_factor": 2 ** (len(args.vae_channels) - 1), "block_out_channels": list(args.vae_channels),
            "recon_l1_before": recon_before, "recon_l1_after": recon_after,
            "recon_grid": {"file": "recon.png", "resolution": args.vae_grid_res, "l1": grid_l1,
                           "object_l1": object_l1},
            "train": {"steps": args.vae_steps, "batch": args.vae_batch, "lr": args.vae_lr,
                      "kl_weight": args.vae_kl, "colour_weight": args.vae_colour_weight,
                      "resolution": args.vae_res, "images": len(x), "skipped": skipped,
                      "seconds": round(time.time() - t0, 1), "l1_history": history},
            "parameters": _count(vae)}


def new_vae(channels: list[int], sample_size: int, seed: int):
    """A small SD-style AutoencoderKL: 4 latent channels, downsampling 2^(len(channels)-1)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1, norm_num_groups=8, sample_size=sample_size)


def train_vae(vae, x: torch.Tensor, args) -> list[list]:
    """Adam, warmup then cosine to 0.1x; (L1 + L2) weighted towards object pixels, + a small KL.

    Returns [step, unweighted L1] every 25 steps.
    """
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(args.seed)
    steps = args.vae_steps
    warmup = max(1, steps // 20)
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))))
    history = []
    vae.train()
    bar = tqdm(range(steps), desc="vae", disable=None)
    for step in bar:
        batch = x[torch.randint(len(x), (args.vae_batch,), generator=gen)]
        flip = torch.rand(len(batch), generator=gen) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        posterior = vae.encode(batch).latent_dist
        err = vae.decode(posterior.sample(generator=gen)).sample - batch
        weight = colour_weight(batch, args.vae_colour_weight)
        loss = ((err.abs() + err ** 2) * weight).mean() / weight.mean() + args.vae_kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            l1 = err.abs().mean().item()
            history.append([step, round(l1, 5)])
            bar.set_postfix(l1=f"{l1:.4f}")
    vae.eval()
    return history


def colour_weight(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-pixel loss weight 1 + strength * saturation (x in [-1, 1]).

    Shapes-world images are mostly pale background; an unweighted loss is happy to get an object's
    hue wrong (yellow -> orange, purple -> blue), and object colours are exactly what the shapes
    detector and GenEval's colour tasks read from decoded samples.
    """
    saturation = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / 2
    return 1 + strength * saturation


@torch.no_grad()
def recon_l1(vae, x: torch.Tensor, keep: bool = False):
    """Mean |x - decode(encode(x).mode())| in [-1, 1] units (and the reconstructions if `keep`)."""
    was_training = vae.training
    vae.eval()
    recon = torch.cat([vae.decode(vae.encode(x[i:i + 16]).latent_dist.mode()).sample
                       for i in range(0, len(x), 16)]).clamp(-1, 1)
    vae.train(was_training)
    err = (recon - x).abs().mean().item()
    return (err, recon) if keep else err


def save_recon_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path) -> None:
    """Two rows: originals on top, their reconstructions below."""
    from PIL import Image

    rows = [torch.cat(list(t), dim=2) for t in (originals, recons)]
    grid = ((torch.cat(rows, dim=1) + 1) * 127.5).round().clamp(0, 255).byte()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- hub and local

MODEL_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "*.md", "LICENSE*"]
# the weight files from_pretrained reads by default (sharded or not); variants like *.fp16.* are not
STANDARD_WEIGHTS = re.compile(r"^(model|diffusion_pytorch_model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")


def weight_patterns(files: list[str]) -> list[str]:
    """The one weights format to fetch: the standard safetensors files, else the standard .bin."""
    top = [f for f in files if "/" not in f]
    for ext in (".safetensors", ".bin"):
        chosen = sorted(f for f in top if STANDARD_WEIGHTS.match(f) and f.endswith(ext))
        if chosen:
            return chosen
    return ["*.safetensors"]


def fetch_hub(role: str, src: Source, dest: Path) -> dict:
    """Snapshot `src` into `dest` (converting OpenCLIP text towers); returns MODEL_INFO facts."""
    if src.id == "cleanfid":
        return fetch_cleanfid(dest)
    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi().model_info(src.id, revision=src.revision)
        prefix = f"{src.subfolder}/" if src.subfolder else ""
        files = [s.rfilename[len(prefix):] for s in info.siblings if s.rfilename.startswith(prefix)]
        if not files:
            raise UserError(f"{role}: {src.id} has no files under {prefix or 'its root'}")
        download = dest / ".download"
        from microdit.zoo_convert import OPENCLIP_CONFIG, OPENCLIP_WEIGHTS

        openclip = role == "text_encoder" and OPENCLIP_CONFIG in files
        if openclip:
            weights = next(w for w in OPENCLIP_WEIGHTS if w in files)
            patterns = [OPENCLIP_CONFIG, weights, "vocab.json", "merges.txt"]
        else:
            patterns = MODEL_FILES + weight_patterns(files)
        snapshot_download(src.id, revision=info.sha, local_dir=download,
                          allow_patterns=[prefix + p for p in patterns])
    except UserError:
        raise
    except Exception as e:  # network, auth, missing repo: one line with the way out
        raise UserError(f"{role}: could not fetch {src.id} from the hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); pass --local {role}=/path/to/model_dir instead") from e
    root = download / prefix if prefix else download
    facts = {"revision": src.revision or "main", "commit": info.sha}
    if src.subfolder:
        facts["subfolder"] = src.subfolder
    if openclip:
        facts |= convert_openclip(role, root, dest, src.id)
    else:
        for entry in root.iterdir():
            if entry.name != ".cache":
                os.replace(entry, dest / entry.name)
    shutil.rmtree(download, ignore_errors=True)
    return facts


def convert_openclip(role: str, src_dir: Path, dest: Path, name: str) -> dict:
    from microdit.zoo_convert import convert_openclip_text_tower

    try:
        return convert_openclip_text_tower(src_dir, dest)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise UserError(f"{role}: cannot convert the OpenCLIP text tower of {name}: {e}") from e


def fetch_cleanfid(dest: Path) -> dict:
    """Download the Inception weights from the URL clean-fid itself uses."""
    import urllib.request

    from cleanfid.downloads_helper import inception_url

    target = dest / CLEANFID_WEIGHTS
    try:
        with urllib.request.urlopen(inception_url, timeout=60) as r, open(target, "wb") as f:
            shutil.copyfileobj(r, f)
    except Exception as e:
        raise UserError(f"fid: could not download {inception_url} ({type(e).__name__}: {e}); "
                        f"pass --local fid=/path/to/{CLEANFID_WEIGHTS} instead") from e
    return cleanfid_dir(dest, inception_url)


def cleanfid_dir(dest: Path, origin: str) -> dict:
    config = {"kind": "cleanfid_inception", "feature_dim": 2048, "comparable": True,
              "input_size": 299, "weights": CLEANFID_WEIGHTS}
    write_json(dest / "config.json", config)
    return {"origin": origin, "kind": config["kind"], "feature_dim": 2048, "comparable": True,
            "sha256": sha256_file(dest / CLEANFID_WEIGHTS)}


def validate_local(role: str, path: Path) -> str:
    """Check a local model dir is what `role` needs; returns how to bring it in.

    "copy" for an ordinary HF dir, "openclip" for an OpenCLIP text tower to convert, "cleanfid"
    for clean-fid's Inception weights file.
    """
    from microdit.zoo_convert import is_openclip_dir

    if not path.exists():
        raise UserError(f"--local {role}={path}: no such file or directory")
    if role == "fid" and (path.is_file() or (path / CLEANFID_WEIGHTS).is_file()):
        return "cleanfid"
    if role == "text_encoder" and path.is_dir() and is_openclip_dir(path):
        return "openclip"
    if not (path / "config.json").is_file():
        raise UserError(f"--local {role}={path}: no config.json there; give an HF-format model directory")
    try:
        config = read_json(path / "config.json")
        if role in ("fid", "detector") and "kind" in config:
            return "copy"
        if role == "vae":
            from diffusers import AutoencoderKL

            AutoencoderKL.load_config(path)
        else:
            from transformers import AutoConfig

            model_type = AutoConfig.from_pretrained(path).model_type
            expected = {"text_encoder": ("clip", "clip_text_model"), "captioner": ("llava",), "clip": ("clip",)}
            if role in expected and model_type not in expected[role]:
                raise UserError(f"--local {role}={path}: config is a {model_type!r} model, "
                                f"expected {' or '.join(expected[role])}")
            if role == "text_encoder" and not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json")):
                raise UserError(f"--local {role}={path}: no tokenizer files beside the model")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"--local {role}={path}: config.json does not load ({type(e).__name__}: {e})") from e
    if not any(f.suffix in (".safetensors", ".bin") for f in path.iterdir()):
        raise UserError(f"--local {role}={path}: no .safetensors/.bin weights in it")
    return "copy"


def bring_local(role: str, src: Source, dest: Path, link: bool) -> dict:
    path = Path(src.id)
    how = validate_local(role, path)
    facts: dict = {"linked": link and how == "copy"}
    if how == "openclip":
        return facts | convert_openclip(role, path, dest, str(path))
    if how == "cleanfid":
        weights = path if path.is_file() else path / CLEANFID_WEIGHTS
        shutil.copy2(weights, dest / CLEANFID_WEIGHTS)
        return facts | cleanfid_dir(dest, str(weights))
    for entry in path.iterdir():
        if entry.name in (INFO_FILE, ".cache"):
            continue
        if link:
            (dest / entry.name).symlink_to(entry.resolve())
        elif entry.is_dir():
            shutil.copytree(entry, dest / entry.name, symlinks=False)
        else:
            shutil.copy2(entry, dest / entry.name)
    if (path / INFO_FILE).is_file():
        facts["origin"] = read_json(path / INFO_FILE)
    return facts


# --------------------------------------------------------------------------- FID feature extractor

class FidFeatures(nn.Module):
    """Images (uint8, or float in [0, 255], N x 3 x H x W) -> (N, feature_dim) float32 features.

    Resizes to the network's input size when needed (clean-fid hands over 299 px already) and
    applies the network's own input normalisation, so clean-fid can use it as a custom extractor.
    """

    def __init__(self, net: nn.Module, input_size: int, mean: float | list, std: float | list, feature_dim: int):
        super().__init__()
        self.net, self.input_size, self.feature_dim = net, input_size, feature_dim
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.device, torch.float32)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return self.net((x - self.mean) / self.std).reshape(len(x), self.feature_dim).float()


def load_fid_extractor(path: str | os.PathLike, device: str | torch.device = "cpu") -> FidFeatures:
    """The FID feature extractor in `<models>/fid` (either kind), in eval mode on `device`."""
    path = Path(path)
    config = read_json(path / "config.json")
    kind = config.get("kind")
    if kind == "torchvision_inception_v3":
        from safetensors.torch import load_file
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        net.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        net.fc = nn.Identity()  # the 2048-d pooled features, as FID uses
        imagenet_mean, imagenet_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        extractor = FidFeatures(net, int(config.get("input_size", 299)), [255 * m for m in imagenet_mean],
                                [255 * s for s in imagenet_std], int(config["feature_dim"]))
    elif kind == "cleanfid_inception":
        import warnings

        with warnings.catch_warnings():  # clean-fid ships TorchScript; there is no other format to load
            warnings.simplefilter("ignore", FutureWarning)
            base = torch.jit.load(str(path / config.get("weights", CLEANFID_WEIGHTS)), map_location="cpu")
        # clean-fid's "clean" mode: pixel values (x - 128) / 128 into the scripted Inception layers
        extractor = FidFeatures(base.layers, 299, 128.0, 128.0, 2048)
    else:
        raise UserError(f"{path}/config.json: unknown FID extractor kind {kind!r}")
    return extractor.eval().requires_grad_(False).to(device)


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
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("built (smoke) models")
    g.add_argument("--captions", nargs="+", action="extend", default=[],
                   help="world parquet files (caption column) or .txt files, for the tokenizer")
    g.add_argument("--images", nargs="+", action="extend", default=[],
                   help="world parquet files (url column) or image dirs, for the VAE (default: --captions)")
    g.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary upper bound")
    g.add_argument("--text-dim", type=int, default=64, help="text encoder hidden size = caption embedding D")
    g.add_argument("--text-layers", type=int, default=2)
    g.add_argument("--text-steps", type=int, default=300,
                   help="contrastive warm-up steps of the text encoder on the captioned images (0: random)")
    g.add_argument("--text-lr", type=float, default=1e-3)
    g.add_argument("--text-image-res", type=int, default=64, help="image side for the warm-up (multiple of 16)")
    g.add_argument("--vae-steps", type=int, default=500)
    g.add_argument("--vae-res", "--vae-resolution", dest="vae_res", type=int, default=64)
    g.add_argument("--vae-batch", "--vae-batch-size", dest="vae_batch", type=int, default=16)
    g.add_argument("--vae-lr", type=float, default=2e-3)
    g.add_argument("--vae-kl", type=float, default=1e-6, help="KL weight")
    g.add_argument("--vae-colour-weight", type=float, default=9.0,
                   help="extra loss weight on saturated (object) pixels, see colour_weight")
    g.add_argument("--vae-channels", type=int, nargs="+", default=[32, 32, 64, 64],
                   help="block_out_channels; the downsampling factor is 2^(len-1)")
    g.add_argument("--vae-max-images", type=int, default=512)
    g.add_argument("--vae-grid-res", type=int, default=128, help="resolution of the recon.png grid")
    g.add_argument("--clip-image-size", type=int, default=64)
    g.add_argument("--fid-input-size", type=int, default=299, help="smoke Inception input size")


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


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
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
    if set(built) & {"text_encoder", "captioner", "clip"} and not args.captions:
        raise UserError("smoke text models need --captions <root>/world/<source>.parquet ... to train the tokenizer")
    if "vae" in built and not args.images:
        raise UserError("the smoke VAE needs --images (or --captions) <root>/world/<source>.parquet to train on")

    with tempfile.TemporaryDirectory(prefix="microdit-tokenizer-") as scratch:
        tokenizer = None
        if set(built) & {"text_encoder", "captioner", "clip"}:
            captions = read_captions(args.captions)
            tokenizer = train_caption_tokenizer(captions, args.vocab_size, Path(scratch) / "bpe")
            tokenizer.save_pretrained(Path(scratch) / "tokenizer")
            print(f"models: tokenizer trained on {len(captions)} captions, {len(tokenizer)} tokens")
        for role in todo:
            src = plan[role]
            remove_stale_staging(out, role)
            t0 = time.time()
            with staged_dir(out / role) as dest:
                if src.kind == "local":
                    facts = bring_local(role, src, dest, args.link)
                elif src.kind == "hub":
                    facts = fetch_hub(role, src, dest)
                elif role == "text_encoder":
                    facts = build_text_encoder(dest, tokenizer, args)
                elif role == "captioner":
                    facts = build_captioner(dest, Path(scratch) / "tokenizer", args)
                elif role == "clip":
                    facts = build_clip(dest, tokenizer, args)
                else:
                    facts = {"vae": build_vae, "fid": build_fid, "detector": build_detector}[role](dest, args)
                facts = describe(role, dest) | facts
                info = {"role": role, "source": src.kind, "id": src.id, "preset": args.preset,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **facts}
                write_json(dest / INFO_FILE, info)
            extra = f", D={facts['hidden_size']}" if role == "text_encoder" else ""
            print(f"models: {role} {src.kind} {src.id} ready in {time.time() - t0:.1f}s{extra}")
    return 0
