"""Fetchers of the paper's archive/hub sources, on tiny archives built in each dataset's real
layout, served from a loopback HTTP server or a local directory; every one has a corrupt member
and a dead link or damaged archive, and must count them."""
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from http_server import LoopbackServer
from microdit.cli import main
from microdit.data.sources import as_parts
from microdit.data.sources import remote
from microdit.data.sources.zipped import pick_caption
from microdit.data.webdataset import ReadStats, iter_samples

CORRUPT = b"\xff\xd8\xff\xe0\x00\x10JFIF but the rest is garbage" * 4


@pytest.fixture(autouse=True)
def _no_retry_pause(monkeypatch):
    monkeypatch.setattr(remote, "RETRY_BACKOFF_S", 0.0)


def image(size=(48, 40), fmt="JPEG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def make_tar(path: Path, members: list[tuple[str, bytes]], gz: bool = False) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def make_zip(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)


def download(kind: str, source_input: str, out: Path, *flags: str) -> int:
    return main(["download", "--source", kind, "--kind", kind, "--input", source_input, "--out", str(out),
                 "--retries", "1", "--timeout", "5", *flags])


def read_out(out: Path) -> tuple[dict, dict]:
    """(_summary.json, {key: sample}) read back with the project's shard reader."""
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["urls"] == summary["downloaded"] + sum(summary["failed"].values())
    stats = ReadStats()
    samples = {s.key: s for s in iter_samples(out, stats)}
    assert stats.truncated_shards == [] and stats.bad_members == 0 and stats.no_image == 0
    assert len(samples) == summary["downloaded"] == stats.samples
    assert not list(out.glob(".*"))  # no temp file of a discarded or unfinished shard left behind
    return summary, samples


# ---------------------------------------------------------------- SA-1B
def test_sa1b_links_file_over_http(tmp_path):
    site = tmp_path / "site"
    make_tar(site / "sa_000000.tar", [
        ("sa_1.jpg", image((96, 64))), ("sa_1.json", b'{"image": {"image_id": 1}, "annotations": []}'),
        ("sa_2.jpg", CORRUPT), ("sa_2.json", b"{}"),
        ("sa_3.jpg", image((40, 30), seed=3)), ("sa_3.json", b"{}"),
    ])
    full = make_tar(site / "sa_000001.tar", [(f"sa_{i}.jpg", image(seed=i)) for i in (4, 5, 6)])
    with tarfile.open(fileobj=io.BytesIO(full)) as tar:
        cut = tar.getmembers()[2].offset_data + 10  # sa_4 and sa_5 whole, sa_6 cut off
    (site / "sa_000001.tar").write_bytes(full[:cut])

    with LoopbackServer(site) as server:
        links = tmp_path / "sa1b_links.txt"
        links.write_text("file_name\tcdn_link\n" + "".join(
            f"sa_00000{i}.tar\t{server.url}/sa_00000{i}.tar?token=abc\n" for i in range(3)))  # 2 is dead
        out = tmp_path / "raw" / "sa1b"
        flags = ("--image-size", "32", "--resize-mode", "keep_ratio", "--min-image-size", "16")
        assert download("sa1b", str(links), out, *flags) == 0

        summary, samples = read_out(out)
        assert (summary["urls"], summary["downloaded"], summary["shards"]) == (7, 4, 3)
        assert summary["failed"] == {"corrupt image": 1, "truncated archive": 1, "dead url": 1}
        assert sorted(samples) == ["sa_1", "sa_3", "sa_4", "sa_5"]
        s1 = samples["sa_1"]
        assert s1.caption == "" and s1.meta["caption"] is None and s1.meta["url"] == "sa_000000.tar/sa_1.jpg"
        assert Image.open(io.BytesIO(s1.image)).size == (48, 32)  # short side brought down to 32
        assert samples["sa_3"].image == image((40, 30), seed=3)  # small enough: original bytes kept
        assert [r for r, _ in server.requests].count("sa_000001.tar") == 2  # one retry
        assert json.loads((out / "00001_stats.json").read_text())["unit_error"].startswith("truncated archive")
        assert pd.read_parquet(out / "00000.parquet")["status"].tolist().count("failed_to_resize") == 1

        # the archive is whole again: a rerun redoes the failed units only
        (site / "sa_000001.tar").write_bytes(full)
        (out / ".00001.tar.x1y2.tmp").write_bytes(b"left by a killed run")
        server.requests.clear()
        assert download("sa1b", str(links), out, *flags) == 0
        summary, samples = read_out(out)
        assert (summary["downloaded"], summary["failed"]) == (5, {"corrupt image": 1, "dead url": 1})
        assert sorted(r for r, _ in server.requests) == ["sa_000001.tar", "sa_000002.tar"]  # 404: no retry

        assert download("sa1b", str(links), out, *flags, "--opt", "parts=0") == 2  # shards 1-2 are foreign


def test_sa1b_bad_links_file(tmp_path, capsys):
    links = tmp_path / "links.txt"
    links.write_text("file_name\tcdn_link\nnot a links line\n")
    assert download("sa1b", str(links), tmp_path / "out") == 2
    assert "line 2: expected 'sa_XXXXXX.tar<TAB>link'" in capsys.readouterr().err


# ---------------------------------------------------------------- JourneyDB
def journeydb_site(site: Path) -> None:
    make_tar(site / "data/train/imgs/000.tgz", [
        ("000/aaa.jpg", image(seed=1)), ("000/bbb.jpg", CORRUPT), ("000/ccc.jpg", image(seed=3)),
        ("./000/ddd.jpg", image(seed=4)),
    ], gz=True)
    rows = [{"img_path": f"./000/{h}.jpg", "prompt": f"a {h} castle --ar 3:2", "Task2": {"Caption": "x"}}
            for h in ("aaa", "bbb", "ddd")] + [{"img_path": "./005/zzz.jpg", "prompt": "not chosen"}]
    jsonl = "".join(json.dumps(r) + "\n" for r in rows).encode()
    make_tar(site / "data/train/train_anno_realease_repath.jsonl.tgz",
             [("train_anno_realease_repath.jsonl", jsonl)], gz=True)


def test_journeydb_gated_hub_layout(tmp_path, monkeypatch, capsys):
    journeydb_site(tmp_path / "site")
    monkeypatch.setattr(remote, "TOKEN_HOSTS", ("127.0.0.1",))  # treat the loopback server as the hub
    monkeypatch.setenv("HF_TOKEN", "sekrit")
    with LoopbackServer(tmp_path / "site") as server:
        server.tokens["data/"] = "sekrit"
        out = tmp_path / "raw" / "journeydb"
        assert download("journeydb", server.url, out, "--opt", "parts=0-1") == 0  # 001.tgz does not exist
        summary, samples = read_out(out)
        assert (summary["urls"], summary["downloaded"]) == (5, 2)
        assert summary["failed"] == {"corrupt image": 1, "no caption": 1, "dead url": 1}
        assert samples["aaa"].caption == "a aaa castle --ar 3:2"
        assert samples["ddd"].meta["img_path"] == "000/ddd.jpg"
        assert samples["ddd"].meta["url"] == "data/train/imgs/000.tgz/000/ddd.jpg"

        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(remote, "hub_token", lambda: None)
        assert download("journeydb", server.url, tmp_path / "raw" / "other", "--opt", "parts=0") == 2
        err = capsys.readouterr().err
        assert "access denied" in err and "gated" in err and "HF_TOKEN" in err


# ---------------------------------------------------------------- DiffusionDB
def test_diffusiondb_from_a_local_directory(tmp_path):
    site = tmp_path / "site"
    prompts = {f"u{i}.webp": {"p": f"prompt {i}, trending on artstation", "se": i, "c": 7.0, "st": 50, "sa": 8}
               for i in (1, 2, 4)}  # u3 has no prompt
    make_zip(site / "diffusiondb-large-part-1/part-000001.zip", [
        ("u1.webp", image(fmt="WEBP", seed=1)), ("u2.webp", image(fmt="WEBP", seed=2)),
        ("u3.webp", image(fmt="WEBP", seed=3)), ("u4.webp", CORRUPT),
        ("part-000001.json", json.dumps(prompts).encode()),
    ])
    make_zip(site / "diffusiondb-large-part-1/part-000002.zip", [("u9.webp", image(fmt="WEBP"))])
    whole = (site / "diffusiondb-large-part-1/part-000002.zip").read_bytes()
    (site / "diffusiondb-large-part-1/part-000002.zip").write_bytes(whole[: len(whole) // 2])
    pd.DataFrame({"image_name": ["u1.webp", "u2.webp", "u3.webp", "u4.webp", "u9.webp"],
                  "part_id": pd.array([1, 1, 1, 1, 2], dtype="uint16"),
                  "image_nsfw": [0.1, 0.95, 0.0, 0.0, 0.0], "prompt_nsfw": [0.0, 0.0, 0.0, 0.0, 0.5]},
                 ).to_parquet(site / "metadata-large.parquet")

    out = tmp_path / "raw" / "diffusiondb"
    assert download("diffusiondb", str(site), out, "--opt", "parts=1-2") == 0
    summary, samples = read_out(out)
    assert (summary["urls"], summary["downloaded"]) == (5, 1)
    assert summary["failed"] == {"nsfw": 1, "no caption": 1, "corrupt image": 1, "corrupt archive": 1}
    u1 = samples["u1"]
    assert u1.ext == "jpg" and Image.open(io.BytesIO(u1.image)).format == "JPEG"  # webp re-encoded
    assert u1.caption == "prompt 1, trending on artstation" and u1.meta["seed"] == 1 and u1.meta["part"] == 1
    assert not (out / "_downloads").exists()  # local input is read in place

    out2 = tmp_path / "raw" / "unfiltered"
    assert download("diffusiondb", str(site), out2, "--opt", "parts=1", "--opt", "nsfw_threshold=none",
                    "--opt", "encode_format=webp") == 0
    summary, samples = read_out(out2)
    assert sorted(samples) == ["u1", "u2"] and samples["u2"].image == image(fmt="WEBP", seed=2)


# ---------------------------------------------------------------- COCO
def test_coco_val2014_over_http_resumes_a_cut_download(tmp_path):
    site = tmp_path / "site"
    name = "val2014/COCO_val2014_{:012d}.jpg".format
    make_zip(site / "zips/val2014.zip", [(name(1), image(seed=1)), (name(2), image(seed=2)), (name(3), CORRUPT)])
    captions = {"info": {}, "images": [{"id": i, "file_name": Path(name(i)).name, "width": 48, "height": 40}
                                       for i in (1, 2, 3, 4)],  # image 4 is not in the zip
                "annotations": [{"id": 10, "image_id": 1, "caption": "A cat on a mat."},
                                {"id": 11, "image_id": 1, "caption": "A cat\n lying on a mat."},
                                {"id": 12, "image_id": 2, "caption": "A dog."},
                                {"id": 13, "image_id": 3, "caption": "Broken."},
                                {"id": 14, "image_id": 4, "caption": "Missing."}]}
    make_zip(site / "annotations/annotations_trainval2014.zip",
             [("annotations/captions_val2014.json", json.dumps(captions).encode()),
              ("annotations/instances_val2014.json", b"{}")])
    with LoopbackServer(site) as server:
        server.cut_after["zips/val2014.zip"] = 200  # the first transfer drops after 200 bytes
        out = tmp_path / "raw" / "coco"
        assert download("coco", server.url, out, "--samples-per-shard", "2", "--processes", "2") == 0
        assert ("zips/val2014.zip", "bytes=200-") in server.requests  # resumed, not restarted
    summary, samples = read_out(out)
    assert (summary["urls"], summary["downloaded"], summary["shards"]) == (4, 2, 2)
    assert summary["failed"] == {"corrupt image": 1, "missing image": 1}
    first = samples["COCO_val2014_000000000001"]
    assert first.caption == "A cat on a mat."
    assert first.meta["captions"] == ["A cat on a mat.", "A cat lying on a mat."] and first.meta["image_id"] == 1
    assert not (out / "_downloads").exists()


def test_caption_pick_is_seeded_per_key():
    caps = [f"caption {i}" for i in range(10)]
    assert pick_caption(caps, "first", 0, "k") == "caption 0"
    picks = [pick_caption(caps, "random", 7, f"k{i}") for i in range(20)]
    assert picks == [pick_caption(caps, "random", 7, f"k{i}") for i in range(20)]
    assert len(set(picks)) > 1 and set(picks) <= set(caps)
    assert pick_caption([], "random", 0, "k") is None


# ---------------------------------------------------------------- TextCaps
def test_textcaps_from_a_local_directory(tmp_path, capsys):
    site = tmp_path / "site"

    def entry(image_id, caption, refs):
        return {"image_id": image_id, "image_classes": ["Sign"], "image_width": 48, "image_height": 40,
                "set_name": "train", "image_name": image_id, "image_path": f"train/{image_id}.jpg",
                "caption_id": 1, "caption_str": caption, "caption_tokens": caption.split(), "reference_strs": refs}

    refs = ["a red sign says stop", "a stop sign on a pole"]
    train = {"dataset_type": "train", "dataset_name": "textcaps", "dataset_version": "0.1",
             "data": [entry("0a1b", refs[0], refs), entry("0a1b", refs[1], refs), entry("ffff", "gone", ["gone"])]}
    val = {"dataset_type": "val", "data": [entry("0c0c", "a book titled maths", ["a book titled maths"]),
                                           entry("0d0d", "broken", ["broken"])]}
    (site / "data/textcaps").mkdir(parents=True)
    (site / "data/textcaps/TextCaps_0.1_train.json").write_text(json.dumps(train))
    (site / "data/textcaps/TextCaps_0.1_val.json").write_text(json.dumps(val))
    make_zip(site / "images/train_val_images.zip", [
        ("train_images/0a1b.jpg", image(seed=1)), ("train_images/0c0c.jpg", image(seed=2)),
        ("train_images/0d0d.jpg", CORRUPT)])

    out = tmp_path / "raw" / "textcaps"
    assert download("textcaps", str(site), out) == 0
    summary, samples = read_out(out)
    assert (summary["urls"], summary["downloaded"]) == (4, 2)
    assert summary["failed"] == {"missing image": 1, "corrupt image": 1}
    assert samples["0a1b"].caption == refs[0] and samples["0a1b"].meta["captions"] == refs
    assert samples["0c0c"].meta["split"] == "val"

    zip_bytes = (site / "images/train_val_images.zip").read_bytes()  # a cut images zip is unusable
    (site / "images/train_val_images.zip").write_bytes(zip_bytes[: len(zip_bytes) // 2])
    assert download("textcaps", str(site), tmp_path / "raw" / "cut") == 2
    assert "textcaps: corrupt archive: train_val_images.zip" in capsys.readouterr().err


def test_parts_spec():
    assert as_parts("0-2,5, 3") == [0, 1, 2, 3, 5]
    with pytest.raises(ValueError):
        as_parts("5-2")
