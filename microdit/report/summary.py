"""The report's summary: what was run, from which commit, on what machine, with which versions."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from collections import defaultdict
from importlib import metadata
from pathlib import Path

VERSIONED = ("python", "microdit", "torch", "torchvision", "diffusers", "transformers", "mosaicml-streaming",
             "img2dataset", "clean-fid", "snakemake", "jinja2", "matplotlib")


def _git_commit() -> str | None:
    """HEAD of the checkout the package runs from (or of the working directory), '+changes' if dirty."""
    for where in (Path(__file__).resolve().parents[2], Path.cwd()):
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
            if head.returncode != 0:
                continue
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                   capture_output=True, text=True, timeout=10)
            return head.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "")
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpus() -> list[str]:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(f"{p.name} ({p.total_memory / 2**30:.0f} GiB)")
    return out


def _version(dist: str) -> str:
    if dist == "python":
        return platform.python_version()
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def summary_section(config: dict | None, stages: list[dict]) -> dict:
    """What was run, from which commit, on what machine, with which library versions."""
    gpus = _gpus()
    memory = _memory_gib()
    devices = defaultdict(list)  # "cuda, 8 GPU(s)" -> [3, 4]
    for s in stages:
        if s["summary"]:
            devices[f"{s['summary'].get('device', '?')}, {s['summary'].get('gpus') or 0} GPU(s)"].append(str(s["stage"]))
    trained_on = [f"stage{'s' if len(n) > 1 else ''} {', '.join(n)}: {d}" for d, n in devices.items()]
    return {
        "preset": (config or {}).get("preset"),
        "commit": _git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()} x {os.cpu_count()} logical cores",
        "memory": f"{memory:.0f} GiB" if memory else None,
        "gpus": ", ".join(gpus) if gpus else "none",
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "trained_on": trained_on,
        "versions": [(name, _version(name)) for name in VERSIONED],
        "config_text": json.dumps(config, indent=2, sort_keys=True) if config else None,
        "root": (config or {}).get("root"),
        "seed": (config or {}).get("seed"),
    }
