"""The report's cost section: `microdit cost`'s cost.json beside the paper's, and every job's benchmark."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from microdit.paper import COST as PAPER_COST
from microdit.report.common import Problems, is_num


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
    ratio = (projection["dollars"] / paper["dollars"]) if is_num(projection.get("dollars")) and paper["dollars"] else None
    return {
        "price": cost.get("price_per_gpu_hour"), "gpu_type": cost.get("gpu_type"),
        "phases": _cost_rows(cost.get("phases")), "stages": _cost_rows(cost.get("stages")),
        "total": total, "projection": projection, "per_stage": per_stage, "stage_keys": stage_keys,
        "comparison": [c for c in comparison if c], "ratio": ratio, "paper": paper, "benchmarks": benchmarks,
        "present": bool(cost),
    }


def _cost_rows(table: Any) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in sorted((table or {}).items()) if isinstance(v, dict)]
