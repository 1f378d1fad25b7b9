"""CLIP score on a tiny random CLIP saved to disk: bounds, a hand computation, clipping, records."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from microdit.errors import UserError
from microdit.metrics.clip_score import clip_score, clip_similarity


def save_tiny_clip(path, image_size=32):
    """A random CLIPModel + CLIPProcessor (character-level byte BPE vocabulary, no merges)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    path.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("models") / "clip")


def images_and_captions(n=5):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 48, 3), dtype=np.uint8)) for i in range(n)]
    captions = ["a red circle", "two blue squares", "a green star left of a yellow triangle", "x", "a purple square " * 30]
    return images, captions[:n]


def test_clip_score_matches_a_hand_computation(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    images, captions = images_and_captions()
    result = clip_score(images, captions, clip_dir, batch_size=2)
    assert result["n"] == 5 and result["skipped"] == 0 and result["model"] == "clip"
    assert 0 <= result["clip_score"] <= 100

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    by_hand = []
    with torch.no_grad():
        for image, caption in zip(images, captions):
            pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
            tokens = processor.tokenizer([caption], return_tensors="pt", truncation=True, max_length=77)
            u = model.get_image_features(pixel_values=pixels)[0]
            v = model.get_text_features(**tokens)[0]
            by_hand.append(100 * max(float(u @ v / (u.norm() * v.norm())), 0.0))
    assert result["clip_score"] == pytest.approx(float(np.mean(by_hand)), abs=1e-4)


def test_similarity_clips_negative_cosines_and_is_bounded():
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    v = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [4.0, 3.0], [-1.0, 1.0]])
    np.testing.assert_allclose(clip_similarity(u, v).numpy(), [100.0, 0.0, 96.0, 0.0], atol=1e-5)
    random = clip_similarity(torch.randn(256, 8), torch.randn(256, 8))
    assert random.min() >= 0 and random.max() <= 100 and (random == 0).any()


def test_unreadable_images_skipped_and_bad_input_rejected(clip_dir, tmp_path):
    images, captions = images_and_captions(3)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    paths[1].write_bytes(b"\x89PNG broken")
    from_files = clip_score(paths, captions, clip_dir)
    assert from_files["n"] == 2 and from_files["skipped"] == 1
    kept = clip_score([images[0], images[2]], [captions[0], captions[2]], clip_dir)
    assert from_files["clip_score"] == pytest.approx(kept["clip_score"], abs=1e-4)

    with pytest.raises(ValueError, match="captions"):
        clip_score(images, captions[:2], clip_dir)
    with pytest.raises(UserError, match="no CLIP model"):
        clip_score(images, captions, tmp_path / "nothing")


def test_model_name_comes_from_model_info(clip_dir):
    (clip_dir / "MODEL_INFO.json").write_text(json.dumps({"role": "clip", "source": "hub", "id": "openai/clip-vit-large-patch14", "revision": "abc"}))
    try:
        images, captions = images_and_captions(1)
        assert clip_score(images, captions, clip_dir)["model"] == "openai/clip-vit-large-patch14@abc"
    finally:
        (clip_dir / "MODEL_INFO.json").unlink()
