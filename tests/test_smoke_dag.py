"""End to end: the data half of the smoke DAG (world -> models -> download -> caption -> MDS ->
latents -> funnel) through real Snakemake, img2dataset, LLaVA, MDS and the VAE, in a temp dir."""
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
}


def snakemake(workdir: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(workdir / "test-config.yaml"), "--cores", "2", *args],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("dag")
    (work / "test-config.yaml").write_text(yaml.safe_dump(SMALL))
    r = snakemake(work, "data")
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
    from streaming.base.format import reader_from_json  # noqa: F401  (import proves the format module)
    from streaming import StreamingDataset

    summary = json.loads((data_run / "data/latents/shapes_real/_summary.json").read_text())
    ds = StreamingDataset(local=str(data_run / "data/latents/shapes_real"), remote=None, shuffle=False, batch_size=1)
    assert len(ds) == summary["encoded"]
    sample = ds[0]
    keys = set(sample)
    lat64 = [k for k in keys if k.endswith("64") and "latent" in k]
    lat128 = [k for k in keys if k.endswith("128") and "latent" in k]
    assert lat64 and lat128, keys
    assert np.asarray(sample[lat64[0]]).shape == (4, 8, 8)
    assert np.asarray(sample[lat128[0]]).shape == (4, 16, 16)
    assert np.asarray(sample[lat128[0]]).dtype == np.float16
    cap = [k for k in keys if "caption" in k and np.asarray(sample[k]).ndim >= 2]
    assert cap and np.asarray(sample[cap[0]]).shape[-2:] == (77, 64)


def test_second_run_has_nothing_to_do(data_run):
    r = snakemake(data_run, "data", "-n")
    assert r.returncode == 0
    assert "Nothing to be done" in r.stdout + r.stderr
