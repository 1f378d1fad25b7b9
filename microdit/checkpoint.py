"""MicroDiT weights on disk: released checkpoints, model directories, and the stage directory a
training stage writes, with the one loader that training, evaluation and generation use.

* `load_trained(dir, ema=False)`: the MicroDiT in a model directory (a stage's `final/`, a
  checkpoint, or what `save_pretrained` wrote), with its EMA weights when `ema`;
  `from_pretrained(dir)` / `save_pretrained(model, dir)`: the raw weights, as `MicroDiT` has them.
  A model directory is `config.json` + `model.safetensors` (+ `ema.safetensors`); its files and
  the weight-file helpers live in `microdit.weights` (below `microdit.models`, which saves and
  loads through them) and are re-exported here.
* `load_released_checkpoint(model, path)`: the released `.pt` files (a bare DiT state dict),
  whole-pipeline state dicts whose DiT keys start with `dit.`, composer checkpoints
  (`state.model`), dicts wrapping a state dict under `state_dict` / `model` / `ema`, and
  `.safetensors` files. Keys and shapes must match exactly; the first mismatch is reported by name.
* `load_previous_stage(model, path)`: the same, but the model keeps its own `pos_embed`, so
  256 px weights load into a 512 px model (the sincos table is recomputed, never learned).
* The stage directory (`microdit train --out`):
      ckpt/step-000100/        a model directory + train_state.pt (optimizer, schedule, data order,
                               RNG) + run.json (the run's fingerprint); the newest `--keep` stay
      final/                   the model directory of the finished stage
      summary.json             written last: its presence means the stage is complete
      train.lock               flock'ed by the one trainer running there
      ckpt.superseded/<run>/   earlier runs with other settings (all of RUN_OUTPUTS + run.json)
  Every directory is written beside its place and renamed into it (`staged_dir`): none is ever
  half there, and resuming falls back past a checkpoint that does not read back whole.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from microdit.io import naming_full_disk, read_json, write_json
from microdit.models import MicroDiT, model_from_config
from microdit.weights import (  # noqa: F401 (re-exported: callers import the format from here)
    CONFIG_FILE, EMA_FILE, MODEL_FILE, CheckpointError, check_state_dict, read_model_dir, read_state_dict,
    write_model_dir,
)

CKPT_ROOT, FINAL_DIR, SUMMARY_FILE = "ckpt", "final", "summary.json"
CKPT_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "train_state.pt"
RUN_FILE = "run.json"  # beside each checkpoint: what defines the run (see microdit.train.run_fingerprint)
LOCK_FILE = "train.lock"  # flock'ed by the one trainer writing --out (holds its pid; empty when none runs)
SUPERSEDED_DIR = "ckpt.superseded"  # <fingerprint key>/: earlier runs with other settings, resumable
# What one run writes into --out; a superseded run takes all of it along, so nothing mixes two runs.
RUN_OUTPUTS = (CKPT_ROOT, FINAL_DIR, SUMMARY_FILE, "samples.png", "samples.json", "metrics.jsonl", "metrics.csv", "tb",
               "evals", "evals.jsonl")


# ---- model directories ---------------------------------------------------------------------------

def load_trained(directory: str | os.PathLike, ema: bool = False, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> MicroDiT:
    """The MicroDiT a model directory holds (a stage's `final/` or a checkpoint); `ema=True` loads the
    EMA weights. Rebuilds the exact architecture its config names; every key and shape must match."""
    return read_model_dir(directory, model_from_config, ema=ema).to(device=device, dtype=dtype)


def from_pretrained(directory: str | os.PathLike, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> MicroDiT:
    """Rebuild the exact architecture saved by `save_pretrained` and load its weights."""
    return load_trained(directory, device=device, dtype=dtype)


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
    write_model_dir(directory, config, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    return Path(directory)


def model_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The architecture config of a model directory."""
    return read_json(Path(directory) / CONFIG_FILE)


# ---- released checkpoints and stage hand-over ----------------------------------------------------

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


# ---- the stage directory -------------------------------------------------------------------------

def replace_dir(tmp: Path, final: Path) -> None:
    """Move a completely written `tmp` directory to `final`, replacing an older one."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A temp dir beside `final` that replaces it once the block has written it completely.

    A failed write (a full disk, a kill) removes the temp dir: no half-written `final` ever exists,
    what was there before stays, and a full disk is reported naming `final`'s directory."""
    tmp = final.parent / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with naming_full_disk(final.parent):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def save_final(out: Path, config: dict, state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor] | None) -> Path:
    """Write the finished stage's model directory, `final/`."""
    with staged_dir(out / FINAL_DIR) as tmp:
        write_model_dir(tmp, config, state, ema_state)
    return out / FINAL_DIR


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CKPT_ROOT / f"step-{step:06d}"


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `out/ckpt`, oldest first."""
    found = []
    for d in (out / CKPT_ROOT).glob("step-*"):
        m = CKPT_DIR.match(d.name)
        if m and (d / STATE_FILE).is_file() and (d / MODEL_FILE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


@dataclass
class Resumed:
    """A checkpoint read back whole: where it is, the model config, train state and weights."""
    directory: Path
    config: dict
    train_state: dict[str, Any]
    state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None


def read_train_state(directory: Path) -> dict[str, Any]:
    # mmap: the processes of one node share the pages instead of each holding a copy
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)


def read_checkpoint(directory: Path, ema: bool) -> Resumed:
    train_state = read_train_state(directory)
    ema_state = read_state_dict(directory / EMA_FILE) if ema and (directory / EMA_FILE).is_file() else None
    return Resumed(directory, model_config(directory), train_state, read_state_dict(directory / MODEL_FILE), ema_state)


def load_newest_checkpoint(out: Path, ema: bool, say=print) -> Resumed | None:
    """The newest checkpoint that reads back whole, falling back past truncated or corrupt ones (and
    saying so); None when there is none. Raises CheckpointError when every checkpoint is unreadable."""
    unreadable: list[tuple[Path, str]] = []
    found = checkpoints(out)
    for _, directory in reversed(found):
        try:
            resumed = read_checkpoint(directory, ema)
        except Exception as e:  # any failure to read it back: truncated, corrupt, half-copied
            unreadable.append((directory, (str(e).strip().splitlines() or [type(e).__name__])[0]))
            continue
        if unreadable:
            newest, why = unreadable[0]
            more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
            say(f"note: checkpoint {newest} is unreadable ({why}){more}; resuming from the previous one, "
                f"{directory.name}")
        return resumed
    if unreadable:
        newest, why = unreadable[0]
        raise CheckpointError(f"{out / CKPT_ROOT}: no checkpoint reads back (newest {newest.name}: {why}); move "
                              "the directory away to start the stage afresh")
    return None


def save_checkpoint(out: Path, step: int, config: dict, state: dict, ema_state: dict | None,
                    train_state: dict, keep: int, fingerprint: dict | None = None) -> Path:
    """Write ckpt/step-N via a temp dir and a rename, then drop all but the newest `keep`."""
    final = checkpoint_dir(out, step)
    with staged_dir(final) as tmp:
        write_model_dir(tmp, config, state, ema_state)
        torch.save(train_state, tmp / STATE_FILE)
        if fingerprint is not None:
            write_json(tmp / RUN_FILE, {"step": step, "fingerprint": fingerprint})
    for saved, old in checkpoints(out):
        if saved > step:  # an unreadable newer checkpoint we resumed past: its trajectory is abandoned
            shutil.rmtree(old, ignore_errors=True)
    for stale in (out / CKPT_ROOT).glob(".step-*.tmp"):  # left by a killed save (we hold the lock: none is live)
        shutil.rmtree(stale, ignore_errors=True)
    for _, old in checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def saved_fingerprint(directory: Path) -> dict | None:
    """The fingerprint of the run that wrote a checkpoint; None for one from before they were recorded."""
    return read_json(directory / RUN_FILE)["fingerprint"] if (directory / RUN_FILE).is_file() else None


# ---- superseded runs: ckpt.superseded/<key>/ -----------------------------------------------------

def set_aside(out: Path, key: str, fingerprint: dict | None) -> Path:
    """Move the current run (its checkpoints, final weights, summary, metrics, samples) to
    ckpt.superseded/<key>/, where a rerun with its settings finds it again."""
    entry = out / SUPERSEDED_DIR / key
    tmp = entry.with_name(f".{entry.name}.tmp")
    for stale in (tmp, entry):  # an entry with the same key is an older copy of this very run
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    for name in RUN_OUTPUTS:
        if (out / name).exists():
            os.replace(out / name, tmp / name)
    write_json(tmp / RUN_FILE, {"fingerprint": fingerprint, "set_aside": time.time()})
    os.replace(tmp, entry)
    return entry


def superseded_runs(out: Path) -> list[tuple[float, Path, dict | None]]:
    """(when set aside, entry, fingerprint) of each run under ckpt.superseded/, oldest first."""
    runs = []
    for entry in (out / SUPERSEDED_DIR).glob("*"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            info = read_json(entry / RUN_FILE)
            runs.append((float(info["set_aside"]), entry, info["fingerprint"]))
    return sorted(runs, key=lambda run: run[0])


def restore_superseded(out: Path, entry: Path) -> None:
    """Move a superseded run back into `out`, replacing what of a run lies there.

    `out` holds no checkpoint here (the current run was set aside, or never saved one), so what
    is replaced is at most the metrics of a run killed before its first checkpoint."""
    for name in RUN_OUTPUTS:
        left = out / name
        if left.is_dir():
            shutil.rmtree(left)
        elif left.exists():
            left.unlink()
        if (entry / name).exists():
            os.replace(entry / name, left)
    shutil.rmtree(entry)


def prune_superseded(out: Path, keep: int) -> None:
    """Keep the `keep` most recently superseded runs."""
    runs = superseded_runs(out)
    for _, entry, _ in runs[: max(len(runs) - keep, 0)]:
        shutil.rmtree(entry, ignore_errors=True)
