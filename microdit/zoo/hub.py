"""Hub roles of `microdit models`: a snapshot of `repo_id[@revision][:subfolder]`, or clean-fid's
Inception weights.

Only the files `from_pretrained` reads are fetched (configs, tokenizer files and one weights
format), pinned to the commit the revision resolved to; an OpenCLIP text tower is converted on
the way in (openclip.py).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from microdit.errors import UserError
from microdit.io import sha256_file, write_json
from microdit.metrics.fid_extractor import CLEANFID_WEIGHTS
from microdit.zoo.openclip import OPENCLIP_CONFIG, OPENCLIP_WEIGHTS, convert_openclip
from microdit.zoo.plan import Source

MODEL_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "*.md", "LICENSE*"]
# the weight files from_pretrained reads by default (sharded or not); variants like *.fp16.* are not
STANDARD_WEIGHTS = re.compile(r"^(model|diffusion_pytorch_model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


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
    """Make `dest`, which holds clean-fid's weights file, an fid model dir; returns MODEL_INFO facts."""
    config = {"kind": "cleanfid_inception", "feature_dim": 2048, "comparable": True,
              "input_size": 299, "weights": CLEANFID_WEIGHTS}
    write_json(dest / "config.json", config)
    return {"origin": origin, "kind": config["kind"], "feature_dim": 2048, "comparable": True,
            "sha256": sha256_file(dest / CLEANFID_WEIGHTS)}


def fetch_released(name: str, dest_dir: Path) -> Path:
    """The paper's released checkpoint `name` (microdit.paper.RELEASED_FILES) as <dest_dir>/<name>.pt."""
    from microdit.io import atomic_path
    from microdit.paper import RELEASED_FILES, RELEASED_REPO

    if name not in RELEASED_FILES:
        raise UserError(f"--released {name}: not a released checkpoint (known: {', '.join(RELEASED_FILES)})")
    dest = Path(dest_dir) / f"{name}.pt"
    if dest.is_file():
        return dest
    if hub_offline():
        raise UserError(f"--released {name}: HF_HUB_OFFLINE=1 and no {dest}; put the file there, or give "
                        "evaluate.released the checkpoint's path")
    from huggingface_hub import hf_hub_download

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        got = hf_hub_download(RELEASED_REPO, f"ckpts/{name}.pt", local_dir=dest.parent / ".download")
    except Exception as e:  # network, auth, a renamed file: one line with the way out
        raise UserError(f"--released {name}: could not fetch it from {RELEASED_REPO} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); download it by hand to {dest}") from e
    with atomic_path(dest) as tmp:
        Path(got).replace(tmp)
    return dest
