"""The metrics `microdit evaluate` computes, by name, and the metrics.json entries they write.

A `Metric` says which generated image set it scores (`CAPTIONS`: one image per caption drawn from the
evaluation split; `GENEVAL`: images per GenEval prompt), the metrics.json keys it fills, `score`
(giving those entries, from a `Scoring`) and `summary` (its part of the one-line summary, from
metrics.json). `microdit evaluate` walks `METRICS` in order, timing each under its name; a metric
whose image set is empty (GenEval with `--geneval-prompts none`) records None under its keys.
A new metric is its own module (lazily imported, as these are) plus one entry in `METRICS`.
"""
from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from microdit.io import read_json, write_json
from microdit.paper import FID_IMAGES as PAPER_FID_IMAGES

if TYPE_CHECKING:
    import torch

# the image sets, named as their folders under <out>/images and in metrics.json's "generated"
CAPTIONS, GENEVAL = "fid", "geneval"


@dataclass
class ImageSet:
    """Generated images: `paths[i]` drawn from `prompts[i]` with noise seed `seed + i`, under `folder`."""
    folder: Path
    prompts: list[str]
    paths: list[Path]
    metadata: list[dict] = field(default_factory=list)  # GenEval: one record per prompt...
    groups: list[list[Path]] = field(default_factory=list)  # ...and its images


@dataclass
class Scoring:
    """What a metric scores with: the command's flags, the images and the split's real images."""
    args: argparse.Namespace
    device: torch.device
    resolution: int  # of the generated images
    real_dir: Path  # the exported evaluation split (`microdit.eval_data.export_eval_split`)
    images: dict[str, ImageSet]


@dataclass(frozen=True)
class Metric:
    """One metric: the images it scores, the entries it writes, how it computes and summarises them."""
    images: str  # the image set scored: CAPTIONS or GENEVAL
    keys: tuple[str, ...]  # the metrics.json entries `score` returns
    score: Callable[[Scoring], dict[str, dict | None]]
    summary: Callable[[dict], list[str]]  # parts of the summary line, from the whole metrics.json


def model_origin(model_dir: Path) -> dict:
    path = Path(model_dir) / "MODEL_INFO.json"
    return read_json(path) if path.is_file() else {}


# ---------------------------------------------------------------- FID


def score_fid(s: Scoring) -> dict[str, dict | None]:
    """FID at the generation resolution, and at 256 px when asked (the same numbers when they coincide)."""
    from microdit.metrics import fid as fidlib
    from microdit.metrics.intervals import bootstrap_fid

    args = s.args
    extractor = fidlib.load_extractor(args.fid, s.device)
    results, kid = {}, {}
    for res in sorted({s.resolution, 256} if args.fid_256 else {s.resolution}):
        ref = fidlib.reference_stats(s.real_dir, s.real_dir.name, extractor, args.cache / "fid_stats", res,
                                     args.batch_size, args.workers)
        raw = fidlib.fid(s.images[CAPTIONS].folder, ref, extractor, args.batch_size, args.workers, seed=args.seed)
        if args.bootstrap:
            raw["interval"] = bootstrap_fid(raw["features"], ref["mu"], ref["sigma"], args.bootstrap, args.seed,
                                            device=str(s.device))
        results[res] = fid_record(raw, args.eval_mds.name)
        kid[res] = raw.get("kid")
    return {"fid": results[s.resolution], "fid_256": results[256] if args.fid_256 else None,
            "kid": None if kid[s.resolution] is None else {
                "value": kid[s.resolution], "comparable": False, "extractor": results[s.resolution]["extractor"],
                "resolution": s.resolution, "subsets": fidlib.KID_SUBSETS,
                "subset_size": min(fidlib.KID_SUBSET_SIZE, results[s.resolution]["n_gen"], results[s.resolution]["n_ref"]),
                "note": "KID (clean-fid's kernel distance) of the FID images: the paper reports none"}}


def fid_record(raw: dict, split: str) -> dict:
    """metrics.json's FID entry from `metrics.fid.fid` output: comparable only as FID-30K with Inception."""
    full = raw["n_generated"] >= PAPER_FID_IMAGES
    record = {"value": raw["fid"], "comparable": bool(raw["comparable"] and full), "extractor": raw["extractor"],
              "n_gen": raw["n_generated"], "n_ref": raw["n_reference"], "resolution": raw["resolution"],
              "reference": split, "skipped_generated": raw["skipped_generated"],
              "skipped_reference": raw["skipped_reference"], "interval": raw.get("interval")}
    notes = [raw["note"]] if raw.get("note") else []
    if not full:
        notes.append(f"FID over {raw['n_generated']} images, not 30,000: biased upwards against FID-30K")
    if notes:
        record["note"] = "; ".join(notes)
    return record


def interval_text(record: dict | None) -> str:
    """' [low, high]' of a metric's 95% interval, or nothing when there is none."""
    interval = (record or {}).get("interval") or {}
    low_high = interval.get("interval")
    return f" [{low_high[0]:.3g}, {low_high[1]:.3g}]" if low_high else ""


def summary_fid(m: dict) -> list[str]:
    parts = [f"FID {m['fid']['value']:.2f}{interval_text(m['fid'])} ({m['fid']['n_gen']} images, "
             f"{m['fid']['resolution']} px)"]
    if m.get("fid_256"):
        parts.append(f"FID-256 {m['fid_256']['value']:.2f}")
    if m.get("kid"):
        parts.append(f"KID {m['kid']['value']:.4f}")
    return parts


# ---------------------------------------------------------------- CLIP score


def score_clip(s: Scoring) -> dict[str, dict | None]:
    from microdit.metrics.clip_score import clip_score as score

    images = s.images[CAPTIONS]
    raw = score(images.paths, images.prompts, s.args.clip, s.args.batch_size, s.device,
                bootstrap=s.args.bootstrap, seed=s.args.seed)
    origin = model_origin(s.args.clip)
    record = {"value": raw["clip_score"], "model": raw["model"], "n": raw["n"], "skipped": raw["skipped"],
              "comparable": origin.get("source") not in ("built", None), "interval": raw.get("interval")}
    if not record["comparable"]:
        record["note"] = "CLIP built locally with random weights: not comparable to published CLIP scores"
    return {"clip_score": record}


def summary_clip(m: dict) -> list[str]:
    return [f"CLIP {m['clip_score']['value']:.2f}{interval_text(m['clip_score'])}"]


# ---------------------------------------------------------------- GenEval


def score_geneval(s: Scoring) -> dict[str, dict | None]:
    """GenEval task accuracies; the per-prompt verdicts go to `<out>/geneval.json`."""
    from microdit.metrics import geneval
    from microdit.metrics.intervals import bootstrap_geneval

    args, images = s.args, s.images[GENEVAL]
    detector = geneval.load_detector(args.detector, s.device)
    colour_fn = None if detector.gives_colour else geneval.ClipColour(args.clip, s.device)
    result = geneval.evaluate_images(images.metadata, images.groups, detector, colour_fn)
    write_json(args.out / "geneval.json", result)
    origin = model_origin(args.detector)
    kind = origin.get("kind") or (read_json(args.detector / "config.json").get("kind")
                                  if (args.detector / "config.json").is_file() else None)
    official = args.geneval_prompts == "official" or (
        Path(args.geneval_prompts).is_file()
        and hashlib.sha256(Path(args.geneval_prompts).read_bytes()).hexdigest() == geneval.PROMPTS_SHA256)
    protocol = official and not args.geneval_per_task and args.geneval_images_per_prompt == 4
    record = {"overall": result["overall"], "tasks": result["tasks"],
              "detector": "shapes (exact)" if kind == "shapes" else (origin.get("id") or kind or args.detector.name),
              "colour": "detector" if detector.gives_colour else getattr(colour_fn, "name", "clip"),
              "n_prompts": len(images.metadata), "images_per_prompt": args.geneval_images_per_prompt,
              "correct_images": result["correct_images"], "prompts": args.geneval_prompts,
              "comparable": bool(protocol and kind != "shapes"),
              "interval": bootstrap_geneval(result["per_prompt"], args.bootstrap, args.seed)}
    if kind == "shapes":
        record["note"] = "shapes-world version of GenEval's six tasks: not comparable to published GenEval"
    elif not protocol:
        record["note"] = "not the full protocol (553 official prompts x 4 images): not comparable"
    else:
        record["note"] = "transformers Mask2Former, not GenEval's mmdetection checkpoint: may differ slightly"
    return {"geneval": record}


def summary_geneval(m: dict) -> list[str]:
    return [f"GenEval {m['geneval']['overall']:.3f}{interval_text(m['geneval'])}"] if m.get("geneval") else []


# ---------------------------------------------------------------- guidance sweep


def sweep_set_name(guidance) -> str:
    """The image set (and folder) of the FID captions at another guidance scale: fid_g3, fid_g7.5."""
    return f"{CAPTIONS}_g{guidance:g}" if guidance != "" else f"{CAPTIONS}_g"


def score_sweep(s: Scoring, metrics: dict, sets: dict[float, ImageSet]) -> list[dict]:
    """FID (at the generation resolution) and CLIP score at each guidance scale, the main one from
    `metrics`, in order of guidance: the points of the report's FID-against-CLIP curve."""
    args = argparse.Namespace(**{**vars(s.args), "fid_256": False})
    points = [{"guidance": s.args.guidance, "fid": (metrics.get("fid") or {}).get("value"),
               "clip_score": (metrics.get("clip_score") or {}).get("value"), "main": True}]
    for guidance, images in sets.items():
        one = Scoring(args, s.device, s.resolution, s.real_dir, {CAPTIONS: images})
        fid, clip = score_fid(one)["fid"], score_clip(one)["clip_score"]
        points.append({"guidance": guidance, "fid": fid["value"], "clip_score": clip["value"], "main": False,
                       "fid_interval": (fid.get("interval") or {}).get("interval"),
                       "clip_interval": (clip.get("interval") or {}).get("interval")})
    points[0].update(fid_interval=((metrics.get("fid") or {}).get("interval") or {}).get("interval"),
                     clip_interval=((metrics.get("clip_score") or {}).get("interval") or {}).get("interval"))
    return sorted(points, key=lambda p: p["guidance"])


# name (also its key in metrics.json's timing_s) -> metric, in the order they run and are summarised
METRICS: dict[str, Metric] = {
    "fid": Metric(CAPTIONS, ("fid", "fid_256", "kid"), score_fid, summary_fid),
    "clip_score": Metric(CAPTIONS, ("clip_score",), score_clip, summary_clip),
    "geneval": Metric(GENEVAL, ("geneval",), score_geneval, summary_geneval),
}
