"""`microdit mds`: raw webdataset shards (+ captions parquet) -> MDS shards, with exact drop counts."""
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from microdit.cli import main as cli_main
from microdit.data.webdataset import ReadStats, iter_samples, write_shard

MIN, MAX = 32, 48
# make_raw's drops: one of each kind, and tail_cut, lost in the truncated shard
DROPPED = {"empty_file": 0, "corrupt": 1, "too_small": 1, "no_caption": 1, "empty_caption": 1, "truncated_shard": 1}


def encode(size, fmt="JPEG", mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_raw(root: Path) -> dict:
    """Two shards: one with every kind of bad sample, one truncated mid-member."""
    raw = root / "raw" / "shapes_test"
    raw.mkdir(parents=True)
    good = [
        dict(key="big", image=encode((96, 60)), caption=" a big red circle ", meta={"caption": "json big"}),
        dict(key="pngrgba", image=encode((40, 44), "PNG", "RGBA"), ext="png", caption="a png", meta={"caption": "json png"}),
        dict(key="gray", image=encode((36, 36), mode="L"), caption="a gray square", meta={"caption": "json gray"}),
        dict(key="exact", image=encode((40, 40), seed=3), caption="kept as is", meta={"caption": "json exact"}),
    ]
    bad = [
        dict(key="corrupt", image=b"\xff\xd8\xff\xe0 definitely not a jpeg", caption="broken", meta={"caption": "x"}),
        dict(key="small", image=encode((20, 50)), caption="too small", meta={"caption": "x"}),
        dict(key="empty", image=encode((40, 40)), caption="   ", meta={"caption": ""}),
        dict(key="nocap", image=encode((40, 40)), meta={}),
    ]
    write_shard(raw / "00000.tar", good[:2] + bad + good[2:])
    # shard 2: one complete sample, then the file ends inside the second sample's image
    tail = [dict(key="tail_ok", image=encode((50, 50)), caption="survives truncation", meta={"caption": "json tail"}),
            dict(key="tail_cut", image=encode((50, 50), seed=7), caption="lost", meta={"caption": "lost"})]
    write_shard(raw / "00001.tar", tail)
    data = (raw / "00001.tar").read_bytes()
    cut = data.index(b"tail_cut.jpg") + 512 + 100  # header + 100 bytes of the image
    (raw / "00001.tar").write_bytes(data[:cut])
    return {"raw": raw, "good": good + tail[:1], "images": {s["key"]: s["image"] for s in good + bad + tail}}


def read_mds(path: Path) -> list[dict]:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    ds = StreamingDataset(local=str(path), remote=None, shuffle=False, batch_size=1)
    return [ds[i] for i in range(ds.num_samples)]


def test_reader_counts_truncation_and_missing_images(tmp_path):
    src = make_raw(tmp_path)
    stats = ReadStats()
    keys = [s.key for s in iter_samples(src["raw"], stats)]
    assert keys == ["big", "pngrgba", "corrupt", "small", "empty", "nocap", "gray", "exact", "tail_ok"]
    assert stats.truncated_shards == ["00001.tar"] and stats.shards == 2 and stats.samples == 9


def test_mds_writes_filters_and_counts(tmp_path):
    src = make_raw(tmp_path)
    out = tmp_path / "mds" / "shapes_test"
    rc = cli_main(["mds", "--raw", str(src["raw"]), "--out", str(out), "--min-size", str(MIN),
                   "--max-size", str(MAX), "--shard-size", "4kb"])
    assert rc == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["input"] == 10 and summary["written"] == 5
    assert summary["dropped"] == DROPPED
    assert summary["reader"]["truncated_shards"] == ["00001.tar"]

    rows = {r["key"]: r for r in read_mds(out)}
    assert sorted(rows) == sorted(s["key"] for s in src["good"])
    assert rows["big"]["caption"] == "a big red circle"  # stripped
    for r in rows.values():
        image = r["image"]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert image.size == (r["width"], r["height"])
        assert MIN <= min(image.size) <= MAX
    assert rows["big"]["image"].size == (77, 48)  # 96x60 scaled so the short side is 48
    assert rows["tail_ok"]["image"].size == (48, 48)
    assert rows["pngrgba"]["image"].size == (40, 44) and rows["gray"]["image"].size == (36, 36)
    # an RGB JPEG that needs no resize is stored byte for byte: identical pixels
    original = np.asarray(Image.open(io.BytesIO(src["images"]["exact"])))
    assert np.array_equal(np.asarray(rows["exact"]["image"]), original)
    assert summary["jpeg_passthrough"] == 1 and summary["resized"] == 2
    assert not list(out.parent.glob(".*")), "temp dirs left behind"


def test_caption_sources_json_field_and_parquet(tmp_path):
    src = make_raw(tmp_path)
    out = tmp_path / "mds" / "json"
    rc = cli_main(["mds", "--raw", str(src["raw"]), "--out", str(out), "--min-size", str(MIN),
                   "--max-size", str(MAX), "--caption-field", "json:caption", "--image-format", "png"])
    assert rc == 0
    rows = {r["key"]: r for r in read_mds(out)}
    assert rows["big"]["caption"] == "json big" and rows["tail_ok"]["caption"] == "json tail"
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["dropped"] == DROPPED
    assert summary["columns"]["image"] == "png"

    # captions from a parquet (the LLaVA stage): "" -> empty_caption, missing key -> no_caption
    captions = tmp_path / "captions.parquet"
    pd.DataFrame({"key": ["big", "pngrgba", "gray", "exact", "empty", "nocap"],
                  "caption": ["llava big", "llava png", "", "llava exact", "llava empty", "llava nocap"],
                  "model": "m"}).to_parquet(captions)
    out2 = tmp_path / "mds" / "llava"
    rc = cli_main(["mds", "--raw", str(src["raw"]), "--out", str(out2), "--captions", str(captions),
                   "--min-size", str(MIN), "--max-size", str(MAX)])
    assert rc == 0
    rows = {r["key"]: r["caption"] for r in read_mds(out2)}
    assert rows == {"big": "llava big", "pngrgba": "llava png", "exact": "llava exact",
                    "empty": "llava empty", "nocap": "llava nocap"}
    summary = json.loads((out2 / "_summary.json").read_text())
    assert summary["dropped"] == DROPPED


def test_rerun_replaces_output(tmp_path):
    src = make_raw(tmp_path)
    out = tmp_path / "mds" / "again"
    args = ["mds", "--raw", str(src["raw"]), "--out", str(out), "--min-size", str(MIN), "--max-size", str(MAX)]
    assert cli_main(args) == 0
    (out / "stale.txt").write_text("from an older run")
    assert cli_main(args + ["--max-size", "40"]) == 0
    assert not (out / "stale.txt").exists()
    assert all(min(r["image"].size) <= 40 for r in read_mds(out))
    assert sorted(p.name for p in out.parent.iterdir()) == ["again"]


def test_empty_source_is_a_one_line_error(tmp_path, capsys):
    src = make_raw(tmp_path)
    out = tmp_path / "mds" / "nothing"
    rc = cli_main(["mds", "--raw", str(src["raw"]), "--out", str(out), "--min-size", "1000", "--max-size", "2000"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shapes_test" in err and "too_small 8" in err
    assert not out.exists() and list(out.parent.iterdir()) == []

    rc = cli_main(["mds", "--raw", str(tmp_path / "missing"), "--out", str(out)])
    assert rc == 2 and "no .tar shards" in capsys.readouterr().err
    rc = cli_main(["mds", "--raw", str(src["raw"]), "--out", str(out), "--caption-field", "yaml"])
    assert rc == 2 and "--caption-field" in capsys.readouterr().err


@pytest.mark.parametrize("cut_at", ["header", "end_marker"])
def test_reader_detects_cut_on_a_block_boundary(tmp_path, cut_at):
    shard = tmp_path / "00000.tar"
    write_shard(shard, [dict(key=f"k{i}", image=encode((8, 8), seed=i), caption=f"c{i}") for i in range(3)])
    data = shard.read_bytes()
    # cut exactly before a member header, or drop the end-of-archive zero blocks
    cut = data.index(b"k2.jpg") if cut_at == "header" else len(data.rstrip(b"\0")) + (-len(data.rstrip(b"\0")) % 512)
    shard.write_bytes(data[:cut])
    stats = ReadStats()
    keys = [s.key for s in iter_samples(shard, stats)]
    assert stats.truncated_shards == ["00000.tar"]
    assert keys == (["k0"] if cut_at == "header" else ["k0", "k1"])


def test_crash_resume_reuses_finished_shards(tmp_path, monkeypatch):
    from microdit.data import mds

    src = make_raw(tmp_path)
    out = tmp_path / "mds" / "resume"
    args = ["mds", "--raw", str(src["raw"]), "--out", str(out), "--min-size", str(MIN), "--max-size", str(MAX)]
    real_job, converted = mds._convert_job, []

    def crash_on_second(job):
        if Path(job[0]).name == "00001.tar":
            raise RuntimeError("simulated preemption")
        converted.append(Path(job[0]).name)
        return real_job(job)

    monkeypatch.setattr(mds, "_convert_job", crash_on_second)
    with pytest.raises(RuntimeError, match="preemption"):
        cli_main(args)
    assert converted == ["00000.tar"] and not out.exists()
    assert (tmp_path / "mds" / "resume.parts" / "00000" / "_counts.json").is_file()

    def counting(job):
        converted.append(Path(job[0]).name)
        return real_job(job)

    converted.clear()
    monkeypatch.setattr(mds, "_convert_job", counting)
    assert cli_main(args) == 0
    assert converted == ["00001.tar"]  # the finished shard is not redone
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["input"] == 10 and summary["written"] == 5
    assert sorted(r["key"] for r in read_mds(out)) == sorted(s["key"] for s in src["good"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["resume"]

    # parts made with other options are stale: a crash at --max-size 48, a rerun at 40 redoes all
    converted.clear()
    monkeypatch.setattr(mds, "_convert_job", crash_on_second)
    with pytest.raises(RuntimeError):
        cli_main(args)
    converted.clear()
    monkeypatch.setattr(mds, "_convert_job", counting)
    assert cli_main(args + ["--max-size", "40"]) == 0
    assert sorted(converted) == ["00000.tar", "00001.tar"]
    assert all(min(r["image"].size) <= 40 for r in read_mds(out))


def test_parallel_workers_match_serial(tmp_path):
    src = make_raw(tmp_path)
    results = {}
    for workers in (1, 2):
        out = tmp_path / "mds" / f"w{workers}"
        assert cli_main(["mds", "--raw", str(src["raw"]), "--out", str(out), "--min-size", str(MIN),
                         "--max-size", str(MAX), "--workers", str(workers)]) == 0
        summary = json.loads((out / "_summary.json").read_text())
        rows = {r["key"]: (r["caption"], np.asarray(r["image"]).tobytes()) for r in read_mds(out)}
        results[workers] = (summary["written"], summary["dropped"], rows)
    assert results[1] == results[2]
