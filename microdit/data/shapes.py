"""The smoke preset's world: coloured shapes on a plain background, with captions true of the image.

Every image is a handful (1-4) of flat-coloured, non-overlapping shapes. Its ground truth is a list
of objects `{shape, color, bbox: [x0, y0, x1, y1], center: [x, y]}` (pixel edges, x1/y1 exclusive),
and its caption is derived from that list alone, so a caption states exact counts, colours and
relative positions that hold in the picture. Relative positions follow GenEval's rule on boxes
(`relative_position`), and layouts that carry a relation are sampled until every pair of objects
satisfies exactly that relation and no other.

The world stands in for the paper's sources (see `SOURCES`): a captioned "real" set, an uncaptioned
set that the caption stage must label, a "synthetic" set with a visibly different style (gradient
backdrop, outlined shapes, prompt-like captions) and a held-out evaluation set. Each image is drawn
from its own random stream `(seed, source, index)`, so sources never share images and a count change
leaves the other images untouched.

`microdit world` writes `<out>/<source>.parquet` URL lists (file:// URLs) and the PNGs under
`<out>/images/<source>/`, plus a few deliberately bad rows per source (a dead URL, a corrupt file, an
image below the minimum size) so that the download funnel's skip counting is exercised.

The same vocabulary gives GenEval-style prompts for its six tasks (`geneval_prompts`), in GenEval's
metadata format, and `objects_for_prompt` draws a scene that satisfies one (an oracle generator).

How the objects look and where they stand (palette, masks, the position rule, rendering) is
`microdit.data.shapes_draw`; this module lays out scenes, captions them and writes the world.
"""
from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from microdit.data.shapes_draw import PALETTE, RELATIONS, SHAPES, group_relation, make_object, outline_width, render

# ---------------------------------------------------------------- vocabulary
GENEVAL_TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
MAX_OBJECTS = 4

# source -> (caption style or None when uncaptioned, render style, stream id); stream ids keep
# every source's random streams disjoint from the others'.
SOURCES: dict[str, tuple[str | None, str, int]] = {
    "shapes_real": ("real", "real", 1),
    "shapes_sa": (None, "real", 2),
    "shapes_synth": ("synth", "synth", 3),
    "shapes_eval": ("real", "real", 4),
}
DEFAULT_COUNTS = {"shapes_real": 256, "shapes_sa": 128, "shapes_synth": 128, "shapes_eval": 64}
BAD_KINDS: tuple[str, ...] = ("dead_url", "corrupt", "too_small")

_NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
_REAL_TEMPLATES = ["{}", "{}", "{} on a white background", "a drawing of {}", "a simple picture of {}"]
_SYNTH_TEMPLATES = [
    "{}, flat vector art, bold outlines, pastel gradient background",
    "digital illustration of {}, clean outlines, soft gradient, 4k",
    "{} --style vector --ar 1:1",
    "icon art: {}, outlined, gradient backdrop, highly detailed",
]
_RELATION_WORDS = {  # caption style -> GenEval relation -> phrase
    "real": {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"},
    "geneval": {r: r for r in RELATIONS},
}
_RELATION_WORDS["synth"] = _RELATION_WORDS["real"]

# Object side as a fraction of the image, by how many objects share it: crowded scenes use smaller shapes.
_SIZE_RANGE = {1: (0.28, 0.50), 2: (0.20, 0.36), 3: (0.16, 0.28), 4: (0.14, 0.24)}


# ---------------------------------------------------------------- layouts
def place_objects(
    rng: np.random.Generator,
    size: int,
    items: list[tuple[str, str]],
    relation: str | None = None,
    split: int = 0,
    tries: int = 200,
) -> list[dict] | None:
    """Lay out `items` ((shape, colour) pairs) without overlap on a size x size canvas.

    With `relation`, items[:split] must each stand in exactly that relation to each of items[split:]
    (GenEval rule); the A and B groups are drawn in opposite halves and the layout is resampled
    until the rule agrees. Returns None when no layout was found within `tries`.
    """
    if not 1 <= len(items) <= MAX_OBJECTS:
        raise ValueError(f"a scene holds 1..{MAX_OBJECTS} objects, got {len(items)}")
    lo, hi = _SIZE_RANGE[len(items)]
    gap = 3 + 2 * outline_width(size)  # same-colour neighbours never touch, outlines never reach a fill
    margin = 1 + outline_width(size)
    for attempt in range(tries):
        shrink = 0.9 ** (attempt // 50)  # crowded draws get smaller shapes
        objects: list[dict] = []
        for i, (shape, color) in enumerate(items):
            side = max(4, int(rng.uniform(lo, hi) * size * shrink))
            side = min(side, size - 2 * margin)
            (cx_lo, cx_hi), (cy_lo, cy_hi) = _centre_region(relation, i < split)
            # top-left corners that keep the box on the canvas and its centre in the region
            last = size - margin - side
            x_range = (max(margin, int(cx_lo * size - side / 2)), min(last, int(cx_hi * size - side / 2)))
            y_range = (max(margin, int(cy_lo * size - side / 2)), min(last, int(cy_hi * size - side / 2)))
            if x_range[0] > x_range[1] or y_range[0] > y_range[1]:
                break
            for _ in range(50):
                x0 = int(rng.integers(x_range[0], x_range[1] + 1))
                y0 = int(rng.integers(y_range[0], y_range[1] + 1))
                candidate = make_object(shape, color, x0, y0, side)
                if all(_apart(candidate["bbox"], o["bbox"], gap) for o in objects):
                    objects.append(candidate)
                    break
            else:
                break
        if len(objects) < len(items):
            continue
        if relation is not None and group_relation(objects[:split], objects[split:]) != relation:
            continue
        return objects
    return None


def _centre_region(relation: str | None, in_a: bool) -> tuple[tuple[float, float], tuple[float, float]]:
    """(x range, y range) for an object's centre, as fractions of the image side."""
    full, first, second = (0.0, 1.0), (0.0, 0.5), (0.5, 1.0)
    if relation is None:
        return full, full
    a_first = relation in ("left of", "above")
    half = first if a_first == in_a else second
    return (half, full) if relation in ("left of", "right of") else (full, half)


def _apart(a: list[int], b: list[int], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def sample_objects(rng: np.random.Generator, size: int) -> list[dict]:
    """A random scene covering GenEval's task kinds: single, pairs, counts, positions, colour binding."""
    all_colors, all_shapes = list(PALETTE), list(SHAPES)
    kind = rng.choice(["single", "two", "counting", "position", "mixed"], p=[0.2, 0.2, 0.2, 0.25, 0.15])

    def pick_two() -> tuple[tuple[str, str], tuple[str, str]]:
        shape_a = str(rng.choice(all_shapes))
        shape_b = str(rng.choice([s for s in all_shapes if s != shape_a])) if rng.random() < 0.7 else shape_a
        color_a = str(rng.choice(all_colors))
        color_b = str(rng.choice([c for c in all_colors if c != color_a] if shape_b == shape_a else all_colors))
        return (shape_a, color_a), (shape_b, color_b)

    relation, split = None, 0
    if kind == "single":
        items = [(str(rng.choice(all_shapes)), str(rng.choice(all_colors)))]
    elif kind == "counting":
        items = [(str(rng.choice(all_shapes)), str(rng.choice(all_colors)))] * int(rng.integers(2, MAX_OBJECTS + 1))
    else:
        a, b = pick_two()
        n_a, n_b = 1, 1
        if kind == "mixed" or (kind == "position" and rng.random() < 0.4):
            n_a, n_b = [(2, 1), (1, 2), (2, 2), (3, 1), (1, 3)][int(rng.integers(5))]
        items, split = [a] * n_a + [b] * n_b, n_a
        if kind == "position":
            relation = str(rng.choice(RELATIONS))
    objects = place_objects(rng, size, items, relation, split)
    if objects is None and relation is not None:  # too crowded for a clean relation: keep the objects
        objects = place_objects(rng, size, items)
    if objects is None:
        raise RuntimeError(f"could not lay out {items} on a {size}px canvas")
    return objects

# ---------------------------------------------------------------- captions
def _groups(objects: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """(shape, colour, members) in order of first appearance."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for obj in objects:
        groups.setdefault((obj["shape"], obj["color"]), []).append(obj)
    return [(shape, color, members) for (shape, color), members in groups.items()]


def noun_phrase(shape: str, count: int, color: str | None = None) -> str:
    """'a red circle', 'an orange star', 'three squares'."""
    if count not in _NUMBER_WORDS:
        raise ValueError(f"counts 1..{max(_NUMBER_WORDS)} have words, got {count}")
    words = ([color] if color else []) + [shape + ("s" if count > 1 else "")]
    number = _NUMBER_WORDS[count]
    if count == 1 and words[0][0] in "aeiou":
        number = "an"
    return " ".join([number, *words])


def scene_phrase(objects: list[dict], style: str = "real", rng: np.random.Generator | None = None) -> str:
    """The caption's core, true of `objects`: exact counts per (shape, colour), and the relation
    between two groups when one holds cleanly. With `rng`, colours and relations are sometimes left
    out (only where the phrase stays exact); without it they are always said."""
    if not objects:
        raise ValueError("cannot caption an empty scene")
    groups = _groups(objects)
    distinct_shapes = len({shape for shape, _, _ in groups}) == len(groups)
    say_color = not distinct_shapes or rng is None or rng.random() < 0.85
    phrases = [noun_phrase(shape, len(members), color if say_color else None) for shape, color, members in groups]
    if len(groups) == 2:
        relation = group_relation(groups[0][2], groups[1][2])
        if relation is not None and (rng is None or rng.random() < 0.9):
            return f"{phrases[0]} {_RELATION_WORDS[style][relation]} {phrases[1]}"
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_for(objects: list[dict], style: str = "real", rng: np.random.Generator | None = None) -> str:
    """A caption true of `objects` in one of the world's voices.

    "real": plain descriptions ("two red circles above a blue square"); "synth": prompt-like text
    around the same phrase ("... , flat vector art, bold outlines"); "geneval": "a photo of ...",
    with GenEval's relation words. `rng` varies the wording; without it the wording is fixed.
    """
    if style not in _RELATION_WORDS:
        raise ValueError(f"unknown caption style {style!r}; expected one of {sorted(_RELATION_WORDS)}")
    phrase = scene_phrase(objects, style, rng)
    if style == "geneval":
        return f"a photo of {phrase}"
    templates = _REAL_TEMPLATES if style == "real" else _SYNTH_TEMPLATES
    template = templates[0] if rng is None else templates[int(rng.integers(len(templates)))]
    return template.format(phrase)


# ---------------------------------------------------------------- GenEval-style prompts
def _prompt(tag: str, include: list[dict], phrase: str, exclude: list[dict] | None = None) -> dict:
    meta: dict[str, Any] = {"tag": tag, "include": include}
    if exclude:
        meta["exclude"] = exclude
    meta["prompt"] = f"a photo of {phrase}"
    return meta


def single_object_prompt(shape: str) -> dict:
    return _prompt("single_object", [{"class": shape, "count": 1}], noun_phrase(shape, 1))


def two_object_prompt(shape_a: str, shape_b: str) -> dict:
    include = [{"class": shape_a, "count": 1}, {"class": shape_b, "count": 1}]
    return _prompt("two_object", include, f"{noun_phrase(shape_a, 1)} and {noun_phrase(shape_b, 1)}")


def counting_prompt(shape: str, count: int) -> dict:
    """Exactly `count`: at least `count` found and not `count + 1`, as GenEval scores counting."""
    return _prompt(
        "counting",
        [{"class": shape, "count": count}],
        noun_phrase(shape, count),
        exclude=[{"class": shape, "count": count + 1}],
    )


def colors_prompt(shape: str, color: str) -> dict:
    return _prompt("colors", [{"class": shape, "count": 1, "color": color}], noun_phrase(shape, 1, color))


def position_prompt(shape_a: str, relation: str, shape_b: str) -> dict:
    """'a photo of a A <relation> a B': B is the target (include[0]); A carries the relation to it."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    include = [{"class": shape_b, "count": 1}, {"class": shape_a, "count": 1, "position": [relation, 0]}]
    return _prompt("position", include, f"{noun_phrase(shape_a, 1)} {relation} {noun_phrase(shape_b, 1)}")


def color_attr_prompt(shape_a: str, color_a: str, shape_b: str, color_b: str) -> dict:
    include = [{"class": shape_a, "count": 1, "color": color_a}, {"class": shape_b, "count": 1, "color": color_b}]
    phrase = f"{noun_phrase(shape_a, 1, color_a)} and {noun_phrase(shape_b, 1, color_b)}"
    return _prompt("color_attr", include, phrase)


def task_prompts(task: str) -> list[dict]:
    """Every prompt of one GenEval task over this world's shapes, colours and relations."""
    pairs = list(itertools.combinations(SHAPES, 2))
    if task == "single_object":
        return [single_object_prompt(s) for s in SHAPES]
    if task == "two_object":
        return [two_object_prompt(a, b) for a, b in pairs]
    if task == "counting":
        return [counting_prompt(s, n) for s in SHAPES for n in range(2, MAX_OBJECTS + 1)]
    if task == "colors":
        return [colors_prompt(s, c) for s in SHAPES for c in PALETTE]
    if task == "position":
        return [position_prompt(a, r, b) for a, b in itertools.permutations(SHAPES, 2) for r in RELATIONS]
    if task == "color_attr":
        return [color_attr_prompt(a, ca, b, cb) for a, b in pairs for ca, cb in itertools.permutations(PALETTE, 2)]
    raise ValueError(f"unknown GenEval task {task!r}; expected one of {GENEVAL_TASKS}")


def geneval_prompts(per_task: int | None = None, seed: int = 0) -> list[dict]:
    """Prompts for all six tasks in GenEval's metadata format; `per_task` caps each task by a seeded
    sample (order kept), None keeps all of them."""
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    for task in GENEVAL_TASKS:
        prompts = task_prompts(task)
        if per_task is not None and per_task < len(prompts):
            prompts = [prompts[i] for i in sorted(rng.choice(len(prompts), per_task, replace=False))]
        out.extend(prompts)
    return out


def objects_for_prompt(meta: dict, rng: np.random.Generator, size: int) -> list[dict]:
    """A scene that satisfies a GenEval-style prompt (an oracle generator, for testing the scorer)."""
    items: list[tuple[str, str]] = []
    starts = []
    for req in meta["include"]:
        color = req.get("color") or str(rng.choice(list(PALETTE)))
        starts.append(len(items))
        items += [(req["class"], color)] * req["count"]
    relation, split = None, 0
    positioned = [r for r in meta["include"] if "position" in r]
    if positioned:  # supported as GenEval writes it: the last group relates to the first
        relation, target = positioned[0]["position"]
        if target != 0 or meta["include"][-1] is not positioned[0]:
            raise ValueError("objects_for_prompt supports a position on the last group relative to the first")
        items = items[starts[-1] :] + items[: starts[-1]]
        split = len(items) - starts[-1]
    objects = place_objects(rng, size, items, relation, split, tries=1000)
    if objects is None:
        raise RuntimeError(f"could not lay out a scene for {meta['prompt']!r} on a {size}px canvas")
    return objects


# ---------------------------------------------------------------- the CLI
def add_arguments(parser) -> None:
    parser.add_argument(
        "--out", required=True, help="world directory: <out>/<source>.parquet and <out>/images/<source>/"
    )
    from microdit.settings import add_flags

    add_flags(parser, "world", top=("seed",))  # --image-size, --bad-per-source, --small-size; the world seed
    parser.add_argument(
        "--count",
        action="append",
        default=[],
        metavar="SOURCE=N",
        help=f"good images for a source (repeatable); defaults {DEFAULT_COUNTS}",
    )


def _parse_counts(specs: list[str]) -> dict[str, int]:
    from microdit.errors import UserError

    counts = dict(DEFAULT_COUNTS)
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or name not in SOURCES:
            raise UserError(f"--count {spec!r}: expected SOURCE=N with SOURCE one of {', '.join(SOURCES)}")
        try:
            counts[name] = int(value)
        except ValueError:
            raise UserError(f"--count {spec!r}: N must be an integer") from None
        if counts[name] < 0:
            raise UserError(f"--count {spec!r}: N must be >= 0")
    return counts


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write that leaves an identical file alone, so a rerun touches nothing."""
    from microdit.io import atomic_path

    if path.exists() and path.read_bytes() == data:
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _bad_row(kind: str, rng: np.random.Generator, image_size: int, small_size: int) -> tuple[bytes | None, list[dict]]:
    """(file bytes, or None for a dead URL; the objects the row claims) of one deliberately bad row.

    A too-small row is a genuine image whose objects are in its own, small, pixel coordinates.
    """
    if kind == "too_small":  # a genuine, decodable image: only the size filter may drop it
        objects = sample_objects(rng, small_size)
        return _png_bytes(render(objects, small_size, "real", rng)), objects
    objects = sample_objects(rng, image_size)
    if kind == "dead_url":
        return None, objects
    # a PNG signature and the start of a header chunk, then noise: recognised as PNG, never decodes
    return b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + rng.bytes(200), objects


def build_source(
    out: Path, source: str, count: int, image_size: int, seed: int, bad: int, small_size: int
) -> dict:
    """Write one source's images and URL list; returns its summary entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from microdit.io import atomic_path

    caption_style, render_style, stream = SOURCES[source]
    image_dir = (out / "images" / source).resolve()
    image_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    written: set[str] = set()
    for index in tqdm(range(count), desc=f"world {source}", disable=None, leave=False):
        rng = np.random.default_rng([seed, stream, index])
        objects = sample_objects(rng, image_size)
        image = render(objects, image_size, render_style, rng)
        caption = caption_for(objects, caption_style, rng) if caption_style else None
        key = f"{source}_{index:06d}"
        path = image_dir / f"{key}.png"
        _write_if_changed(path, _png_bytes(image))
        written.add(path.name)
        rows.append({"url": path.as_uri(), "caption": caption, "key": key, "objects": json.dumps(objects)})

    bad_keys: dict[str, list[str]] = {k: [] for k in BAD_KINDS}
    for j in range(bad):
        kind = BAD_KINDS[j % len(BAD_KINDS)]
        rng = np.random.default_rng([seed, stream, 1_000_000 + j])
        data, objects = _bad_row(kind, rng, image_size, small_size)
        caption = caption_for(objects, caption_style, rng) if caption_style else None
        key = f"{source}_{kind}_{j:03d}"
        path = image_dir / f"{key}.png"
        if data is not None:
            _write_if_changed(path, data)
            written.add(path.name)
        bad_keys[kind].append(key)
        # spread bad rows through the list rather than bunching them at the end
        at = (j + 1) * len(rows) // (bad + 1) if rows else 0
        rows.insert(at, {"url": path.as_uri(), "caption": caption, "key": key, "objects": json.dumps(objects)})

    for stale in image_dir.glob("*.png"):  # left by an earlier run with other counts (or a dead URL's target)
        if stale.name not in written:
            stale.unlink()

    columns = {"url": pa.string(), "caption": pa.string(), "key": pa.string(), "objects": pa.string()}
    if caption_style is None:
        del columns["caption"]  # uncaptioned: the caption stage has to supply them
    table = pa.table({name: pa.array([r[name] for r in rows], type=t) for name, t in columns.items()})
    with atomic_path(out / f"{source}.parquet") as tmp:
        pq.write_table(table, tmp)
    return {
        "rows": len(rows),
        "good": count,
        "captioned": caption_style is not None,
        "caption_style": caption_style,
        "render_style": render_style,
        "bad": bad_keys,
    }


def run(args) -> int:
    from microdit.errors import UserError
    from microdit.io import write_json

    counts = _parse_counts(args.count)
    if args.image_size < 32:
        raise UserError(f"--image-size {args.image_size}: must be at least 32 pixels")
    if not 8 <= args.small_size < args.image_size:
        raise UserError(f"--small-size {args.small_size}: must be at least 8 and below --image-size {args.image_size}")
    if args.bad_per_source < 0:
        raise UserError(f"--bad-per-source {args.bad_per_source}: must be >= 0")
    out = Path(args.out)
    sources = {
        name: build_source(
            out, name, counts[name], args.image_size, args.seed, args.bad_per_source, args.small_size
        )
        for name in SOURCES
    }
    write_json(
        out / "_summary.json",
        {
            "seed": args.seed,
            "image_size": args.image_size,
            "small_size": args.small_size,
            "bad_per_source": args.bad_per_source,
            "sources": sources,
        },
    )
    total = sum(s["rows"] for s in sources.values())
    print(f"world: {total} rows in {len(sources)} sources under {out}")
    return 0
