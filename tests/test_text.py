"""TextEncoder on a tiny CLIP text model + word-level tokenizer built in tmp_path."""
import pytest
import torch

from microdit.text import CONTEXT_LENGTH, TextEncoder

torch.set_num_threads(1)

WORDS = "a an one two three red green blue circle square triangle left right of above below the and".split()


def build_tiny_text_encoder(directory, hidden=32, with_pad=True):
    """Save a word-level tokenizer and a random 2-layer CLIPTextModel into `directory`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    specials = ["<pad>", "<|startoftext|>", "<|endoftext|>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 2)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<pad>" if with_pad else None,
        model_max_length=CONTEXT_LENGTH,
    )
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CONTEXT_LENGTH, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    tokenizer.save_pretrained(directory)
    CLIPTextModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return build_tiny_text_encoder(tmp_path_factory.mktemp("text_encoder"))


def test_encode_shapes_and_determinism(encoder_dir):
    enc = TextEncoder.from_pretrained(encoder_dir)
    prompts = ["a red circle", "two blue squares left of a green triangle", ""]
    emb = enc.encode(prompts)
    assert emb.shape == (3, 77, 32) and emb.dtype == torch.float32 and enc.dim == 32
    assert torch.isfinite(emb).all()
    assert torch.equal(emb, TextEncoder.from_pretrained(encoder_dir).encode(prompts))
    # a prompt's embedding does not depend on the rest of its batch
    torch.testing.assert_close(enc.encode(prompts[1:2])[0], emb[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(emb[0], emb[1])


def test_tokenize_pads_and_truncates(encoder_dir):
    enc = TextEncoder.from_pretrained(encoder_dir)
    ids = enc.tokenize(["red circle", " ".join(["blue"] * 200)])
    assert ids.shape == (2, 77)
    bos, eos, pad = 1, 2, 0
    assert ids[0, :4].tolist() == [bos, 4 + WORDS.index("red"), 4 + WORDS.index("circle"), eos]
    assert (ids[0, 4:] == pad).all()
    assert ids[1, 0] == bos and ids[1, -1] == eos  # truncated, still closed by the end token
    assert (ids[1, 1:-1] == 4 + WORDS.index("blue")).all()
    with pytest.raises(TypeError):
        enc.tokenize("a single string")


def test_all_positions_causal_no_attention_mask(encoder_dir):
    enc = TextEncoder.from_pretrained(encoder_dir)
    short, longer = enc.encode(["red circle", "red circle left"])
    # CLIP's causal mask: positions before the prompts diverge see the same prefix
    torch.testing.assert_close(short[:3], longer[:3], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(short[3], longer[3])
    # no padding mask: pad positions attend to the pads before them, as OpenCLIP computes them
    ids = enc.tokenize(["red circle"])
    with torch.no_grad():
        unmasked = enc.model(input_ids=ids).last_hidden_state[0]
        masked = enc.model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state[0]
    assert torch.equal(short, unmasked)
    assert not torch.allclose(short[5:], masked[5:])


def test_dtype_option(encoder_dir):
    enc = TextEncoder.from_pretrained(encoder_dir, dtype="bfloat16")
    emb = enc.encode(["a blue square"])
    assert emb.dtype == torch.bfloat16 and enc.dtype == torch.bfloat16
    ref = TextEncoder.from_pretrained(encoder_dir).encode(["a blue square"])
    torch.testing.assert_close(emb.float(), ref, rtol=0.1, atol=0.1)


def test_pipeline_layout_subfolders(tmp_path):
    build_tiny_text_encoder(tmp_path / "tokenizer")
    build_tiny_text_encoder(tmp_path / "text_encoder")
    (tmp_path / "model_index.json").write_text("{}")
    assert TextEncoder.from_pretrained(tmp_path).encode(["one red circle"]).shape == (1, 77, 32)


def test_missing_or_bad_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TextEncoder.from_pretrained(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TextEncoder.from_pretrained(tmp_path)


def test_tokenizer_without_pad_token_is_rejected(tmp_path):
    build_tiny_text_encoder(tmp_path, with_pad=False)
    with pytest.raises(ValueError, match="pad token"):
        TextEncoder.from_pretrained(tmp_path)
