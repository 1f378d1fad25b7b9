"""`microdit models`: smoke build of every role, reload via from_pretrained, hub/local/offline paths,
and the OpenCLIP -> CLIPTextModel conversion checked against OpenCLIP itself."""
from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from microdit import zoo
from microdit.cli import main
from microdit.errors import UserError

COLORS = {"red": (220, 40, 40), "green": (40, 165, 70), "blue": (40, 90, 225), "yellow": (240, 220, 30)}
TEXT_DIM = 48


def draw_world(root: Path, n: int = 36, size: int = 64) -> Path:
    """A few dozen shape images + a parquet URL list with captions and two bad rows."""
    rng = np.random.default_rng(0)
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    rows = []
    for i in range(n):
        im = Image.new("RGB", (size, size), (245, 243, 238))
        d = ImageDraw.Draw(im)
        name, color = list(COLORS.items())[i % len(COLORS)]
        r = int(rng.integers(size // 8, size // 4))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        shape = ("circle", "square", "triangle")[i % 3]
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        path = img_dir / f"{i:04d}.png"
        im.save(path)
        rows.append({"url": path.as_uri(), "caption": f"a {name} {shape}", "key": f"{i:04d}"})
    (img_dir / "corrupt.png").write_bytes(b"not a png")
    rows.append({"url": (img_dir / "corrupt.png").as_uri(), "caption": "a broken image", "key": "bad0"})
    rows.append({"url": (img_dir / "gone.png").as_uri(), "caption": None, "key": "bad1"})
    table = root / "world.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table)
    return table


def smoke_args(out: Path, world: Path, *extra: str) -> list[str]:
    return ["models", "--out", str(out), "--preset", "smoke", "--captions", str(world), "--images", str(world),
            "--vae-steps", "40", "--vae-res", "32", "--vae-batch", "8", "--vae-channels", "8", "16", "16", "16",
            "--vae-grid-res", "64", "--text-dim", str(TEXT_DIM), "--clip-image-size", "32",
            "--text-steps", "40", "--text-image-res", "32", "--fid-input-size", "96", *extra]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("zoo")
    world = draw_world(root / "world")
    out = root / "models"
    assert main(smoke_args(out, world)) == 0
    return out, world


def info(out: Path, role: str) -> dict:
    return json.loads((out / role / zoo.INFO_FILE).read_text())


# ------------------------------------------------------------------ smoke build

def test_every_role_has_model_info(built):
    out, _ = built
    for role in zoo.ROLES:
        meta = info(out, role)
        assert meta["role"] == role and meta["source"] == "built" and meta["id"] == f"microdit-smoke/{role}"
        assert meta["preset"] == "smoke"
    assert not list(out.glob(".*")), "staging dirs left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "vae").stat().st_mode & 0o777 == 0o777 & ~umask, "model dirs get the modes mkdir would give"
    assert (out / "vae" / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_text_encoder_warm_up_separates_the_captions(built):
    """The contrastive warm-up learns to match captions to images (the corrupt row and the row
    without a caption are left out) and spreads caption embeddings apart."""
    out, world = built
    alignment = info(out, "text_encoder")["alignment"]
    assert alignment["pairs"] == 36 and alignment["steps"] == 40
    assert alignment["loss_after"] < 0.7 * alignment["loss_before"]
    assert alignment["batch_accuracy_after"] > alignment["batch_accuracy_before"] + 0.2
    from transformers import AutoTokenizer

    from microdit.text import TextEncoder

    # the same text encoder left random, for comparison
    random_dir = out.parent / "random-text-encoder"
    tokenizer = AutoTokenizer.from_pretrained(out / "text_encoder")
    zoo.build_text_encoder(random_dir, tokenizer, argparse.Namespace(seed=0, text_dim=TEXT_DIM, text_layers=2,
                                                                     text_steps=0))
    prompts = ["a red circle", "a blue square", "a yellow triangle", "a green circle"]
    off = ~torch.eye(len(prompts), dtype=torch.bool)

    def mean_cosine(path):
        emb = torch.nn.functional.normalize(TextEncoder.from_pretrained(path, device="cpu").encode(prompts).flatten(1), dim=1)
        return (emb @ emb.T)[off].mean().item()

    assert mean_cosine(out / "text_encoder") < mean_cosine(random_dir) - 0.03


def test_text_encoder_reloads_and_encodes_77_by_d(built):
    from transformers import AutoTokenizer, CLIPTextModel

    out, _ = built
    path = out / "text_encoder"
    tok = AutoTokenizer.from_pretrained(path)
    model = CLIPTextModel.from_pretrained(path).eval()
    assert tok.model_max_length == 77
    ids = tok(["a red circle", "a blue square! " * 40, ""], padding="max_length", truncation=True,
              max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (3, 77)
    assert ids[0, 0] == tok.bos_token_id and ids[0, 4] == tok.eos_token_id and (ids[0, 5:] == 0).all()
    assert ids[1, -1] == tok.eos_token_id  # truncated, end token kept
    assert (ids[1] != 0).all(), "'!' in a caption must not tokenize as the pad id"
    with torch.no_grad():
        h = model(ids).last_hidden_state
    assert h.shape == (3, 77, TEXT_DIM) and torch.isfinite(h).all()
    assert info(out, "text_encoder")["hidden_size"] == TEXT_DIM
    assert type(tok).__name__ == "CLIPTokenizerFast"
    vocab = tok.get_vocab()
    assert vocab["!"] == 0 and vocab["<|endoftext|>"] == len(vocab) - 1  # CLIP's layout


def test_vae_trained_scaled_and_recon_falls(built):
    from diffusers import AutoencoderKL

    out, _ = built
    meta = info(out, "vae")
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    assert vae.config.latent_channels == 4 and meta["downsample_factor"] == 8
    assert vae.config.scaling_factor == pytest.approx(meta["scaling_factor"]) and vae.config.scaling_factor != 1.0
    assert meta["scaling_factor"] == pytest.approx(1 / meta["latent_std"])
    assert meta["recon_l1_after"] < 0.7 * meta["recon_l1_before"]
    assert meta["train"]["images"] == 36 and meta["train"]["skipped"] == {"corrupt": 1, "missing": 1}
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert z.shape == (1, 4, 8, 8)
    with Image.open(out / "vae" / "recon.png") as grid:
        assert grid.size == (8 * 64, 2 * 64)
    assert meta["recon_grid"]["resolution"] == 64 and 0 < meta["recon_grid"]["object_l1"] < 2


def test_captioner_generates_through_chat_template(built):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out, world = built
    processor = AutoProcessor.from_pretrained(out / "captioner", use_fast=False)
    model = LlavaForConditionalGeneration.from_pretrained(out / "captioner").eval()
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    assert prompt.startswith("USER: <image>\n") and prompt.endswith("ASSISTANT:")
    images = []
    for path in sorted((world.parent / "images").glob("000[01].png")):
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    inputs = processor(images=images, text=[prompt, prompt + " a"], padding=True, return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_index).sum() == 2 * 16
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = ids[:, inputs["input_ids"].shape[1]:]
    assert new.shape == (2, 5)
    texts = processor.batch_decode(new, skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_clip_scores_images_against_texts(built):
    from transformers import CLIPModel, CLIPProcessor

    out, _ = built
    model = CLIPModel.from_pretrained(out / "clip").eval()
    processor = CLIPProcessor.from_pretrained(out / "clip")
    images = [Image.new("RGB", (80, 64), c) for c in ((220, 40, 40), (40, 90, 225))]
    inputs = processor(text=["a red circle", "a blue square", "a green star"], images=images,
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_fid_extractor_maps_uint8_to_features(built):
    out, _ = built
    config = json.loads((out / "fid" / "config.json").read_text())
    assert config == {"kind": "torchvision_inception_v3", "feature_dim": 2048, "comparable": False,
                      "input_size": 96, "seed": 3}
    a, b = zoo.load_fid_extractor(out / "fid"), zoo.load_fid_extractor(out / "fid")
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    fa, fb = a(images), b(images.float())
    assert fa.shape == (2, 2048) and fa.dtype == torch.float32 and torch.isfinite(fa).all()
    assert torch.equal(fa, fb)  # same weights, uint8 and float [0, 255] inputs agree
    assert not torch.allclose(fa[0], fa[1])


def test_detector_is_the_shapes_detector(built):
    out, _ = built
    assert json.loads((out / "detector" / "config.json").read_text())["kind"] == "shapes"
    assert info(out, "detector")["kind"] == "shapes"


# ------------------------------------------------------------------ reruns, local, hub

def test_rerun_skips_and_force_rebuilds(built, capsys):
    out, world = built
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(smoke_args(out, world)) == 0
    assert "skipped" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    created = info(out, "detector")["created"]
    (out / "detector" / "config.json").write_text("{}")
    assert main(smoke_args(out, world, "--roles", "detector", "--force")) == 0
    assert json.loads((out / "detector" / "config.json").read_text())["kind"] == "shapes"
    assert info(out, "detector")["created"] >= created


def test_local_copy_and_link(built, tmp_path):
    from transformers import CLIPTextModel

    out, _ = built
    src = out / "text_encoder"
    for link in (False, True):
        dest = tmp_path / f"models_{link}"
        argv = ["models", "--out", str(dest), "--roles", "text_encoder", "--local", f"text_encoder={src}"]
        assert main(argv + (["--link"] if link else [])) == 0
        meta = info(dest, "text_encoder")
        assert meta["source"] == "local" and meta["id"] == str(src.resolve()) and meta["linked"] is link
        assert meta["origin"]["id"] == "microdit-smoke/text_encoder"
        assert (dest / "text_encoder" / "model.safetensors").is_symlink() is link
        assert CLIPTextModel.from_pretrained(dest / "text_encoder").config.hidden_size == TEXT_DIM


def test_local_bad_dir_and_mismatch_fail_clearly(built, tmp_path, capsys):
    out, _ = built
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["models", "--out", str(tmp_path / "m"), "--roles", "vae", "--local", f"vae={empty}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vae" in err and "config.json" in err
    assert not (tmp_path / "m" / "vae").exists()
    # a role already holding another model is not silently reused
    assert main(["models", "--out", str(out), "--roles", "clip", "--local", f"clip={out / 'clip'}"]) == 2
    assert "--force" in capsys.readouterr().err
    # a llava dir is not a text encoder
    assert main(["models", "--out", str(tmp_path / "m"), "--roles", "text_encoder",
                 "--local", f"text_encoder={out / 'captioner'}"]) == 2
    assert "llava" in capsys.readouterr().err


def test_offline_hub_request_fails_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["models", "--out", str(tmp_path), "--preset", "paper", "--roles", "vae", "captioner"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "vae" in err and "stabilityai/sdxl-vae" in err and "--local vae=" in err and "HF_HUB_OFFLINE" in err
    assert "captioner" in err
    assert not list(tmp_path.iterdir())
    # an explicit --hub in the smoke preset is held to the same rule
    assert main(["models", "--out", str(tmp_path), "--roles", "vae",
                 "--hub", "vae=stabilityai/stable-diffusion-xl-base-1.0:vae"]) == 2
    assert "--local vae=" in capsys.readouterr().err


def test_model_specs_parse():
    role, src = zoo.parse_model_spec("vae=stabilityai/stable-diffusion-xl-base-1.0@abc123:vae")
    assert (role, src) == ("vae", zoo.Source("hub", "stabilityai/stable-diffusion-xl-base-1.0", "abc123", "vae"))
    assert zoo.parse_model_spec("clip=openai/clip-vit-large-patch14")[1].revision is None
    assert zoo.parse_model_spec("vae=built:tiny-autoencoderkl")[1] == zoo.Source("built", "tiny-autoencoderkl")
    assert zoo.parse_model_spec("vae=built")[1] == zoo.Source("built", "microdit-smoke/vae")
    assert zoo.parse_model_spec("fid=cleanfid:inception-2015-12-05")[1] == zoo.Source("hub", "cleanfid")
    for bad in ("vae", "vae=", "unet=a/b", "vae=not-a-repo-id", "vae=/abs", "clip=cleanfid"):
        with pytest.raises(UserError):
            zoo.parse_model_spec(bad)
    with pytest.raises(UserError):
        zoo.parse_local_spec("captioner")
    plan = zoo.plan_sources(zoo.ROLES, "paper", ["clip=me/clip", "detector=built"], ["vae=/x/vae"])
    assert plan["clip"].id == "me/clip" and plan["vae"].kind == "local" and plan["detector"].kind == "built"
    assert plan["captioner"] == zoo.Source("hub", "llava-hf/llava-1.5-7b-hf")
    assert plan["fid"].id == "cleanfid"


def test_workflow_flag_spellings(built, tmp_path, capsys):
    """`--source build --id role=built:name`, repeated `--captions`, images defaulting to them."""
    _, world = built
    out = tmp_path / "m"
    argv = ["models", "--out", str(out), "--source", "build", "--roles", "detector", "vae",
            "--id", "detector=built:shapes-detector", "--captions", str(world), "--captions", str(world),
            "--vae-steps", "2", "--vae-resolution", "32", "--vae-batch-size", "4",
            "--vae-channels", "8", "8", "--vae-grid-res", "32"]
    assert main(argv) == 0
    assert info(out, "detector")["id"] == "shapes-detector" and info(out, "detector")["preset"] == "smoke"
    assert info(out, "vae")["train"]["images"] == 36  # the world file given twice is read once
    assert main(["models", "--out", str(out), "--source", "hub", "--preset", "smoke"]) == 2


def test_weight_patterns_pick_one_format():
    sdxl_vae = ["config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.fp16.safetensors", "sdxl_vae.safetensors"]
    assert zoo.weight_patterns(sdxl_vae) == ["diffusion_pytorch_model.safetensors"]
    llava = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
             "pytorch_model-00001-of-00002.bin", "tf_model.h5"]
    assert zoo.weight_patterns(llava) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert zoo.weight_patterns(["config.json", "pytorch_model.bin", "flax_model.msgpack"]) == ["pytorch_model.bin"]


def test_staged_dir_replaces_atomically(tmp_path):
    final = tmp_path / "role"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with zoo.staged_dir(final) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["role"] and (final / "old.txt").exists()
    with zoo.staged_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["role"]


def test_missing_smoke_inputs_are_user_errors(tmp_path, capsys):
    assert main(["models", "--out", str(tmp_path), "--roles", "text_encoder"]) == 2
    assert "--captions" in capsys.readouterr().err
    assert main(["models", "--out", str(tmp_path), "--roles", "vae", "--images", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(b"PAR1 not really")
    assert main(["models", "--out", str(tmp_path), "--roles", "text_encoder", "--captions", str(truncated)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "truncated.parquet" in err
    assert not (tmp_path / "text_encoder").exists()


# ------------------------------------------------------------------ OpenCLIP conversion

def clip_bpe_files(open_clip, dest: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt (HF CLIPTokenizer files) of OpenCLIP's bundled CLIP BPE."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (dest / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return dest / "vocab.json", dest / "merges.txt"


@pytest.fixture(scope="module")
def openclip_dir(tmp_path_factory):
    """A tiny OpenCLIP model written the way hub OpenCLIP repos are (config + state dict + BPE files)."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model_cfg = {"embed_dim": 32, "quick_gelu": True,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 3}}
    model = open_clip.CLIP(**model_cfg).eval()
    with torch.no_grad():  # OpenCLIP zero-inits nothing here, but make the LayerNorms non-trivial too
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("openclip")
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), root / "open_clip_pytorch_model.bin")
    clip_bpe_files(open_clip, root)
    return root, model, open_clip


CAPTIONS = [
    "A photo of two red circles above a blue square.",
    "Wow!! a dog's   ball, 3 cats & 12 birds",
    "",
    "the quick brown fox jumps over the lazy dog " * 12,  # truncated at 77
]


def test_converted_text_tower_matches_openclip(openclip_dir, tmp_path):
    from transformers import AutoTokenizer, CLIPTextModel

    from microdit.zoo.openclip import convert_openclip_text_tower

    src, reference, open_clip = openclip_dir
    facts = convert_openclip_text_tower(src, tmp_path / "te")
    assert facts["hidden_act"] == "quick_gelu" and facts["hidden_size"] == 48 and facts["pad_token_id"] == 0

    tok = AutoTokenizer.from_pretrained(tmp_path / "te")
    ours = tok(CAPTIONS, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    theirs = open_clip.tokenizer.SimpleTokenizer(context_length=77)(CAPTIONS)
    assert torch.equal(ours, theirs), "token ids (incl. zero padding and truncation) must match OpenCLIP's"

    model = CLIPTextModel.from_pretrained(tmp_path / "te").eval()
    with torch.no_grad():
        x = reference.token_embedding(theirs) + reference.positional_embedding
        expected = reference.ln_final(reference.transformer(x, attn_mask=reference.attn_mask))
        got = model(ours).last_hidden_state
    assert got.shape == (4, 77, 48)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_local_openclip_dir_is_converted_by_the_cli(openclip_dir, tmp_path):
    from microdit.text import TextEncoder

    src, reference, open_clip = openclip_dir
    assert main(["models", "--out", str(tmp_path), "--roles", "text_encoder", "--local", f"text_encoder={src}"]) == 0
    meta = info(tmp_path, "text_encoder")
    assert meta["source"] == "local" and meta["converted_from"] == "open_clip" and meta["max_length"] == 77
    encoder = TextEncoder.from_pretrained(tmp_path / "text_encoder")
    emb = encoder.encode(CAPTIONS[:2])
    ids = open_clip.tokenizer.SimpleTokenizer(context_length=77)(CAPTIONS[:2])
    with torch.no_grad():
        x = reference.token_embedding(ids) + reference.positional_embedding
        expected = reference.ln_final(reference.transformer(x, attn_mask=reference.attn_mask))
    torch.testing.assert_close(emb.float().reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)


def test_unsupported_openclip_text_options_are_rejected():
    from microdit.zoo.openclip import convert_text_state_dict, text_config_from_openclip

    cfg = {"embed_dim": 8, "text_cfg": {"width": 16, "heads": 2, "layers": 1, "ls_init_value": 1e-4}}
    with pytest.raises(ValueError, match="ls_init_value"):
        text_config_from_openclip(cfg)
    with pytest.raises(KeyError):
        convert_text_state_dict({"token_embedding.weight": torch.zeros(4, 16)}, num_layers=1)


# ------------------------------------------------------------------ hub path, served from disk

class FakeHub:
    """Stands in for huggingface_hub's model_info/snapshot_download, serving repos from a directory."""

    def __init__(self, root: Path):
        self.root, self.downloads = root, []

    def model_info(self, repo_id, revision=None, **kwargs):
        from types import SimpleNamespace

        repo = self.root / repo_id
        if not repo.is_dir():
            raise ConnectionError(f"cannot reach the hub for {repo_id}")
        files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
        return SimpleNamespace(sha="c0ffee" + (revision or "main"),
                               siblings=[SimpleNamespace(rfilename=f) for f in files])

    def snapshot_download(self, repo_id, revision=None, local_dir=None, allow_patterns=None, **kwargs):
        import fnmatch
        import shutil

        repo = self.root / repo_id
        for p in repo.rglob("*"):
            rel = str(p.relative_to(repo))
            if p.is_file() and any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, Path(local_dir) / rel)
                self.downloads.append(rel)
        (Path(local_dir) / ".cache").mkdir(exist_ok=True)  # as the real one leaves behind
        return local_dir


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: hub.model_info(*a, **k))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    return hub


def test_hub_snapshot_of_a_subfolder(built, fake_hub, tmp_path):
    import shutil

    from diffusers import AutoencoderKL

    out, _ = built
    repo = fake_hub.root / "acme/sdxl"
    shutil.copytree(out / "vae", repo / "vae", ignore=shutil.ignore_patterns("MODEL_INFO.json", "recon.png"))
    (repo / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"duplicate weights in another format")
    (repo / "unet").mkdir()
    (repo / "unet" / "config.json").write_text("{}")
    dest = tmp_path / "models"
    assert main(["models", "--out", str(dest), "--roles", "vae", "--hub", "vae=acme/sdxl@v1:vae"]) == 0
    assert sorted(fake_hub.downloads) == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    meta = info(dest, "vae")
    assert (meta["source"], meta["id"], meta["revision"], meta["commit"], meta["subfolder"]) == (
        "hub", "acme/sdxl", "v1", "c0ffeev1", "vae")
    assert meta["scaling_factor"] == pytest.approx(info(out, "vae")["scaling_factor"])
    assert sorted(p.name for p in (dest / "vae").iterdir()) == [
        "MODEL_INFO.json", "config.json", "diffusion_pytorch_model.safetensors"]
    AutoencoderKL.from_pretrained(dest / "vae")
    # same request again: kept; another revision: refused without --force
    assert main(["models", "--out", str(dest), "--roles", "vae", "--hub", "vae=acme/sdxl@v1:vae"]) == 0
    assert main(["models", "--out", str(dest), "--roles", "vae", "--hub", "vae=acme/sdxl@v2:vae"]) == 2


def test_hub_openclip_text_encoder_is_converted(openclip_dir, fake_hub, tmp_path):
    import shutil

    from transformers import CLIPTextModel

    src, _, _ = openclip_dir
    shutil.copytree(src, fake_hub.root / "apple/tiny-clip")
    (fake_hub.root / "apple/tiny-clip" / "pytorch_model.bin").write_bytes(b"the HF copy, not fetched")
    argv = ["models", "--out", str(tmp_path / "m"), "--roles", "text_encoder", "--hub", "text_encoder=apple/tiny-clip"]
    assert main(argv) == 0
    assert sorted(fake_hub.downloads) == ["merges.txt", "open_clip_config.json", "open_clip_pytorch_model.bin",
                                          "vocab.json"]
    meta = info(tmp_path / "m", "text_encoder")
    assert meta["converted_from"] == "open_clip" and meta["hidden_size"] == 48 and meta["commit"] == "c0ffeemain"
    assert not (tmp_path / "m" / "text_encoder" / ".download").exists()
    assert CLIPTextModel.from_pretrained(tmp_path / "m" / "text_encoder").config.hidden_act == "quick_gelu"


def test_unreachable_hub_is_a_one_line_error(fake_hub, tmp_path, capsys):
    assert main(["models", "--out", str(tmp_path), "--roles", "clip", "--hub", "clip=nobody/nothing"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nobody/nothing" in err and "--local clip=" in err
    assert not (tmp_path / "clip").exists() and not list(tmp_path.glob(".clip*"))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_local_cleanfid_weights_file(tmp_path):
    """`--local fid=<inception .pt>`: clean-fid's TorchScript layout, normalised (x - 128) / 128 at 299 px."""
    from torch import nn

    class Scripted(nn.Module):  # stands in for inception-2015-12-05.pt: a module with `.layers`
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 2048, 1))

        def forward(self, x):
            return self.layers(x)

    torch.manual_seed(0)
    weights = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(Scripted()).save(str(weights))
    out = tmp_path / "models"
    assert main(["models", "--out", str(out), "--roles", "fid", "--local", f"fid={weights}"]) == 0
    meta = info(out, "fid")
    assert meta["kind"] == "cleanfid_inception" and meta["comparable"] is True and len(meta["sha256"]) == 64
    extractor = zoo.load_fid_extractor(out / "fid")
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    expected = torch.jit.load(str(weights)).layers((images.float() - 128) / 128).reshape(2, 2048)
    torch.testing.assert_close(extractor(images), expected)
    assert extractor(images[:, :, :64, :64]).shape == (2, 2048)  # other sizes are resized to 299
