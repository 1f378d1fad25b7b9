"""Fault suite, data pipeline: what a hostile or unlucky user does to download -> mds -> latents ->
loader, and what each stage must do about it (issue 13, items 1, 2, 7, 8, 9, 10, 13)."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from microdit.cli import main as cli_main
from microdit.data import latents as L
from microdit.data import mds as M
from microdit.data.funnel import source_funnel
from microdit.data.webdataset import write_shard
from microdit.io import read_json, write_json
from test_latents import _one_thread, models, read_rows  # noqa: F401 (fixtures shared with test_latents)
from test_mds import MAX, MIN, encode, make_raw

RES = [16]


@pytest.fixture(scope="module")
def encoders(models):
    return L.load_encoders(*models, device="cpu", dtype="float32")


def mds_args(raw: Path, out: Path, *extra: str) -> list[str]:
    return ["mds", "--raw", str(raw), "--out", str(out), "--min-size", str(MIN), "--max-size", str(MAX),
            "--shard-size", "4kb", *extra]


def build_mds(tmp_path: Path, *extra: str) -> Path:
    raw = tmp_path / "raw" / "shapes_test"
    if not raw.exists():
        make_raw(tmp_path)
    out = tmp_path / "mds" / "shapes_test"
    assert cli_main(mds_args(raw, out, *extra)) == 0
    return out


def encode_latents(mds_dir: Path, out: Path, encoders) -> dict:
    return L.precompute(mds_dir, out, encoders, RES, batch_size=4, seed=1, progress=False)


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def shard_files(dataset: Path) -> list[Path]:
    return [dataset / s["raw_data"]["basename"] for s in read_json(dataset / "index.json")["shards"]]


# ---------------------------------------------------------------- item 1: stale latents


def test_rebuilt_mds_shards_make_their_latents_again(tmp_path, encoders):
    mds_dir = build_mds(tmp_path)
    out = tmp_path / "latents" / "shapes_test"
    encode_latents(mds_dir, out, encoders)
    stale = read_rows(out)

    build_mds(tmp_path, "--max-size", "40")  # every resized image changes: new shard bytes
    encode_latents(mds_dir, out, encoders)
    fresh = tmp_path / "fresh"
    encode_latents(mds_dir, fresh, encoders)
    assert read_rows(out) == read_rows(fresh)
    assert read_rows(out)["big"]["latents_16"] != stale["big"]["latents_16"]


def test_retrained_text_encoder_makes_the_latents_again(tmp_path, models, encoders):
    from transformers import CLIPTextModel

    mds_dir = build_mds(tmp_path)
    out = tmp_path / "latents" / "shapes_test"
    encode_latents(mds_dir, out, encoders)
    stale = read_rows(out)

    retrained = tmp_path / "text_encoder"
    shutil.copytree(models[1], retrained)
    model = CLIPTextModel.from_pretrained(retrained)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    model.save_pretrained(retrained)
    new = L.load_encoders(models[0], retrained, device="cpu", dtype="float32")
    assert new.digests["text_encoder"] != encoders.digests["text_encoder"]
    assert new.digests["vae"] == encoders.digests["vae"]

    encode_latents(mds_dir, out, new)
    fresh = tmp_path / "fresh"
    encode_latents(mds_dir, fresh, new)
    assert read_rows(out) == read_rows(fresh)
    assert read_rows(out)["big"]["caption_latents"] != stale["big"]["caption_latents"]


# ---------------------------------------------------------------- item 2: shard hashes


def test_damaged_mds_shard_is_named_before_any_latent(tmp_path, models, capsys):
    mds_dir = build_mds(tmp_path)
    damaged = shard_files(mds_dir)[1]
    flip_last_byte(damaged)
    out = tmp_path / "latents" / "shapes_test"
    rc = cli_main(["latents", "--mds", str(mds_dir), "--out", str(out), "--vae", str(models[0]),
                   "--text-encoder", str(models[1]), "--resolutions", "16", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(damaged) in err and "rerun the mds stage" in err
    assert not (out / "part-00001").exists() and not (out / "_summary.json").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_damaged_latents_shard_stops_training_with_one_line(tmp_path, encoders, workers):
    from microdit.data.loader import DamagedShard, build_latent_loader

    out = tmp_path / "latents" / "shapes_test"
    encode_latents(build_mds(tmp_path), out, encoders)
    damaged = shard_files(out)[0]
    flip_last_byte(damaged)
    loader = build_latent_loader([out], 16, batch_size=2, shuffle=False, caption_drop=0.0, num_workers=workers,
                                 clean_shm=False)
    with pytest.raises(DamagedShard) as caught:
        list(loader)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and str(damaged) in message and "rerun the latents stage" in message


# ---------------------------------------------------------------- items 7 and 10: download


def test_url_list_with_non_utf8_caption_and_empty_image(tmp_path):
    from microdit.data.download import NOT_UTF8
    from test_download import png, tar_members

    images = tmp_path / "images"
    images.mkdir()
    good = [png(images / f"good{i}.png", seed=i) for i in range(2)]
    (images / "empty.png").write_bytes(b"")
    lines = [b"url\tcaption", f"{good[0].as_uri()}\ta red circle".encode(),
             f"{good[1].as_uri()}\ta bad \xff\xfe byte".encode("latin-1"),
             f"{(images / 'empty.png').as_uri()}\tnothing at all".encode()]
    (tmp_path / "list.tsv").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "raw" / "s"
    assert cli_main(["download", "--source", "s", "--kind", "urls", "--input", str(tmp_path / "list.tsv"),
                     "--out", str(out), "--opt", "caption_col=caption", "--image-size", "0",
                     "--processes", "1", "--threads", "1"]) == 0
    summary = read_json(out / "_summary.json")
    assert summary["urls"] == 3 and summary["downloaded"] == 2
    assert summary["failed"] == {"empty file": 1}  # not OpenCV's assertion text
    assert summary["repaired"] == {NOT_UTF8: 1}
    captions = {v.decode() for k, v in tar_members(out / "00000.tar").items() if k.endswith(".txt")}
    assert captions == {"a red circle", "a bad \ufffd\ufffd byte"}
    assert source_funnel(tmp_path, "s")["download_repaired"] == {NOT_UTF8: 1}


def test_opencv_empty_buffer_message_is_a_named_reason():
    from microdit.data.sources.images import BadImage, ImageOptions
    from microdit.data.sources.layout import failure_reason

    message = ("OpenCV(4.14.0) /io/opencv/modules/imgcodecs/src/loadsave.cpp:1310: error: (-215:Assertion failed) "
               "!buf.empty() in function 'imdecode_'\n")
    assert failure_reason(message) == "empty file"
    with pytest.raises(BadImage, match="empty file"):
        ImageOptions()(b"")


# ---------------------------------------------------------------- items 8 and 10: mds


def test_captions_parquet_with_wrong_columns_is_one_line(tmp_path, capsys):
    src = make_raw(tmp_path)
    captions = tmp_path / "captions.parquet"
    pd.DataFrame({"key": ["big"], "text": ["llava big"]}).to_parquet(captions)
    rc = cli_main(mds_args(src["raw"], tmp_path / "mds" / "x", "--captions", str(captions)))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(captions) in err and "'text'" in err and "'caption'" in err


def test_captions_missing_for_some_keys_are_counted(tmp_path, capsys):
    src = make_raw(tmp_path)
    captions = tmp_path / "captions.parquet"
    pd.DataFrame({"key": ["big", "gray"], "caption": ["llava big", None]}).to_parquet(captions)
    out = tmp_path / "mds" / "x"
    assert cli_main(mds_args(src["raw"], out, "--captions", str(captions))) == 0
    summary = read_json(out / "_summary.json")
    assert summary["written"] == 1 and summary["dropped"]["no_caption"] == 6

    numbers = tmp_path / "numbers.parquet"  # keys of another type than the shards': none match
    pd.DataFrame({"key": [1, 2], "caption": ["one", "two"]}).to_parquet(numbers)
    capsys.readouterr()
    assert cli_main(mds_args(src["raw"], out, "--captions", str(numbers))) == 2  # nothing left: one line
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no_caption 7" in err


def test_truncated_tar_and_empty_image_are_named_drops(tmp_path):
    raw = tmp_path / "raw" / "cut"
    samples = [dict(key=f"k{i}", image=encode((40, 40), seed=i), caption=f"caption {i}") for i in range(6)]
    samples[1]["image"] = b""
    write_shard(raw / "00000.tar", samples)
    write_json(raw / "00000_stats.json", {"count": 6, "successes": 6})  # as the download leaves it
    data = (raw / "00000.tar").read_bytes()
    (raw / "00000.tar").write_bytes(data[:data.index(b"k3.jpg") + 512 + 50])  # k3 cut, k4 and k5 gone

    out = tmp_path / "mds" / "cut"
    assert cli_main(mds_args(raw, out)) == 0
    summary = read_json(out / "_summary.json")
    assert summary["written"] == 2 and summary["input"] == 6
    assert summary["dropped"]["empty_file"] == 1 and summary["dropped"]["truncated_shard"] == 3
    assert summary["input"] == summary["written"] + sum(summary["dropped"].values())
    write_json(tmp_path / "raw" / "cut" / "_summary.json", {"urls": 6, "downloaded": 6, "failed": {}})
    assert source_funnel(tmp_path, "cut")["mds_dropped"]["truncated_shard"] == 3


# ---------------------------------------------------------------- item 13: modes


def test_mds_directories_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = build_mds(tmp_path)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755


# ---------------------------------------------------------------- item 9: full disk


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def fails_for_space(argv: list[str]) -> None:
    """The command stops on ENOSPC (the CLI may turn it into a one-line message)."""
    try:
        rc = cli_main(argv)
    except OSError as e:
        assert e.errno == errno.ENOSPC
        return
    assert rc == 2


def test_mds_on_a_full_disk_keeps_what_is_done(tmp_path, monkeypatch):
    import streaming.base.util

    src = make_raw(tmp_path)
    out = tmp_path / "mds" / "full"
    parts = out.with_name("full.parts")
    real_write_json, real_job, converted = M.write_json, M._convert_job, []

    def full_on_second_shard(path, obj):
        if Path(path).name == "_counts.json" and obj.get("input") == 2:  # shard 00001, after its MDS data
            enospc()
        real_write_json(path, obj)

    monkeypatch.setattr(M, "write_json", full_on_second_shard)
    fails_for_space(mds_args(src["raw"], out))
    assert not out.exists()
    assert sorted(p.name for p in parts.iterdir() if p.is_dir()) == ["00000"]  # no half part left
    monkeypatch.setattr(M, "write_json", real_write_json)

    monkeypatch.setattr(streaming.base.util, "merge_index", enospc)  # full while merging the parts
    fails_for_space(mds_args(src["raw"], out))
    assert not out.exists() and (parts / "00001" / "_counts.json").is_file()
    monkeypatch.undo()

    monkeypatch.setattr(M, "_convert_job", lambda job: converted.append(job) or real_job(job))
    assert cli_main(mds_args(src["raw"], out)) == 0
    assert converted == []  # both parts survived the failed merge
    fresh = tmp_path / "mds" / "fresh"
    assert cli_main(mds_args(src["raw"], fresh)) == 0
    assert read_json(out / "_summary.json") == read_json(fresh / "_summary.json")
    assert [p.read_bytes() for p in shard_files(out)] == [p.read_bytes() for p in shard_files(fresh)]


def test_latents_on_a_full_disk_keeps_what_is_done(tmp_path, encoders, monkeypatch):
    mds_dir = build_mds(tmp_path)
    out = tmp_path / "latents" / "full"
    real_encode, calls = L.encode_batch, []

    def full_on_second_part(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            enospc()
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(L, "encode_batch", full_on_second_part)
    with pytest.raises(OSError):
        encode_latents(mds_dir, out, encoders)
    kept = sorted(out.iterdir())  # the finished parts; the half one is gone, its space given back
    assert kept and len(kept) < len(shard_files(mds_dir))
    assert all(p.name.startswith("part-") and (p / "_part.json").is_file() for p in kept)
    done = {p.name: (p / "_part.json").stat().st_mtime_ns for p in kept}

    monkeypatch.setattr(L, "encode_batch", real_encode)
    real_write_json = L.write_json
    monkeypatch.setattr(L, "write_json", lambda path, obj: enospc() if Path(path).name == "index.json"
                        else real_write_json(path, obj))
    with pytest.raises(OSError):
        encode_latents(mds_dir, out, encoders)
    assert not (out / "index.json").exists() and not (out / "_summary.json").exists()

    monkeypatch.setattr(L, "write_json", real_write_json)
    encode_latents(mds_dir, out, encoders)
    assert {name: (out / name / "_part.json").stat().st_mtime_ns for name in done} == done  # not redone
    fresh = tmp_path / "fresh"
    encode_latents(mds_dir, fresh, encoders)
    assert read_rows(out) == read_rows(fresh)
    assert json.loads((out / "_summary.json").read_text()) == json.loads((fresh / "_summary.json").read_text())


def test_report_lists_repaired_rows_and_truncated_shards_beside_the_losses():
    from microdit.report import data_section

    funnel = {"sources": {"cut": {"urls": 10, "downloaded": 9, "download_failed": {"dead url": 1},
                                  "download_repaired": {"text not utf-8 (replaced)": 2}, "in_mds": 6,
                                  "mds_dropped": {"truncated_shard": 3}, "final": 6, "final_stage": "in_mds"}}}
    losses = data_section(funnel, None)["rows"][0]["losses"]
    assert "mds: truncated_shard 3" in losses
    assert "download kept, repaired: text not utf-8 (replaced) 2" in losses
