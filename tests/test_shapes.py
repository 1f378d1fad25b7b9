"""The smoke world (microdit.data.shapes) and its exact detector (microdit.data.shapes_detect)."""
from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from microdit.cli import main as cli_main
from microdit.data import shapes
from microdit.data.shapes import (
    GENEVAL_TASKS,
    caption_for,
    geneval_prompts,
    objects_for_prompt,
    place_objects,
    sample_objects,
    task_prompts,
)
from microdit.data.shapes_draw import PALETTE, RELATIONS, SHAPES, group_relation, relative_position, render, shape_mask
from microdit.data.shapes_detect import detect
from microdit.metrics.geneval import evaluate_prompt

COUNTS = {"shapes_real": 40, "shapes_sa": 12, "shapes_synth": 24, "shapes_eval": 16}
BAD = 4  # cycles dead URL, corrupt, too small, dead URL
SIZE, SMALL = 128, 32


def world_args(out: Path, seed: int = 0, counts: dict[str, int] = COUNTS) -> list[str]:
    args = ["world", "--out", str(out), "--image-size", str(SIZE), "--seed", str(seed)]
    args += ["--bad-per-source", str(BAD), "--small-size", str(SMALL)]
    for source, n in counts.items():
        args += ["--count", f"{source}={n}"]
    return args


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "world"
    assert cli_main(world_args(out)) == 0
    return out


def read_rows(world: Path, source: str) -> list[dict]:
    return pq.read_table(world / f"{source}.parquet").to_pylist()


def url_path(url: str) -> Path:
    assert url.startswith("file:///")
    return Path(url[len("file://") :])


def good_rows(world: Path, source: str) -> list[dict]:
    summary = json.loads((world / "_summary.json").read_text())
    bad = {k for keys in summary["sources"][source]["bad"].values() for k in keys}
    return [r for r in read_rows(world, source) if r["key"] not in bad]


def as_tuples(objects: list[dict]) -> list[tuple]:
    return sorted((o["shape"], o["color"], tuple(o["bbox"]), tuple(o["center"])) for o in objects)


# ---------------------------------------------------------------- geometry and the position rule
def test_shape_masks_fill_their_box_and_are_one_piece():
    from scipy import ndimage

    for shape in SHAPES:
        for side in range(4, 49):
            for w, h in [(side, side), (side, side + side // 5)]:  # world boxes are square; near-square holds too
                mask = shape_mask(shape, w, h)
                assert mask.shape == (h, w)
                assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any(), (shape, w, h)
                assert ndimage.label(mask, structure=np.ones((3, 3)))[1] == 1, (shape, w, h)
    fill = {s: shape_mask(s, 200, 200).mean() for s in SHAPES}
    assert fill["square"] == 1.0
    assert fill["circle"] == pytest.approx(np.pi / 4, abs=0.01)
    assert fill["triangle"] == pytest.approx(0.5, abs=0.01)
    assert 0.3 < fill["star"] < 0.5
    with pytest.raises(ValueError, match="unknown shape"):
        shape_mask("hexagon", 10, 10)


def test_relative_position_follows_geneval_rule():
    a, b = [0, 40, 20, 60], [80, 40, 100, 60]  # same row, far apart
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    assert relative_position([40, 0, 60, 20], [40, 80, 60, 100]) == {"above"}
    # on the diagonal both axes pass 0.5
    assert relative_position([0, 0, 10, 10], [50, 50, 60, 60]) == {"left of", "above"}
    # centres closer than 10% of the summed sizes cancel out
    assert relative_position([0, 0, 50, 50], [4, 4, 54, 54]) == set()
    # mostly horizontal: dy is large enough to matter only when it beats dx
    assert relative_position([0, 0, 10, 10], [60, 20, 70, 30]) == {"left of"}
    for rel, opposite in [("left of", "right of"), ("above", "below")]:
        rng = np.random.default_rng(1)
        for _ in range(50):
            x, y = rng.integers(0, 100, size=(2, 2))
            box_a, box_b = [*x, *(x + 10)], [*y, *(y + 14)]
            assert (rel in relative_position(box_a, box_b)) == (opposite in relative_position(box_b, box_a))


@pytest.mark.parametrize("relation", RELATIONS)
def test_relation_layouts_hold_exactly_one_relation(relation):
    rng = np.random.default_rng(7)
    for n_a, n_b in [(1, 1), (2, 1), (1, 2), (2, 2), (3, 1)]:
        items = [("circle", "red")] * n_a + [("square", "blue")] * n_b
        objects = place_objects(rng, SIZE, items, relation, split=n_a)
        assert objects is not None
        for a in objects[:n_a]:
            for b in objects[n_a:]:
                assert relative_position(a["bbox"], b["bbox"]) == {relation}
        assert group_relation(objects[:n_a], objects[n_a:]) == relation
        for i, p in enumerate(objects):  # no overlap, room for outlines between neighbours
            for q in objects[i + 1 :]:
                assert shapes._apart(p["bbox"], q["bbox"], 3)
            assert 0 < p["bbox"][0] and p["bbox"][2] < SIZE and 0 < p["bbox"][1] and p["bbox"][3] < SIZE


# ---------------------------------------------------------------- the CLI's output
def test_world_rows_columns_and_counts(world):
    summary = json.loads((world / "_summary.json").read_text())
    keys = []
    for source, n in COUNTS.items():
        table = pq.read_table(world / f"{source}.parquet")
        expected = ["url", "key", "objects"] if source == "shapes_sa" else ["url", "caption", "key", "objects"]
        assert table.column_names == expected
        rows = table.to_pylist()
        assert len(rows) == n + BAD == summary["sources"][source]["rows"]
        assert len(good_rows(world, source)) == n
        keys += [r["key"] for r in rows]
        for row in rows:
            assert url_path(row["url"]).is_absolute()
            assert url_path(row["url"]).parent == (world / "images" / source).resolve()
            objects = json.loads(row["objects"])
            assert 1 <= len(objects) <= shapes.MAX_OBJECTS
            assert all(set(o) == {"shape", "color", "bbox", "center"} for o in objects)
            if source != "shapes_sa":
                assert isinstance(row["caption"], str) and row["caption"]
    assert len(keys) == len(set(keys)), "keys must be unique across the world"


def test_world_bad_rows_are_as_specified(world):
    summary = json.loads((world / "_summary.json").read_text())
    for source in COUNTS:
        bad = summary["sources"][source]["bad"]
        assert {k: len(v) for k, v in bad.items()} == {"dead_url": 2, "corrupt": 1, "too_small": 1}
        rows = {r["key"]: r for r in read_rows(world, source)}
        for key in bad["dead_url"]:
            assert not url_path(rows[key]["url"]).exists()
        for key in bad["corrupt"]:
            path = url_path(rows[key]["url"])
            assert path.exists()
            with pytest.raises(Exception):
                with Image.open(path) as im:
                    im.load()
        for key in bad["too_small"]:
            with Image.open(url_path(rows[key]["url"])) as im:
                assert im.size == (SMALL, SMALL)
        # bad rows are spread through the list, not piled at its end
        order = [r["key"] for r in read_rows(world, source)]
        assert order.index(bad["dead_url"][0]) < len(order) - BAD
    for source in COUNTS:
        for row in good_rows(world, source):
            with Image.open(url_path(row["url"])) as im:
                assert im.size == (SIZE, SIZE) and im.mode == "RGB"


def test_world_is_deterministic_and_rerun_is_a_no_op(world, tmp_path):
    files = sorted(p for p in world.rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    assert cli_main(world_args(world)) == 0
    assert sorted(p for p in world.rglob("*") if p.is_file()) == files
    for p, (data, mtime) in before.items():
        assert p.read_bytes() == data, p
        if p.suffix == ".png":
            assert p.stat().st_mtime_ns == mtime, f"{p} rewritten with identical content"

    # the same seed elsewhere: same images, captions and objects (only the absolute URLs differ)
    other = tmp_path / "world"
    assert cli_main(world_args(other)) == 0
    for source in COUNTS:
        a, b = read_rows(world, source), read_rows(other, source)
        assert [(r["key"], r.get("caption"), r["objects"]) for r in a] == [
            (r["key"], r.get("caption"), r["objects"]) for r in b
        ]
    for p in (world / "images").rglob("*.png"):
        assert (other / p.relative_to(world)).read_bytes() == p.read_bytes()


def test_world_seed_and_counts(world, tmp_path):
    out = tmp_path / "world"
    assert cli_main(world_args(out, seed=1)) == 0
    reseeded = [r["objects"] for r in read_rows(out, "shapes_real")]
    assert reseeded != [r["objects"] for r in read_rows(world, "shapes_real")]

    # fewer images: the kept ones are unchanged (per-image streams), the extra files are gone
    fewer = dict(COUNTS, shapes_real=10)
    out0 = tmp_path / "world0"
    assert cli_main(world_args(out0)) == 0
    assert cli_main(world_args(out0, counts=fewer)) == 0
    kept = sorted((out0 / "images" / "shapes_real").glob("*.png"))
    assert len(kept) == 10 + 2  # + the corrupt file and the small image
    for p in kept:
        assert p.read_bytes() == (world / "images" / "shapes_real" / p.name).read_bytes()


def test_sources_are_disjoint_and_styles_differ(world):
    seen = collections.Counter()
    for source in COUNTS:
        for row in good_rows(world, source):
            seen[row["objects"]] += 1
    assert max(seen.values()) == 1, "an image's layout appears twice across sources"

    def border_spread(source):  # the synthetic style has a gradient backdrop, the real one a flat one
        spreads = []
        for row in good_rows(world, source)[:8]:
            arr = np.asarray(Image.open(url_path(row["url"])), dtype=int)
            corners = arr[[0, 0, -1, -1], [0, -1, 0, -1]]
            spreads.append(np.abs(corners - corners[0]).max())
        return spreads

    assert max(border_spread("shapes_real")) == 0
    assert min(border_spread("shapes_synth")) > 5
    synth_captions = [r["caption"] for r in good_rows(world, "shapes_synth")]
    real_captions = [r["caption"] for r in good_rows(world, "shapes_real")]
    assert all(re.search(r"vector|illustration|outline", c) for c in synth_captions)
    assert not any(re.search(r"vector|illustration|outline", c) for c in real_captions)


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert cli_main(["world", "--out", str(tmp_path), "--count", "shapes_nope=3"]) == 2
    assert "SOURCE=N" in capsys.readouterr().err
    assert cli_main(["world", "--out", str(tmp_path), "--count", "shapes_real=-1"]) == 2
    assert cli_main(["world", "--out", str(tmp_path), "--small-size", "128", "--image-size", "128"]) == 2
    err = capsys.readouterr().err
    assert "--small-size" in err and len(err.strip().splitlines()) == 2
    assert not list(tmp_path.iterdir()), "a rejected command wrote output"


# ---------------------------------------------------------------- detector and captions on every image
def test_detector_recovers_every_rendered_object(world):
    n = 0
    for source in COUNTS:
        for row in good_rows(world, source):
            truth = json.loads(row["objects"])
            found = detect(Image.open(url_path(row["url"])))
            assert as_tuples(found) == as_tuples(truth), row["key"]
            assert all(d["score"] == 1.0 for d in found)
            n += 1
    assert n == sum(COUNTS.values())


_NUMBERS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}
_REL_WORDS = {"to the left of": "left of", "to the right of": "right of", "left of": "left of",
              "right of": "right of", "above": "above", "below": "below"}  # fmt: skip
_NP = rf"(a|an|two|three|four) (?:({'|'.join(PALETTE)}) )?({'|'.join(SHAPES)})s?"
_SCENE = re.compile(rf"{_NP}(?:(?:, | and )({_NP}(?:(?:, | and ){_NP})*)| (?P<rel>{'|'.join(_REL_WORDS)}) {_NP})?")


def parse_caption(caption: str) -> tuple[list[tuple[int, str | None, str]], str | None]:
    """Independent reading of the world's caption grammar: ([(count, colour, shape)], relation)."""
    matches = [m for m in _SCENE.finditer(caption)]
    assert len(matches) == 1, caption
    m = matches[0]
    phrases = re.findall(_NP, m.group(0))
    groups = [(_NUMBERS[num], color or None, shape) for num, color, shape in phrases]
    relation = _REL_WORDS[m["rel"]] if m["rel"] else None
    return groups, relation


def check_caption(caption: str, objects: list[dict]) -> str | None:
    groups, relation = parse_caption(caption)
    assert sum(n for n, _, _ in groups) == len(objects), (caption, objects)  # nothing left unsaid

    def members(color, shape):
        return [o for o in objects if o["shape"] == shape and (color is None or o["color"] == color)]

    for count, color, shape in groups:
        assert len(members(color, shape)) == count, (caption, objects)
    if relation is not None:
        assert len(groups) == 2
        for a in members(*groups[0][1:]):
            for b in members(*groups[1][1:]):
                assert relative_position(a["bbox"], b["bbox"]) == {relation}, (caption, a, b)
    return relation


def test_every_caption_is_true_of_its_objects(world):
    kinds = collections.Counter()
    for source in ["shapes_real", "shapes_synth", "shapes_eval"]:
        for row in read_rows(world, source):
            objects = json.loads(row["objects"])
            relation = check_caption(row["caption"], objects)
            groups, _ = parse_caption(row["caption"])
            kinds["relation" if relation else "single" if len(objects) == 1 else "counting" if len(groups) == 1
                  else "several"] += 1  # fmt: skip
            kinds["no colour" if any(c is None for _, c, _ in groups) else "colour"] += 1
    assert all(kinds[k] > 0 for k in ["relation", "single", "counting", "several", "colour", "no colour"]), kinds


def test_captions_on_many_scenes_and_styles():
    for i in range(300):
        rng = np.random.default_rng([5, i])
        objects = sample_objects(rng, SIZE)
        for style in ["real", "synth", "geneval"]:
            check_caption(caption_for(objects, style, rng), objects)
        fixed = caption_for(objects)  # no rng: fixed wording, colours always said
        assert fixed == caption_for(objects) and all(c for _, c, _ in parse_caption(fixed)[0])
    two = [shapes.make_object("circle", "red", 10, 50, 20), shapes.make_object("star", "blue", 90, 50, 20)]
    assert caption_for(two) == "a red circle to the left of a blue star"
    assert caption_for(two, "geneval") == "a photo of a red circle left of a blue star"
    assert caption_for([shapes.make_object("triangle", "orange", 10, 10, 30)]) == "an orange triangle"


def test_detector_degrades_gracefully_on_blurred_noisy_images():
    rng = np.random.default_rng(3)
    scores, crisp_scores = [], []
    for _ in range(20):
        objects = sample_objects(rng, SIZE)
        image = render(objects, SIZE, "real", rng)
        crisp_scores += [d["score"] for d in detect(image)]
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(2)), dtype=float)
        noisy = np.clip(blurred + rng.normal(0, 10, blurred.shape), 0, 255).astype(np.uint8)
        found = detect(noisy)
        assert all(0.0 <= d["score"] < 1.0 for d in found)
        assert all(d["bbox"][2] - d["bbox"][0] > 0 for d in found)
        scores += [d["score"] for d in found]
    assert min(crisp_scores) == 1.0
    assert 0.2 < np.mean(scores) < 0.9
    noise = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    assert not [d for d in detect(noise) if d["score"] > 0.3]
    # specks below the minimum area are not objects
    canvas = np.full((SIZE, SIZE, 3), 245, dtype=np.uint8)
    canvas[10:13, 10:13] = PALETTE["red"]
    canvas[60:90, 60:90] = PALETTE["blue"]
    assert [(d["shape"], d["color"]) for d in detect(canvas)] == [("square", "blue")]


def test_detector_accepts_arrays_and_rejects_other_shapes():
    objects = [shapes.make_object("star", "green", 20, 30, 40), shapes.make_object("circle", "purple", 80, 30, 30)]
    image = render(objects, SIZE)
    expected = as_tuples(objects)
    assert as_tuples(detect(image)) == expected
    assert as_tuples(detect(np.asarray(image))) == expected
    assert as_tuples(detect(np.asarray(image, dtype=np.float32) / 255.0)) == expected
    assert as_tuples(detect(image.convert("RGBA"))) == expected
    with pytest.raises(ValueError, match="RGB image"):
        detect(np.zeros((8, 8)))


# ---------------------------------------------------------------- GenEval-style prompts
def test_prompt_helpers_cover_the_six_tasks_in_geneval_format():
    prompts = geneval_prompts()
    assert {p["tag"] for p in prompts} == set(GENEVAL_TASKS)
    assert len({p["prompt"] for p in prompts}) == len(prompts)
    for p in prompts:
        assert set(p) <= {"tag", "include", "exclude", "prompt"} and p["prompt"].startswith("a photo of ")
        for req in p["include"] + p.get("exclude", []):
            assert req["class"] in SHAPES and req.get("color", "red") in PALETTE
    by_tag = collections.defaultdict(list)
    for p in prompts:
        by_tag[p["tag"]].append(p)
    assert len(by_tag["single_object"]) == len(SHAPES)
    assert len(by_tag["colors"]) == len(SHAPES) * len(PALETTE)
    for p in by_tag["counting"]:
        (inc,), (exc,) = p["include"], p["exclude"]
        assert exc == {"class": inc["class"], "count": inc["count"] + 1}
    for p in by_tag["position"]:
        target, mover = p["include"]
        assert "position" not in target and mover["position"][1] == 0 and mover["position"][0] in RELATIONS
        assert p["prompt"] == f"a photo of a {mover['class']} {mover['position'][0]} a {target['class']}"
    assert task_prompts("color_attr")[0]["include"][0]["color"] != task_prompts("color_attr")[0]["include"][1]["color"]
    capped = geneval_prompts(per_task=3, seed=1)
    assert capped == geneval_prompts(per_task=3, seed=1)
    assert collections.Counter(p["tag"] for p in capped) == {t: min(3, len(task_prompts(t))) for t in GENEVAL_TASKS}
    with pytest.raises(ValueError):
        task_prompts("spatial")


def test_oracle_scenes_pass_and_wrong_scenes_fail_the_scorer():
    rng = np.random.default_rng(11)
    for meta in geneval_prompts(per_task=6, seed=2):
        objects = objects_for_prompt(meta, rng, SIZE)
        found = detect(render(objects, SIZE, "synth", rng))
        correct, reason = evaluate_prompt(meta, found)
        assert correct, (meta, reason)

    def score(meta, objects):
        return evaluate_prompt(meta, detect(render(objects, SIZE)))[0]

    red_left = shapes.make_object("circle", "red", 10, 50, 24)
    blue_right = shapes.make_object("square", "blue", 90, 50, 24)
    assert score(shapes.position_prompt("circle", "left of", "square"), [red_left, blue_right])
    assert not score(shapes.position_prompt("circle", "right of", "square"), [red_left, blue_right])
    assert not score(shapes.position_prompt("circle", "above", "square"), [red_left, blue_right])
    assert score(shapes.color_attr_prompt("circle", "red", "square", "blue"), [red_left, blue_right])
    assert not score(shapes.color_attr_prompt("circle", "blue", "square", "red"), [red_left, blue_right])
    assert not score(shapes.colors_prompt("circle", "green"), [red_left])
    assert not score(shapes.two_object_prompt("circle", "star"), [red_left, blue_right])
    three = [shapes.make_object("star", "yellow", x, 40, 20) for x in (5, 50, 95)]
    assert score(shapes.counting_prompt("star", 3), three)
    assert not score(shapes.counting_prompt("star", 2), three)  # too many: the exclude clause
    assert not score(shapes.counting_prompt("star", 4), three)
    assert score(shapes.single_object_prompt("star"), three)  # GenEval asks for at least one

