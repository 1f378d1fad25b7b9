"""Weight files, below the model: reproducible .safetensors, state dicts out of any checkpoint layout,
strict key and shape checks, and the model directory every MicroDiT is saved as.

A model directory is `config.json` (the architecture name and constructor overrides),
`model.safetensors` (the state dict) and, for a trained stage, `ema.safetensors` (the EMA weights
of the same model). Nothing here knows a model class: `read_model_dir` is handed the builder, so
`microdit.models` can use this module for `MicroDiT.save_pretrained` / `from_pretrained` while
`microdit.checkpoint` (the stage directory around it, and the public loaders) builds on both.
"""
from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from microdit.errors import UserError
from microdit.io import atomic_path, read_json, write_json

CONFIG_FILE, MODEL_FILE, EMA_FILE = "config.json", "model.safetensors", "ema.safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# A key every MicroDiT state dict has; whatever precedes it is the DiT's prefix in a bigger dict.
ANCHOR_KEY = "x_embedder.proj.weight"
# Where training frameworks nest the weights, in the order we look (training weights before EMA).
WRAPPER_KEYS = ("state", "model", "state_dict", "module", "ema", "ema_state_dict")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit the model (one line, names the key)."""


# ---- writing ---------------------------------------------------------------------------------

def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file atomically, with the modes the umask gives, byte-identical for identical
    tensors and metadata: safetensors writes its metadata in a per-process random order (and 0600)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_safetensors_metadata(tmp)


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite the header in place with `__metadata__` in key order (same length: only the order moves)."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        header = {"__metadata__": header.pop("__metadata__"), **header}  # the tensors keep their order
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # cannot happen for a compact header; leave the valid file as it is
            return
        f.seek(8)
        f.write(text.ljust(size, b" "))  # safetensors pads its header with spaces


def write_model_dir(directory: str | os.PathLike, config: dict, state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor] | None = None) -> None:
    """`config.json` + `model.safetensors` (+ `ema.safetensors`), each file atomically, the config last:
    its presence marks a complete directory."""
    directory = Path(directory)
    meta = {"format": "pt", "architecture": str(config["architecture"])}
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.contiguous() for k, v in state.items()}, directory / MODEL_FILE, metadata=meta)
    if ema_state is not None:
        save_safetensors({k: v.contiguous() for k, v in ema_state.items()}, directory / EMA_FILE, metadata=meta)
    write_json(directory / CONFIG_FILE, config)


# ---- reading ---------------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike, which: str | None = None) -> dict[str, torch.Tensor]:
    """The DiT state dict (prefix stripped) held by a checkpoint file or a model directory.

    `which` picks a nested entry explicitly, dot-separated (e.g. "ema" or "state.model").
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        loader = lambda: load_file(str(path))  # noqa: E731
    elif path.suffix in TORCH_SUFFIXES:
        loader = lambda: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format; expected .safetensors or one of {', '.join(TORCH_SUFFIXES)}")
    try:
        obj = loader()
    except pickle.UnpicklingError as e:  # weights_only refuses arbitrary pickled objects
        raise CheckpointError(
            f"{path}: cannot read checkpoint: it holds pickled Python objects, which are not loaded for safety; "
            "in a trusted session save just its state dict (e.g. torch.save(ckpt['state']['model'], 'dit.pt'))"
        ) from e
    except Exception as e:  # corrupt or truncated
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: cannot read checkpoint: {reason}") from e
    return extract_dit_state(obj, source=str(path), which=which)


def extract_dit_state(obj: Any, source: str = "checkpoint", which: str | None = None) -> dict[str, torch.Tensor]:
    """Find the DiT weights inside a loaded checkpoint object and strip their key prefix."""
    if which:
        for part in which.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                raise CheckpointError(f"{source}: no entry '{which}' in the checkpoint")
            obj = obj[part]
    while not _holds_dit(obj):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            top = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{source}: no MicroDiT weights found (no key ending in '{ANCHOR_KEY}'; top level: {top})")
        obj = inner

    prefixes = sorted({k[: -len(ANCHOR_KEY)] for k in obj if isinstance(k, str) and k.endswith(ANCHOR_KEY)})
    prefix = prefixes[0] if len(prefixes) == 1 else next((p for p in ("", "dit.") if p in prefixes), None)
    if prefix is None:
        raise CheckpointError(f"{source}: several DiT copies under prefixes {prefixes}; pick one with which=")
    return {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}


def _holds_dit(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(
        isinstance(k, str) and k.endswith(ANCHOR_KEY) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def check_state_dict(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint", ignore: tuple[str, ...] = ()
) -> None:
    """Raise CheckpointError naming the first missing key, unexpected key or shape mismatch."""
    expected = model.state_dict()
    hint = "is the model built with the same size, in_channels and caption_channels?"

    def fail(problem: str, keys: list[str]) -> None:
        more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
        raise CheckpointError(f"{source}: {problem} '{keys[0]}'{more}; {hint}")

    missing = [k for k in expected if k not in state and k not in ignore]
    if missing:
        fail("missing key", missing)
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        fail("unexpected key", unexpected)
    wrong = [k for k, v in expected.items() if k not in ignore and tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        key = wrong[0]
        more = f" (and {len(wrong) - 1} more keys differ in shape)" if len(wrong) > 1 else ""
        why = "; from another resolution? load it with load_previous_stage" if key == "pos_embed" else f"; {hint}"
        raise CheckpointError(
            f"{source}: key '{key}' has shape {tuple(state[key].shape)} in the checkpoint "
            f"but {tuple(expected[key].shape)} in the model{more}{why}"
        )


def read_model_dir(directory: str | os.PathLike, build: Callable[[dict], torch.nn.Module],
                   ema: bool = False) -> torch.nn.Module:
    """The model a model directory holds, on the CPU: `build(config)` (on the meta device, no point
    initialising weights we are about to overwrite) with the directory's weights, then its EMA
    weights when `ema`. Every key and shape must match."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; expected a directory written by save_pretrained")
    try:
        with torch.device("meta"):
            model = build(read_json(config_path))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: invalid model config: {e}") from e
    state = read_state_dict(directory / MODEL_FILE)
    check_state_dict(model, state, source=str(directory / MODEL_FILE))
    model.load_state_dict(state, strict=True, assign=True)
    if ema:
        path = directory / EMA_FILE
        if not path.is_file():
            raise CheckpointError(f"{directory}: no {EMA_FILE}; the stage ran without EMA, load it with ema=False")
        state = read_state_dict(path)
        check_state_dict(model, state, source=str(path))
        model.load_state_dict(state, strict=True)
    return model
