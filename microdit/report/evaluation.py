"""The report's evaluation and samples sections: our checkpoints and the paper's released ones in one
table, GenEval task by task, and the sample grids of training and evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from microdit.paper import RESULTS as PAPER_RESULTS
from microdit.report.common import Problems, figure, image_uri, is_num, load_any, load_json, png_uri

GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def geneval_plot(tags: list[str], tasks: list[str], table: dict[str, dict[str, float | None]]) -> str | None:
    """Grouped bars: GenEval accuracy per task (and overall) for every evaluated checkpoint."""
    if not tags or not tasks:
        return None
    fig = figure(8, 2.8, left=0.6)
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
    return png_uri(fig)


def sweep_plot(sweeps: dict[str, list[dict]]) -> str | None:
    """FID against CLIP score over the guidance scales, a line per checkpoint; the paper's scale starred."""
    from microdit.paper import SAMPLER

    drawn = {tag: [p for p in points if is_num(p.get("fid")) and is_num(p.get("clip_score"))]
             for tag, points in sweeps.items()}
    drawn = {tag: points for tag, points in drawn.items() if len(points) > 1}
    if not drawn:
        return None
    fig = figure(5.2, 3.4, left=0.65)
    ax = fig.subplots()
    palette = ["#b0b0b0", "#8fb0d8", "#2f67a8", "#1b4379", "#0d2645"]
    for j, (tag, points) in enumerate(drawn.items()):
        xs, ys = [p["clip_score"] for p in points], [p["fid"] for p in points]
        ax.plot(xs, ys, marker="o", markersize=3, color=palette[j % 5], label=tag)
        for p in points:
            ax.annotate(f"{p['guidance']:g}", (p["clip_score"], p["fid"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
            if p["guidance"] == SAMPLER["guidance"]:
                ax.plot([p["clip_score"]], [p["fid"]], marker="*", markersize=10, color=palette[j % 5])
    ax.set_xlabel("CLIP score", fontsize=8)
    ax.set_ylabel("FID", fontsize=8)
    ax.set_title(f"guidance sweep (numbers: scale; star: the paper's {SAMPLER['guidance']:g})", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    return png_uri(fig)


def samples_section(root: Path, results: Path, eval_tags: list[str], problems: Problems,
                    stages: list[int] = (1, 2, 3, 4)) -> list[dict]:
    grids = []
    for n in stages:
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


def evaluated_tags(results: Path) -> list[str]:
    d = results / "eval"
    tags = [p.name for p in d.iterdir() if (p / "metrics.json").is_file()] if d.is_dir() else []
    # stage0 (the untrained baseline), stage1, stage2, ... in training order, then any other tag
    return sorted(tags, key=lambda t: (0, int(t[5:]), "") if t[5:].isdigit() and t.startswith("stage") else (1, 0, t))


def _cell(value: Any, comparable: Any = None, interval: Any = None) -> dict:
    """A table cell: the value, whether it compares with the paper, its 95% interval if any."""
    if isinstance(interval, dict):
        interval = interval.get("interval")
    ok = isinstance(interval, list) and len(interval) == 2 and all(is_num(x) for x in interval)
    return {"value": value if is_num(value) else None, "comparable": comparable, "interval": interval if ok else None}


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
        clip, ge, kid = m.get("clip_score") or {}, m.get("geneval") or {}, m.get("kid") or {}
        ge_ok = bool(ge.get("comparable"))
        task_acc = ge.get("tasks") or {}
        geneval[tag] = {"overall": ge.get("overall") if is_num(ge.get("overall")) else None,
                        "interval": _cell(None, None, ge.get("interval"))["interval"],
                        "intervals": {"overall": _cell(None, None, ge.get("interval"))["interval"],
                                      **{t: _cell(None, None, ((ge.get("interval") or {}).get("tasks") or {}).get(t))
                                         ["interval"] for t in tasks}},
                        "detector": ge.get("detector"),
                        "images": ge["n_prompts"] * ge["images_per_prompt"] if is_num(ge.get("n_prompts")) and is_num(ge.get("images_per_prompt")) else None,
                        **{t: task_acc.get(t) if is_num(task_acc.get(t)) else None for t in tasks}}
        s = m.get("settings") or {}
        rows.append({
            "name": _row_name(tag), "paper": False,
            "fid": _cell(fid.get("value"), bool(fid.get("comparable")), fid.get("interval")),
            "fid_256": _cell(fid256.get("value"), bool(fid256.get("comparable")), fid256.get("interval")),
            "clip": _cell(clip.get("value"), bool(clip.get("comparable")), clip.get("interval")),
            "kid": _cell(kid.get("value"), bool(kid.get("comparable")) if kid else None),
            "overall": _cell(ge.get("overall"), ge_ok, ge.get("interval")),
            "tasks": [_cell(task_acc.get(t), ge_ok, ((ge.get("interval") or {}).get("tasks") or {}).get(t))
                      for t in tasks],
            "notes": "; ".join(x for x in [
                _settings_note(s),
                f"FID: {fid.get('extractor', '?')}, {fid.get('n_gen', '?')} generated vs {fid.get('n_ref', '?')} reference"
                f" at {fid.get('resolution', '?')} px" if fid else "",
                f"CLIP: {clip.get('model', '?')}, n={clip.get('n', '?')}" if clip else "",
                f"GenEval: {ge.get('detector', '?')}, {ge.get('n_prompts', '?')} prompts x "
                f"{ge.get('images_per_prompt', '?')} images" if ge else "",
                _interval_note(fid, clip, ge),
            ] if x),
        })
    for name, fid, overall in PAPER_RESULTS:
        rows.append({"name": f"paper: {name}", "paper": True, "fid": _cell(fid), "fid_256": _cell(None), "kid": _cell(None),
                     "clip": _cell(None), "overall": _cell(overall), "tasks": [_cell(None) for _ in tasks], "notes": ""})
    # untrained against trained, task by task
    compare_tags = list(geneval)
    compare = None
    if "stage0" in geneval and len(geneval) > 1:
        last = compare_tags[-1]
        a, b = geneval["stage0"]["interval"], geneval[last]["interval"]
        compare = {"tags": compare_tags, "last": last,
                   # different only when the two 95% intervals do not overlap
                   "separated": None if not (a and b) else (a[1] < b[0] or b[1] < a[0]),
                   "rows": [(t, [geneval[tag].get(t) for tag in compare_tags], _delta(geneval[last].get(t), geneval["stage0"].get(t)))
                            for t in ["overall", *tasks]]}
    sweeps = {tag: m["guidance_sweep"] for tag, m in metrics.items() if isinstance(m.get("guidance_sweep"), list)}
    return {"tasks": tasks, "rows": rows, "compare": compare, "untrained": geneval.get("stage0"),
            "sweep": sweeps, "sweep_plot": sweep_plot(sweeps),
            "plot": geneval_plot(compare_tags, tasks, geneval) if tasks else None,
            "geneval": geneval}


def headline(evaluation: dict | None, stages: list[dict]) -> str | None:
    """One line on what the run shows: which GenEval tasks the last trained checkpoint does measurably
    better than the untrained model (95% intervals apart), with the numbers; or that it does not yet."""
    if not evaluation or not evaluation.get("compare"):
        return None
    geneval, last = evaluation["geneval"], evaluation["compare"]["last"]
    trained, untrained = geneval[last], geneval["stage0"]
    params = next((s["summary"].get("params") for s in reversed(stages) if is_num(s["summary"].get("params"))), None)
    who = f"trained {params / 1e6:.1f}M model ({last})" if params else f"trained model ({last})"

    def figure_of(task: str) -> str:
        value, interval, base = trained.get(task), trained["intervals"].get(task), untrained.get(task)
        ci = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""
        return f"{task.replace('_', ' ')} {value:.2f}{ci} vs {base:.2f} untrained"

    def apart(task: str) -> bool:
        a, b = untrained["intervals"].get(task), trained["intervals"].get(task)
        return bool(a and b) and b[0] > a[1]

    tasks = [t for t in evaluation["tasks"] if is_num(trained.get(t)) and is_num(untrained.get(t))]
    followed = [t for t in tasks if apart(t)]
    name = "shapes-GenEval" if "shapes" in str(trained.get("detector") or "") else "GenEval"
    n = f" ({name}, {trained['images']} images)" if trained.get("images") else f" ({name})"
    if not is_num(trained["overall"]) or not is_num(untrained["overall"]):
        return None
    if not followed:
        return (f"The {who} does not yet follow its prompts measurably{n}: "
                f"{figure_of('overall')}, 95% intervals overlap.")
    names = ", ".join(t.replace("_", " ") for t in followed)
    return f"The {who} follows {names} prompts{n}: " + "; ".join(figure_of(t) for t in [*followed, "overall"]) + "."


def _row_name(tag: str) -> str:
    """stage0 (untrained), stage4, or a released checkpoint evaluated here, by the paper's label."""
    from microdit.paper import RELEASED_FILES
    from microdit.settings import released_tag

    if tag == "stage0":
        return "stage0 (untrained)"
    if tag.startswith("released-"):
        label = next((label for name, label in RELEASED_FILES.items() if released_tag(name) == tag),
                     tag.removeprefix("released-"))
        return f"released {label}, evaluated here"
    return tag


def _interval_note(*records: dict) -> str:
    """How the bracketed intervals were drawn, once per row."""
    for r in records:
        interval = (r or {}).get("interval")
        if isinstance(interval, dict) and interval.get("draws"):
            return (f"[low, high]: {interval.get('level', 0.95):.0%} bootstrap intervals, {interval['draws']} draws "
                    "(FID over generated images, centred on the value; CLIP over pairs; GenEval over prompts)")
    return ""


def _settings_note(s: dict) -> str:
    if not s:
        return ""
    return (f"{s.get('steps', '?')} Heun steps, guidance {s.get('guidance', '?')}, seed {s.get('seed', '?')}, "
            f"{s.get('num_images', '?')} images at {s.get('resolution', '?')} px")


def _delta(a: Any, b: Any) -> float | None:
    return a - b if is_num(a) and is_num(b) else None
