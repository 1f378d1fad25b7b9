"""`microdit latents`: shapes, scaling, resumability and rank splitting on tiny local models."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from microdit.cli import main as cli_main
from microdit.data import latents as L
from microdit.io import read_json

RES = [16, 32]
N_IMAGES = 10
CORRUPT = "img-0005"


def build_tiny_vae(directory: Path, shift_factor: float | None = 0.1) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), scaling_factor=0.7, shift_factor=shift_factor,
    )
    vae.save_pretrained(directory)
    return directory


def build_tiny_text_encoder(directory: Path, hidden: int = 16) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    words = "a an the red green blue circle square triangle left right of above below".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<bos>", eos_token="<eos>", model_max_length=77)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                            pad_token_id=0, bos_token_id=2, eos_token_id=3)
    CLIPTextModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_mds(directory: Path, n: int = N_IMAGES, corrupt: str | None = CORRUPT,
              compression: str | None = None) -> Path:
    """An MDS source per data contract 4 (jpeg images), split over several small shards."""
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    scratch = directory.parent / f"{directory.name}-jpegs"
    scratch.mkdir(parents=True, exist_ok=True)
    columns = {"key": "str", "image": "jpeg", "caption": "str", "width": "int", "height": "int"}
    with MDSWriter(out=str(directory), columns=columns, size_limit=3000, compression=compression) as writer:
        for i in range(n):
            key = f"img-{i:04d}"
            w, h = int(rng.integers(20, 48)), int(rng.integers(20, 48))
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = scratch / f"{key}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            image = Image.open(path)
            if key == corrupt:  # valid header, truncated body: opens, fails to decode
                path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
            writer.write({"key": key, "image": image, "caption": f"a red circle left of {i} blue square",
                          "width": w, "height": h})
    return directory


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: extra threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return build_tiny_vae(root / "vae"), build_tiny_text_encoder(root / "text_encoder")


@pytest.fixture(scope="module")
def mds(tmp_path_factory):
    return write_mds(tmp_path_factory.mktemp("mds") / "shapes")


@pytest.fixture(scope="module")
def encoders(models):
    return L.load_encoders(*models, device="cpu", dtype="float32", posterior="sample")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, mds, encoders):
    """One uninterrupted single-process run (seed 3) the other runs are compared with."""
    out = tmp_path_factory.mktemp("baseline") / "shapes"
    L.precompute(mds, out, encoders, RES, batch_size=4, seed=3, progress=False)
    return out


def read_rows(out: Path) -> dict[str, dict]:
    """Every sample of an MDS dataset, by key, read through streaming's own reader."""
    from streaming.base.format import reader_from_json

    rows = {}
    for shard in read_json(out / "index.json")["shards"]:
        reader = reader_from_json(str(out), None, shard)
        for i in range(reader.samples):
            row = reader.get_item(i)
            assert row["key"] not in rows, f"duplicate key {row['key']}"
            rows[row["key"]] = row
    return rows


def test_cli_shapes_dtypes_scaling(tmp_path, mds, models):
    from diffusers import AutoencoderKL

    from microdit.text import TextEncoder

    out = tmp_path / "latents" / "shapes"
    rc = cli_main(["latents", "--mds", str(mds), "--out", str(out), "--vae", str(models[0]),
                   "--text-encoder", str(models[1]), "--resolutions", *map(str, RES), "--batch-size", "4",
                   "--device", "cpu", "--posterior", "mode"])
    assert rc == 0
    summary = read_json(out / "_summary.json")
    assert summary["input"] == N_IMAGES and summary["encoded"] == N_IMAGES - 1
    assert summary["failed"] == {"corrupt": 1}
    assert summary["latent_shape"] == {"latents_16": [4, 8, 8], "latents_32": [4, 16, 16]}
    assert summary["caption_shape"] == [77, 16]
    assert summary["parts"] == len(read_json(mds / "index.json")["shards"]) >= 3

    rows = read_rows(out)
    assert sorted(rows) == [f"img-{i:04d}" for i in range(N_IMAGES) if f"img-{i:04d}" != CORRUPT]

    vae = AutoencoderKL.from_pretrained(models[0])
    text = TextEncoder.from_pretrained(models[1])
    source = read_rows(mds)
    for key in ["img-0000", "img-0009"]:
        row, image = rows[key], source[key]["image"]
        assert row["caption"] == source[key]["caption"]
        for r in RES:
            stored = np.frombuffer(row[f"latents_{r}"], np.float16).reshape(4, r // 2, r // 2)
            with torch.no_grad():
                mean = vae.encode(L.center_crop(image, r)[None]).latent_dist.mode()[0]
            expected = ((mean - 0.1) * 0.7).numpy()  # shift_factor first, then scaling_factor
            np.testing.assert_allclose(stored.astype(np.float32), expected, atol=2e-3, rtol=2e-3)
        caption = np.frombuffer(row["caption_latents"], np.float16).reshape(77, 16)
        np.testing.assert_allclose(caption.astype(np.float32), text.encode([row["caption"]])[0].numpy(),
                                   atol=5e-3, rtol=5e-3)


def test_center_crop_takes_the_middle():
    image = np.zeros((40, 120, 3), np.uint8)
    image[:, 30:90] = 255  # white middle band, wider than the crop, of a wide image
    crop = L.center_crop(Image.fromarray(image), 16)  # resized to 16 x 48, crop at columns 16:32
    assert crop.shape == (3, 16, 16) and crop.dtype == torch.float32
    assert crop.min() > 0.99  # nothing of the black sides survives
    tall = L.center_crop(Image.fromarray(image.transpose(1, 0, 2).copy()), 16)
    assert tall.min() > 0.99
    left = np.zeros((40, 120, 3), np.uint8)
    left[:, :30] = 255  # white only at the left end
    assert L.center_crop(Image.fromarray(left), 16).max() < -0.99


def test_resume_after_kill_same_content(tmp_path, mds, encoders, baseline, monkeypatch):
    clean, resumed = baseline, tmp_path / "resumed"

    real = L.encode_part
    calls = []

    def dies_on_second_part(index, *args, **kwargs):
        calls.append(index)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(index, *args, **kwargs)

    monkeypatch.setattr(L, "encode_part", dies_on_second_part)
    with pytest.raises(KeyboardInterrupt):
        L.precompute(mds, resumed, encoders, RES, batch_size=4, seed=3, progress=False)
    assert (resumed / "part-00000" / "_part.json").is_file()
    assert not (resumed / "part-00001").exists() and not (resumed / "index.json").exists()
    (resumed / ".part-00001.tmp").mkdir()  # debris of the killed writer
    (resumed / ".part-00001.tmp" / "shard.00000.mds").write_bytes(b"half")
    first_part_mtime = (resumed / "part-00000" / "_part.json").stat().st_mtime_ns

    monkeypatch.setattr(L, "encode_part", real)
    summary = L.precompute(mds, resumed, encoders, RES, batch_size=4, seed=3, progress=False)
    assert (resumed / "part-00000" / "_part.json").stat().st_mtime_ns == first_part_mtime  # not redone
    assert summary["encoded"] == N_IMAGES - 1
    a, b = read_rows(clean), read_rows(resumed)
    assert sorted(a) == sorted(b) and len(b) == N_IMAGES - 1
    for key in a:  # posterior noise is seeded per part, so a resumed part is bit-identical
        assert a[key] == b[key]


def test_changed_settings_redo_parts(tmp_path, mds, encoders, baseline):
    out = tmp_path / "out"
    shutil.copytree(baseline, out)
    summary = L.precompute(mds, out, encoders, [16], batch_size=8, seed=3, progress=False)
    assert summary["latent_shape"] == {"latents_16": [4, 8, 8]}
    rows = read_rows(out)
    assert len(rows) == N_IMAGES - 1 and all("latents_32" not in row for row in rows.values())


def test_two_ranks_then_merge_equals_one_process(tmp_path, mds, encoders, baseline):
    single, split = baseline, tmp_path / "split"
    kw = dict(batch_size=4, seed=3, progress=False)
    assert L.precompute(mds, split, encoders, RES, rank=1, world_size=2, **kw) is None
    assert not (split / "index.json").exists()
    n_parts = len(read_json(mds / "index.json")["shards"])
    assert sorted(p.name for p in split.glob("part-*")) == [f"part-{i:05d}" for i in range(1, n_parts, 2)]
    L.precompute(mds, split, encoders, RES, rank=0, world_size=2, **kw)
    assert read_rows(single) == read_rows(split)
    assert read_json(single / "_summary.json") == read_json(split / "_summary.json")


def test_rank_and_world_size_come_from_torchrun_env(tmp_path, mds, encoders, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert L.precompute(mds, tmp_path / "o", encoders, [16], progress=False) is None
    n_parts = len(read_json(mds / "index.json")["shards"])
    assert sorted(p.name for p in (tmp_path / "o").glob("part-*")) == [f"part-{i:05d}" for i in range(1, n_parts, 3)]


def test_decoding_workers_and_compressed_input_change_nothing(tmp_path, encoders, baseline):
    zipped = write_mds(tmp_path / "zipped", compression="zstd")
    assert not list(zipped.glob("*.mds"))  # only .mds.zstd shards
    out = tmp_path / "out"
    L.precompute(zipped, out, encoders, RES, batch_size=4, seed=3, workers=2, progress=False)
    assert read_rows(out) == read_rows(baseline)


def test_rank0_fails_clearly_when_a_rank_never_finishes(tmp_path, mds, encoders):
    with pytest.raises(RuntimeError, match="part-00001"):
        L.precompute(mds, tmp_path / "o", encoders, [16], rank=0, world_size=2, wait_timeout=0, progress=False)


def test_merged_index_streams(baseline):
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(baseline), remote=None, shuffle=False, batch_size=1)
    keys = sorted(sample["key"] for sample in dataset)
    assert len(keys) == len(set(keys)) == N_IMAGES - 1


def test_bad_inputs_are_one_line_errors(tmp_path, models, capsys):
    args = ["latents", "--mds", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--vae", str(models[0]),
            "--text-encoder", str(models[1]), "--device", "cpu"]
    assert cli_main(args) == 2
    assert "no index.json" in capsys.readouterr().err
    src = write_mds(tmp_path / "m", n=3, corrupt=None)
    assert cli_main([*args[:2], str(src), *args[3:6], str(tmp_path / "novae"), *args[7:]]) == 2
    assert "novae" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
    assert cli_main([*args[:2], str(src), *args[3:], "--image-column", "jpg"]) == 2
    assert "no column 'jpg'" in capsys.readouterr().err


def test_missing_shard_file_is_an_error(tmp_path, encoders):
    src = write_mds(tmp_path / "m", n=6, corrupt=None)
    first = read_json(src / "index.json")["shards"][0]["raw_data"]["basename"]
    (src / first).unlink()
    with pytest.raises(L.UserError, match="missing"):
        L.precompute(src, tmp_path / "o", encoders, [16], progress=False)


def test_loader_reads_precomputed_latents(baseline):
    from microdit.data.loader import build_latent_loader

    out = baseline
    loader = build_latent_loader([out], 32, batch_size=3, caption_drop=0.0, clean_shm=False)
    batch = next(iter(loader))
    assert batch["latents"].shape == (3, 4, 16, 16) and batch["latents"].dtype == torch.float32
    assert batch["captions"].shape == (3, 1, 77, 16)
    rows = read_rows(out)
    first = np.frombuffer(rows[batch["key"][0]]["latents_32"], np.float16).reshape(4, 16, 16)
    np.testing.assert_array_equal(batch["latents"][0].numpy(), first.astype(np.float32))
