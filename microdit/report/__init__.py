"""`microdit report`: everything the DAG produced, as one self-contained HTML page.

The page carries its own CSS, plots and sample grids (as `data:` URIs), so it opens offline and
loads nothing from anywhere; the raw JSON files are plain relative links, never fetched on load.
Every section is optional: whatever has not been produced yet is shown as "not run", and a file
that cannot be read is named in a warning on the page (or is an error with `--strict`).
One module per section (summary, dag, data, training, evaluation, cost); `common` reads inputs,
`render` fills the template.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import quote

from microdit.errors import UserError
from microdit.io import atomic_path
from microdit.paper import RESULTS as PAPER_RESULTS
from microdit.report.common import Problems, load_json, stage_numbers
from microdit.report.cost import cost_section, read_benchmarks
from microdit.report.dag import dag_section, layout_dag, parse_dot
from microdit.report.data import data_section
from microdit.report.evaluation import evaluated_tags, evaluation_section, headline, samples_section
from microdit.report.render import render
from microdit.report.summary import summary_section
from microdit.report.training import training_section

__all__ = ["Problems", "add_arguments", "build_report", "data_section", "layout_dag", "parse_dot", "run"]


def raw_links(results: Path, root: Path, out: Path, config_path: Path, dag_path: Path, eval_tags: list[str],
              stages: list[int]) -> list[dict]:
    """Relative links from the report to the raw files it was built from (not loaded by the page)."""
    candidates = [(config_path, "resolved config"), (dag_path, "rule graph (dot)"),
                  (results / "data" / "funnel.json", "data funnel"), (results / "cost.json", "cost")]
    candidates += [(results / "eval" / t / "metrics.json", f"evaluation {t}") for t in eval_tags]
    for n in stages:
        d = root / "checkpoints" / f"stage{n}"
        candidates += [(d / "summary.json", f"stage {n} summary"), (d / "metrics.jsonl", f"stage {n} training log"),
                       (d / "samples.json", f"stage {n} sample prompts")]
    links = []
    for path, what in candidates:
        if path.is_file():
            rel = Path(os.path.relpath(path.resolve(), out.resolve().parent)).as_posix()
            links.append({"href": quote(rel), "text": rel, "what": what, "bytes": path.stat().st_size})
    return links


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
    eval_tags = evaluated_tags(results)
    stages = stage_numbers(config, root)
    training = training_section(root, problems, stages)
    context = {
        "dag": dag_section(dag_path, problems),
        "data": data_section(load_json(results / "data" / "funnel.json", problems), config),
        "training": training,
        "samples": samples_section(root, results, eval_tags, problems, stages),
        "evaluation": evaluation_section(results, eval_tags, problems),
        "cost": cost_section(load_json(results / "cost.json", problems), read_benchmarks(root, problems)),
        "raw": raw_links(results, root, out, config_path, dag_path, eval_tags, stages),
        "summary": summary_section(config, training["stages"]),
        "paper_results": PAPER_RESULTS,
    }
    context["headline"] = headline(context["evaluation"], training["stages"])
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
