"""GenEval: the rules of every task on synthetic detections, task and overall means, prompt files,
the detector adapters (shapes world, a tiny random Mask2Former) and CLIP colour crops."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from microdit.errors import UserError
from microdit.metrics import geneval as ge


def det(label, score=0.95, bbox=(0, 0, 10, 10), color=None):
    d = {"label": label, "score": score, "bbox": list(bbox)}
    if color:
        d["color"] = color
    return d


SINGLE = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}
TWO = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}], "prompt": "a photo of a dog and a cat"}
COUNTING = {
    "tag": "counting",
    "include": [{"class": "clock", "count": 2}],
    "exclude": [{"class": "clock", "count": 3}],
    "prompt": "a photo of two clocks",
}
COLORS = {"tag": "colors", "include": [{"class": "fire hydrant", "count": 1, "color": "blue"}], "prompt": "a photo of a blue fire hydrant"}
POSITION = {
    "tag": "position",
    "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    "prompt": "a photo of a dog right of a teddy bear",
}
COLOR_ATTR = {
    "tag": "color_attr",
    "include": [{"class": "wine glass", "count": 1, "color": "purple"}, {"class": "apple", "count": 1, "color": "black"}],
    "prompt": "a photo of a purple wine glass and a black apple",
}


def correct(meta, detections):
    return ge.judge(meta, detections)[0]


def test_single_object():
    assert correct(SINGLE, [det("dog", 0.31)])
    assert correct(SINGLE, [det("dog", 0.9), det("dog", 0.8), det("cat")])  # extra objects are fine
    assert not correct(SINGLE, [det("dog", 0.3)])  # the threshold is strict
    assert not correct(SINGLE, [det("cat")])
    assert not correct(SINGLE, [])
    ok, reasons = ge.judge(SINGLE, [det("cat")])
    assert reasons == ["expected 1 dog, found 0"]


def test_two_objects():
    assert correct(TWO, [det("cat", 0.5), det("dog", 0.4)])
    assert not correct(TWO, [det("dog"), det("dog")])
    assert not correct(TWO, [det("dog"), det("cat", 0.2)])


def test_counting_uses_the_strict_threshold_and_exact_counts():
    assert correct(COUNTING, [det("clock", 0.95), det("clock", 0.92), det("clock", 0.85)])  # 0.85 is not counted
    assert not correct(COUNTING, [det("clock", 0.95), det("clock", 0.85)])  # only one above 0.9
    assert not correct(COUNTING, [det("clock", 0.95), det("clock", 0.91), det("clock", 0.93)])  # three: excluded
    ok, reasons = ge.judge(COUNTING, [det("clock")] * 3)
    assert not ok and reasons == ["expected fewer than 3 clock, found 3"]
    # the same 0.85 detections would count under the ordinary threshold
    assert correct({**SINGLE, "include": [{"class": "clock", "count": 2}]}, [det("clock", 0.85)] * 2)


def test_colors_checks_the_most_confident_objects():
    assert correct(COLORS, [det("fire hydrant", color="blue")])
    assert not correct(COLORS, [det("fire hydrant", color="red")])
    # only the top `count` objects are looked at: a blue one further down does not rescue the image
    assert not correct(COLORS, [det("fire hydrant", 0.9, color="red"), det("fire hydrant", 0.8, color="blue")])
    assert correct(COLORS, [det("fire hydrant", 0.8, color="red"), det("fire hydrant", 0.9, color="blue")])
    ok, reasons = ge.judge(COLORS, [det("fire hydrant", color="red")])
    assert "expected 1 blue fire hydrant, found colours red" in reasons


def official_order(scores: list[float], threshold: float) -> list[int]:
    """The official scorer's choice of a class's detections, written as it is there: a reversed
    ascending argsort of the float32 scores, then those above the threshold. Its environment pins
    numpy 1.23, whose default sort orders up to 16 values by insertion sort, which is stable; newer
    numpy's default may order ties otherwise (SIMD sorts), so the stable kind stands for it here."""
    scores32 = np.asarray(scores, dtype=np.float32)
    ordering = np.argsort(scores32, kind="stable")[::-1]
    return ordering[scores32[ordering] > threshold].tolist()


def test_equal_scores_are_taken_latest_first_as_the_official_scorer():
    # the colour check looks at the one object the count asks for: with equal scores, the later one
    assert correct(COLORS, [det("fire hydrant", 1.0, color="red"), det("fire hydrant", 1.0, color="blue")])
    assert not correct(COLORS, [det("fire hydrant", 1.0, color="blue"), det("fire hydrant", 1.0, color="red")])
    # orderings of tie-heavy score lists equal the official expression, up to the 16 objects it keeps
    rng = np.random.default_rng(0)
    for n in range(1, 17):
        for _ in range(20):
            scores = rng.choice([0.3, 0.5, 0.95, 1.0], size=n).tolist()
            dets = [det("dog", s, bbox=(i, 0, i + 1, 1)) for i, s in enumerate(scores)]
            got = [d["bbox"][0] for d in ge.confident_objects(dets, "single_object").get("dog", [])]
            assert got == official_order(scores, 0.3), scores


def test_the_threshold_is_compared_in_float32_as_the_official_scorer():
    at = float(np.float32(0.3))  # 0.30000001192...: above 0.3 in float64, equal to it in float32
    assert at > 0.3 and official_order([at], 0.3) == []
    assert not correct(SINGLE, [det("dog", at)])
    assert correct(SINGLE, [det("dog", float(np.nextafter(np.float32(0.3), np.float32(1))))])
    at9 = float(np.float32(0.9))
    assert not correct(COUNTING, [det("clock", 0.95), det("clock", at9)])
    assert correct(COUNTING, [det("clock", 0.95), det("clock", float(np.nextafter(np.float32(0.9), np.float32(1))))])


def test_colour_function_sees_the_image_and_the_found_objects():
    calls = []

    def colour_fn(image, detections, classname):
        calls.append((image, [d["score"] for d in detections], classname))
        return ["blue"] * len(detections)

    assert ge.judge(COLORS, [det("fire hydrant", 0.7), det("fire hydrant", 0.9)], colour_fn, image="img.png")[0]
    assert calls == [("img.png", [0.9], "fire hydrant")]
    ge.judge(COLORS, [det("dog")], colour_fn)  # no hydrant: colour is never asked
    assert len(calls) == 1


def test_position_rule_and_its_margin():
    bear, right, left = (0, 0, 10, 10), (30, 0, 40, 10), (-30, 0, -20, 10)
    assert correct(POSITION, [det("teddy bear", bbox=bear), det("dog", bbox=right)])
    assert not correct(POSITION, [det("teddy bear", bbox=bear), det("dog", bbox=left)])
    ok, reasons = ge.judge(POSITION, [det("dog", bbox=right)])
    assert not ok and reasons == ["expected 1 teddy bear, found 0", "no teddy bear for dog to be right of"]
    # the dog must be right of every matched teddy bear, and only the top `count` bears are matched
    far = (60, 0, 70, 10)
    assert correct(POSITION, [det("teddy bear", 0.9, bear), det("teddy bear", 0.5, far), det("dog", bbox=right)])

    # two 40 px wide boxes, centres 10 px apart: "right of" without the margin, nothing with it
    a, b = (10, 0, 50, 10), (0, 0, 40, 10)
    assert ge.relative_position(a, b, margin=0.0) == {"right of"}
    assert ge.relative_position(a, b) == set()
    assert not correct(POSITION, [det("teddy bear", bbox=b), det("dog", bbox=a)])
    assert ge.relative_position((0, 0, 10, 10), (0, 30, 10, 40)) == {"above"}
    assert ge.relative_position((0, 30, 10, 40), (0, 0, 10, 10)) == {"below"}
    assert ge.relative_position((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}  # diagonal: both
    assert ge.relative_position((0, 0, 10, 10), (0, 0, 10, 10)) == set()


def test_position_rule_agrees_with_the_shapes_world():
    from microdit.data.shapes_draw import relative_position as world_rule

    rng = np.random.default_rng(0)
    for _ in range(300):
        boxes = []
        for _ in range(2):
            x0, y0 = rng.integers(0, 100, 2)
            w, h = rng.integers(1, 40, 2)
            boxes.append([int(x0), int(y0), int(x0 + w), int(y0 + h)])
        assert ge.relative_position(*boxes) == world_rule(*boxes)


def test_color_attribution():
    good = [det("wine glass", color="purple"), det("apple", color="black")]
    assert correct(COLOR_ATTR, good)
    assert not correct(COLOR_ATTR, [det("wine glass", color="black"), det("apple", color="purple")])
    assert not correct(COLOR_ATTR, [det("wine glass", color="purple"), det("apple", color="red")])
    assert not correct(COLOR_ATTR, [det("wine glass", color="purple")])


def test_max_objects_per_class():
    many = [det("clock", 0.99)] * 20
    assert len(ge.confident_objects(many, "counting")["clock"]) == 16
    # with at most 16 kept, "fewer than 17" can never fail: GenEval's cap applies to exclusions too
    meta = {**COUNTING, "include": [{"class": "clock", "count": 1}], "exclude": [{"class": "clock", "count": 17}]}
    assert correct(meta, many)


def test_task_scores_and_overall_mean():
    metadata = [SINGLE, TWO, COUNTING, COLORS, POSITION, COLOR_ATTR, SINGLE]
    bear, right = (0, 0, 10, 10), (30, 0, 40, 10)
    detections = [
        [[det("dog")], [det("dog")]],  # single_object: 2/2 ...
        [[det("dog"), det("cat")], [det("dog")]],  # two_object: 1/2
        [[det("clock")] * 3, [det("clock")] * 3],  # counting: 0/2
        [[det("fire hydrant", color="blue")], [det("fire hydrant", color="red")]],  # colors: 1/2
        [[det("teddy bear", bbox=bear), det("dog", bbox=right)]] * 2,  # position: 2/2
        [[det("wine glass", color="purple"), det("apple", color="black")], []],  # color_attr: 1/2
        [[], [det("cat")]],  # ... single_object again: 0/2, so 2/4 for the task
    ]
    result = ge.score(metadata, detections)
    assert result["tasks"] == {"single_object": 0.5, "two_object": 0.5, "counting": 0.0, "colors": 0.5, "position": 1.0, "color_attr": 0.5}
    assert list(result["tasks"]) == list(ge.TASKS)  # in order of first appearance
    assert result["overall"] == pytest.approx(3.0 / 6)
    assert result["images"] == 14 and result["prompts"] == 7
    assert result["correct_images"] == pytest.approx(7 / 14)
    assert result["correct_prompts"] == pytest.approx(5 / 7)
    assert result["per_prompt"][2]["correct"] == [False, False] and "fewer than 3" in result["per_prompt"][2]["reasons"][0]
    assert result["rules"]["counting_threshold"] == 0.9
    json.dumps(result)  # the record is JSON-serialisable as it is

    with pytest.raises(ValueError, match="7 prompts"):
        ge.score(metadata, detections[:6])
    with pytest.raises(ValueError, match="no images"):
        ge.score([SINGLE], [[]])


def test_rules_are_configurable():
    loose = ge.Rules(threshold=0.1, counting_threshold=0.5)
    assert ge.judge(SINGLE, [det("dog", 0.2)], rules=loose)[0]
    assert ge.judge(COUNTING, [det("clock", 0.6)] * 2, rules=loose)[0]


# ---------------------------------------------------------------- prompt files
PROMPT_LINES = [SINGLE, COUNTING, POSITION]


def write_prompts(path, rows=PROMPT_LINES):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_prompts_and_one_line_errors(tmp_path):
    assert ge.load_prompts(write_prompts(tmp_path / "p.jsonl")) == PROMPT_LINES
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SINGLE) + "\n{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2: not a GenEval prompt"):
        ge.load_prompts(bad)
    forward = {**POSITION, "include": [{"class": "dog", "count": 1, "position": ["right of", 1]}, {"class": "cat", "count": 1}]}
    with pytest.raises(UserError, match=r":1: .*earlier clause"):
        ge.load_prompts(write_prompts(tmp_path / "fw.jsonl", [forward]))
    with pytest.raises(UserError, match=r":1: "):
        ge.load_prompts(write_prompts(tmp_path / "nc.jsonl", [{"tag": "single_object", "prompt": "x", "include": [{"class": "dog"}]}]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no prompts"):
        ge.load_prompts(tmp_path / "empty.jsonl")


def test_fetch_prompts_checks_the_checksum(tmp_path):
    source = write_prompts(tmp_path / "upstream.jsonl")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = tmp_path / "data" / "geneval" / "evaluation_metadata.jsonl"
    assert ge.fetch_prompts(source.as_uri(), digest, dest) == dest
    assert dest.read_bytes() == source.read_bytes()
    source.unlink()  # a verified copy is not downloaded again
    assert ge.fetch_prompts(source.as_uri(), digest, dest) == dest
    with pytest.raises(UserError, match="cannot download"):
        ge.fetch_prompts(source.as_uri(), "0" * 64, dest)  # copy is stale and the URL is dead
    assert dest.is_file()  # the old copy is kept

    write_prompts(source, [SINGLE])
    with pytest.raises(UserError, match="expected " + "0" * 64):
        ge.fetch_prompts(source.as_uri(), "0" * 64, tmp_path / "other.jsonl")
    assert not (tmp_path / "other.jsonl").exists()
    assert ge.PROMPTS_URL.endswith("evaluation_metadata.jsonl") and len(ge.PROMPTS_SHA256) == 64


# ---------------------------------------------------------------- detectors and colours
def test_shapes_world_end_to_end():
    """Oracle scenes for the shapes version of the six tasks score 1; mismatched scenes do not."""
    from microdit.data.shapes import geneval_prompts, objects_for_prompt, render

    metadata = geneval_prompts(per_task=2, seed=0)
    rng = np.random.default_rng(0)
    images = [[render(objects_for_prompt(meta, rng, 96), 96, rng=rng) for _ in range(2)] for meta in metadata]
    detector = ge.ShapesDetector()
    result = ge.evaluate_images(metadata, images, detector)
    assert set(result["tasks"]) == set(ge.TASKS)
    assert result["overall"] == 1.0, [p for p in result["per_prompt"] if not all(p["correct"])]

    shuffled = ge.evaluate_images(metadata, images[1:] + images[:1], detector)
    assert shuffled["overall"] < 0.8
    # detections computed once, scored later, give the same numbers
    detections = [[detector.detect(image) for image in row] for row in images]
    assert ge.score(metadata, detections)["tasks"] == result["tasks"]


def test_load_detector(tmp_path):
    (tmp_path / "MODEL_INFO.json").write_text(json.dumps({"role": "detector", "source": "built", "kind": "shapes"}))
    assert isinstance(ge.load_detector(tmp_path), ge.ShapesDetector)
    with pytest.raises(UserError, match="no GenEval detector"):
        ge.load_detector(tmp_path / "missing")


def test_instances_to_detections_adapter():
    masks = torch.zeros(3, 20, 30)
    masks[0, 2:5, 3:9] = 1
    masks[1, 10:20, 0:30] = 1
    result = {
        "segmentation": masks,
        "segments_info": [
            {"id": 0, "label_id": 0, "score": 0.4},
            {"id": 1, "label_id": 1, "score": 0.8},
            {"id": 2, "label_id": 2, "score": 0.9},  # empty mask: dropped
        ],
    }
    dets = ge.instances_to_detections(result, {0: "keyboard", 1: "potted_plant", 2: "dog"})
    assert [d["label"] for d in dets] == ["potted plant", "computer keyboard"]
    assert dets[0]["bbox"] == [0, 10, 30, 20] and dets[1]["bbox"] == [3, 2, 9, 5]
    assert dets[1]["mask"].shape == (20, 30) and dets[1]["mask"].sum() == 18
    assert ge.instances_to_detections({"segmentation": torch.full((20, 30), -1.0), "segments_info": []}, {}) == []
    assert ge.geneval_label("TV-Monitor") == "tv" and ge.geneval_label("remote") == "tv remote"


def test_tiny_mask2former_detector(tmp_path):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    names = ["person", "mouse", "dog"]
    backbone = SwinConfig(
        image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
        dim_feedforward=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=6,
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
    )
    model_dir = tmp_path / "detector"
    Mask2FormerForUniversalSegmentation(config).save_pretrained(model_dir)
    Mask2FormerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(model_dir)
    (model_dir / "MODEL_INFO.json").write_text(json.dumps({"role": "detector", "source": "built", "kind": "mask2former"}))

    detector = ge.load_detector(model_dir)
    assert isinstance(detector, ge.Mask2FormerDetector) and not detector.gives_colour
    detector.min_score = 0.0  # random weights: keep every instance so the adapter is exercised
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    dets = detector.detect(image)
    assert dets, "a random Mask2Former with min_score 0 keeps its non-empty instances"
    assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
    for d in dets:
        assert d["label"] in {"person", "computer mouse", "dog"} and d["mask"].shape == (50, 70)
        assert d["bbox"] == ge.mask_box(d["mask"])
    with pytest.raises(ValueError, match="colour_fn"):
        ge.evaluate_images([COLORS], [[image]], detector)


def test_object_crop_paints_outside_the_mask_grey():
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:6, 4:8] = True
    crop = np.asarray(ge.object_crop(image, {"bbox": [2, 1, 10, 8], "mask": mask}))
    assert crop.shape == (7, 8, 3)
    assert tuple(crop[1, 2]) == (255, 0, 0)  # inside the mask (image pixel (4, 2))
    assert tuple(crop[0, 0]) == ge.CROP_BACKGROUND  # in the box, outside the mask
    assert np.asarray(ge.object_crop(image, {"bbox": [2, 1, 10, 8]})).min(axis=(0, 1)).tolist() == [255, 0, 0]


def test_clip_colour_classifier(tmp_path):
    from test_metrics_clip import save_tiny_clip

    colour = ge.ClipColour(save_tiny_clip(tmp_path / "clip"))
    classifier = colour._classifier("fire hydrant")
    assert classifier.shape[0] == len(ge.COLORS)
    torch.testing.assert_close(classifier.norm(dim=-1), torch.ones(len(ge.COLORS)))
    assert colour._classifier("fire hydrant") is classifier  # built once per class

    image = Image.new("RGB", (40, 40), (20, 40, 220))
    dets = [det("fire hydrant", bbox=(0, 0, 20, 20)), det("fire hydrant", bbox=(10, 10, 40, 40))]
    colours = colour(image, dets, "fire hydrant")
    assert len(colours) == 2 and set(colours) <= set(ge.COLORS)
    assert colour(image, dets, "fire hydrant") == colours
    # the answer is the best-matching colour prompt for that crop
    pixels = colour.processor(images=[ge.object_crop(image, dets[0])], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embed = torch.nn.functional.normalize(colour.model.get_image_features(pixel_values=pixels), dim=-1)
    assert ge.COLORS[int((embed @ classifier.T).argmax())] == colours[0]
    result = ge.score([COLORS], [[dets]], colour, images=[[image]])
    assert result["tasks"]["colors"] == float(colours[0] == "blue")
    with pytest.raises(ValueError, match="needs the image"):
        ge.score([COLORS], [[dets]], colour)
