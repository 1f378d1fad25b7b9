"""MicroDiT weights on disk: released checkpoints, our own model directories, stage hand-overs.

* `save_pretrained(model, dir)` / `from_pretrained(dir)`: a directory with `config.json` (the
  architecture name and constructor overrides) and `model.safetensors` (the state dict).
* `load_released_checkpoint(model, path)`: the released `.pt` files (a bare DiT state dict),
  whole-pipeline state dicts whose DiT keys start with `dit.`, composer checkpoints
  (`state.model`), dicts wrapping a state dict under `state_dict` / `model` / `ema`, and
  `.safetensors` files. Keys and shapes must match exactly; the first mismatch is reported by name.
* `load_previous_stage(model, path)`: the same, but the model keeps its own `pos_embed`, so
  256 px weights load into a 512 px model (the sincos table is recomputed, never learned).
"""
from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from microdit.cli import UserError
from microdit.io import atomic_path, read_json, write_json
from microdit.models import MicroDiT, model_from_config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# A key every MicroDiT state dict has; whatever precedes it is the DiT's prefix in a bigger dict.
ANCHOR_KEY = "x_embedder.proj.weight"
# Where training frameworks nest the weights, in the order we look (training weights before EMA).
WRAPPER_KEYS = ("state", "model", "state_dict", "module", "ema", "ema_state_dict")


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


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit the model (one line, names the key)."""


# ---- reading ---------------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike, which: str | None = None) -> dict[str, torch.Tensor]:
    """The DiT state dict (prefix stripped) held by a checkpoint file or a `save_pretrained` directory.

    `which` picks a nested entry explicitly, dot-separated (e.g. "ema" or "state.model").
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
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


def load_released_checkpoint(model: torch.nn.Module, path: str | os.PathLike, which: str | None = None) -> torch.nn.Module:
    """Load DiT weights from `path` into `model` strictly (every key, every shape); returns the model."""
    state = read_state_dict(path, which)
    check_state_dict(model, state, source=str(path))
    model.load_state_dict(state, strict=True)
    return model


def load_previous_stage(model: torch.nn.Module, path: str | os.PathLike, which: str | None = None) -> torch.nn.Module:
    """Load an earlier training stage's weights, keeping `model`'s own position embedding.

    For the 256 px -> 512 px hand-over: `pos_embed` is a fixed sincos table recomputed for the new
    grid (with its `pos_interp_scale`), so only it may differ; every other key and shape must match.
    """
    state = read_state_dict(path, which)
    state.pop("pos_embed", None)
    check_state_dict(model, state, source=str(path), ignore=("pos_embed",))
    result = model.load_state_dict(state, strict=False)
    assert list(result.missing_keys) == ["pos_embed"] and not result.unexpected_keys, result
    return model


# ---- our own model directories ------------------------------------------------------------------

def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DDP keeps the model in `.module`, torch.compile in `._orig_mod`.
    while isinstance(getattr(model, "module", None), torch.nn.Module) or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write `config.json` and `model.safetensors` into `directory` (each file atomically)."""
    model = _unwrap(model)
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "architecture" not in config:
        raise ValueError("model has no `config` naming its architecture; build it with microdit.models")
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "architecture": str(config["architecture"])}
    save_safetensors(state, directory / WEIGHTS_NAME, metadata=meta)
    write_json(directory / CONFIG_NAME, config)  # written last: its presence marks a complete save
    return directory


def from_pretrained(
    directory: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> MicroDiT:
    """Rebuild the exact architecture saved by `save_pretrained` and load its weights."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; expected a directory written by save_pretrained")
    try:
        with torch.device("meta"):  # no point initialising weights we are about to overwrite
            model = model_from_config(read_json(config_path))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: invalid model config: {e}") from e
    state = read_state_dict(directory / WEIGHTS_NAME)
    check_state_dict(model, state, source=str(directory / WEIGHTS_NAME))
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)
