"""generate(): prompts -> PIL images with a tiny VAE, text encoder and DiT built in tmp_path."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from microdit.generate import Pipeline, decode_latents, generate, initial_noise, latent_size_of, load_pipeline
from microdit.text import TextEncoder

torch.set_num_threads(1)

WORDS = "a one two red green blue circle square triangle left right of above below".split()
CAPTION_DIM = 16


def build_text_encoder(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=77,
    ).save_pretrained(directory)
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=CAPTION_DIM, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    CLIPTextModel(config).save_pretrained(directory)
    return directory


def build_vae(directory=None, scaling_factor=0.5, shift_factor=None):
    """4-channel AutoencoderKL that halves the resolution (8x8 latents -> 16x16 images)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16, scaling_factor=scaling_factor, shift_factor=shift_factor,
    ).eval()
    if directory is not None:
        vae.save_pretrained(directory)
    return vae


class ToyDiT(nn.Module):
    """Caption-conditioned per-sample conv net with the MicroDiT call signature."""

    input_size = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.t_proj = nn.Linear(1, 4)
        self.y_proj = nn.Linear(CAPTION_DIM, 4)

    def forward(self, x, t, y, mask_ratio=0.0, cfg=1.0):
        cond = self.t_proj(t.expand(x.shape[0])[:, None]) + self.y_proj(y.mean(dim=1))
        return {"sample": torch.tanh(self.conv(x)) + cond[:, :, None, None], "mask": None}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    te = TextEncoder.from_pretrained(build_text_encoder(tmp_path_factory.mktemp("text_encoder")))
    return ToyDiT(), build_vae(), te


PROMPTS = ["a red circle", "two blue square left of a green triangle", "one green circle above a red square"]


def _pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_generate_end_to_end(parts):
    model, vae, te = parts
    images = generate(PROMPTS, model, vae, te, steps=3, seed=0, progress=False)
    assert len(images) == 3
    assert all(im.size == (16, 16) and im.mode == "RGB" for im in images)
    px = _pixels(images)
    assert px.dtype == np.uint8 and px.std() > 0
    assert not np.array_equal(px[0], px[1])


def test_generate_deterministic_and_seeded(parts):
    model, vae, te = parts
    a = _pixels(generate(PROMPTS, model, vae, te, steps=3, seed=4, progress=False))
    b = _pixels(generate(PROMPTS, model, vae, te, steps=3, seed=4, progress=False))
    c = _pixels(generate(PROMPTS, model, vae, te, steps=3, seed=5, progress=False))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_generate_batch_size_invariant(parts):
    model, vae, te = parts
    whole = _pixels(generate(PROMPTS, model, vae, te, steps=3, seed=1, batch_size=3, progress=False))
    single = _pixels(generate(PROMPTS, model, vae, te, steps=3, seed=1, batch_size=1, progress=False))
    pairs = _pixels(generate(PROMPTS, model, vae, te, steps=3, seed=1, batch_size=2, progress=False))
    # identical up to float rounding differences between batch shapes (at most one grey level)
    assert np.abs(whole.astype(int) - single.astype(int)).max() <= 1
    assert np.abs(whole.astype(int) - pairs.astype(int)).max() <= 1
    # image i is seeded by seed + i alone, whatever else is in the call
    tail = _pixels(generate(PROMPTS[2:], model, vae, te, steps=3, seed=3, progress=False))
    assert np.abs(whole[2].astype(int) - tail[0].astype(int)).max() <= 1


def test_guidance_changes_images(parts):
    model, vae, te = parts
    plain = _pixels(generate(PROMPTS[:1], model, vae, te, steps=3, guidance=1.0, progress=False))
    guided = _pixels(generate(PROMPTS[:1], model, vae, te, steps=3, guidance=5.0, progress=False))
    assert not np.array_equal(plain, guided)


def test_initial_noise_rows_seeded_by_index():
    noise = initial_noise(3, (4, 8, 8), seed=10)
    assert noise.shape == (3, 4, 8, 8)
    assert torch.equal(noise[2], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(12)))
    assert torch.equal(initial_noise(1, (4, 8, 8), seed=10, start=1)[0], noise[1])


def test_decode_latents_unscales_and_shifts():
    vae = build_vae(scaling_factor=2.0, shift_factor=0.25)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = (vae.decode(z / 2.0 + 0.25).sample / 2 + 0.5).clamp(0, 1)
    out = decode_latents(vae, z)
    assert out.shape == (2, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out, expected)


def test_latent_size_and_bad_arguments(parts):
    model, vae, te = parts
    assert latent_size_of(model) == 8
    with pytest.raises(ValueError, match="latent size"):
        latent_size_of(nn.Linear(2, 2))
    with pytest.raises(TypeError):
        generate("a red circle", model, vae, te)
    with pytest.raises(ValueError, match="batch_size"):
        generate(PROMPTS, model, vae, te, batch_size=0)


def _smoke_dit():
    models = pytest.importorskip("microdit.models")
    torch.manual_seed(0)
    model = models.MicroDiT_Smoke_2(input_size=8, caption_channels=CAPTION_DIM, in_channels=4)
    with torch.no_grad():  # the zero-initialised output layers would make F constant
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def test_pipeline_with_microdit_smoke(tmp_path):
    dit = _smoke_dit()
    build_vae(tmp_path / "vae")
    build_text_encoder(tmp_path / "text_encoder")
    pipe = load_pipeline(dit, tmp_path / "vae", tmp_path / "text_encoder")
    assert isinstance(pipe, Pipeline)
    a = pipe(PROMPTS[:2], steps=2, seed=0, progress=False)
    assert [im.size for im in a] == [(16, 16), (16, 16)]
    b = generate(PROMPTS[:2], dit, pipe.vae, pipe.text_encoder, steps=2, seed=0, batch_size=1, progress=False)
    assert np.abs(_pixels(a).astype(int) - _pixels(b).astype(int)).max() <= 1


def test_load_pipeline_from_saved_microdit(tmp_path):
    dit = _smoke_dit()
    pytest.importorskip("microdit.checkpoint")
    dit.save_pretrained(tmp_path / "dit")
    build_vae(tmp_path / "vae")
    build_text_encoder(tmp_path / "text_encoder")
    pipe = load_pipeline(tmp_path / "dit", tmp_path / "vae", tmp_path / "text_encoder")
    a = _pixels(pipe(PROMPTS[:1], steps=2, seed=0, progress=False))
    b = _pixels(generate(PROMPTS[:1], dit.eval(), pipe.vae, pipe.text_encoder, steps=2, seed=0, progress=False))
    assert np.array_equal(a, b)
