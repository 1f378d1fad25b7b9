"""End to end and unforgiving: the smoke chain memorises a handful of captioned images.

Four shapes-world scenes go through the real components: the smoke VAE and text encoder are built on
them (`microdit models`), their MDS shard is encoded (`microdit latents`), the smoke MicroDiT trains
through the paper's four stages (`microdit train`: 64 px masked -> unmasked -> 128 px masked ->
unmasked), and sampling each training caption (the sampler, classifier-free guidance 2) must give
back that caption's image as the VAE reproduces it: close in pixels, and nearer to it than to any
other of the four. A chain that pairs captions with the wrong latents, drops the VAE's scaling
factor, or flips the guidance sign cannot pass. (The exact shapes detector is not the judge here:
this 4-image VAE, trained at 64 px, blurs edges at 128 px past its thresholds.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from microdit.cli import main as cli
from microdit.data.shapes import caption_for
from microdit.data.shapes_draw import make_object, render

pytestmark = pytest.mark.slow

SIZE = 128
# (shape, colour, x0, y0, side): one or two well-separated objects per scene, every caption different
SCENES = [
    [("circle", "red", 30, 34, 60)],
    [("square", "blue", 14, 20, 40), ("triangle", "yellow", 74, 70, 40)],
    [("star", "green", 40, 16, 48)],
    [("square", "orange", 20, 72, 36), ("circle", "purple", 72, 16, 40)],
]
STAGES = [  # resolution, mask ratio, steps, optimizer state carried over
    (64, 0.75, 200, False), (64, 0.0, 600, True), (128, 0.75, 200, False), (128, 0.0, 800, True)]
GUIDANCE = 2.0  # not 1: at 1 the unconditional branch is skipped and a flipped sign would not show
MAX_L1 = 0.05  # mean |sample - the image through the VAE| in [0, 1] units; other images are >= 0.1 away


def objects_of(scene):
    return [make_object(*o) for o in scene]


def write_inputs(work: Path) -> tuple[Path, Path, list[np.ndarray], list[str]]:
    from streaming import MDSWriter

    images_dir = work / "images"
    images_dir.mkdir(parents=True)
    pixels, captions = [], []
    mds = work / "mds"
    with MDSWriter(out=str(mds), columns={"key": "str", "image": "png", "caption": "str"}) as writer:
        for i, scene in enumerate(SCENES):
            objects = objects_of(scene)
            image = render(objects, SIZE, "real", np.random.default_rng(i))
            image.save(images_dir / f"scene{i}.png")
            caption = caption_for(objects, "real")
            writer.write({"key": f"scene{i}", "image": image, "caption": caption})
            pixels.append(np.asarray(image, dtype=np.float32) / 255)
            captions.append(caption)
    assert len(set(captions)) == len(captions), captions
    text = work / "captions.txt"
    text.write_text("\n".join(captions) + "\n")
    return mds, text, pixels, captions


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    work = tmp_path_factory.mktemp("memorise")
    mds, captions_txt, pixels, captions = write_inputs(work)
    models = work / "models"
    assert cli(["models", "--out", str(models), "--source", "build", "--roles", "vae", "text_encoder",
                "--captions", str(captions_txt), "--images", str(work / "images"),
                "--vae-steps", "300", "--vae-batch-size", "4", "--text-steps", "100"]) == 0
    latents = work / "latents"
    assert cli(["latents", "--mds", str(mds), "--out", str(latents), "--vae", str(models / "vae"),
                "--text-encoder", str(models / "text_encoder"), "--resolutions", "64", "128",
                "--dtype", "float32", "--batch-size", "4"]) == 0
    previous = None
    for n, (res, mask, steps, carry) in enumerate(STAGES, start=1):
        out = work / f"stage{n}"
        argv = ["train", "--out", str(out), "--stage", str(n), "--model", "MicroDiT_Smoke_2",
                "--latents", str(latents), "--resolution", str(res), "--mask-ratio", str(mask),
                "--steps", str(steps), "--global-batch", "4", "--micro-batch", "4", "--lr", "1e-3",
                "--schedule", "constant", "--warmup", "0", "--p-mean", "0.4", "--p-std", "1.2",
                "--no-ema", "--eval-every", "0", "--ckpt-every", "10000", "--log-every", "100",
                "--no-tensorboard", "--sample-steps", "2", "--sample-prompts", captions[0], "--device", "cpu",
                "--init-optimizer" if carry else "--no-init-optimizer"]
        if previous:
            argv += ["--init", str(previous / "final")]
        assert cli(argv) == 0
        previous = out

    from microdit.generate import load_pipeline

    pipe = load_pipeline(previous / "final", models / "vae", models / "text_encoder")
    samples = pipe(captions, steps=20, guidance=GUIDANCE, seed=0, progress=False)
    # what the chain can give back at best: each image through the VAE and back, no DiT, no scaling
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
    pixels = list(((recon.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())
    return {"pixels": pixels, "captions": captions,
            "samples": [np.asarray(s, dtype=np.float32) / 255 for s in samples]}


def test_each_caption_gives_back_its_own_image(memorised):
    pixels, samples = memorised["pixels"], memorised["samples"]
    errors = np.array([[np.abs(s - p).mean() for p in pixels] for s in samples])  # sample i vs image j
    own = np.diag(errors)
    print("L1 of each caption's sample to every training image:\n", errors.round(4))
    assert (own < MAX_L1).all(), f"samples are not their captions' images: L1 {own.round(4)} (bound {MAX_L1})"
    others = np.where(np.eye(len(pixels), dtype=bool), np.inf, errors).min(axis=1)
    assert (own < others).all(), f"a sample is nearer another caption's image: own {own.round(4)}, others {others.round(4)}"

