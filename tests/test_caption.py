"""`microdit caption`: a tiny random LLaVA captions raw shards; resumable, counted, one row per key."""
import argparse
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from microdit.errors import UserError
from microdit.cli import main as cli_main
from microdit.data import caption as caption_mod
from microdit.data.webdataset import write_shard

N_GOOD = 7


def build_tiny_llava(out: Path) -> None:
    """Random LLaVA (tiny CLIP vision tower + tiny Llama) with a word-level tokenizer, an
    `<image>` token and a chat template: the same processor/generate path as llava-1.5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    words = "a the red green blue circle square triangle left right above below of and small large".split()
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}"
                "{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=template)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8).to_dict(),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                max_position_embeddings=128, **ids).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16,
        vision_feature_select_strategy="default", vision_feature_layer=-2, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # special tokens never win the argmax: every caption is made of words
        model.lm_head.weight[: len(vocab) - len(words)] = 0.0
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("<image>")] = 0.0
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "MODEL_INFO.json").write_text(json.dumps({"role": "captioner", "source": "built", "id": "tiny-llava-test"}))


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "captioner"
    build_tiny_llava(path)
    return path


def jpeg(size, seed) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def raw(tmp_path) -> Path:
    """7 good images over two shards (uncaptioned, as SA-1B), a corrupt one, a truncated shard."""
    raw = tmp_path / "raw" / "shapes_sa"
    raw.mkdir(parents=True)
    good = [dict(key=f"{i:05d}", image=jpeg((40 + i, 36), i), meta={"key": f"{i:05d}"}) for i in range(N_GOOD)]
    write_shard(raw / "00000.tar", good[:4] + [dict(key="corrupt", image=b"not an image at all")])
    write_shard(raw / "00001.tar", good[4:])
    write_shard(raw / "00002.tar", [dict(key="lost", image=jpeg((40, 40), 99))])
    data = (raw / "00002.tar").read_bytes()
    (raw / "00002.tar").write_bytes(data[:1000])  # ends inside the image
    return raw


def cli_args(raw: Path, out: Path, llava: Path, *extra: str) -> list[str]:
    return ["caption", "--raw", str(raw), "--out", str(out), "--model", str(llava), "--prompt",
            "describe the shapes", "--max-new-tokens", "6", "--batch-size", "2", "--chunk-size", "2", *extra]


def good_keys() -> list[str]:
    return [f"{i:05d}" for i in range(N_GOOD)]


def test_caption_writes_parquet_and_stats(raw, tmp_path, llava):
    out = tmp_path / "captions" / "shapes_sa.parquet"
    assert cli_main(cli_args(raw, out, llava)) == 0
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["key", "caption", "model"]
    assert sorted(frame["key"]) == good_keys()
    assert set(frame["model"]) == {"tiny-llava-test"}
    assert all(isinstance(c, str) and c == c.strip() for c in frame["caption"])
    # the random model speaks its own vocabulary: decoded new tokens, not the prompt echoed back
    assert any(frame["caption"] != "") and not any(frame["caption"].str.contains("ASSISTANT"))
    stats = json.loads((out.parent / "shapes_sa.stats.json").read_text())
    assert stats["images"] == N_GOOD + 1 and stats["failed"] == 1
    assert stats["captioned"] + stats["empty"] == N_GOOD
    assert stats["reader"]["truncated_shards"] == ["00002.tar"]
    assert not (out.parent / "shapes_sa.parquet.parts").exists()

    # the MDS stage takes these captions for the uncaptioned source
    mds = tmp_path / "mds" / "shapes_sa"
    assert cli_main(["mds", "--raw", str(raw), "--out", str(mds), "--captions", str(out),
                     "--min-size", "32", "--max-size", "64"]) == 0
    summary = json.loads((mds / "_summary.json").read_text())
    assert summary["written"] == stats["captioned"] and summary["dropped"]["corrupt"] == 1
    assert summary["dropped"]["empty_caption"] == stats["empty"]


def test_crash_then_resume_loses_nothing(raw, tmp_path, llava, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    real_generate = LlavaForConditionalGeneration.generate
    calls = {"n": 0, "crash_after": 2}

    def flaky_generate(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > calls["crash_after"]:
            raise RuntimeError("simulated preemption")
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", flaky_generate)
    out = tmp_path / "captions" / "shapes_sa.parquet"
    with pytest.raises(RuntimeError, match="preemption"):
        cli_main(cli_args(raw, out, llava))
    assert not out.exists()
    parts = sorted((out.parent / "shapes_sa.parquet.parts").glob("part-*.parquet"))
    first = pd.concat([pd.read_parquet(p) for p in parts])
    assert list(first["key"]) == good_keys()[:4]  # two batches of two, each chunk flushed

    calls.update(n=0, crash_after=10**6)
    assert cli_main(cli_args(raw, out, llava)) == 0
    assert calls["n"] == 2  # only the 3 remaining images: batches of 2 + 1
    final = pd.read_parquet(out)
    assert sorted(final["key"]) == good_keys() and final["key"].is_unique
    kept = final.set_index("key").loc[first["key"], "caption"]
    assert list(kept) == list(first["caption"])  # earlier captions survive untouched

    calls["n"] = 0  # a third run over a finished source captions nothing and loads no model
    monkeypatch.setattr(caption_mod, "Captioner", None)
    assert cli_main(cli_args(raw, out, llava)) == 0
    assert calls["n"] == 0 and len(pd.read_parquet(out)) == N_GOOD


def test_max_images_then_complete(raw, tmp_path, llava):
    out = tmp_path / "captions" / "shapes_sa.parquet"
    assert cli_main(cli_args(raw, out, llava, "--max-images", "3")) == 0
    assert sorted(pd.read_parquet(out)["key"]) == good_keys()[:3]
    assert cli_main(cli_args(raw, out, llava)) == 0
    final = pd.read_parquet(out)
    assert sorted(final["key"]) == good_keys() and final["key"].is_unique
    stats = json.loads((out.parent / "shapes_sa.stats.json").read_text())
    assert stats["new_this_run"] == N_GOOD - 3


def test_empty_captions_kept_and_counted(raw, tmp_path):
    """An empty answer is stored as "" (the MDS stage drops it as empty_caption) and counted."""
    out = tmp_path / "captions" / "shapes_sa.parquet"

    def captioner(images):  # stands in for LLaVA: odd widths get an empty answer
        return ["" if im.width % 2 else f"shape of width {im.width}" for im in images]

    parser = argparse.ArgumentParser()
    caption_mod.add_arguments(parser)
    ns = parser.parse_args(["--raw", str(raw), "--out", str(out), "--model", "some/llava"])
    stats = caption_mod.caption_source(ns, captioner=captioner)
    frame = pd.read_parquet(out).set_index("key")
    assert frame.loc["00001", "caption"] == "" and frame.loc["00002", "caption"] == "shape of width 42"
    assert stats["empty"] == 3 and stats["captioned"] == 4 and stats["failed"] == 1
    assert set(frame["model"]) == {"llava"}  # no MODEL_INFO.json: the name of the path


def test_bad_input_is_a_one_line_error(raw, tmp_path, llava, capsys):
    out = tmp_path / "captions" / "x.parquet"
    assert cli_main(cli_args(tmp_path / "nowhere", out, llava)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no .tar shards" in err

    out.parent.mkdir()
    pd.DataFrame({"key": ["00000"], "caption": ["old"], "model": ["another-captioner"]}).to_parquet(out)
    with pytest.raises(UserError, match="another-captioner"):
        caption_mod.load_done(out, "tiny-llava-test")
    assert cli_main(cli_args(raw, out, llava)) == 2
    assert "already holds captions" in capsys.readouterr().err


def test_missing_model_is_a_one_line_error(raw, tmp_path, capsys):
    out = tmp_path / "captions" / "shapes_sa.parquet"
    assert cli_main(cli_args(raw, out, tmp_path / "models" / "captioner")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot load a LLaVA captioner" in err
    assert not out.exists() and not list(out.parent.glob("*"))
