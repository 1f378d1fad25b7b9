"""Local roles of `microdit models` (`--local role=DIR`): a model on disk, checked and brought in.

An ordinary HF-format directory is copied (or symlinked with --link); an OpenCLIP text tower is
converted (openclip.py); clean-fid's Inception weights file becomes an fid model dir.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from microdit.errors import UserError
from microdit.io import read_json
from microdit.metrics.fid_extractor import CLEANFID_WEIGHTS
from microdit.zoo.hub import cleanfid_dir
from microdit.zoo.openclip import convert_openclip, is_openclip_dir
from microdit.zoo.plan import INFO_FILE, Source


def validate_local(role: str, path: Path) -> str:
    """Check a local model dir is what `role` needs; returns how to bring it in.

    "copy" for an ordinary HF dir, "openclip" for an OpenCLIP text tower to convert, "cleanfid"
    for clean-fid's Inception weights file.
    """
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
    """Fill `dest` from the local `src` (see `validate_local`); returns MODEL_INFO facts."""
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
