"""OpenCLIP text tower -> transformers `CLIPTextModel` + `CLIPTokenizerFast`.

The paper's text encoder, DFN5B-CLIP-ViT-H-14-378, was run by the official precompute through
OpenCLIP: token + position embedding, the causal transformer, the final LayerNorm, and all 77
positions kept as the caption embedding. `CLIPTextModel.last_hidden_state` is the same function
once the weights are renamed and OpenCLIP's fused q/k/v projection is split in three, so every
later stage can load the encoder with `from_pretrained` like any other model.

One detail decides whether the embeddings match: OpenCLIP pads token ids with 0, while a stock
`CLIPTokenizer` pads with <|endoftext|>. The encoder is causal, so the outputs at padded positions
depend on the pad id, and the DiT was trained on all 77 of them. The converted tokenizer therefore
pads with the token whose id is the OpenCLIP `pad_id` (0, the vocabulary's "!"). One known
difference remains: OpenCLIP also runs ftfy and HTML unescaping on the text, the fast tokenizer
does not, so captions with mojibake or HTML entities (&amp;) may tokenize differently.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from microdit.errors import UserError

OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

# OpenCLIP text options this converter maps (pooling/projection only shape the pooled vector, which
# the caption embedding does not use); anything else truthy changes the architecture or tokenizer.
_SUPPORTED_TEXT_OPTIONS = {
    "context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pad_id", "eos_id",
    "pool_type", "proj_type", "proj_bias", "output_tokens",
}


def is_openclip_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / OPENCLIP_CONFIG).is_file() and any((path / w).is_file() for w in OPENCLIP_WEIGHTS)


def text_config_from_openclip(open_clip_cfg: dict):
    """The `CLIPTextConfig` describing the text tower of an OpenCLIP model config."""
    from transformers import CLIPTextConfig

    model_cfg = open_clip_cfg.get("model_cfg", open_clip_cfg)
    text = dict(model_cfg["text_cfg"])
    unsupported = sorted(k for k, v in text.items() if k not in _SUPPORTED_TEXT_OPTIONS and v)
    if unsupported:
        raise ValueError(f"OpenCLIP text options not supported by the CLIPTextModel converter: {unsupported}")
    width = int(text["width"])
    return CLIPTextConfig(
        vocab_size=int(text.get("vocab_size", 49408)),
        hidden_size=width,
        intermediate_size=int(width * float(text.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(text["layers"]),
        num_attention_heads=int(text["heads"]),
        max_position_embeddings=int(text.get("context_length", 77)),
        projection_dim=int(model_cfg.get("embed_dim", width)),
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu",
        layer_norm_eps=1e-5,  # torch.nn.LayerNorm's default, which OpenCLIP uses
    )


def convert_text_state_dict(openclip_sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Rename (and split) the text-tower tensors of an OpenCLIP state dict to CLIPTextModel keys.

    Accepts both layouts OpenCLIP writes: text tower at the top level (`CLIP`) or under `text.`
    (`CustomTextCLIP`). Vision, projection and logit-scale tensors are ignored; any other text
    tensor left unmapped is an error, so an architecture we do not know cannot load silently wrong.
    """
    prefix = "text." if "text.token_embedding.weight" in openclip_sd else ""
    sd = {k[len(prefix):]: v for k, v in openclip_sd.items() if k.startswith(prefix) and not k.startswith("visual.")}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str) -> torch.Tensor:
        if src not in sd:
            raise KeyError(f"OpenCLIP state dict has no '{prefix}{src}'")
        used.add(src)
        return sd[src]

    emb = "text_model.embeddings."
    out[emb + "token_embedding.weight"] = take("token_embedding.weight")
    out[emb + "position_embedding.weight"] = take("positional_embedding")
    for i in range(num_layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = take(f"{src}attn.in_proj_{kind}").chunk(3, dim=0)
            out[f"{dst}self_attn.q_proj.{kind}"] = q
            out[f"{dst}self_attn.k_proj.{kind}"] = k
            out[f"{dst}self_attn.v_proj.{kind}"] = v
            out[f"{dst}self_attn.out_proj.{kind}"] = take(f"{src}attn.out_proj.{kind}")
            out[f"{dst}layer_norm1.{kind}"] = take(f"{src}ln_1.{kind}")
            out[f"{dst}layer_norm2.{kind}"] = take(f"{src}ln_2.{kind}")
            out[f"{dst}mlp.fc1.{kind}"] = take(f"{src}mlp.c_fc.{kind}")
            out[f"{dst}mlp.fc2.{kind}"] = take(f"{src}mlp.c_proj.{kind}")
    for kind in ("weight", "bias"):
        out[f"text_model.final_layer_norm.{kind}"] = take(f"ln_final.{kind}")

    ignored = {"text_projection", "logit_scale", "logit_bias", "attn_mask"}
    left = sorted(k for k in sd if k not in used and k not in ignored and not k.startswith("visual."))
    if left:
        raise ValueError(f"unmapped OpenCLIP text tensors (unsupported architecture): {left[:5]}")
    return {k: v.contiguous() for k, v in out.items()}


def build_clip_tokenizer(vocab_file: str | os.PathLike, merges_file: str | os.PathLike,
                         pad_id: int = 0, max_length: int = 77):
    """A `CLIPTokenizerFast` over CLIP BPE files that pads with `pad_id`, as OpenCLIP does."""
    from transformers import CLIPTokenizerFast

    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    id_to_token = {i: t for t, i in vocab.items()}
    if pad_id not in id_to_token:
        raise ValueError(f"pad id {pad_id} is not in {vocab_file}")
    # split_special_tokens: the pad symbol (id 0 is "!") must still tokenize as ordinary text
    # where it occurs in a caption, as it does in OpenCLIP; only padding emits it as id 0.
    tok = CLIPTokenizerFast(vocab_file=str(vocab_file), merges_file=str(merges_file),
                            pad_token=id_to_token[pad_id], model_max_length=max_length,
                            split_special_tokens=True)
    tok.padding_side = "right"
    return tok


def load_openclip_state_dict(src_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    src_dir = Path(src_dir)
    for name in OPENCLIP_WEIGHTS:
        path = src_dir / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(str(path))
        try:  # mmap keeps a multi-GB checkpoint out of RAM; pre-zipfile pickles cannot be mapped
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        return sd.get("state_dict", sd)
    raise FileNotFoundError(f"no OpenCLIP weights ({' or '.join(OPENCLIP_WEIGHTS)}) in {src_dir}")


def convert_openclip_text_tower(src_dir: str | os.PathLike, out_dir: str | os.PathLike,
                                vocab_file: str | os.PathLike | None = None,
                                merges_file: str | os.PathLike | None = None) -> dict:
    """Write `CLIPTextModel` + tokenizer converted from the OpenCLIP checkpoint in `src_dir`.

    `src_dir` holds `open_clip_config.json`, the OpenCLIP weights and (unless given explicitly)
    the CLIP BPE files `vocab.json` + `merges.txt`. Returns facts for MODEL_INFO.json.
    """
    from transformers import CLIPTextModel

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    open_clip_cfg = json.loads((src_dir / OPENCLIP_CONFIG).read_text())
    config = text_config_from_openclip(open_clip_cfg)
    text_cfg = open_clip_cfg.get("model_cfg", open_clip_cfg)["text_cfg"]
    vocab_file = Path(vocab_file or src_dir / "vocab.json")
    merges_file = Path(merges_file or src_dir / "merges.txt")
    for f in (vocab_file, merges_file):
        if not f.is_file():
            raise FileNotFoundError(f"CLIP tokenizer file missing: {f}")
    tokenizer = build_clip_tokenizer(vocab_file, merges_file, pad_id=int(text_cfg.get("pad_id", 0)),
                                     max_length=config.max_position_embeddings)
    if len(tokenizer) != config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the OpenCLIP text tower {config.vocab_size}")
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id

    state = convert_text_state_dict(load_openclip_state_dict(src_dir), config.num_hidden_layers)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "converted_from": "open_clip",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_act": config.hidden_act,
        "max_length": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "pad_token_id": tokenizer.pad_token_id,
        "parameters": sum(t.numel() for t in state.values()),
    }


def convert_openclip(role: str, src_dir: Path, dest: Path, name: str) -> dict:
    """`convert_openclip_text_tower` for `microdit models`: a checkpoint it cannot map is one line."""
    try:
        return convert_openclip_text_tower(src_dir, dest)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise UserError(f"{role}: cannot convert the OpenCLIP text tower of {name}: {e}") from e
