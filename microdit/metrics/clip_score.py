"""CLIP score: 100 x max(cosine(image embedding, caption embedding), 0), averaged over pairs.

Any transformers `CLIPModel` + `CLIPProcessor` directory works; the paper preset uses a large
public CLIP (ViT-L/14) and the result records which model scored it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image


def load_clip(model_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """(CLIPModel in eval mode on `device`, CLIPProcessor, the model's name for the record)."""
    from transformers import CLIPModel, CLIPProcessor

    from microdit.errors import UserError

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"no CLIP model at {model_dir}: config.json missing; run `microdit models` first")
    model = CLIPModel.from_pretrained(model_dir).to(device).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    return model, processor, model_name(model_dir)


def model_name(model_dir: Path) -> str:
    """The hub id from MODEL_INFO.json when the models stage wrote one, else the directory name."""
    info = model_dir / "MODEL_INFO.json"
    if info.is_file():
        meta = json.loads(info.read_text())
        if meta.get("id"):
            return str(meta["id"]) + (f"@{meta['revision']}" if meta.get("revision") else "")
    return model_dir.name


def clip_similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per-pair 100 x max(cos, 0): row i of one against row i of the other."""
    cos = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return 100 * cos.clamp(min=0)


@torch.no_grad()
def embed_pairs(model, processor, images: list[Image.Image], captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected CLIP embeddings (image, caption) for one batch; captions cut at the model's length."""
    device = next(model.parameters()).device
    max_length = model.config.text_config.max_position_embeddings
    inputs = processor(
        text=captions, images=images, return_tensors="pt", padding=True, truncation=True, max_length=max_length
    )
    image_embeds = model.get_image_features(pixel_values=inputs["pixel_values"].to(device))
    text_embeds = model.get_text_features(
        input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
    )
    return image_embeds, text_embeds


def _open(image) -> Image.Image | None:
    """RGB image, or None when the file cannot be read (skipped and counted by the caller)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as f:
            return f.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        return None


def clip_score(
    images: Sequence[Image.Image | str | os.PathLike],
    captions: Sequence[str],
    model_dir: str | os.PathLike,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    bootstrap: int = 0,
    seed: int = 0,
) -> dict:
    """Mean CLIP score of image i against caption i: `{"clip_score", "n", "skipped", "model"}`, and
    with `bootstrap` draws its 95% bootstrap interval over the pairs (`interval`).

    Unreadable image files are left out of the mean and counted in `skipped`.
    """
    from tqdm import tqdm

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("CLIP score of an empty set")
    model, processor, name = load_clip(model_dir, device)
    total, n, each = 0.0, 0, []
    for start in tqdm(range(0, len(images), batch_size), desc="CLIP score", disable=None):
        opened = [(_open(x), c) for x, c in zip(images[start : start + batch_size], captions[start : start + batch_size])]
        pairs = [(x, c) for x, c in opened if x is not None]
        if pairs:
            batch, texts = zip(*pairs)
            image_embeds, text_embeds = embed_pairs(model, processor, list(batch), list(texts))
            scores = clip_similarity(image_embeds, text_embeds)
            total += scores.sum().item()
            each += scores.tolist()
            n += len(pairs)
    if n == 0:
        raise ValueError(f"none of the {len(images)} images could be read")
    result = {"clip_score": total / n, "n": n, "skipped": len(images) - n, "model": name}
    if bootstrap:
        from microdit.metrics.intervals import bootstrap_mean

        result["interval"] = bootstrap_mean(each, bootstrap, seed)
    return result
