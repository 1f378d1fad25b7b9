import json

import pytest

from microdit.errors import UserError
from microdit.data.funnel import source_funnel
from microdit.io import write_json


def test_funnel_collects_every_stage(tmp_path):
    write_json(tmp_path / "raw/a/_summary.json", {"urls": 10, "downloaded": 8, "failed": {"dead url": 2}})
    write_json(tmp_path / "captions/a.stats.json", {"images": 8, "captioned": 7, "empty": 1, "failed": 0})
    write_json(tmp_path / "mds/a/_summary.json", {"input": 8, "written": 6, "dropped": {"too_small": 1, "empty_caption": 1}})
    write_json(tmp_path / "latents/a/_summary.json", {"input": 6, "encoded": 6, "failed": {}})
    f = source_funnel(tmp_path, "a")
    assert (f["urls"], f["downloaded"], f["captioned"], f["in_mds"], f["encoded"]) == (10, 8, 7, 6, 6)
    assert f["download_failed"] == {"dead url": 2} and f["mds_dropped"]["too_small"] == 1
    assert (f["final"], f["final_stage"]) == (6, "encoded")


def test_funnel_reused_download_and_missing_stages(tmp_path):
    write_json(tmp_path / "raw/big/_summary.json", {"urls": 5, "downloaded": 5, "failed": {}})
    write_json(tmp_path / "mds/big512/_summary.json", {"input": 5, "written": 2, "dropped": {"too_small": 3}})
    f = source_funnel(tmp_path, "big512", "big")
    assert f["raw_from"] == "big" and (f["final"], f["final_stage"]) == (2, "in_mds")
    assert "encoded" not in f


def test_funnel_without_download_is_an_error(tmp_path):
    with pytest.raises(UserError, match="source 'x'"):
        source_funnel(tmp_path, "x")


def test_funnel_cli(tmp_path):
    from microdit.cli import main

    write_json(tmp_path / "raw/a/_summary.json", {"urls": 3, "downloaded": 3, "failed": {}})
    assert main(["funnel", "--root", str(tmp_path), "--source", "a", "--out", str(tmp_path / "f.json")]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["sources"]["a"]["downloaded"] == 3
    assert main(["funnel", "--root", str(tmp_path), "--source", "nope", "--out", str(tmp_path / "g.json")]) == 2
