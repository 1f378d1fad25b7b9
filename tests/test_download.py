"""`microdit download --kind urls`: img2dataset on real URL lists (file:// and a loopback HTTP server)."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from http_server import LoopbackServer
from microdit.cli import main
from microdit.errors import UserError
from microdit.data.download import normalise_url_list
from microdit.data.sources.layout import failure_reason


def png(path: Path, size=(48, 40), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def read_summary(out: Path) -> dict:
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["urls"] == summary["downloaded"] + sum(summary["failed"].values())
    return summary


@pytest.mark.parametrize("message, reason", [
    ("<urlopen error [Errno 2] No such file or directory: '/w/x.png'>", "dead url"),
    ("HTTP Error 404: Not Found", "dead url"),
    ("<urlopen error [Errno -2] Name or service not known>", "dead url"),
    ("HTTP Error 503: Service Unavailable", "server error"),
    ("The read operation timed out", "timeout"),
    ("Image decoding error", "corrupt image"),
    ("image too small", "image too small"),
    ("Use of image disallowed by X-Robots-Tag directive", "disallowed by x-robots-tag"),
    ("a brand new   failure\nmode " + "x" * 300, "a brand new failure mode " + "x" * 75),
])
def test_failure_messages_become_short_reasons(message, reason):
    assert failure_reason(message) == reason


def test_url_list_through_img2dataset(tmp_path):
    """3 good images (2 file://, 1 http) and a dead file, a dead http URL, a corrupt file and a
    too-small image: 3 samples in the shards, every failure counted under its reason; a rerun
    resumes from the finished shards and does not redo them."""
    images = tmp_path / "images"
    images.mkdir()
    good = [png(images / f"good{i}.png", seed=i) for i in range(3)]
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    png(images / "small.png", size=(8, 8))
    rows = [
        (good[0].as_uri(), "a red circle", '[{"shape": "circle"}]'),
        (good[1].as_uri(), "two blue squares", '[{"shape": "square"}]'),
        (None, "over http", "[]"),  # filled in with the server's URL below
        ((images / "missing.png").as_uri(), "dead file", "[]"),
        (None, "dead http", "[]"),
        ((images / "corrupt.png").as_uri(), "corrupt", "[]"),
        ((images / "small.png").as_uri(), "too small", "[]"),
    ]
    with LoopbackServer(images) as server:
        rows[2] = (f"{server.url}/good2.png", *rows[2][1:])
        rows[4] = (f"{server.url}/nowhere.png", *rows[4][1:])
        world = pd.DataFrame(rows, columns=["url", "caption", "objects"])
        world["key"] = [f"k{i}" for i in range(len(rows))]
        world.to_parquet(tmp_path / "world.parquet")
        out = tmp_path / "raw" / "shapes"
        argv = ["download", "--source", "shapes", "--kind", "urls", "--input", str(tmp_path / "world.parquet"),
                "--out", str(out), "--opt", "input_format=parquet", "--opt", "caption_col=caption",
                "--opt", "save_additional_columns=objects,key", "--image-size", "32", "--resize-mode", "keep_ratio",
                "--min-image-size", "16", "--processes", "1", "--threads", "2", "--samples-per-shard", "4"]
        assert main(argv) == 0

        summary = read_summary(out)
        assert summary["source"] == "shapes" and summary["urls"] == 7 and summary["downloaded"] == 3
        assert summary["failed"] == {"dead url": 2, "corrupt image": 1, "image too small": 1}
        assert summary["shards"] == 2
        assert sorted(p.name for p in out.glob("0*")) == [
            "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]
        assert not (out / "_input").exists()

        samples = {}
        for shard in sorted(out.glob("*.tar")):
            members = tar_members(shard)
            keys = {name.split(".")[0] for name in members}
            for key in keys:
                assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= set(members)
                meta = json.loads(members[f"{key}.json"])
                samples[meta["source_key"]] = (members[f"{key}.txt"].decode(), meta, members[f"{key}.jpg"])
        assert set(samples) == {"k0", "k1", "k2"}
        caption, meta, jpg = samples["k1"]
        assert caption == "two blue squares" and meta["objects"] == '[{"shape": "square"}]'
        assert meta["url"] == good[1].as_uri() and meta["key"]
        # keep_ratio brings the short side to 32: 48x40 -> 38x32
        assert Image.open(io.BytesIO(jpg)).size == (38, 32) == (meta["width"], meta["height"])
        assert samples["k2"][1]["url"].startswith("http://127.0.0.1:")
        stats = json.loads((out / "00001_stats.json").read_text())
        assert stats["count"] == 3 and stats["successes"] == 0

        before = {p.name: p.stat().st_mtime_ns for p in out.glob("0*")}
        assert main(argv) == 0  # every shard is finished: nothing is fetched again
        assert {p.name: p.stat().st_mtime_ns for p in out.glob("0*")} == before
        assert read_summary(out) == summary

        (out / "00001_stats.json").unlink()  # as if killed while writing shard 1: img2dataset resumes it
        assert main(argv) == 0
        after = {p.name: p.stat().st_mtime_ns for p in out.glob("0*")}
        assert all(after[n] == before[n] for n in ("00000.tar", "00000.parquet", "00000_stats.json"))
        assert after["00001_stats.json"] != before["00001_stats.json"]
        assert read_summary(out) == summary


def test_a_source_with_no_image_is_an_error(tmp_path, capsys):
    """A headerless tsv (CC12M's shape) whose every URL fails: one-line error naming the reasons."""
    (tmp_path / "list.tsv").write_text(
        f"{(tmp_path / 'gone1.jpg').as_uri()}\ta caption\n{(tmp_path / 'gone2.jpg').as_uri()}\tanother one\n")
    argv = ["download", "--source", "cc12m", "--kind", "urls", "--input", str(tmp_path / "list.tsv"),
            "--out", str(tmp_path / "raw"), "--opt", "column_names=url,caption", "--opt", "caption_col=caption",
            "--threads", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cc12m: 0 of 2 images downloaded" in err and "dead url x2" in err
    assert not (tmp_path / "raw" / "_summary.json").exists()


def test_url_lists_are_normalised(tmp_path):
    """tsv without a header, stray quotes in captions, a malformed row; no caption column -> empty."""
    (tmp_path / "list.tsv").write_text('http://x/1.jpg\ta "quoted" caption\nhttp://x/2.jpg\n'
                                       'http://x/3.jpg\tthird\textra field\nhttp://x/4.jpg\tfourth\n')
    opts = {"input_format": "auto", "url_col": "url", "caption_col": "caption", "column_names": ["url", "caption"],
            "save_additional_columns": []}
    path, rows, malformed, _ = normalise_url_list(str(tmp_path / "list.tsv"), tmp_path / "work", opts, 5, 0)
    table = pd.read_parquet(path)
    assert rows == 2 and malformed == 2
    assert table["caption"].tolist() == ['a "quoted" caption', "fourth"]

    (tmp_path / "urls.txt").write_text("http://x/1.jpg\nhttp://x/2.jpg\n")
    opts = {**opts, "caption_col": None, "column_names": None}
    path, rows, _, _ = normalise_url_list(str(tmp_path / "urls.txt"), tmp_path / "work2", opts, 5, 0)
    assert pd.read_parquet(path).to_dict("list") == {"url": ["http://x/1.jpg", "http://x/2.jpg"], "caption": ["", ""]}

    with pytest.raises(UserError, match="no caption column 'text'"):
        normalise_url_list(str(tmp_path / "list.tsv"), tmp_path / "work3", {**opts, "caption_col": "text",
                           "column_names": ["url", "caption"]}, 5, 0)


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    base = ["download", "--source", "s", "--out", str(tmp_path / "o")]
    assert main([*base, "--kind", "urls", "--input", "x.parquet", "--opt", "url_column=u"]) == 2
    assert "unknown option(s) url_column" in capsys.readouterr().err
    assert main([*base, "--kind", "coco", "--opt", "caption_pick=longest"]) == 2
    assert "caption_pick='longest'" in capsys.readouterr().err
    assert main([*base, "--kind", "sa1b"]) == 2
    assert "sa1b needs --input" in capsys.readouterr().err
    assert main([*base, "--kind", "urls", "--input", str(tmp_path / "none.parquet")]) == 2
    assert "none.parquet" in capsys.readouterr().err
