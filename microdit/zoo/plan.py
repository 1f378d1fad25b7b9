"""The role plan of `microdit models`: which roles exist, where each comes from, where it lands.

`plan_sources` turns `--id`/`--local`/`--preset` into one `Source` per role. A built (smoke) role
is made by the builder registered for it in `BUILDERS` (the `builder` decorator in smoke.py and
smoke_vae.py); `staged_dir` makes each `<out>/<role>/` appear whole or not at all.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from microdit.errors import UserError

ROLES = ("vae", "text_encoder", "captioner", "clip", "fid", "detector")
INFO_FILE = "MODEL_INFO.json"

# The paper's models. The text encoder repo holds OpenCLIP weights, which the official precompute
# used; they are converted to a transformers CLIPTextModel (see openclip.py).
PAPER_MODELS = {
    "vae": "stabilityai/sdxl-vae",
    "text_encoder": "apple/DFN5B-CLIP-ViT-H-14-378",
    "captioner": "llava-hf/llava-1.5-7b-hf",
    "clip": "openai/clip-vit-large-patch14",
    "fid": "cleanfid",  # the Inception weights clean-fid itself downloads
    "detector": "facebook/mask2former-swin-small-coco-instance",
}


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


# --------------------------------------------------------------------------- builder registry

@dataclass(frozen=True)
class Builder:
    """How one role's smoke model is made offline: `build(dest, *needs, args)` -> MODEL_INFO facts."""

    build: Callable[..., dict]
    needs: tuple[str, ...]  # shared inputs taken before `args`: "tokenizer" and/or "tokenizer_dir"

    def __call__(self, dest: Path, inputs: dict, args) -> dict:
        return self.build(dest, *(inputs[name] for name in self.needs), args)


BUILDERS: dict[str, Builder] = {}


def builder(role: str, *needs: str):
    """Register the decorated function as the smoke builder of `role` (see `Builder`)."""
    _check_role(role, "builder")

    def register(build: Callable[..., dict]) -> Callable[..., dict]:
        BUILDERS[role] = Builder(build, needs)
        return build
    return register


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
