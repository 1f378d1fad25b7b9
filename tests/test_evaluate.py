"""`microdit evaluate` end to end on tiny models built in tmp_path, and its pieces."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from microdit import distributed, eval_data, image_grid
from microdit import evaluate as ev
from microdit.errors import UserError
from microdit.metrics import registry

torch.set_num_threads(1)

RES = 16  # image px: latent 8 through a VAE that halves the resolution
N_IMAGES = 8


# ---------------------------------------------------------------- fixtures: a tiny world and tiny models


def write_eval_mds(directory: Path, n: int = 12, corrupt: int = 1) -> list[str]:
    """An evaluation split of shapes scenes (key, image, caption), plus `corrupt` undecodable rows."""
    from streaming import MDSWriter

    from microdit.data.shapes import caption_for, render, sample_objects

    captions = []
    columns = {"key": "str", "image": "bytes", "caption": "str"}
    with MDSWriter(out=str(directory), columns=columns, compression=None) as writer:
        for i in range(n):
            rng = np.random.default_rng([7, i])
            objects = sample_objects(rng, 32)
            image = render(objects, 32, "real", rng)
            import io

            buf = io.BytesIO()
            image.save(buf, format="PNG")
            captions.append(caption_for(objects, "real", rng))
            writer.write({"key": f"eval_{i:03d}", "image": buf.getvalue(), "caption": captions[-1]})
        for j in range(corrupt):
            writer.write({"key": f"bad_{j}", "image": b"\x89PNG\r\n\x1a\nnot an image", "caption": "a red circle"})
    return captions


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Eval MDS + VAE, text encoder, CLIP, FID extractor and detector directories, all tiny."""
    from diffusers import AutoencoderKL

    from microdit import zoo
    from microdit.io import write_json

    root = tmp_path_factory.mktemp("world")
    captions = write_eval_mds(root / "mds" / "shapes_eval")
    models = root / "models"
    tokenizer = zoo.train_caption_tokenizer(captions + ["a photo of a red circle and a blue square"], 320, root / "bpe")
    args = argparse.Namespace(seed=0, text_dim=16, text_layers=1, text_steps=0, clip_image_size=32, fid_input_size=75)
    zoo.build_text_encoder(models / "text_encoder", tokenizer, args)
    zoo.build_clip(models / "clip", tokenizer, args)
    write_json(models / "clip" / "MODEL_INFO.json", {"role": "clip", "source": "built", "id": "tiny-clip"})
    (models / "fid").mkdir(parents=True)
    zoo.build_fid(models / "fid", args)
    zoo.build_detector(models / "detector", args)
    write_json(models / "detector" / "MODEL_INFO.json", {"role": "detector", "source": "built", "kind": "shapes"})
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=RES, scaling_factor=0.5,
    ).save_pretrained(models / "vae")
    return root


def cli_args(world: Path, out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    m = world / "models"
    argv = ["--tag", "stage0", "--eval-mds", str(world / "mds" / "shapes_eval"), "--vae", str(m / "vae"),
            "--text-encoder", str(m / "text_encoder"), "--clip", str(m / "clip"), "--fid", str(m / "fid"),
            "--detector", str(m / "detector"), "--geneval-prompts", "shapes", "--geneval-per-task", "1",
            "--geneval-images-per-prompt", "1", "--num-images", str(N_IMAGES), "--steps", "2", "--guidance", "2.0",
            "--seed", "0", "--batch-size", "4", "--out", str(out), "--cache", str(world / "eval_cache"),
            "--device", "cpu", *extra]
    if "--checkpoint" not in extra and "--released" not in extra:
        argv += ["--untrained", "--model", "MicroDiT_Smoke_2", "--resolution", str(RES)]
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def first_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "stage0"
    assert ev.run(cli_args(world, out, "--fid-256")) == 0
    return out


def pngs(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*.png"))}


# ---------------------------------------------------------------- end to end


def test_metrics_json_has_every_field(first_run):
    m = json.loads((first_run / "metrics.json").read_text())
    assert m["tag"] == "stage0" and m["checkpoint"].startswith("untrained MicroDiT_Smoke_2")
    assert m["settings"] == {**m["settings"], "steps": 2, "guidance": 2.0, "seed": 0, "num_images": N_IMAGES,
                             "resolution": RES}
    for key in ("fid", "fid_256"):
        fid = m[key]
        assert set(fid) >= {"value", "comparable", "extractor", "n_gen", "n_ref", "resolution"}
        assert np.isfinite(fid["value"]) and fid["value"] >= 0
        assert fid["comparable"] is False and fid["extractor"] == "torchvision_inception_v3"
        assert fid["n_gen"] == N_IMAGES and fid["n_ref"] == 12  # the corrupt row is skipped
    assert m["fid"]["resolution"] == RES and m["fid_256"]["resolution"] == 256
    clip = m["clip_score"]
    assert 0 <= clip["value"] <= 100 and clip["n"] == N_IMAGES and clip["comparable"] is False
    ge = m["geneval"]
    assert set(ge["tasks"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert ge["overall"] == pytest.approx(np.mean(list(ge["tasks"].values())))
    assert ge["n_prompts"] == 6 and ge["images_per_prompt"] == 1 and ge["comparable"] is False
    assert ge["detector"] == "shapes (exact)"
    assert m["generated"]["new_this_run"] == {"fid": N_IMAGES, "geneval": 6}
    assert len(json.loads((first_run / "geneval.json").read_text())["per_prompt"]) == 6


def test_every_metric_has_its_bootstrap_interval(first_run):
    m = json.loads((first_run / "metrics.json").read_text())
    for record in (m["fid"], m["fid_256"], m["clip_score"], m["geneval"]):
        interval = record["interval"]
        low, high = interval["interval"]
        assert interval["level"] == 0.95 and interval["draws"] == 1000 and low <= high
    # each interval holds its estimate (FID's: centred on it, the resamples' upward bias removed)
    for record in (m["fid"], m["fid_256"], m["clip_score"]):
        assert record["interval"]["interval"][0] <= record["value"] <= record["interval"]["interval"][1]
    assert m["fid"]["interval"]["bias"] >= 0
    ge = m["geneval"]
    assert ge["interval"]["interval"][0] <= ge["overall"] <= ge["interval"]["interval"][1]
    assert set(ge["interval"]["tasks"]) == set(ge["tasks"])


def test_kid_of_the_fid_images_as_clean_fid_computes_it(first_run, world):
    m = json.loads((first_run / "metrics.json").read_text())
    kid = m["kid"]
    assert np.isfinite(kid["value"]) and kid["subsets"] == 100 and kid["subset_size"] == N_IMAGES
    assert kid["comparable"] is False and kid["resolution"] == RES


def test_a_fixed_caption_list_prompts_in_its_order(world, tmp_path):
    import hashlib

    listed = tmp_path / "captions.jsonl"
    lines = [json.dumps({"caption": f"a red circle number {i}"}) for i in range(N_IMAGES + 3)]
    listed.write_text("\n".join(lines) + "\n")
    digest = hashlib.sha256(listed.read_bytes()).hexdigest()
    out = tmp_path / "listed"
    assert ev.run(cli_args(world, out, "--captions-file", str(listed), "--captions-sha256", digest,
                           "--geneval-prompts", "none")) == 0
    manifest = json.loads((out / "images" / "fid" / "manifest.json").read_text())
    assert manifest["prompts"] == [f"a red circle number {i}" for i in range(N_IMAGES)]
    assert json.loads((out / "metrics.json").read_text())["eval_split"]["captions_from"] == str(listed)
    with pytest.raises(UserError, match="sha256"):
        ev.run(cli_args(world, out, "--captions-file", str(listed), "--captions-sha256", "0" * 64))
    listed.write_text("one\ntwo\n")
    with pytest.raises(UserError, match="fewer than --num-images"):
        ev.run(cli_args(world, out, "--captions-file", str(listed)))


def test_guidance_sweep_scores_each_scale_as_a_run_at_that_scale(world, first_run, tmp_path):
    out = tmp_path / "sweep"
    assert ev.run(cli_args(world, out, "--guidance-sweep", "4.0", "2.0", "1.0", "--geneval-prompts", "none")) == 0
    m = json.loads((out / "metrics.json").read_text())
    points = m["guidance_sweep"]
    assert [p["guidance"] for p in points] == [1.0, 2.0, 4.0] and [p["main"] for p in points] == [False, True, False]
    assert (out / "images" / "fid_g1").is_dir() and (out / "images" / "fid_g4").is_dir()
    assert m["generated"]["new_this_run"]["fid_g4"] == N_IMAGES
    main = next(p for p in points if p["main"])
    assert main["fid"] == m["fid"]["value"] and main["clip_score"] == m["clip_score"]["value"]
    # the point at 4.0 is what a plain run at guidance 4.0 measures (same captions, same seeds)
    alone = tmp_path / "at4"
    assert ev.run(cli_args(world, alone, "--guidance", "4.0", "--geneval-prompts", "none")) == 0
    at4 = json.loads((alone / "metrics.json").read_text())
    assert points[2]["fid"] == pytest.approx(at4["fid"]["value"], rel=1e-9)
    assert points[2]["clip_score"] == pytest.approx(at4["clip_score"]["value"], rel=1e-9)
    assert "guidance_sweep" not in json.loads((first_run / "metrics.json").read_text())


def test_images_grid_and_geneval_layout(first_run):
    fid_images = sorted((first_run / "images" / "fid").glob("*.png"))
    assert [p.name for p in fid_images] == [f"{i:06d}.png" for i in range(N_IMAGES)]
    assert all(Image.open(p).size == (RES, RES) for p in fid_images)
    for i in range(6):  # GenEval's own folder layout
        meta = json.loads((first_run / "images" / "geneval" / f"{i:05d}" / "metadata.jsonl").read_text())
        assert meta["prompt"].startswith("a photo of")
        assert (first_run / "images" / "geneval" / f"{i:05d}" / "samples" / "0000.png").is_file()
    grid = Image.open(first_run / "grid.png")
    assert grid.width == 4 * 192 and grid.height > 2 * 192


def test_rerun_generates_nothing_and_gives_the_same_numbers(world, first_run):
    before = pngs(first_run / "images")
    m1 = json.loads((first_run / "metrics.json").read_text())
    assert ev.run(cli_args(world, first_run, "--fid-256")) == 0
    m2 = json.loads((first_run / "metrics.json").read_text())
    assert pngs(first_run / "images") == before  # same files, untouched
    assert m2["generated"]["new_this_run"] == {"fid": 0, "geneval": 0}
    for key in ("fid", "fid_256", "clip_score"):
        assert m2[key]["value"] == m1[key]["value"]
    assert m2["geneval"]["tasks"] == m1["geneval"]["tasks"]


def test_a_missing_image_is_regenerated_from_its_own_seed(world, first_run, tmp_path):
    """Image i depends only on seed + i: remade alone (batch of one) it matches the batched original."""
    target = first_run / "images" / "fid" / "000005.png"
    original = np.asarray(Image.open(target)).astype(int)
    target.unlink()
    before = pngs(first_run / "images")
    assert ev.run(cli_args(world, first_run, "--fid-256", "--batch-size", "1")) == 0
    after = pngs(first_run / "images")
    assert set(after) - set(before) == {target}
    assert all(after[p] == t for p, t in before.items())
    assert np.abs(np.asarray(Image.open(target)).astype(int) - original).max() <= 1
    m = json.loads((first_run / "metrics.json").read_text())
    assert m["generated"]["new_this_run"] == {"fid": 1, "geneval": 0}


def test_checkpoint_directory_gives_the_untrained_models_images(world, first_run, tmp_path):
    """The same weights saved as a model directory, loaded with --checkpoint, sample the same images."""
    from microdit.models import build_model

    torch.manual_seed(0)  # what --untrained --seed 0 does
    model = build_model("MicroDiT_Smoke_2", input_size=RES // 2, caption_channels=16, in_channels=4)
    ckpt = tmp_path / "final"
    model.save_pretrained(ckpt)
    out = tmp_path / "stage4"
    args = cli_args(world, out, "--checkpoint", str(ckpt), "--geneval-prompts", "none", "--num-images", "4")
    args.tag = "stage4"
    assert ev.run(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["checkpoint"] == str(ckpt) and m["geneval"] is None and m["fid_256"] is None
    for i in range(4):
        a = np.asarray(Image.open(out / "images" / "fid" / f"{i:06d}.png")).astype(int)
        b = np.asarray(Image.open(first_run / "images" / "fid" / f"{i:06d}.png")).astype(int)
        assert np.abs(a - b).max() <= 1

    with pytest.raises(UserError, match="ema"):
        ev.run(cli_args(world, tmp_path / "ema", "--checkpoint", str(ckpt), "--ema", "--num-images", "2"))
    with pytest.raises(UserError, match="--resolution 32"):
        ev.run(cli_args(world, tmp_path / "res", "--checkpoint", str(ckpt), "--resolution", "32"))


def test_a_released_checkpoint_in_the_official_layout_samples_what_its_weights_do(world, first_run, tmp_path):
    """The official release is the whole pipeline's state dict (keys `dit.*` beside the VAE's and the
    text encoder's): loaded with --released it samples the images of the same weights as a model."""
    from microdit.models import build_model

    torch.manual_seed(0)  # the untrained model of first_run
    model = build_model("MicroDiT_Smoke_2", input_size=RES // 2, caption_channels=16, in_channels=4)
    official = {f"dit.{k}": v for k, v in model.state_dict().items()}
    official.update({"vae.decoder.conv_in.weight": torch.zeros(2, 2), "text_encoder.proj": torch.zeros(3)})
    release = tmp_path / "dit_4_channel_tiny_test.pt"
    torch.save(official, release)
    out = tmp_path / "released"
    args = cli_args(world, out, "--released", str(release), "--model", "MicroDiT_Smoke_2", "--resolution", str(RES),
                    "--geneval-prompts", "none", "--num-images", "4")
    args.tag = "released-dit_4_channel_tiny_test"
    assert ev.run(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["checkpoint"] == f"released {release.name}"
    for i in range(4):
        a = np.asarray(Image.open(out / "images" / "fid" / f"{i:06d}.png")).astype(int)
        b = np.asarray(Image.open(first_run / "images" / "fid" / f"{i:06d}.png")).astype(int)
        assert np.abs(a - b).max() <= 1
    # a checkpoint that is not this architecture: one line naming the key and the way out
    torch.save({f"dit.{k}": v for k, v in list(model.state_dict().items())[1:]}, tmp_path / "cut.pt")
    with pytest.raises(UserError, match="cut.pt.*VAE and text encoder it was trained with"):
        ev.run(cli_args(world, tmp_path / "cut", "--released", str(tmp_path / "cut.pt"), "--model", "MicroDiT_Smoke_2",
                        "--resolution", str(RES), "--geneval-prompts", "none", "--num-images", "2"))
    with pytest.raises(UserError, match="does not exist"):
        ev.run(cli_args(world, tmp_path / "none", "--released", str(tmp_path / "nothing.pt"), "--model",
                        "MicroDiT_Smoke_2", "--resolution", str(RES)))


def test_changed_settings_clear_the_old_images(world, first_run, tmp_path):
    folder = tmp_path / "images"
    paths = [folder / f"{i:06d}.png" for i in range(3)]
    ident = {"model": "a", "steps": 2}
    ev.prepare_folder(folder, ident, ["p0", "p1", "p2"], paths)
    for p in paths:
        Image.new("RGB", (4, 4)).save(p)
    # more images, same prompts at the old indices: all kept
    longer = paths + [folder / "000003.png"]
    ev.prepare_folder(folder, ident, ["p0", "p1", "p2", "p3"], longer)
    assert all(p.is_file() for p in paths)
    # a prompt changed at index 1: only that image goes
    ev.prepare_folder(folder, ident, ["p0", "other", "p2", "p3"], longer)
    assert [p.is_file() for p in paths] == [True, False, True]
    # other settings: everything goes
    ev.prepare_folder(folder, {**ident, "steps": 30}, ["p0", "other", "p2", "p3"], longer)
    assert not any(p.is_file() for p in paths)


# ---------------------------------------------------------------- the real images


def test_export_skips_corrupt_images_and_is_made_once(world, tmp_path):
    from microdit.metrics import fid as fidlib

    mds = world / "mds" / "shapes_eval"
    real = eval_data.export_eval_split(mds, tmp_path / "cache")
    export = json.loads((real / "export.json").read_text())
    assert export["images"] == 12 and export["skipped"] == {"unreadable": 0, "corrupt": 1}
    rows = [json.loads(x) for x in (real / eval_data.REAL_INDEX).read_text().splitlines()]
    assert [r["key"] for r in rows] == [f"eval_{i:03d}" for i in range(12)]
    first = pngs(real)
    assert eval_data.export_eval_split(mds, tmp_path / "cache") == real and pngs(real) == first
    # real against real: FID ~ 0, through the same cached-statistics path the evaluation uses
    extractor = fidlib.load_extractor(world / "models" / "fid")
    ref = fidlib.reference_stats(real, real.name, extractor, tmp_path / "stats", RES)
    # (the smoke extractor's random weights give features ~1e7, so "0" is relative to the traces)
    assert abs(fidlib.fid(real, ref, extractor)["fid"]) <= 1e-6 * 2 * np.trace(ref["sigma"])


def test_bad_inputs_are_one_line_errors(world, tmp_path):
    with pytest.raises(UserError, match="index.json"):
        eval_data.export_eval_split(tmp_path / "nothing", tmp_path / "cache")
    args = cli_args(world, tmp_path / "out")
    args.resolution = None
    with pytest.raises(UserError, match="--resolution"):
        ev.run(args)
    args = cli_args(world, tmp_path / "out", "--resolution", "15")
    args.resolution = 15
    with pytest.raises(UserError, match="multiple"):
        ev.run(args)
    args = cli_args(world, tmp_path / "out")
    args.vae = tmp_path / "no_vae"
    with pytest.raises(UserError, match="microdit models"):
        ev.run(args)
    args = cli_args(world, tmp_path / "out")
    args.geneval_prompts = str(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="missing.jsonl"):
        eval_data.geneval_prompt_set(args)


# ---------------------------------------------------------------- pieces


def test_draw_captions_is_seeded_and_cycles_through_the_split():
    pool = ["a", "b", "", "c", "d"]
    drawn = eval_data.draw_captions(pool, 4, seed=3)
    assert drawn == eval_data.draw_captions(pool, 4, seed=3) and sorted(drawn) == ["a", "b", "c", "d"]
    assert eval_data.draw_captions(pool, 4, seed=4) != drawn or eval_data.draw_captions(pool, 4, seed=5) != drawn
    more = eval_data.draw_captions(pool, 10, seed=3)
    assert more[:4] == drawn  # asking for more keeps the first ones
    assert all(more.count(c) in (2, 3) for c in "abcd") and "" not in more
    with pytest.raises(UserError):
        eval_data.draw_captions(["", " "], 2, 0)


def test_contiguous_runs_and_rank_shares():
    assert ev.contiguous_runs([0, 1, 2, 3, 4, 7, 8, 10], 3) == [[0, 1, 2], [3, 4], [7, 8], [10]]
    assert ev.contiguous_runs([], 4) == []
    items = list(range(3, 20))
    shares = [distributed.rank_share(items, r, 4) for r in range(4)]
    assert sum(shares, []) == items and max(map(len, shares)) - min(map(len, shares)) <= 1


def test_generate_images_seeds_each_image_by_its_index(tmp_path):
    calls = []

    def sample(prompts, first_seed):
        calls.append((list(prompts), first_seed))
        return [Image.new("RGB", (2, 2), (first_seed + k, 0, 0)) for k in range(len(prompts))]

    paths = [tmp_path / f"{i}.png" for i in range(6)]
    prompts = [f"p{i}" for i in range(6)]
    assert ev.generate_images(prompts, paths, [0, 1, 2, 4, 5], sample, seed=10, batch_size=2) == 5
    assert calls == [(["p0", "p1"], 10), (["p2"], 12), (["p4", "p5"], 14)]
    assert [Image.open(p).getpixel((0, 0))[0] for p in paths if p.exists()] == [10, 11, 12, 14, 15]
    assert not paths[3].exists() and not list(tmp_path.glob("*.tmp"))


def test_cap_per_task_keeps_file_order():
    meta = [{"tag": t, "prompt": f"{t}{i}"} for t in ("a", "b") for i in range(5)] + [{"tag": "c", "prompt": "c0"}]
    kept = eval_data.cap_per_task(meta, 2, seed=0)
    assert [m["tag"] for m in kept] == ["a", "a", "b", "b", "c"]
    assert kept == [m for m in meta if m in kept]
    assert eval_data.cap_per_task(meta, None, 0) == meta


def test_fid_record_is_comparable_only_for_inception_at_30k():
    raw = {"fid": 12.0, "comparable": True, "extractor": "cleanfid_inception", "resolution": 256, "reference": "coco",
           "n_generated": 30_000, "n_reference": 40_504, "skipped_generated": 0, "skipped_reference": 0}
    assert registry.fid_record(raw, "coco")["comparable"] is True
    small = registry.fid_record({**raw, "n_generated": 5000}, "coco")
    assert small["comparable"] is False and "5000" in small["note"]
    assert registry.fid_record({**raw, "comparable": False, "note": "untrained"}, "coco")["comparable"] is False


def test_wrap():
    assert image_grid.wrap("a red circle left of a blue square", 12, 3) == ["a red circle", "left of a", "blue square"]
    cut = image_grid.wrap("one two three four five six seven eight", 9, 2)
    assert len(cut) == 2 and cut[-1].endswith("...") and all(len(x) <= 9 for x in cut)


def test_geneval_metadata_follows_the_prompt_set(tmp_path):
    metas = [{"tag": "single_object", "prompt": f"a photo of a p{i}", "include": []} for i in range(3)]
    ev.write_geneval_metadata(tmp_path, metas)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000", "00001", "00002"]
    changed = [metas[0], {**metas[1], "prompt": "a photo of something else"}]
    ev.write_geneval_metadata(tmp_path, changed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000", "00001"]
    assert json.loads((tmp_path / "00001" / "metadata.jsonl").read_text())["prompt"] == "a photo of something else"
