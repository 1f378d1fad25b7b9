"""The smoke builders of `microdit models`: tiny models made here, offline, in a minute on a CPU.

A CLIP BPE tokenizer trained on the world's captions; a CLIPTextModel (its hidden size is the
caption embedding width D the DiT sees) warmed up contrastively on the captioned images; a random
LLaVA and a random CLIPModel with their processors; a random Inception-v3 for FID, its BatchNorm
statistics set from the world (numbers not comparable with the paper's); the exact shapes
detector. The VAE is in smoke_vae.py. Each builder registers itself for its role (plan.builder).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from microdit.weights import save_safetensors
from microdit.io import write_json
from microdit.zoo.inputs import load_images, load_pairs
from microdit.zoo.openclip import build_clip_tokenizer
from microdit.zoo.plan import builder

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

@builder("text_encoder", "tokenizer")
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
            "num_hidden_layers": args.text_layers, "parameters": count_parameters(model), "alignment": alignment}


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


@builder("clip", "tokenizer")
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
    return {"image_size": size, "projection_dim": width, "parameters": count_parameters(model)}


@builder("captioner", "tokenizer_dir")
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
    return {"image_size": image_size, "image_tokens": num_patches, "parameters": count_parameters(model),
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


@builder("fid")
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
    return {"kind": config["kind"], "feature_dim": 2048, "comparable": False, "parameters": count_parameters(net)}


@builder("detector")
def build_detector(dest: Path, args) -> dict:
    write_json(dest / "config.json", {"kind": "shapes", "module": "microdit.data.shapes_detect"})
    return {"kind": "shapes"}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
