"""`microdit cost`: what this run cost, and what the paper's full run would cost on this hardware.

Measured: every Snakemake benchmark file `<root>/benchmarks/<rule>[/<wildcards>].tsv` (wall
seconds `s`, `cpu_time`) is one job; its rule names its phase (data, captions, latents, training,
evaluation, report) and the resolved config's `resources.<group>.gpu` its GPU count. GPU-hours =
wall x GPUs, dollars = GPU-hours x price; CPU-only jobs cost 0 GPU-hours but their CPU-hours are
recorded. Wall seconds add up over jobs (jobs that ran side by side each count in full). The last
row of a TSV is the job's latest run, as in the report.

Training stages: `<root>/checkpoints/stage{N}/summary.json` gives each stage's throughput, so
images/s per device can be set against the paper's schedule (`microdit.paper.STAGES`) for a
projection of the full reproduction on this hardware. The projection is labelled with the model and
hardware it was measured on; only MicroDiT_XL_2 at the paper's resolutions is comparable to the
paper's cost (`microdit.paper.COST`, 2.6 days on 8 H100s). A second estimate scales the measured
throughput by the ratio of forward FLOPs per image between the measured model and XL, i.e.
assumes the hardware would reach the same FLOP/s on XL.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import re
from pathlib import Path

from microdit import paper
from microdit.errors import UserError
from microdit.io import read_json, write_json

# rule name prefix -> phase; first match wins
PHASE_OF_RULE: tuple[tuple[str, str], ...] = (
    ("models", "data"), ("world", "data"), ("download", "data"), ("mds", "data"),
    ("caption", "captions"),
    ("latents", "latents"),
    ("train", "training"),
    ("evaluate", "evaluation"), ("eval", "evaluation"),
    ("cost", "report"), ("report", "report"), ("funnel", "report"), ("dag", "report"), ("config", "report"),
)
PHASES = ("data", "captions", "latents", "training", "evaluation", "report", "other")
# where a phase's GPU count lives in `resources` when its rule has no group of its own
GROUP_OF_PHASE = {"data": "download", "captions": "caption", "latents": "latents", "training": "train",
                  "evaluation": "evaluate", "report": "report"}

PAPER_GLOBAL_BATCH = paper.GLOBAL_BATCH
PAPER_MODEL = paper.MODEL
PAPER_SCHEDULE = {  # stage -> resolution (px), mask ratio, optimizer steps: what the projection uses
    n: {k: stage[k] for k in ("resolution", "mask_ratio", "steps")} for n, stage in paper.STAGES.items()}
PAPER_VAE_FACTOR = paper.VAE_FACTOR
PAPER = paper.COST


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, type=Path, help="data root (benchmarks/, checkpoints/)")
    p.add_argument("--results", type=Path, help="results dir; its config.json is used when --config is not given")
    p.add_argument("--config", type=Path, help="resolved config.json (GPUs per rule group from `resources`)")
    p.add_argument("--out", required=True, type=Path, help="cost JSON to write (<results>/cost.json)")
    from microdit.settings import add_flags

    add_flags(p, "cost")  # --gpu-type, --price-per-gpu-hour: the `cost` config keys


def run(args: argparse.Namespace) -> int:
    if not math.isfinite(args.price_per_gpu_hour) or args.price_per_gpu_hour < 0:
        raise UserError(f"--price-per-gpu-hour must be a non-negative number, got {args.price_per_gpu_hour}")
    config = {}
    if args.config is None and args.results is not None and (args.results / "config.json").is_file():
        args.config = args.results / "config.json"
    if args.config is not None:
        if not args.config.is_file():
            raise UserError(f"--config {args.config} does not exist: pass the resolved config.json the workflow wrote")
        config = read_json(args.config)
    cost = compute_cost(args.root, config, args.price_per_gpu_hour, args.gpu_type)
    write_json(args.out, cost)
    total, proj = cost["total"], cost["projection"]
    line = (f"cost: {total['wall_s'] / 3600:.2f} job-hours, {total['gpu_hours']:.2f} GPU-hours, "
            f"${total['dollars']:,.2f} at ${args.price_per_gpu_hour}/{args.gpu_type}-hour")
    if proj["dollars"] is not None:
        line += (f"; paper schedule on {proj['hardware']} with {proj['model']}: {proj['gpu_hours']:,.0f} device-hours, "
                 f"${proj['dollars']:,.0f} (paper: ${PAPER['dollars']:,})")
    print(line)
    for problem in cost["skipped"]:
        print(f"cost: skipped {problem}")
    return 0


# ---------------------------------------------------------------- measured cost


def read_benchmarks(root: Path) -> tuple[list[dict], list[str]]:
    """Every benchmark TSV as {rule, job, s, cpu_time}; unreadable files are listed, not used."""
    folder = Path(root) / "benchmarks"
    jobs, skipped = [], []
    for path in sorted(folder.rglob("*.tsv")) if folder.is_dir() else []:
        rel = path.relative_to(folder).with_suffix("")
        try:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t"))
            if not rows:
                raise ValueError("no rows")
            wall = _number(rows[-1].get("s"))
            if wall is None or wall < 0:
                raise ValueError(f"wall time s={rows[-1].get('s')!r}")
        except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
            skipped.append(f"{path}: not a Snakemake benchmark file ({e})")
            continue
        jobs.append({"rule": rel.parts[0], "job": "/".join(rel.parts[1:]), "s": wall,
                     "cpu_time": _number(rows[-1].get("cpu_time"))})
    return jobs, skipped


def _number(text) -> float | None:
    """A benchmark cell as a float; None for Snakemake's NA / '-' placeholders."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def phase_of(rule: str) -> str:
    for prefix, phase in PHASE_OF_RULE:
        if rule.startswith(prefix):
            return phase
    return "other"


def gpus_for(rule: str, resources: dict) -> int:
    """The GPU count the config gives a rule: its own group, its name's prefix, then its phase's group."""
    phase = phase_of(rule)
    candidates = [rule, rule.split("_")[0], re.sub(r"\d+$", "", rule)]
    candidates += [prefix for prefix, p in PHASE_OF_RULE if rule.startswith(prefix)]
    candidates.append(GROUP_OF_PHASE.get(phase, phase))
    for group in candidates:
        spec = resources.get(group)
        if isinstance(spec, dict) and "gpu" in spec:
            return int(spec["gpu"] or 0)
    return 0


def cost_row(wall_s: float, gpus: int, cpu_time: float | None, price: float) -> dict:
    gpu_hours = wall_s * gpus / 3600
    return {"wall_s": wall_s, "gpus": gpus, "gpu_hours": gpu_hours,
            "cpu_hours": None if cpu_time is None else cpu_time / 3600, "dollars": gpu_hours * price}


def add_rows(rows: list[dict]) -> dict:
    """Sum of cost rows (CPU-hours summed over the rows that have them)."""
    cpu = [r["cpu_hours"] for r in rows if r.get("cpu_hours") is not None]
    return {"wall_s": sum(r["wall_s"] for r in rows), "gpu_hours": sum(r["gpu_hours"] for r in rows),
            "cpu_hours": sum(cpu) if cpu else None, "dollars": sum(r["dollars"] for r in rows), "jobs": len(rows)}


def stage_of_job(job: dict) -> int | None:
    """The training stage a train-rule benchmark belongs to (`train/stage2.tsv`, `train_stage2.tsv`, ...)."""
    if phase_of(job["rule"]) != "training":
        return None
    found = re.search(r"(?:stage|train)[_-]?(\d+)", f"{job['rule']}/{job['job']}")
    return int(found.group(1)) if found else None


# ---------------------------------------------------------------- training stages


def read_stages(root: Path) -> dict[int, dict]:
    """stage number -> its summary.json, for the stages that have one."""
    stages = {}
    for path in sorted((Path(root) / "checkpoints").glob("stage*/summary.json")):
        found = re.fullmatch(r"stage(\d+)", path.parent.name)
        if found:
            stages[int(found.group(1))] = read_json(path)
    return stages


def devices_of(summary: dict) -> int:
    """Devices that trained a stage: its GPUs, else its processes (CPU), at least 1."""
    gpus = int(summary.get("gpus") or 0)
    return gpus if gpus > 0 else max(int(summary.get("world_size") or 1), 1)


def stage_row(summary: dict, bench: dict | None, resources: dict, price: float) -> dict:
    """One training stage: its cost (benchmark wall time when there is one) and throughput."""
    gpus = int(summary["gpus"]) if summary.get("gpus") is not None else gpus_for("train", resources)
    wall = bench["s"] if bench else float(summary.get("wall_s") or 0.0)
    row = cost_row(wall, gpus, bench["cpu_time"] if bench else None, price)
    ips = summary.get("images_per_s")
    row.update({
        "images_per_s": ips,
        "images_per_s_per_gpu": ips / devices_of(summary) if ips else None,
        "timed_by": "benchmark" if bench else "summary",
        **{k: summary.get(k) for k in ("model", "device", "resolution", "mask_ratio", "steps", "global_batch",
                                       "images_seen", "world_size")},
    })
    return row


# ---------------------------------------------------------------- projection


@functools.lru_cache(maxsize=None)
def _forward_flops(config_json: str, mask_ratio: float) -> int:
    """Forward FLOPs per image of the MicroDiT a config describes (built on the meta device: shapes only)."""
    import torch

    from microdit.models import flops_per_image, model_from_config

    with torch.device("meta"):
        model = model_from_config(json.loads(config_json))
    return flops_per_image(model, mask_ratio)


def paper_forward_flops(stage: int) -> int:
    """Forward FLOPs per image of MicroDiT_XL_2 at a paper stage's resolution and mask ratio."""
    schedule = PAPER_SCHEDULE[stage]
    config = {"architecture": PAPER_MODEL, "input_size": schedule["resolution"] // PAPER_VAE_FACTOR}
    return _forward_flops(json.dumps(config, sort_keys=True), float(schedule["mask_ratio"]))


def measured_forward_flops(root: Path, stage: int, summary: dict) -> int | None:
    """Forward FLOPs per image of the model a stage trained, at its mask ratio (from final/config.json)."""
    path = Path(root) / "checkpoints" / f"stage{stage}" / "final" / "config.json"
    if not path.is_file():
        return None
    try:
        return _forward_flops(json.dumps(read_json(path), sort_keys=True), float(summary.get("mask_ratio") or 0.0))
    except (TypeError, ValueError):
        return None


def projection(stages: dict[int, dict], flops: dict[int, tuple[int | None, int]], price: float) -> dict:
    """The paper's schedule at the measured images/s per device, stage by stage.

    `flops[n]` = (measured model's forward FLOPs per image or None, XL's at the paper's stage n).
    Totals are given only when every stage was measured.
    """
    per_stage, missing = {}, []
    for n, theirs in PAPER_SCHEDULE.items():
        images = PAPER_GLOBAL_BATCH * theirs["steps"]
        entry: dict = {"images": images, "paper_resolution": theirs["resolution"], "paper_mask_ratio": theirs["mask_ratio"]}
        ips = (stages.get(f"stage{n}") or {}).get("images_per_s_per_gpu")
        if not ips:
            missing.append(n)
            per_stage[f"stage{n}"] = {**entry, "gpu_hours": None, "dollars": None}
            continue
        hours = images / ips / 3600
        entry.update({"measured_images_per_s_per_gpu": ips, "measured_resolution": stages[f"stage{n}"].get("resolution"),
                      "gpu_hours": hours, "dollars": hours * price})
        measured_flops, xl_flops = flops.get(n, (None, None))
        if measured_flops and xl_flops:
            entry["flops_scaled_gpu_hours"] = hours * xl_flops / measured_flops
        per_stage[f"stage{n}"] = entry

    measured = [stages[f"stage{n}"] for n in PAPER_SCHEDULE if n not in missing]
    models = sorted({str(s.get("model")) for s in measured})
    hardware = sorted({str(s.get("device")) for s in measured})
    comparable = bool(measured) and not missing and models == [PAPER_MODEL] and all(
        stages[f"stage{n}"].get("resolution") == PAPER_SCHEDULE[n]["resolution"] for n in PAPER_SCHEDULE)
    out = {"hardware": ", ".join(hardware) or None, "model": ", ".join(models) or None,
           "gpu_hours": None, "days_on_8_gpus": None, "dollars": None, "flops_scaled": None,
           "per_stage": per_stage, "comparable": comparable, "complete": not missing,
           "schedule": {"global_batch": PAPER_GLOBAL_BATCH, **{f"stage{n}": s for n, s in PAPER_SCHEDULE.items()}}}
    if not missing:
        hours = sum(per_stage[f"stage{n}"]["gpu_hours"] for n in PAPER_SCHEDULE)
        out.update(gpu_hours=hours, days_on_8_gpus=hours / 8 / 24, dollars=hours * price)
        scaled = [per_stage[f"stage{n}"].get("flops_scaled_gpu_hours") for n in PAPER_SCHEDULE]
        if all(s is not None for s in scaled):
            out["flops_scaled"] = {"model": PAPER_MODEL, "gpu_hours": sum(scaled), "days_on_8_gpus": sum(scaled) / 8 / 24,
                                   "dollars": sum(scaled) * price,
                                   "note": "measured throughput scaled by forward FLOPs per image to MicroDiT_XL_2 "
                                           "at the paper's resolutions, assuming the same FLOP/s"}
    if missing:
        out["note"] = f"stage(s) {', '.join(map(str, missing))} not measured: no total projection"
    elif comparable:
        out["note"] = "the paper's model and resolutions, measured on this hardware"
    else:
        out["note"] = (f"measured with {out['model']} on {out['hardware']}, not {PAPER_MODEL} at the paper's "
                       f"resolutions: the paper's schedule at this throughput; not comparable to the paper's cost")
    return out


# ---------------------------------------------------------------- all together


def compute_cost(root: Path, config: dict, price: float, gpu_type: str) -> dict:
    resources = (config or {}).get("resources") or {}
    benchmarks, skipped = read_benchmarks(root)
    jobs = []
    for b in benchmarks:
        gpus = gpus_for(b["rule"], resources)
        jobs.append({"rule": b["rule"], "job": b["job"], "phase": phase_of(b["rule"]), **cost_row(b["s"], gpus, b["cpu_time"], price)})

    summaries = read_stages(root)
    bench_of_stage = {}
    for b in benchmarks:
        n = stage_of_job(b)
        if n is not None:
            bench_of_stage[n] = b
    stages = {f"stage{n}": stage_row(s, bench_of_stage.get(n), resources, price) for n, s in sorted(summaries.items())}

    phases, counted = {}, []
    for phase in PHASES:
        rows = [j for j in jobs if j["phase"] == phase]
        if phase == "training" and not rows:  # trained by hand, outside the workflow: the summaries' times
            rows = list(stages.values())
        if rows:
            phases[phase] = add_rows(rows)
            counted += rows

    flops = {}
    for n in PAPER_SCHEDULE:
        if n in summaries:
            measured = measured_forward_flops(root, n, summaries[n])
            flops[n] = (measured, paper_forward_flops(n) if measured else None)
    return {
        "price_per_gpu_hour": price,
        "gpu_type": gpu_type,
        "phases": phases,
        "stages": stages,
        "total": add_rows(counted),
        "jobs": jobs,
        "projection": projection(stages, flops, price),
        "paper": dict(PAPER),
        "skipped": skipped,
        "notes": ["wall_s adds up job wall times; jobs that ran side by side each count in full",
                  "CPU-only jobs cost 0 GPU-hours; their CPU-hours are listed"],
    }
