"""Evaluation during training: every `--eval-every` steps (and at the stage's end) a sample grid on
the fixed prompts and a small-n GenEval, so quality can be watched rising over steps and stages.

Rank 0 samples from a copy of the current weights (the EMA when the stage keeps one) with the
torch RNG forked, so training draws nothing differently and a resumed run stays exact. Written to
`--out`: `evals/step-NNNNNN.png` and one `evals.jsonl` row per evaluation; a resumed run first
drops the rows of steps it is about to redo. The GenEval numbers are over a few prompts and one
image each: they show a trend within a run, they are not comparable to anything published.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from microdit.io import atomic_path
from microdit.training.log import MetricsLog, image_grid, sample_prompts

EVALS_DIR, EVALS_FILE = "evals", "evals.jsonl"
NOTE = "small-n in-training GenEval (one image per prompt): a trend within this run, not comparable"


@dataclass
class Tools:
    """What an evaluation needs besides the weights, loaded once per run."""
    vae: Any
    text_encoder: Any
    detector: Any
    colour_fn: Any
    metadata: list[dict]


def due(step: int, every: int, last: int) -> bool:
    return every > 0 and (step % every == 0 or step == last)


def forget_after(out: Path, step: int) -> None:
    """Drop the rows of steps after `step` (a resumed run redoes them)."""
    path = out / EVALS_FILE
    if not path.is_file():
        return
    rows = [r for r in MetricsLog.read(path) if r.get("step", 0) <= step]  # a row cut short by a kill goes too
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def load_tools(args, device: torch.device) -> Tools:
    from diffusers import AutoencoderKL

    from microdit.metrics import geneval
    from microdit.text import TextEncoder

    vae = AutoencoderKL.from_pretrained(args.vae).to(device).eval()
    text_encoder = TextEncoder.from_pretrained(args.text_encoder, device=device)
    detector = colour_fn = None
    metadata: list[dict] = []
    if args.detector and args.eval_prompts != "none":
        detector = geneval.load_detector(args.detector, device)
        if not detector.gives_colour:
            colour_fn = geneval.ClipColour(args.clip, device)
        if args.eval_prompts == "shapes":
            from microdit.data.shapes import geneval_prompts

            metadata = geneval_prompts(args.eval_per_task or None, args.seed)
        else:
            from microdit.eval_data import cap_per_task

            metadata = cap_per_task(geneval.load_prompts(args.eval_prompts), args.eval_per_task or None, args.seed)
    return Tools(vae, text_encoder, detector, colour_fn, metadata)


def evaluate_now(s) -> dict | None:
    """Every process: gather the weights (a collective under FSDP); rank 0 samples the grid and
    GenEval, appends the row and returns it; the others wait."""
    from microdit.training.state import full_model_state

    state = full_model_state(s.model, s.sharded) if (s.sharded or s.rt.main) else None
    row = None
    if s.rt.main:
        if s.eval_tools is None:
            s.eval_tools = load_tools(s.args, s.rt.device)
        row = _evaluate(s, s.eval_tools, state)
    s.rt.barrier()
    return row


def _evaluate(s, tools: Tools, state: dict) -> dict:
    from microdit.generate import generate
    from microdit.metrics import geneval
    from microdit.models import model_from_config

    args, out = s.args, s.out
    devices = [s.rt.device] if s.rt.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        weights = s.ema.full_state(state) if s.ema is not None else state
        model = model_from_config(dict(s.config)).to(s.rt.device)
        model.load_state_dict(weights)
        seed = args.seed if args.sample_seed is None else args.sample_seed

        def draw(prompts: list[str]) -> list:
            return generate(prompts, model, tools.vae, tools.text_encoder, steps=args.sample_steps,
                            guidance=args.sample_guidance, seed=seed, autocast_dtype=s.autocast_dtype, progress=False)

        row: dict[str, Any] = {"step": s.step, "weights": "ema" if s.ema is not None else "raw"}
        prompts = sample_prompts(args)
        if prompts:
            grid = out / EVALS_DIR / f"step-{s.step:06d}.png"
            grid.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(grid) as tmp:
                image_grid(draw(prompts), columns=min(4, len(prompts))).save(tmp, format="PNG")
            row["grid"] = str(grid.relative_to(out))
        if tools.detector is not None and tools.metadata:
            images = draw([m["prompt"] for m in tools.metadata])
            verdicts = [[geneval.judge(m, tools.detector.detect(im), tools.colour_fn or geneval.detection_colour, im)]
                        for m, im in zip(tools.metadata, images)]
            result = geneval.summarize(tools.metadata, verdicts)
            row.update(geneval=result["overall"], tasks=result["tasks"], images=result["images"], note=NOTE)
    with open(out / EVALS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row
