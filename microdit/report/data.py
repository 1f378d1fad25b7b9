"""The report's data section: the funnel of items per source, stage by stage, and why items were lost."""
from __future__ import annotations

from typing import Any

from microdit.report.common import figure, is_num, png_uri

FUNNEL_STAGES = (("urls", "URLs"), ("downloaded", "downloaded"), ("captioned", "captioned"),
                 ("in_mds", "in MDS"), ("encoded", "encoded"))


def funnel_plot(rows: list[dict]) -> str | None:
    """Horizontal bars: items left after each stage, one group per source."""
    if not rows:
        return None
    stages = [(k, label) for k, label in FUNNEL_STAGES if any(is_num(r["counts"].get(k)) for r in rows)]
    longest = max(len(r["source"]) for r in rows)
    fig = figure(8, min(0.13 * len(rows) * max(len(stages), 1) + 1.1, 10), left=0.2 + 0.075 * longest, top=0.45)
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
    return png_uri(fig)


def _reasons(prefix: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        return [f"{prefix}: {reason} {n}" for reason, n in sorted(value.items()) if n]
    if is_num(value) and value:
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
