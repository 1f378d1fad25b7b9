"""Caption embeddings for the DiT: a CLIP text tower's last hidden state at all 77 positions.

The paper encodes captions with the text tower of DFN5B-CLIP-ViT-H-14-378 (77 tokens x 1024).
Its embeddings are the final-LayerNorm output of every position, padded to 77 tokens, with no
attention mask beyond CLIP's causal one; transformers' `CLIPTextModel.last_hidden_state` is that
same tensor. Any HF-format directory (or hub id) holding a CLIP text model and its tokenizer works;
the smoke preset uses a tiny one built locally.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

CONTEXT_LENGTH = 77


class TextEncoder:
    """Tokenizer + frozen CLIP text model mapping prompts to (N, 77, D) embeddings."""

    def __init__(self, tokenizer, model: torch.nn.Module, max_length: int = CONTEXT_LENGTH):
        if tokenizer.pad_token is None:
            raise ValueError("the text encoder's tokenizer has no pad token; captions cannot be padded to a fixed length")
        n_pos = getattr(model.config, "max_position_embeddings", max_length)
        if n_pos < max_length:
            raise ValueError(f"text model has {n_pos} positions but captions are padded to {max_length} tokens")
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        max_length: int = CONTEXT_LENGTH,
    ) -> "TextEncoder":
        """Load from an HF-format directory (tokenizer files beside the model, or in the
        `tokenizer/` and `text_encoder/` subfolders of a diffusers pipeline) or a hub id."""
        from transformers import AutoTokenizer, CLIPTextModel

        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        tok_dir = model_dir = str(path)
        if _is_local(path):
            root = Path(path)
            tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
            model_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
            if not (model_dir / "config.json").is_file():
                raise FileNotFoundError(f"{root}: no config.json; expected an HF-format text encoder directory")
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        # cast after loading: the dtype keyword of from_pretrained changed name across versions
        model = CLIPTextModel.from_pretrained(model_dir).to(device=device, dtype=dtype)
        return cls(tokenizer, model, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (N, max_length): begin/end tokens, truncated, padded with the pad token."""
        if isinstance(prompts, str):
            raise TypeError("tokenize expects a list of prompts, not a single string")
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Caption embeddings (N, max_length, D) in the model's dtype, on its device."""
        ids = self.tokenize(prompts).to(self.device)
        return self.model(input_ids=ids).last_hidden_state

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextEncoder":
        self.model.to(device=device, dtype=dtype)
        return self


def _is_local(path: str | os.PathLike) -> bool:
    """A path on disk rather than a hub id ("org/name")."""
    p = str(path)
    return Path(p).exists() or os.path.isabs(p) or p.startswith(".") or p.count("/") != 1
