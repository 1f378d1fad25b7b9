"""`microdit report`: everything the DAG produced, as one self-contained HTML page.

The page carries its own CSS, plots and sample grids (as `data:` URIs), so it opens offline and
loads nothing from anywhere; the raw JSON files are plain relative links, never fetched on load.
Every section is optional: whatever has not been produced yet is shown as "not run", and a file
that cannot be read is named in a warning on the page (or is an error with `--strict`).
"""
from __future__ import annotations

import argparse
import base64
import colorsys
import csv
import datetime as dt
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote

from microdit.cli import UserError
from microdit.io import atomic_path, read_json

EVAL_ORDER = ("stage0", "stage1", "stage2", "stage3", "stage4")
GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
FUNNEL_STAGES = (("urls", "URLs"), ("downloaded", "downloaded"), ("captioned", "captioned"),
                 ("in_mds", "in MDS"), ("encoded", "encoded"))
VERSIONED = ("python", "microdit", "torch", "torchvision", "diffusers", "transformers", "mosaicml-streaming",
             "img2dataset", "clean-fid", "snakemake", "jinja2", "matplotlib")

# The paper's numbers (Sehwag et al. 2024); DESIGN.md "Paper facts" is where they come from.
PAPER_RESULTS = [  # released 512 px checkpoints: COCO FID-30K, GenEval overall
    ("22M real, SDXL-VAE", 12.72, 0.46),
    ("37M real + synthetic, SDXL-VAE", 12.66, 0.46),
    ("37M real + synthetic, 16-channel VAE", 13.04, 0.40),
    ("490M synthetic", 13.26, 0.52),
]
PAPER_COST = {"days": 2.6, "gpus": 8, "gpu_type": "H100", "dollars": 1890, "pixart_alpha_dollars": 28400}
PAPER_STAGES = {  # per training stage, in the keys of a stage's summary.json
    1: dict(resolution=256, mask_ratio=0.75, steps=250_000, global_batch=2048, lr=2.4e-4,
            schedule="2.5K warmup, cosine to 0.33x", p_mean=-0.6, p_std=1.2, grad_clip=0.25),
    2: dict(resolution=256, mask_ratio=0.0, steps=30_000, global_batch=2048, lr=8e-5,
            schedule="constant", p_mean=-0.6, p_std=1.2, grad_clip=0.25),
    3: dict(resolution=512, mask_ratio=0.75, steps=50_000, global_batch=2048, lr=8e-5,
            schedule="500 warmup, constant", p_mean=0.0, p_std=0.6, grad_clip=0.5,
            ema="configs: yes; released code: no"),
    4: dict(resolution=512, mask_ratio=0.0, steps=5_000, global_batch=2048, lr=8e-5,
            schedule="constant", p_mean=0.0, p_std=0.6, grad_clip=0.5, ema="configs: yes; released code: no"),
}
SETTING_KEYS = ("model", "params", "resolution", "latent_size", "mask_ratio", "steps", "global_batch", "lr",
                "schedule", "p_mean", "p_std", "grad_clip", "ema", "ema_decay", "moe_lr_scale", "device",
                "gpus", "world_size", "wall_s", "images_seen", "images_per_s", "flops_per_image", "mfu",
                "final_loss")
MAX_EMBED_BYTES = 3 << 20  # larger images are shrunk before embedding, so the page stays openable


class Problems(list):
    """Files that could not be used; shown at the top of the page, printed, fatal with --strict."""

    def add(self, path: Path, why: str) -> None:
        self.append(f"{path}: {why}")


# --- reading inputs ------------------------------------------------------------------------------

def load_any(path: Path, problems: Problems) -> Any:
    """The JSON value in `path`; None when the file is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.add(path, f"unreadable JSON ({e}); left out")
        return None


def load_json(path: Path, problems: Problems) -> dict | None:
    """A JSON object from `path`; None when the file is absent, unreadable or not an object."""
    obj = load_any(path, problems)
    if obj is not None and not isinstance(obj, dict):
        problems.add(path, f"expected a JSON object, found {type(obj).__name__}; left out")
        return None
    return obj


def read_metrics(path: Path, problems: Problems) -> list[dict]:
    """Rows of a training log; broken lines (e.g. the last one of a killed run) are counted."""
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
        else:
            bad += 1
    if bad:
        problems.add(path, f"{bad} malformed line(s) skipped")
    return sorted(rows, key=lambda r: r["step"])


def image_uri(path: Path, problems: Problems) -> str | None:
    """A `data:` URI of the image at `path`, shrunk to JPEG when it is too big to embed."""
    from PIL import Image

    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = (im.format or "PNG").lower()
            if len(data) > MAX_EMBED_BYTES or fmt not in ("png", "jpeg", "gif", "webp"):
                im = im.convert("RGB")
                im.thumbnail((2048, 2048))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                data, fmt = buf.getvalue(), "jpeg"
    except Exception as e:  # PIL raises many kinds for a corrupt file
        problems.add(path, f"unreadable image ({type(e).__name__}: {e}); left out")
        return None
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode('ascii')}"


# --- plots (matplotlib's object API: no pyplot, no global backend) ----------------------------------

def _figure(width: float, height: float, **margins):
    """A figure with fixed margins in inches (layout engines draw everything twice: slow)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=96)
    m = {"left": 0.5, "right": 0.15, "bottom": 0.45, "top": 0.3, **margins}
    fig.subplots_adjust(left=m["left"] / width, right=1 - m["right"] / width, bottom=m["bottom"] / height,
                        top=1 - m["top"] / height, wspace=m.get("wspace", 0.25))
    return fig


def _png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def training_plot(rows: list[dict]) -> str | None:
    """Loss (raw and smoothed), learning rate and throughput against step, side by side."""
    panels = [("loss", "loss"), ("lr", "learning rate"), ("images_per_s", "images / s")]
    panels = [(k, t) for k, t in panels if any(_is_num(r.get(k)) for r in rows)]
    if not panels:
        return None
    fig = _figure(3.6 * len(panels), 2.6, left=0.45, wspace=0.3)
    for ax, (key, title) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        pts = [(r["step"], r[key]) for r in rows if _is_num(r.get(key))]
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        if key == "loss" and len(values) > 10:
            ax.plot(steps, values, color="#9db4d6", linewidth=0.8, label="logged")
            ax.plot(steps, _running_mean(values, max(len(values) // 20, 2)), color="#1f4e8c", label="running mean")
            ax.legend(fontsize=7, frameon=False)
        else:
            ax.plot(steps, values, color="#1f4e8c", marker="." if len(values) < 30 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return _png_uri(fig)


def funnel_plot(rows: list[dict]) -> str | None:
    """Horizontal bars: items left after each stage, one group per source."""
    if not rows:
        return None
    stages = [(k, label) for k, label in FUNNEL_STAGES if any(_is_num(r["counts"].get(k)) for r in rows)]
    longest = max(len(r["source"]) for r in rows)
    fig = _figure(8, min(0.13 * len(rows) * max(len(stages), 1) + 1.1, 10), left=0.2 + 0.075 * longest, top=0.45)
    ax = fig.subplots()
    height = 0.8 / max(len(stages), 1)
    colors = ["#c7d6ea", "#8fb0d8", "#5d8cc4", "#2f67a8", "#1b4379"]
    for j, (key, label) in enumerate(stages):
        ys = [i + j * height for i in range(len(rows))]
        ax.barh(ys, [r["counts"].get(key) or 0 for r in rows], height=height, label=label, color=colors[j % 5])
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(rows))], [r["source"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("items", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(stages))
    ax.grid(axis="x", alpha=0.3)
    return _png_uri(fig)


def geneval_plot(tags: list[str], tasks: list[str], table: dict[str, dict[str, float | None]]) -> str | None:
    """Grouped bars: GenEval accuracy per task (and overall) for every evaluated checkpoint."""
    if not tags or not tasks:
        return None
    fig = _figure(8, 2.8, left=0.6)
    ax = fig.subplots()
    width = 0.8 / len(tags)
    palette = ["#b0b0b0", "#8fb0d8", "#2f67a8", "#1b4379", "#0d2645"]
    for j, tag in enumerate(tags):
        xs = [i + j * width for i in range(len(tasks))]
        ax.bar(xs, [table[tag].get(t) or 0 for t in tasks], width=width, label=tag, color=palette[j % 5])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], [t.replace("_", " ") for t in tasks], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _png_uri(fig)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --- sections --------------------------------------------------------------------------------------

def _git_commit() -> str | None:
    """HEAD of the checkout the package runs from (or of the working directory), '+changes' if dirty."""
    for where in (Path(__file__).resolve().parent.parent, Path.cwd()):
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


_DOT_NODE = re.compile(r"^\s*(\w+)\s*\[(.*)\]\s*;?\s*$")
_DOT_EDGE = re.compile(r"^\s*(\w+)\s*->\s*(\w+)")
_DOT_ATTR = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


def parse_dot(text: str) -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """Nodes {id: {label, color}} and edges of a `snakemake --rulegraph` (or --dag) dot graph."""
    nodes: dict[str, dict] = {}
    edges: list[tuple[str, str]] = []
    for line in text.splitlines():
        if m := _DOT_EDGE.match(line):
            edges.append((m[1], m[2]))
        elif (m := _DOT_NODE.match(line)) and m[1] not in ("graph", "node", "edge"):
            attrs = dict(_DOT_ATTR.findall(m[2]))
            nodes[m[1]] = {"label": attrs.get("label", m[1]), "color": attrs.get("color", "")}
    for a, b in edges:
        for n in (a, b):
            nodes.setdefault(n, {"label": n, "color": ""})
    return nodes, edges


def _dot_color(hsv: str) -> str:
    """Graphviz 'h s v' in [0, 1] to a hex colour; grey when absent or not HSV."""
    try:
        h, s, v = (float(x) for x in hsv.replace(",", " ").split())
    except ValueError:
        return "#777777"
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def layout_dag(nodes: dict[str, dict], edges: list[tuple[str, str]]) -> dict:
    """Columns by longest path from the inputs (so every edge points right), ordered to cut crossings."""
    preds, succs = defaultdict(set), defaultdict(set)
    for a, b in edges:
        if a != b:
            preds[b].add(a)
            succs[a].add(b)
    # Kahn's algorithm; depth = longest path from a node without inputs
    depth = {n: 0 for n in nodes}
    waiting = {n: len(preds[n]) for n in nodes}
    ready = sorted(n for n in nodes if waiting[n] == 0)
    seen = set()
    while ready:
        n = ready.pop()
        seen.add(n)
        for m in succs[n]:
            depth[m] = max(depth[m], depth[n] + 1)
            waiting[m] -= 1
            if waiting[m] == 0:
                ready.append(m)
    last = max(depth.values(), default=0) + 1
    for n in nodes:  # nodes on a cycle (not a real rule graph) go after everything else
        if n not in seen:
            depth[n] = last
    layers: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for n in sorted(nodes, key=lambda n: nodes[n]["label"]):
        layers[depth[n]].append(n)
    layers = [layer for layer in layers if layer]
    depth = {n: d for d, layer in enumerate(layers) for n in layer}

    # a few barycentre sweeps: place each node near the mean position of its neighbours before/after
    def position(layer):
        return {n: i / max(len(layer) - 1, 1) for i, n in enumerate(layer)}

    def mean_at(neighbours, placed):
        xs = [placed[m] for m in neighbours if m in placed]
        return sum(xs) / len(xs) if xs else 0.5

    for _ in range(4):
        for r in range(1, len(layers)):
            before = {n: p for layer in layers[:r] for n, p in position(layer).items()}
            layers[r].sort(key=lambda n: mean_at(preds[n], before))
        for r in range(len(layers) - 2, -1, -1):
            after = {n: p for layer in layers[r + 1:] for n, p in position(layer).items()}
            layers[r].sort(key=lambda n: mean_at(succs[n], after))

    # left to right: one column per depth, boxes centred in their column and stacked top to bottom
    char_w, box_h, gap_x, gap_y, margin = 7.5, 28, 56, 18, 12
    width_of = {n: 20 + char_w * len(nodes[n]["label"]) for n in nodes}
    col_w = [max(width_of[n] for n in col) for col in layers]
    col_h = [len(col) * box_h + (len(col) - 1) * gap_y for col in layers]
    height = max(col_h, default=0) + 2 * margin
    boxes, x = {}, margin
    for c, col in enumerate(layers):
        y = margin + (height - 2 * margin - col_h[c]) / 2
        for n in col:
            color = _dot_color(nodes[n]["color"])
            boxes[n] = {"id": n, "label": nodes[n]["label"], "x": round(x + (col_w[c] - width_of[n]) / 2, 1),
                        "y": round(y, 1), "w": round(width_of[n], 1), "h": box_h, "stroke": color, "fill": _tint(color)}
            y += box_h + gap_y
        x += col_w[c] + gap_x
    paths = []
    for a, b in sorted(set(edges)):
        if a == b:
            continue
        A, B = boxes[a], boxes[b]
        x1, y1 = A["x"] + A["w"], A["y"] + A["h"] / 2
        x2, y2 = B["x"] - 3, B["y"] + B["h"] / 2
        mid = (x1 + x2) / 2
        paths.append({"d": f"M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} {x2:.1f},{y2:.1f}",
                      "from": A["label"], "to": B["label"]})
    width = round(x - gap_x + margin) if layers else 2 * margin
    return {"width": width, "height": round(height), "boxes": list(boxes.values()), "edges": paths,
            "depth": {nodes[n]["label"]: depth[n] for n in nodes}}


def _tint(hex_color: str, keep: float = 0.15) -> str:
    """`hex_color` mixed mostly with white, for box fills."""
    rgb = [int(hex_color[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(255 - (255 - c) * keep):02x}" for c in rgb)


def dag_section(dag_path: Path, problems: Problems) -> dict | None:
    if not dag_path.is_file():
        return None
    text = dag_path.read_text(errors="replace")
    nodes, edges = parse_dot(text)
    if "digraph" not in text or not nodes:
        problems.add(dag_path, "no dot digraph found; rule graph left out")
        return None
    return layout_dag(nodes, edges)


def _reasons(prefix: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        return [f"{prefix}: {reason} {n}" for reason, n in sorted(value.items()) if n]
    if _is_num(value) and value:
        return [f"{prefix}: {value}"]
    return []


def data_section(funnel: dict | None, config: dict | None) -> dict | None:
    if funnel is None:
        return None
    sources = funnel.get("sources") or {}
    config_sources = (config or {}).get("sources") or {}
    rows = []
    for name, f in sorted(sources.items()):
        if not isinstance(f, dict):
            continue
        losses = (_reasons("download", f.get("download_failed")) + _reasons("caption empty", f.get("caption_empty"))
                  + _reasons("caption failed", f.get("caption_failed")) + _reasons("mds", f.get("mds_dropped"))
                  + _reasons("encode", f.get("encode_failed"))
                  + _reasons("download kept, repaired", f.get("download_repaired")))
        rows.append({"source": name, "role": (config_sources.get(name) or {}).get("role"),
                     "raw_from": f.get("raw_from"), "counts": {k: f.get(k) for k, _ in FUNNEL_STAGES},
                     "final": f.get("final"), "final_stage": f.get("final_stage"), "losses": losses})
    return {"stages": FUNNEL_STAGES, "rows": rows, "plot": funnel_plot(rows)}


def training_section(root: Path, problems: Problems) -> dict:
    """Stages 1-4, run or not: their settings beside the paper's, and their training curves."""
    stages = []
    for n in (1, 2, 3, 4):
        d = root / "checkpoints" / f"stage{n}"
        summary = load_json(d / "summary.json", problems) or {}
        rows = read_metrics(d / "metrics.jsonl", problems) if (d / "metrics.jsonl").is_file() else []
        stages.append({
            "stage": n, "ran": bool(summary or rows), "finished": bool(summary), "summary": summary,
            "paper": PAPER_STAGES[n], "n_logged": len(rows), "last": rows[-1] if rows else {},
            "plot": training_plot(rows) if rows else None,
        })
    present = {k for s in stages for k in (*s["summary"], *s["paper"])} - {"stage"}
    keys = [k for k in SETTING_KEYS if k in present] + sorted(present - set(SETTING_KEYS))
    return {"stages": stages, "settings": keys, "any": any(s["ran"] for s in stages)}


def samples_section(root: Path, results: Path, eval_tags: list[str], problems: Problems) -> list[dict]:
    grids = []
    for n in (1, 2, 3, 4):
        d = root / "checkpoints" / f"stage{n}"
        uri = image_uri(d / "samples.png", problems)
        if uri:
            grids.append({"title": f"training stage {n}: samples at the end of the stage", "uri": uri,
                          "prompts": _prompts(load_any(d / "samples.json", problems))})
    for tag in eval_tags:
        uri = image_uri(results / "eval" / tag / "grid.png", problems)
        if uri:
            grids.append({"title": f"evaluation, {tag}" + (" (untrained model)" if tag == "stage0" else ""),
                          "uri": uri, "prompts": []})
    return grids


def _prompts(value: Any) -> list[str]:
    """Prompts from a samples.json that is a list, or an object with a 'prompts' list."""
    if isinstance(value, dict):
        value = value.get("prompts")
    if not isinstance(value, list):
        return []
    return [v if isinstance(v, str) else str(v.get("prompt", v)) if isinstance(v, dict) else str(v) for v in value]


def _eval_tags(results: Path) -> list[str]:
    d = results / "eval"
    tags = [p.name for p in d.iterdir() if (p / "metrics.json").is_file()] if d.is_dir() else []
    return sorted(tags, key=lambda t: (EVAL_ORDER.index(t) if t in EVAL_ORDER else len(EVAL_ORDER), t))


def _cell(value: Any, comparable: Any = None) -> dict:
    return {"value": value if _is_num(value) else None, "comparable": comparable}


def evaluation_section(results: Path, tags: list[str], problems: Problems) -> dict | None:
    """Our checkpoints and the paper's released ones in one table, marking what compares."""
    metrics = {}
    for tag in tags:
        m = load_json(results / "eval" / tag / "metrics.json", problems)
        if m is not None:
            metrics[tag] = m
    if not metrics:
        return None
    seen = {t for m in metrics.values() for t in ((m.get("geneval") or {}).get("tasks") or {})}
    tasks = [t for t in GENEVAL_TASKS if t in seen] + sorted(seen - set(GENEVAL_TASKS))
    rows, geneval = [], {}
    for tag, m in metrics.items():
        fid, fid256 = m.get("fid") or {}, m.get("fid_256") or {}
        clip, ge = m.get("clip_score") or {}, m.get("geneval") or {}
        ge_ok = bool(ge.get("comparable"))
        task_acc = ge.get("tasks") or {}
        geneval[tag] = {"overall": ge.get("overall") if _is_num(ge.get("overall")) else None,
                        **{t: task_acc.get(t) if _is_num(task_acc.get(t)) else None for t in tasks}}
        s = m.get("settings") or {}
        rows.append({
            "name": tag + (" (untrained)" if tag == "stage0" else ""), "paper": False,
            "fid": _cell(fid.get("value"), bool(fid.get("comparable"))),
            "fid_256": _cell(fid256.get("value"), bool(fid256.get("comparable"))),
            "clip": _cell(clip.get("value"), bool(clip.get("comparable"))),
            "overall": _cell(ge.get("overall"), ge_ok),
            "tasks": [_cell(task_acc.get(t), ge_ok) for t in tasks],
            "notes": "; ".join(x for x in [
                _settings_note(s),
                f"FID: {fid.get('extractor', '?')}, {fid.get('n_gen', '?')} generated vs {fid.get('n_ref', '?')} reference"
                f" at {fid.get('resolution', '?')} px" if fid else "",
                f"CLIP: {clip.get('model', '?')}, n={clip.get('n', '?')}" if clip else "",
                f"GenEval: {ge.get('detector', '?')}, {ge.get('n_prompts', '?')} prompts x "
                f"{ge.get('images_per_prompt', '?')} images" if ge else "",
            ] if x),
        })
    for name, fid, overall in PAPER_RESULTS:
        rows.append({"name": f"paper: {name}", "paper": True, "fid": _cell(fid), "fid_256": _cell(None),
                     "clip": _cell(None), "overall": _cell(overall), "tasks": [_cell(None) for _ in tasks], "notes": ""})
    # untrained against trained, task by task
    compare_tags = list(geneval)
    compare = None
    if "stage0" in geneval and len(geneval) > 1:
        last = compare_tags[-1]
        compare = {"tags": compare_tags, "last": last,
                   "rows": [(t, [geneval[tag].get(t) for tag in compare_tags], _delta(geneval[last].get(t), geneval["stage0"].get(t)))
                            for t in ["overall", *tasks]]}
    return {"tasks": tasks, "rows": rows, "compare": compare, "untrained": geneval.get("stage0"),
            "plot": geneval_plot(compare_tags, tasks, geneval) if tasks else None,
            "geneval": geneval}


def _settings_note(s: dict) -> str:
    if not s:
        return ""
    return (f"{s.get('steps', '?')} Heun steps, guidance {s.get('guidance', '?')}, seed {s.get('seed', '?')}, "
            f"{s.get('num_images', '?')} images at {s.get('resolution', '?')} px")


def _delta(a: Any, b: Any) -> float | None:
    return a - b if _is_num(a) and _is_num(b) else None


def read_benchmarks(root: Path, problems: Problems) -> list[dict]:
    """Snakemake's per-job benchmark TSVs: rule, wildcards, wall time, peak memory, CPU time."""
    d = root / "benchmarks"
    out = []
    for path in sorted(d.rglob("*.tsv")) if d.is_dir() else []:
        rel = path.relative_to(d).with_suffix("")
        try:
            with path.open(newline="") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t"))
            row = rows[-1]  # several rows when the job ran repeatedly; the last is the latest
            out.append({"rule": rel.parts[0], "job": "/".join(rel.parts[1:]), "s": float(row["s"]),
                        "max_rss": _float(row.get("max_rss")), "cpu_time": _float(row.get("cpu_time")),
                        "mean_load": _float(row.get("mean_load"))})
        except (OSError, KeyError, IndexError, ValueError) as e:
            problems.add(path, f"unreadable benchmark TSV ({type(e).__name__}: {e}); left out")
    return out


def _float(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def cost_section(cost: dict | None, benchmarks: list[dict]) -> dict | None:
    if cost is None and not benchmarks:
        return None
    cost = cost or {}
    paper = {**PAPER_COST, **(cost.get("paper") or {})}
    projection = cost.get("projection") or {}
    per_stage = projection.get("per_stage") or {}
    stage_keys = sorted({k for v in per_stage.values() if isinstance(v, dict) for k in v})
    total = cost.get("total") or {}
    comparison = [
        {"what": "this run (measured)", "gpu_hours": total.get("gpu_hours"), "cpu_hours": total.get("cpu_hours"),
         "days": None, "dollars": total.get("dollars")},
        {"what": f"projection: {projection.get('model', '?')} on {projection.get('hardware', '?')}",
         "gpu_hours": projection.get("gpu_hours"), "days": projection.get("days_on_8_gpus"),
         "dollars": projection.get("dollars")} if projection else None,
        {"what": f"paper: MicroDiT, {paper['gpus']} x {paper['gpu_type']}",
         "gpu_hours": paper["days"] * 24 * paper["gpus"], "days": paper["days"], "dollars": paper["dollars"]},
        {"what": "paper's figure for PixArt-alpha", "gpu_hours": None, "days": None, "dollars": paper["pixart_alpha_dollars"]},
    ]
    ratio = (projection["dollars"] / paper["dollars"]) if _is_num(projection.get("dollars")) and paper["dollars"] else None
    return {
        "price": cost.get("price_per_gpu_hour"), "gpu_type": cost.get("gpu_type"),
        "phases": _cost_rows(cost.get("phases")), "stages": _cost_rows(cost.get("stages")),
        "total": total, "projection": projection, "per_stage": per_stage, "stage_keys": stage_keys,
        "comparison": [c for c in comparison if c], "ratio": ratio, "paper": paper, "benchmarks": benchmarks,
        "present": bool(cost),
    }


def _cost_rows(table: Any) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in sorted((table or {}).items()) if isinstance(v, dict)]


def raw_links(results: Path, root: Path, out: Path, config_path: Path, dag_path: Path, eval_tags: list[str]) -> list[dict]:
    """Relative links from the report to the raw files it was built from (not loaded by the page)."""
    candidates = [(config_path, "resolved config"), (dag_path, "rule graph (dot)"),
                  (results / "data" / "funnel.json", "data funnel"), (results / "cost.json", "cost")]
    candidates += [(results / "eval" / t / "metrics.json", f"evaluation {t}") for t in eval_tags]
    for n in (1, 2, 3, 4):
        d = root / "checkpoints" / f"stage{n}"
        candidates += [(d / "summary.json", f"stage {n} summary"), (d / "metrics.jsonl", f"stage {n} training log"),
                       (d / "samples.json", f"stage {n} sample prompts")]
    links = []
    for path, what in candidates:
        if path.is_file():
            rel = Path(os.path.relpath(path.resolve(), out.resolve().parent)).as_posix()
            links.append({"href": quote(rel), "text": rel, "what": what, "bytes": path.stat().st_size})
    return links


# --- rendering -------------------------------------------------------------------------------------

def _fmt_num(x: Any) -> str:
    """Numbers as people read them: thousands separators, a few significant digits, '—' for none."""
    if x is None or x == "":
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return str(x)
    if isinstance(x, int) or x.is_integer():
        return f"{int(x):,}"
    if abs(x) >= 1e7 or abs(x) < 1:
        return f"{x:.3g}"
    return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.2f}".rstrip("0").rstrip(".")


def _fmt_fixed(x: Any, decimals: int = 2, sign: bool = False) -> str:
    """Fixed decimals, as result tables print them (FID 12.72, GenEval 0.46)."""
    if not _is_num(x):
        return "—"
    return f"{x:+,.{decimals}f}" if sign else f"{x:,.{decimals}f}"


def _fmt_dollars(x: Any) -> str:
    if not _is_num(x):
        return "—"
    return f"${x:,.0f}" if abs(x) >= 100 else f"${x:,.2f}" if abs(x) >= 0.01 else f"${x:.2g}"


def _fmt_duration(seconds: Any) -> str:
    if not _is_num(seconds):
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _fmt_bytes(n: Any) -> str:
    if not _is_num(n):
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def render(context: dict) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("microdit", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_fmt_num, fixed=_fmt_fixed, dollars=_fmt_dollars, duration=_fmt_duration, size=_fmt_bytes)
    return env.get_template("report.html.j2").render(**context)


def build_report(results: Path, root: Path, out: Path, config_path: Path | None = None,
                 dag_path: Path | None = None, strict: bool = False) -> Problems:
    """Gather whatever exists under `results` and `root`, render it, write `out` atomically."""
    results, root, out = Path(results), Path(root), Path(out)
    config_path = Path(config_path) if config_path else results / "config.json"
    dag_path = Path(dag_path) if dag_path else results / "dag.dot"
    if not results.is_dir():
        raise UserError(f"results directory {results} does not exist; run the workflow first (or pass --results)")
    problems = Problems()
    config = load_json(config_path, problems)
    eval_tags = _eval_tags(results)
    training = training_section(root, problems)
    context = {
        "dag": dag_section(dag_path, problems),
        "data": data_section(load_json(results / "data" / "funnel.json", problems), config),
        "training": training,
        "samples": samples_section(root, results, eval_tags, problems),
        "evaluation": evaluation_section(results, eval_tags, problems),
        "cost": cost_section(load_json(results / "cost.json", problems), read_benchmarks(root, problems)),
        "raw": raw_links(results, root, out, config_path, dag_path, eval_tags),
        "summary": summary_section(config, training["stages"]),
        "paper_results": PAPER_RESULTS,
    }
    if strict and problems:
        raise UserError(f"{len(problems)} input problem(s), first: {problems[0]}")
    context["problems"] = list(problems)
    html = render(context)
    with atomic_path(out) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", required=True, type=Path, help="results directory (eval/, cost.json, data/)")
    parser.add_argument("--root", required=True, type=Path, help="data root (checkpoints/, benchmarks/)")
    parser.add_argument("--out", type=Path, help="HTML file to write (default: <results>/report.html)")
    parser.add_argument("--config", type=Path, help="resolved config JSON (default: <results>/config.json)")
    parser.add_argument("--dag", type=Path, help="rule graph in dot (default: <results>/dag.dot)")
    parser.add_argument("--strict", action="store_true", help="fail on any unreadable input instead of warning")


def run(args: argparse.Namespace) -> int:
    out = args.out or args.results / "report.html"
    problems = build_report(args.results, args.root, out, args.config, args.dag, strict=args.strict)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0
