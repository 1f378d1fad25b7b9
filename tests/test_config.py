"""Config resolution and schema errors: bad config fails before any job, naming the key."""
import subprocess
import sys
from pathlib import Path

import pytest

from microdit.config import ConfigError, deep_merge, resolve

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflow"


def test_presets_resolve_and_expand_root():
    smoke = resolve({"preset": "smoke", "root": "elsewhere"}, WORKFLOW)
    assert smoke["sources"]["shapes_real"]["input"] == "elsewhere/world/shapes_real.parquet"
    paper = resolve({"preset": "paper"}, WORKFLOW)
    assert paper["latents"]["resolutions"] == [256, 512]
    assert {"cc12m", "sa1b", "textcaps", "journeydb", "diffusiondb", "coco"} <= set(paper["sources"])


def test_user_keys_override_preset_and_null_drops_a_source():
    cfg = resolve({"download": {"threads": 7}, "sources": {"shapes_synth": None}}, WORKFLOW)
    assert cfg["download"]["threads"] == 7
    assert cfg["download"]["processes"] == 1  # untouched keys keep the preset value
    assert "shapes_synth" not in cfg["sources"]


@pytest.mark.parametrize(
    "override, message",
    [
        ({"wieght": 1}, "unknown config key 'wieght'"),
        ({"sources": {"shapes_real": {"weigth": 1}}}, "unknown config key 'sources.shapes_real.weigth'"),
        ({"sources": {"shapes_real": {"weight": "heavy"}}}, "config key 'sources.shapes_real.weight'"),
        ({"download": {"threads": 0}}, "config key 'download.threads'"),
        ({"latents": {"resolutions": [250]}}, "config key 'latents.resolutions.0'"),
        ({"models": {"roles": {"vae": {"path": "/definitely/not/here"}}}}, "config key 'models.roles.vae.path'"),
        ({"preset": "huge"}, "config key 'preset'"),
        ({"sources": {"shapes_real": {"kind": "ftp"}}}, "config key 'sources.shapes_real.kind'"),
    ],
)
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        resolve(override, WORKFLOW)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_deep_merge_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}}
    out = deep_merge(base, {"a": {"b": 3}})
    assert out == {"a": {"b": 3, "c": 2}} and base == {"a": {"b": 1, "c": 2}}


def _snakemake(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )


def test_snakemake_rejects_bad_key_before_any_job(tmp_path):
    r = _snakemake("-n", "--config", "wieght=1", f"root={tmp_path}/data")
    assert r.returncode != 0
    assert "unknown config key 'wieght'" in r.stdout + r.stderr
    assert not (tmp_path / "data").exists()


def test_paper_preset_dry_run_plans_every_phase(tmp_path):
    r = _snakemake("-n", "--config", "preset=paper", f"root={tmp_path}/data", f"results={tmp_path}/results")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    for rule in ("models", "download", "caption", "mds", "latents", "funnel"):
        assert f"rule {rule}:" in out
    # every paper source is downloaded or reuses a download, and every training source gets latents
    for source in ("cc12m", "sa1b", "textcaps", "journeydb", "diffusiondb", "coco"):
        assert f"raw/{source}/_summary.json" in out
    assert "latents/cc12m_512/_summary.json" in out and "latents/coco/" not in out


def test_multi_node_training_plans_srun_and_torchrun(tmp_path):
    cfg = tmp_path / "nodes.yaml"
    cfg.write_text("preset: paper\nresources:\n  train: {threads: 64, mem_mb: 512000, runtime: 10080, gpu: 8, nodes: 2}\n")
    r = _snakemake("-n", "-p", "--configfile", str(cfg), "--config", f"root={tmp_path}/data", f"results={tmp_path}/results")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "nodes=2, tasks=2, mpi=srun" in out and "--gpus-per-node=8" in out
    assert "srun --nodes 2 --ntasks-per-node 1" in out and "torchrun --nnodes 2 --nproc_per_node 8" in out


def test_values_a_yaml_1_2_writer_leaves_plain_are_read_back():
    """`dvc exp run -S` rewrites params.yaml as YAML 1.2: `1e-4` and `no` unquoted, which YAML 1.1
    readers (PyYAML, Snakemake) take for a string and for false."""
    import yaml

    text = "download:\n  resize_mode: no\ntrain:\n  stages:\n    stage1:\n      lr: 1e-4\ncaption:\n  prompt: 2e5\n"
    user = yaml.safe_load(text)
    assert user["download"]["resize_mode"] is False and user["train"]["stages"]["stage1"]["lr"] == "1e-4"
    config = resolve(user, WORKFLOW)
    assert config["download"]["resize_mode"] == "no"
    assert config["train"]["stages"]["stage1"]["lr"] == 1e-4
    assert config["caption"]["prompt"] == "2e5"  # a string where the schema wants one stays one
    with pytest.raises(ConfigError, match="resize_mode"):  # false where no enum value is "no" still fails
        resolve({"download": {"resize_mode": True}}, WORKFLOW)


def test_released_checkpoints_become_evaluation_jobs(tmp_path):
    from microdit.dvc import snakemake_jobs

    ckpt = tmp_path / "My Release.pt"
    ckpt.write_bytes(b"weights")
    cfg = tmp_path / "released.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({"root": str(tmp_path / "data"), "results": str(tmp_path / "results"), "evaluate": {
        "released": [{"path": str(ckpt), "model": "MicroDiT_Smoke_2", "resolution": 128, "pos_interp_scale": 1.0},
                     "dit_4_channel_0.5B_synthetic_data"]}}))
    jobs = {j.wildcards["tag"]: j for j in snakemake_jobs(REPO, cfg) if j.rule == "evaluate"}
    assert {"released-my_release", "released-dit_4_channel_0_5b_synthetic_data"} <= set(jobs)
    mine, named = jobs["released-my_release"], jobs["released-dit_4_channel_0_5b_synthetic_data"]
    assert str(ckpt) in mine.input and "--model MicroDiT_Smoke_2 --resolution 128" in mine.shellcmd
    assert "'" + str(ckpt) + "'" in mine.shellcmd  # quoted: the path has a space
    # a released name: the paper's architecture, its file fetched by the job beside the models
    assert "--model MicroDiT_XL_2 --resolution 512 --pos-interp-scale 2.0" in named.shellcmd
    assert "models/released/dit_4_channel_0.5B_synthetic_data.pt" in named.shellcmd
    with pytest.raises(ConfigError, match="evaluate.released.0"):
        resolve({"evaluate": {"released": [str(tmp_path / "missing.pt")]}}, WORKFLOW)
    with pytest.raises(ConfigError, match="a second checkpoint"):
        resolve({"evaluate": {"released": [str(ckpt), str(ckpt)]}}, WORKFLOW)
