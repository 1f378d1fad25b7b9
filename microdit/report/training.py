"""The report's training section: the run's stages beside the paper's settings, with their curves."""
from __future__ import annotations

from pathlib import Path

from microdit import paper
from microdit.report.common import Problems, figure, is_num, load_json, png_uri, read_metrics

PAPER_STAGES = {  # the paper's settings as the table shows them: summary.json keys, the schedule in words
    n: {**{k: s[k] for k in ("resolution", "mask_ratio", "steps", "global_batch", "lr")},
        "schedule": paper.schedule_text(s), **{k: s[k] for k in ("p_mean", "p_std", "grad_clip")},
        **({"ema": paper.EMA_NOTE} if s["ema"] else {})}
    for n, s in paper.STAGES.items()
}
SETTING_KEYS = ("model", "params", "resolution", "latent_size", "mask_ratio", "steps", "global_batch", "lr",
                "schedule", "p_mean", "p_std", "grad_clip", "ema", "ema_decay", "moe_lr_scale", "device",
                "gpus", "world_size", "wall_s", "images_seen", "images_per_s", "flops_per_image", "mfu",
                "final_loss")


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
    panels = [(k, t) for k, t in panels if any(is_num(r.get(k)) for r in rows)]
    if not panels:
        return None
    fig = figure(3.6 * len(panels), 2.6, left=0.45, wspace=0.3)
    for ax, (key, title) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        pts = [(r["step"], r[key]) for r in rows if is_num(r.get(key))]
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
    return png_uri(fig)


def read_evals(path: Path, problems: Problems) -> list[dict]:
    """The in-training evaluation rows of a stage (evals.jsonl), those with a GenEval number."""
    rows = read_metrics(path, problems) if path.is_file() else []
    return [r for r in rows if is_num(r.get("step")) and is_num(r.get("geneval"))]


def evals_plot(stages: list[dict]) -> str | None:
    """In-training GenEval against the step counted over all stages, a band per stage."""
    offset, points, bounds = 0, [], []
    for s in stages:
        rows = s.get("evals") or []
        points += [(offset + r["step"], r["geneval"], s["stage"]) for r in rows]
        steps = (s["summary"].get("steps") if is_num(s["summary"].get("steps")) else None) or (rows[-1]["step"] if rows else 0)
        bounds.append((offset, offset + steps, s["stage"]))
        offset += steps
    if not points:
        return None
    fig = figure(6.4, 2.6, left=0.6)
    ax = fig.subplots()
    for j, (start, end, n) in enumerate(bounds):
        if j % 2:
            ax.axvspan(start, end, color="#f0f0f0", zorder=0)
        ax.text((start + end) / 2, 1.02, f"stage {n}", ha="center", va="bottom", fontsize=7, transform=ax.get_xaxis_transform())
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, color="#1f4e8c")
    ax.set_ylim(0, 1)
    ax.set_xlabel("step (all stages)", fontsize=8)
    ax.set_ylabel("GenEval (small-n)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    return png_uri(fig)


def training_section(root: Path, problems: Problems, numbers: list[int] = (1, 2, 3, 4)) -> dict:
    """The run's stages, trained or not: their settings beside the paper's, and their training curves."""
    stages = []
    for n in numbers:
        d = root / "checkpoints" / f"stage{n}"
        summary = load_json(d / "summary.json", problems) or {}
        rows = read_metrics(d / "metrics.jsonl", problems) if (d / "metrics.jsonl").is_file() else []
        stages.append({
            "stage": n, "ran": bool(summary or rows), "finished": bool(summary), "summary": summary,
            "paper": PAPER_STAGES.get(n, {}), "n_logged": len(rows), "last": rows[-1] if rows else {},
            "plot": training_plot(rows) if rows else None, "evals": read_evals(d / "evals.jsonl", problems),
        })
    present = {k for s in stages for k in (*s["summary"], *s["paper"])} - {"stage"}
    keys = [k for k in SETTING_KEYS if k in present] + sorted(present - set(SETTING_KEYS))
    return {"stages": stages, "settings": keys, "any": any(s["ran"] for s in stages), "evals_plot": evals_plot(stages)}
