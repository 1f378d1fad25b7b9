"""End to end: the whole smoke DAG (world -> models -> download -> caption -> MDS -> latents ->
four training stages -> evaluation -> cost -> report) through real Snakemake, img2dataset, LLaVA,
MDS, the VAE and the trainer, in a temp dir, on a smaller world and fewer steps than the preset."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

SMALL = {
    "world": {"counts": {"shapes_real": 24, "shapes_sa": 10, "shapes_synth": 12, "shapes_eval": 8},
              "bad_per_source": 3},
    "models": {"build": {"vae_steps": 30, "vae_batch_size": 8}},
    "download": {"samples_per_shard": 10},
    "caption": {"batch_size": 4, "max_new_tokens": 8},
    "train": {"ckpt_every": 10, "log_every": 5, "stages": {
        "stage1": {"steps": 30, "warmup": 5}, "stage2": {"steps": 10},
        "stage3": {"steps": 20, "warmup": 2}, "stage4": {"steps": 10}}},
    "evaluate": {"num_images": 16, "steps": 8, "batch_size": 16, "geneval_per_task": 1,
                 "geneval_images_per_prompt": 2},
}


def release_checkpoint(folder: Path) -> dict:
    """A checkpoint in the official release's layout (the whole pipeline's state dict, the DiT's keys
    under `dit.`) for the smoke models: a smoke-size MicroDiT at 128 px over the 4-channel tiny VAE
    and the 64-d tiny text encoder; the evaluate.released entry that names it."""
    import torch

    from microdit.models import build_model

    torch.manual_seed(1)
    model = build_model("MicroDiT_Smoke_2", input_size=16, in_channels=4, caption_channels=64)
    folder.mkdir(parents=True)
    path = folder / "dit_smoke_release.pt"
    torch.save({**{f"dit.{k}": v for k, v in model.state_dict().items()}, "vae.scale": torch.ones(1)}, path)
    return {"path": str(path), "model": "MicroDiT_Smoke_2", "resolution": 128, "pos_interp_scale": 1.0}


def snakemake(workdir: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(workdir / "test-config.yaml"), "--cores", "2", *args],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("dag")
    config = {**SMALL, "evaluate": {**SMALL["evaluate"], "released": [release_checkpoint(work / "release")]}}
    (work / "test-config.yaml").write_text(yaml.safe_dump(config))
    r = snakemake(work)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return work


def test_funnel_counts_every_stage(data_run):
    funnel = json.loads((data_run / "results/data/funnel.json").read_text())["sources"]
    assert set(funnel) == {"shapes_real", "shapes_sa", "shapes_synth", "shapes_eval"}
    for name, f in funnel.items():
        n = SMALL["world"]["counts"][name]
        # the world adds one dead URL, one corrupt file and one too-small image per source:
        # img2dataset must count each under its own reason and lose nothing else
        assert f["urls"] == n + 3, f
        assert f["downloaded"] == n, f
        assert f["download_failed"] == {"dead url": 1, "corrupt image": 1, "image too small": 1}, f
        assert f["in_mds"] == n and sum(f["mds_dropped"].values()) == 0, f
    assert funnel["shapes_sa"]["captioned"] == SMALL["world"]["counts"]["shapes_sa"]
    for name in ("shapes_real", "shapes_sa", "shapes_synth"):
        assert funnel[name]["encoded"] == funnel[name]["in_mds"]
    assert "encoded" not in funnel["shapes_eval"]  # the evaluation split is not encoded


def test_latent_shards_have_the_contract_shapes(data_run):
    from streaming import StreamingDataset

    root = data_run / "data/latents/shapes_real"
    summary = json.loads((root / "_summary.json").read_text())
    assert summary["latent_shape"] == {"latents_64": [4, 8, 8], "latents_128": [4, 16, 16]}
    ds = StreamingDataset(local=str(root), remote=None, shuffle=False, batch_size=1)
    assert len(ds) == summary["encoded"] == SMALL["world"]["counts"]["shapes_real"]
    sample = ds[0]
    # float16 bytes, as the official precompute stores them
    for column, shape in (("latents_64", (4, 8, 8)), ("latents_128", (4, 16, 16)), ("caption_latents", (77, 64))):
        array = np.frombuffer(sample[column], dtype=np.float16)
        assert array.size == int(np.prod(shape)) and np.isfinite(array).all(), column
    latents = np.frombuffer(sample["latents_128"], dtype=np.float16).astype(np.float32)
    assert 0.2 < latents.std() < 5  # scaled by the VAE's scaling_factor: roughly unit variance
    assert sample["caption"] and sample["key"]


def test_four_stages_chain_and_resolutions(data_run):
    summaries = [json.loads((data_run / f"data/checkpoints/stage{n}/summary.json").read_text()) for n in (1, 2, 3, 4)]
    assert [s["resolution"] for s in summaries] == [64, 64, 128, 128]
    assert [s["mask_ratio"] for s in summaries] == [0.75, 0.0, 0.75, 0.0]
    assert [s["ema"] for s in summaries] == [False, False, True, True]
    for n, s in zip((1, 2, 3, 4), summaries):
        rows = (data_run / f"data/checkpoints/stage{n}/metrics.jsonl").read_text().splitlines()
        assert json.loads(rows[-1])["step"] == SMALL["train"]["stages"][f"stage{n}"]["steps"]
        assert np.isfinite(s["final_loss"])
        assert (data_run / f"data/checkpoints/stage{n}/samples.png").is_file()
    from microdit.checkpoint import load_trained

    model = load_trained(data_run / "data/checkpoints/stage4/final", ema=True)
    assert model.config["input_size"] == 16 and model.config["pos_interp_scale"] == 2.0


def test_evaluation_cost_and_report(data_run):
    results = data_run / "results"
    for tag in ("stage0", "stage2", "stage4"):
        m = json.loads((results / f"eval/{tag}/metrics.json").read_text())
        assert m["fid"]["comparable"] is False and np.isfinite(m["fid"]["value"])
        assert 0 <= m["clip_score"]["value"] <= 100
        assert set(m["geneval"]["tasks"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    cost = json.loads((results / "cost.json").read_text())
    assert cost["phases"]["training"]["wall_s"] > 0 and cost["paper"]["dollars"] == 1890
    html = (results / "report.html").read_text()
    for section in ("summary", "dag", "data", "training", "samples", "evaluation", "cost", "raw"):
        assert f'id="{section}"' in html
    assert "http://" not in html and "https://" not in html


def test_a_released_checkpoint_is_evaluated_beside_the_stages(data_run):
    m = json.loads((data_run / "results/eval/released-dit_smoke_release/metrics.json").read_text())
    assert m["checkpoint"] == "released dit_smoke_release.pt" and np.isfinite(m["fid"]["value"])
    assert set(m["geneval"]["tasks"]) >= {"single_object", "colors"}
    html = (data_run / "results/report.html").read_text()
    assert "released dit_smoke_release, evaluated here" in html


def test_report_in_a_real_browser(data_run):
    from browser import find_chromium, load_page  # tests/browser.py

    if find_chromium() is None:
        pytest.skip("chromium is not on PATH (Debian: apt-get install chromium); browser check skipped")
    report = data_run / "results/report.html"
    page = load_page(report, evaluate=("[...document.images].filter(i => i.complete && i.naturalWidth > 0).length",
                                       "document.images.length"))
    own = report.resolve().as_uri()
    assert [u for u in page.requests if u != own and not u.startswith("data:")] == []
    assert page.failed == [] and page.errors == []
    shown, total = page.values.values()
    assert total >= 10 and shown == total  # curves, funnel, grids: every image decodes
    assert "Not run yet" not in page.dom


def test_snakemake_report_holds_the_marked_outputs(data_run, tmp_path):
    out = tmp_path / "snakemake-report.html"
    r = snakemake(data_run, "--report", str(out))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    html = out.read_text()
    marked = ["results/config.json", "results/data/funnel.json", "results/cost.json", "results/report.html"]
    marked += [f"results/eval/{tag}/{name}" for tag in ("stage0", "stage2", "stage4") for name in ("metrics.json", "grid.png")]
    marked += [f"data/checkpoints/stage{n}/samples.png" for n in (1, 2, 3, 4)]
    for path in marked:  # a result entry, keyed by path (a bare path also shows up in job inputs)
        assert f'"{path}": {{"name": ' in html, f"{path} is not a result in Snakemake's report"
    # captions are rendered per job (wildcards filled in) and the workflow description is there
    assert "Sample grid at the end of training stage 4" in html and "Evaluation of stage2" in html
    assert "results/report.html (category Report)" in html


def test_second_run_has_nothing_to_do(data_run):
    r = snakemake(data_run, "-n")
    assert r.returncode == 0
    assert "Nothing to be done" in r.stdout + r.stderr


def test_an_upstream_change_recomputes_the_latents(data_run):
    """Last here: it changes the run. A smaller `mds.max_size` rebuilds the MDS shards, and the latents
    made from them must be encoded again, not reused because their part names are the same."""
    from streaming import StreamingDataset

    latents = data_run / "data/latents/shapes_real"
    before = {p.relative_to(latents): p.read_bytes() for p in latents.rglob("*.mds")}
    assert before
    r = snakemake(data_run, "--config", "mds={max_size: 96}", "--", "data/latents/shapes_real/_summary.json")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    ds = StreamingDataset(local=str(data_run / "data/mds/shapes_real"), remote=None, shuffle=False, batch_size=1)
    assert min(ds[0]["image"].size) == 96  # the MDS images were rebuilt at the new size
    after = {p.relative_to(latents): p.read_bytes() for p in latents.rglob("*.mds")}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)
