"""The HTML report: built from fake but well-formed DAG outputs, checked as HTML and in a real browser."""
import io
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from microdit.errors import UserError
from microdit.io import write_json
from microdit.report import add_arguments, build_report, layout_dag, parse_dot, run

SECTIONS = ("summary", "dag", "data", "training", "samples", "evaluation", "cost", "raw")

RULEGRAPH = """digraph snakemake_dag {
    graph[bgcolor=white, margin=0];
    node[shape=box, style=rounded, fontname=sans,                 fontsize=10, penwidth=2];
    edge[penwidth=2, color=grey];
	0[label = "all", color = "0.00 0.6 0.85", style="rounded"];
	1[label = "latents", color = "0.33 0.6 0.85", style="rounded"];
	2[label = "mds", color = "0.42 0.6 0.85", style="rounded"];
	3[label = "download", color = "0.17 0.6 0.85", style="rounded"];
	4[label = "world", color = "0.58 0.6 0.85", style="rounded"];
	5[label = "models", color = "0.50 0.6 0.85", style="rounded"];
	6[label = "caption", color = "0.08 0.6 0.85", style="rounded"];
	7[label = "funnel", color = "0.25 0.6 0.85", style="rounded"];
	8[label = "train", color = "0.66 0.6 0.85", style="rounded"];
	9[label = "evaluate", color = "0.75 0.6 0.85", style="rounded"];
	10[label = "cost", color = "0.83 0.6 0.85", style="rounded"];
	11[label = "report", color = "0.92 0.6 0.85", style="rounded"];
	2 -> 0
	11 -> 0
	2 -> 1
	5 -> 1
	6 -> 2
	3 -> 2
	4 -> 3
	4 -> 5
	5 -> 6
	3 -> 6
	2 -> 7
	1 -> 7
	1 -> 8
	8 -> 9
	5 -> 9
	8 -> 10
	9 -> 11
	10 -> 11
	7 -> 11
}
"""

FUNNEL = {"sources": {
    "shapes_real": {"source": "shapes_real", "urls": 198, "downloaded": 194,
                    "download_failed": {"dead url": 2, "corrupt image": 2}, "in_mds": 192,
                    "mds_dropped": {"too_small": 2}, "encoded": 192, "encode_failed": {}, "final": 192,
                    "final_stage": "encoded"},
    "shapes_sa": {"source": "shapes_sa", "urls": 70, "downloaded": 66, "download_failed": {"dead url": 4},
                  "captioned": 65, "caption_empty": 1, "caption_failed": 0, "in_mds": 63,
                  "mds_dropped": {"too_small": 2}, "encoded": 63, "encode_failed": {}, "final": 63,
                  "final_stage": "encoded"},
    "shapes_eval": {"source": "shapes_eval", "urls": 70, "downloaded": 67, "download_failed": {"dead url": 3},
                    "in_mds": 64, "mds_dropped": {"too_small": 3}, "final": 64, "final_stage": "in_mds"},
}}

GENEVAL = {  # tag -> per-task accuracy; overall is their mean
    "stage0": {"single_object": 0.25, "two_object": 0.0, "counting": 0.0, "colors": 0.25, "position": 0.0, "color_attr": 0.0},
    "stage2": {"single_object": 0.75, "two_object": 0.25, "counting": 0.25, "colors": 0.5, "position": 0.0, "color_attr": 0.25},
    "stage4": {"single_object": 1.0, "two_object": 0.75, "counting": 0.5, "colors": 0.75, "position": 0.5, "color_attr": 0.5},
}


def shapes_grid(path: Path, tiles: int = 8, size: int = 32) -> None:
    """A small PNG grid of coloured shapes, like the smoke preset's samples."""
    from PIL import Image, ImageDraw

    colors = ["red", "blue", "green", "yellow", "purple", "orange", "cyan", "magenta"]
    grid = Image.new("RGB", (size * 4, size * ((tiles + 3) // 4)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(tiles):
        x, y = (i % 4) * size, (i // 4) * size
        box = (x + 6, y + 6, x + size - 6, y + size - 6)
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=colors[i % len(colors)])
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def write_data_only(results: Path, root: Path) -> None:
    """What exists after the data half of the DAG: config, rule graph, funnel, some benchmarks."""
    write_json(results / "config.json", {
        "preset": "smoke", "root": str(root), "results": str(results), "seed": 0,
        "sources": {"shapes_real": {"role": "train"}, "shapes_sa": {"role": "train"}, "shapes_eval": {"role": "eval"}},
    })
    (results / "dag.dot").write_text("Building DAG of jobs...\n" + RULEGRAPH)
    write_json(results / "data" / "funnel.json", FUNNEL)
    bench = root / "benchmarks" / "download" / "shapes_real.tsv"
    bench.parent.mkdir(parents=True, exist_ok=True)
    bench.write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                     "12.3456\t0:00:12\t321.5\t900.1\t300.2\t310.3\t0.1\t5.2\t87.5\t10.8\n")
    # a job too short to sample: Snakemake writes NA for what it could not measure
    short = root / "benchmarks" / "world.tsv"
    short.write_text(bench.read_text().splitlines()[0] + "\n0.4\t0:00:00" + "\tNA" * 8 + "\n")


def write_full(results: Path, root: Path) -> None:
    """Every output of the four smoke stages, evaluation and cost, with a loss that goes down."""
    write_data_only(results, root)
    for n in (1, 2, 3, 4):
        d = root / "checkpoints" / f"stage{n}"
        d.mkdir(parents=True, exist_ok=True)
        steps = 60
        with open(d / "metrics.jsonl", "w") as f:
            for step in range(1, steps + 1):
                loss = 1.5 * math.exp(-step / 20) / n + 0.2 + 0.03 * math.sin(step)
                f.write(json.dumps({"step": step, "loss": loss, "lr": 2.4e-4 * min(1, step / 10), "grad_norm": 1.0,
                                    "images_per_s": 50.0 + step % 3, "mfu": None, "time": step * 0.5,
                                    "images_seen": step * 32}) + "\n")
        write_json(d / "summary.json", {
            "stage": n, "model": "MicroDiT_smoke", "resolution": 64 * (1 + (n > 2)), "latent_size": 8 * (1 + (n > 2)),
            "mask_ratio": 0.75 if n % 2 else 0.0, "steps": steps, "global_batch": 32, "lr": 2.4e-4,
            "schedule": "cosine", "p_mean": -0.6, "p_std": 1.2, "grad_clip": 0.25, "ema": n > 2, "ema_decay": 0.999,
            "moe_lr_scale": 0.5, "wall_s": 30.0 * n, "images_seen": 1920, "images_per_s": 51.2,
            "final_loss": [0.612, 0.534, 0.487, 0.459][n - 1], "device": "cpu", "gpus": 0, "world_size": 1, "params": 1234567,
            "flops_per_image": 3.2e9, "mfu": None,
        })
        shapes_grid(d / "samples.png")
        write_json(d / "samples.json", {"prompts": [f"a photo of {c} squares" for c in ("two red", "one blue")]})
    for tag, tasks in GENEVAL.items():
        e = results / "eval" / tag
        write_json(e / "metrics.json", {
            "tag": tag, "checkpoint": str(root / "checkpoints" / tag),
            "settings": {"steps": 30, "guidance": 5.0, "seed": 0, "num_images": 64, "resolution": 128},
            "fid": {"value": 300.5 - 100 * int(tag[-1]) / 4, "comparable": False, "extractor": "random-inception-v3",
                    "n_gen": 64, "n_ref": 64, "resolution": 128},
            "fid_256": {"value": 280.25, "comparable": False, "extractor": "random-inception-v3", "n_gen": 64,
                        "n_ref": 64, "resolution": 256},
            "clip_score": {"value": 21.5 + int(tag[-1]), "model": "tiny-clip", "n": 64},
            "geneval": {"overall": sum(tasks.values()) / len(tasks), "tasks": tasks, "detector": "shapes-detector",
                        "n_prompts": 24, "images_per_prompt": 4, "comparable": False},
        })
        shapes_grid(e / "grid.png", tiles=4)
    write_json(results / "cost.json", {
        "price_per_gpu_hour": 3.75, "gpu_type": "H100",
        "phases": {"data": {"wall_s": 95.0, "gpu_hours": 0.0, "cpu_hours": 0.05, "dollars": 0.0},
                   "train": {"wall_s": 300.0, "gpu_hours": 0.0, "cpu_hours": 0.17, "dollars": 0.0}},
        "stages": {f"stage{n}": {"wall_s": 30.0 * n, "gpu_hours": 0.0, "cpu_hours": 0.01 * n, "dollars": 0.0,
                                 "images_per_s_per_gpu": 51.2} for n in (1, 2, 3, 4)},
        "total": {"wall_s": 395.0, "gpu_hours": 0.0, "cpu_hours": 0.22, "dollars": 0.0},
        "projection": {"hardware": "8 x H100", "model": "MicroDiT_XL_2", "gpu_hours": 531.2, "days_on_8_gpus": 2.77,
                       "dollars": 1992.0, "per_stage": {"stage1": {"gpu_hours": 400.0, "dollars": 1500.0},
                                                        "stage2": {"gpu_hours": 50.0, "dollars": 187.5}}},
        "paper": {"days": 2.6, "gpus": 8, "gpu_type": "H100", "dollars": 1890, "pixart_alpha_dollars": 28400},
    })


class _Tags(HTMLParser):
    """Every tag with its attributes, plus the visible text."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(html: str) -> _Tags:
    p = _Tags()
    p.feed(html)
    return p


def section_text(html: str, section: str) -> str:
    m = re.search(rf'<section id="{section}">(.*?)</section>', html, re.S)
    assert m, f"section {section} missing"
    return " ".join(parse(m[1]).text)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """Built once and only read by the tests that use it."""
    tmp_path = tmp_path_factory.mktemp("full")
    results, root = tmp_path / "results", tmp_path / "data"
    write_full(results, root)
    out = results / "report.html"
    problems = build_report(results, root, out)
    assert problems == []
    return out


@pytest.fixture
def partial_report(tmp_path):
    results, root = tmp_path / "results", tmp_path / "data"
    write_data_only(results, root)
    out = results / "report.html"
    assert build_report(results, root, out) == []
    return out


def test_full_report_has_every_section_and_the_numbers(full_report):
    html = full_report.read_text()
    ids = {a.get("id") for _, a in parse(html).tags}
    assert set(SECTIONS) <= ids
    assert "Not run yet" not in html
    assert "smoke" in section_text(html, "summary")
    for name in ("torch", "diffusers", "transformers", "mosaicml-streaming", "snakemake"):
        assert name in section_text(html, "summary")
    # the rule graph: one box per rule, one path per edge
    dag = re.search(r'<section id="dag">(.*?)</section>', html, re.S)[1]
    assert len(re.findall(r'<g class="rule"', dag)) == 12 and dag.count('<path class="edge"') == 19
    data = section_text(html, "data")
    assert all(n in data for n in ("198", "194", "192", "dead url 4", "caption empty: 1", "too_small 3"))
    training = section_text(html, "training")
    assert "0.612" in training and "0.459" in training  # final losses
    assert "0.75" in training and "250,000" in training and "2.5K warmup" in training  # mask, paper settings
    assert training.count("60 logged steps") == 4
    assert section_text(html, "samples").count("a photo of two red squares") == 4
    evaluation = section_text(html, "evaluation")
    for value in ("0.08", "0.33", "0.67", "12.72", "12.66", "13.04", "13.26", "0.52", "300.50", "200.50", "280.25", "25.50"):
        assert value in evaluation, value
    compare = re.search(r'id="geneval-compare">(.*?)</p>', html, re.S)[1]
    assert "0.08" in compare and "0.67" in compare and "+0.58" in compare
    cost = section_text(html, "cost")
    assert all(v in cost for v in ("$1,890", "$28,400", "$1,992", "2.77", "1.05", "531.2", "12.3 s"))
    raw = section_text(html, "raw")
    assert "data/funnel.json" in raw and "eval/stage4/metrics.json" in raw and "cost.json" in raw


def test_report_loads_nothing_from_outside(full_report):
    html = full_report.read_text()
    assert "http://" not in html and "https://" not in html and "@import" not in html
    tags = parse(html).tags
    assert not [t for t, _ in tags if t in ("script", "iframe", "object", "embed", "video", "audio", "source")]
    for tag, attrs in tags:
        if "src" in attrs:
            assert attrs["src"].startswith("data:"), (tag, attrs["src"][:80])
        if tag == "link":
            assert attrs.get("href", "").startswith("data:"), attrs
        if tag == "a":  # links are only followed when clicked: in-page anchors or relative files
            href = attrs.get("href", "")
            assert href.startswith("#") or not re.match(r"^[a-z][a-z0-9+.-]*:", href), href
    assert re.findall(r"url\(([^)]*)\)", html) == ["#arrowhead"] * html.count("marker-end=")
    hrefs = [a["href"] for t, a in tags if t == "a" and not a["href"].startswith("#")]
    assert "../data/checkpoints/stage1/metrics.jsonl" in hrefs
    for href in hrefs:  # every raw-file link resolves, relative to the report
        assert (full_report.parent / href).is_file(), href


def test_images_are_embedded_and_decode(full_report):
    import base64

    from PIL import Image

    srcs = [a["src"] for t, a in parse(full_report.read_text()).tags if t == "img"]
    # funnel plot + 4 training plots + 7 sample grids + GenEval plot
    assert len(srcs) == 13
    for src in srcs:
        header, data = src.split(",", 1)
        assert header.startswith("data:image/png;base64")
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.width >= 64 and im.height >= 32


def test_data_only_report_marks_later_sections_not_run(partial_report):
    html = partial_report.read_text()
    assert set(SECTIONS) <= {a.get("id") for _, a in parse(html).tags}
    assert "198" in section_text(html, "data")
    assert section_text(html, "training").count("not run") == 4
    for section in ("samples", "evaluation"):
        assert "Not run yet" in section_text(html, section)
    # the paper's numbers are still there to compare against, and the benchmarks already measured
    assert "12.72" in section_text(html, "evaluation")
    cost = section_text(html, "cost")
    assert "Not run yet: no cost summary" in cost and "12.3 s" in cost and "0.4 s" in cost and "(2 jobs)" in cost
    assert '<g class="rule"' in html


def test_bad_inputs_are_named_not_hidden(tmp_path):
    results, root = tmp_path / "results", tmp_path / "data"
    write_full(results, root)
    (results / "eval" / "stage2" / "metrics.json").write_text('{"tag": "stage2", ')  # killed mid-write
    with open(root / "checkpoints" / "stage1" / "metrics.jsonl", "a") as f:
        f.write('{"step": 61, "lo')
    (root / "checkpoints" / "stage3" / "samples.png").write_bytes(b"\x89PNG not really")
    problems = build_report(results, root, results / "report.html")
    assert len(problems) == 3
    assert any("stage2/metrics.json" in p and "unreadable JSON" in p for p in problems)
    assert any("stage1/metrics.jsonl" in p and "1 malformed line" in p for p in problems)
    assert any("stage3/samples.png" in p and "unreadable image" in p for p in problems)
    html = (results / "report.html").read_text()
    assert 'id="problems"' in html and "1 malformed line(s) skipped" in html
    assert "stage2" not in section_text(html, "evaluation").replace("stage2/", "")  # left out, not shown as zero
    with pytest.raises(UserError, match="3 input problem"):
        build_report(results, root, tmp_path / "strict.html", strict=True)
    assert not (tmp_path / "strict.html").exists()


def test_cli_writes_atomically_and_rejects_missing_results(tmp_path, capsys):
    import argparse

    results, root = tmp_path / "results", tmp_path / "data"
    write_data_only(results, root)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "site" / "report.html"
    args = parser.parse_args(["--results", str(results), "--root", str(root), "--out", str(out),
                              "--config", str(results / "config.json"), "--dag", str(results / "dag.dot")])
    assert run(args) == 0
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["report.html"]
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(UserError, match="does not exist"):
        run(parser.parse_args(["--results", str(tmp_path / "nope"), "--root", str(root)]))


def test_dag_layout_points_every_edge_right_without_overlaps():
    nodes, edges = parse_dot(RULEGRAPH)
    assert len(nodes) == 12 and len(edges) == 19 and nodes["4"]["label"] == "world"
    layout = layout_dag(nodes, edges)
    depth = layout["depth"]
    assert depth["world"] == 0 and depth["all"] == max(depth.values())
    for a, b in edges:
        assert depth[nodes[a]["label"]] < depth[nodes[b]["label"]]
    columns: dict[int, list[dict]] = {}
    for box in layout["boxes"]:
        columns.setdefault(depth[box["label"]], []).append(box)
    for d, column in columns.items():
        right_edge = max(b["x"] + b["w"] for b in column)
        assert all(right_edge < b["x"] for b in columns.get(d + 1, [])), "columns overlap"
        column.sort(key=lambda b: b["y"])
        for top, bottom in zip(column, column[1:]):
            assert top["y"] + top["h"] < bottom["y"], "boxes in a column overlap"
    for b in layout["boxes"]:
        assert 0 <= b["x"] and b["x"] + b["w"] <= layout["width"] and 0 <= b["y"] and b["y"] + b["h"] <= layout["height"]


def test_dag_layout_survives_a_cycle_and_an_empty_graph():
    nodes, edges = parse_dot('digraph g {\n a[label = "a"];\n a -> b\n b -> a\n b -> c\n}')
    layout = layout_dag(nodes, edges)
    assert {b["label"] for b in layout["boxes"]} == {"a", "b", "c"} and len(layout["edges"]) == 3
    assert layout_dag({}, [])["boxes"] == []


IMAGES_SHOWN = "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length"


def _load(path):
    from browser import find_chromium, load_page

    if find_chromium() is None:
        pytest.skip("chromium is not on PATH (Debian: apt-get install chromium); browser checks skipped")
    return load_page(path, evaluate=(IMAGES_SHOWN, "document.images.length"))


def _assert_offline(page, path):
    self_url = Path(path).resolve().as_uri()
    external = [u for u in page.requests if u != self_url and not u.startswith("data:")]
    assert external == [], external
    assert page.requests and page.requests[0] == self_url
    assert page.failed == [] and page.errors == []


def _ink(png: bytes) -> tuple[float, float]:
    """Grey-level variance and the fraction of pixels that are not background."""
    from PIL import Image, ImageStat

    with Image.open(io.BytesIO(png)) as im:
        grey = im.convert("L")
        hist = grey.histogram()
        return ImageStat.Stat(grey).var[0], 1 - max(hist) / sum(hist)


def test_full_report_in_chromium(full_report):
    page = _load(full_report)
    _assert_offline(page, full_report)
    assert page.values == {IMAGES_SHOWN: 13, "document.images.length": 13}  # every image decoded
    for section in SECTIONS:
        assert f'id="{section}"' in page.dom
    assert page.dom.count('class="rule"') == 12
    variance, inked = _ink(page.screenshot)
    assert variance > 500 and inked > 0.05, (variance, inked)


def test_partial_report_in_chromium(partial_report):
    page = _load(partial_report)
    _assert_offline(page, partial_report)
    assert "Not run yet" in page.dom
    variance, inked = _ink(page.screenshot)
    assert variance > 200 and inked > 0.02, (variance, inked)


def test_intervals_are_shown_and_decide_what_differs(tmp_path):
    results, root = tmp_path / "results", tmp_path / "data"
    tasks = {"single_object": 0.5, "colors": 0.25}
    for tag, overall, interval in (("stage0", 0.0, [0.0, 0.02]), ("stage2", 0.1, [0.01, 0.2]), ("stage4", 0.375, [0.3, 0.45])):
        write_json(results / "eval" / tag / "metrics.json", {
            "tag": tag, "fid": {"value": 100.0, "comparable": False, "interval": {"interval": [90.125, 120.5], "level": 0.95, "draws": 1000}},
            "geneval": {"overall": overall, "tasks": tasks, "comparable": False,
                        "interval": {"interval": interval, "level": 0.95, "draws": 1000,
                                     "tasks": {"single_object": [0.4, 0.6], "colors": [0.1, 0.4]}}}})
    out = results / "report.html"
    build_report(results, root, out)
    evaluation = section_text(out.read_text(), "evaluation")
    assert "[90.12, 120.50]" in evaluation and "[0.30, 0.45]" in evaluation and "[0.40, 0.60]" in evaluation
    assert "95% bootstrap intervals, 1000 draws" in evaluation
    compare = re.search(r'id="geneval-compare">(.*?)</p>', out.read_text(), re.S)[1]
    assert "[0.00, 0.02]" in compare and "the 95% intervals do not overlap" in compare
    # stage2's interval reaches stage0's: the comparison with it would not call them different
    write_json(results / "eval" / "stage4" / "metrics.json", {"tag": "stage4", "geneval": {
        "overall": 0.1, "tasks": tasks, "interval": {"interval": [0.01, 0.2], "level": 0.95, "draws": 10}}})
    build_report(results, root, out)
    assert "overlap: not told apart" in re.search(r'id="geneval-compare">(.*?)</p>', out.read_text(), re.S)[1]


def test_guidance_sweep_is_drawn(tmp_path):
    results, root = tmp_path / "results", tmp_path / "data"
    points = [{"guidance": g, "fid": 50.0 - g, "clip_score": 20.0 + g, "main": g == 5.0} for g in (1.0, 3.0, 5.0, 8.0)]
    write_json(results / "eval" / "stage4" / "metrics.json", {"tag": "stage4", "fid": {"value": 45.0},
                                                              "kid": {"value": 0.01234}, "guidance_sweep": points})
    out = results / "report.html"
    build_report(results, root, out)
    html = out.read_text()
    assert 'id="guidance-sweep"' in html and "FID 42.00 / CLIP 28.00" in section_text(html, "evaluation")
    assert "KID ×10³" in html and "12.34" in section_text(html, "evaluation")  # KID x 1000
    # without a sweep, no such figure
    write_json(results / "eval" / "stage4" / "metrics.json", {"tag": "stage4", "fid": {"value": 45.0}})
    build_report(results, root, out)
    assert 'id="guidance-sweep"' not in out.read_text()


def test_in_training_evaluation_is_plotted_over_the_stages(tmp_path):
    results, root = tmp_path / "results", tmp_path / "data"
    results.mkdir()
    for n, scores in ((1, [0.0, 0.1, 0.3]), (2, [0.35])):
        d = root / "checkpoints" / f"stage{n}"
        d.mkdir(parents=True)
        (d / "evals.jsonl").write_text("".join(json.dumps({"step": 100 * (i + 1), "geneval": g}) + "\n"
                                               for i, g in enumerate(scores)) + '{"step": 4')  # a cut row
        write_json(d / "summary.json", {"stage": n, "steps": 100 * len(scores)})
    out = results / "report.html"
    build_report(results, root, out, config_path=tmp_path / "none.json")
    html = out.read_text()
    assert 'id="in-training-eval"' in html and "not comparable" in section_text(html, "training")
    (root / "checkpoints" / "stage1" / "evals.jsonl").unlink()
    (root / "checkpoints" / "stage2" / "evals.jsonl").unlink()
    build_report(results, root, out, config_path=tmp_path / "none.json")
    assert 'id="in-training-eval"' not in out.read_text()


def test_first_screen_says_in_one_line_what_the_run_shows(tmp_path):
    results, root = tmp_path / "results", tmp_path / "data"
    write_json(root / "checkpoints" / "stage4" / "summary.json", {"stage": 4, "params": 2_983_984})

    def write(tag, overall, interval, single, single_interval):
        write_json(results / "eval" / tag / "metrics.json", {"tag": tag, "geneval": {
            "overall": overall, "tasks": {"single_object": single, "colors": 0.0}, "detector": "shapes-detector",
            "n_prompts": 40, "images_per_prompt": 4, "interval": {
                "interval": interval, "draws": 100,
                "tasks": {"single_object": single_interval, "colors": [0.0, 0.05]}}}})

    write("stage0", 0.0, [0.0, 0.0], 0.0, [0.0, 0.0])
    write("stage4", 0.43, [0.31, 0.52], 0.86, [0.8, 0.91])
    out = results / "report.html"
    build_report(results, root, out)
    line = re.search(r'id="headline">(.*?)</p>', out.read_text(), re.S)[1]
    assert line.startswith("The trained 3.0M model (stage4) follows single object prompts (shapes-GenEval, 160 images)")
    assert "single object 0.86 [0.80, 0.91] vs 0.00 untrained" in line and "overall 0.43 [0.31, 0.52]" in line
    assert "colors" not in line.split(":")[0]  # colours did not beat the untrained model: not claimed
    # a trained model whose intervals reach the untrained one's is not said to follow anything
    write("stage4", 0.04, [0.0, 0.12], 0.25, [0.0, 0.5])
    build_report(results, root, out)
    line = re.search(r'id="headline">(.*?)</p>', out.read_text(), re.S)[1]
    assert "does not yet follow its prompts measurably" in line and "intervals overlap" in line
