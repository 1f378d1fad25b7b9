"""dvc.yaml against the Snakemake DAG, and `dvc repro` / experiments / remotes on a tiny smoke world.

The fast tests check that dvc.yaml is what `microdit dvc` generates from the rules and params.yaml,
and that each stage's `params` are the keys its jobs' commands really read. The slow one runs the
pipeline under DVC end to end in a fresh git + DVC repository."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from microdit.errors import UserError
from microdit.config import deep_merge, load_yaml, resolve
from microdit.dvc import build_dvc, generate, params_text, phase, preset_params, snakemake_jobs

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "workflow", "envs", "config.yaml", ".gitignore")


def copy_workflow(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / name)
    return dest


# ---- dvc.yaml is the DAG ----------------------------------------------------------------------------

def test_committed_dvc_yaml_and_params_are_current():
    assert (REPO / "dvc.yaml").read_text() == generate(REPO, REPO / "params.yaml"), \
        "dvc.yaml is stale: run `microdit dvc`"
    text = (REPO / "params.yaml").read_text()
    params = yaml.safe_load(text)
    assert params == preset_params(REPO, "smoke"), "params.yaml is stale: run `microdit dvc --preset smoke`"
    # the whole configuration: resolving it adds nothing the preset would have supplied
    assert resolve(params, REPO / "workflow") == resolve({"preset": "smoke"}, REPO / "workflow")


def test_check_fails_when_a_rule_changes(tmp_path):
    work = copy_workflow(tmp_path / "repo")
    shutil.copy2(REPO / "params.yaml", work / "params.yaml")
    shutil.copy2(REPO / "dvc.yaml", work / "dvc.yaml")
    cmd = [sys.executable, "-m", "microdit.cli", "dvc", "--check", "--repo", str(work)]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0 and "dvc.yaml is current" in ok.stdout, ok.stdout + ok.stderr
    data = work / "workflow/rules/data.smk"
    data.write_text(data.read_text().replace("{ROOT}/logs/funnel.log", "{ROOT}/logs/data-funnel.log"))
    stale = subprocess.run(cmd, capture_output=True, text=True)
    assert stale.returncode == 2, stale.stdout + stale.stderr
    assert stale.stderr.strip().splitlines()[-1].endswith("run `microdit dvc` to regenerate it")


def test_params_file_missing_a_key_is_one_line(tmp_path):
    params = preset_params(REPO, "smoke")
    jobs = snakemake_jobs(REPO, REPO / "params.yaml")
    broken = copy.deepcopy(params)
    del broken["train"]["stages"]["stage2"]  # resolve fills it from the preset; dvc.yaml can't track it
    with pytest.raises(UserError, match=r"params.yaml has no key 'train.stages.stage2'"):
        build_dvc(jobs, broken, resolve(params, REPO / "workflow"))


def _covers(stage_params: list, key: str) -> bool:
    return any(isinstance(p, dict) or p == key or key.startswith(p + ".") for p in stage_params)


# One key at a time, each to another valid value: the jobs whose command changes must all belong to
# stages that list the key (or a parent of it) in `params`, and the key must change some command.
MUTATIONS = [
    ("seed", 7), ("device", "cpu"), ("world.image_size", 96), ("models.build.vae_steps", 9),
    ("download.timeout", 11), ("caption.max_new_tokens", 9), ("mds.min_size", 48), ("mds.quality", 90),
    ("latents.batch_size", 16), ("sources.shapes_real.weight", 1.5), ("sources.shapes_sa.captions", "source"),
    ("train.patch_mixer", False), ("train.log_every", 5), ("train.stages.stage3.lr", 1.0e-4),
    ("train.stages.stage4.ema", False), ("evaluate.guidance", 4.0), ("cost.price_per_gpu_hour", 2.0),
]


def _set(config: dict, key: str, value) -> dict:
    out = copy.deepcopy(config)
    node = out
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return out


def test_each_stage_lists_the_keys_its_commands_read(tmp_path):
    params = load_yaml(REPO / "params.yaml")
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    base = {(j.rule, tuple(sorted(j.wildcards.items()))): j.shellcmd for j in snakemake_jobs(REPO, REPO / "params.yaml")}
    for key, value in MUTATIONS:
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump(_set(params, key, value)))
        changed = []
        for job in snakemake_jobs(REPO, path):
            ident = (job.rule, tuple(sorted(job.wildcards.items())))
            if ident in base and base[ident] != job.shellcmd:
                changed.append(job)
        # cost reads its keys from results/config.json (the config stage tracks the whole file)
        assert changed or key.startswith("cost."), f"{key}: no command changed, the mutation tests nothing"
        for job in changed:
            stage = phase(job)
            assert _covers(dvc[stage].get("params", []), key), \
                f"{key} changes {job.rule} {job.wildcards} but DVC stage {stage} does not list it"
    assert _covers(dvc["cost"]["params"], "cost.price_per_gpu_hour")
    assert dvc["config"]["params"] == [{"params.yaml": None}]


def test_stage_layout():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages = dvc["stages"]
    assert {"world", "models", "funnel", "config", "cost", "report"} <= set(stages)
    assert {f"train-stage{n}" for n in range(1, 5)} <= set(stages)
    for n in range(1, 5):
        train = stages[f"train-stage{n}"]
        assert {f"data/checkpoints/stage{n}": {"persist": True}} in train["outs"]  # resume survives a rerun
        assert f"--config only=stage={n}" in train["cmd"] and "--allowed-rules train" in train["cmd"]
        assert ("train.stages.stage%d" % n) in train["params"]
        assert not any(p.startswith("train.stages.") and p != f"train.stages.stage{n}" for p in train["params"])
        if n > 1:
            assert f"data/checkpoints/stage{n - 1}" in train["deps"]
    # a source's data chain does not rerun when only its training weight changes
    assert not any(p.endswith(".weight") for p in stages["data-shapes_real"]["params"])
    assert "results/eval/stage4/metrics.json" in dvc["metrics"] and "results/cost.json" in dvc["metrics"]
    assert set(dvc["plots"][0]["training loss"]["y"]) == {f"data/checkpoints/stage{n}/metrics.csv" for n in range(1, 5)}


# ---- dvc repro, experiments, a remote: end to end ---------------------------------------------------

TINY = {
    "world": {"counts": {"shapes_real": 12, "shapes_sa": 6, "shapes_eval": 6}, "bad_per_source": 1},
    "models": {"build": {"vae_steps": 10, "vae_batch_size": 8}},
    "download": {"samples_per_shard": 10},
    "caption": {"batch_size": 4, "max_new_tokens": 6},
    "train": {"micro_batch": 4, "ckpt_every": 2, "keep": 1, "log_every": 1, "sample_prompts": ["a red circle"],
              "stages": {f"stage{n}": {"steps": 3, "global_batch": 4, "warmup": 0} for n in range(1, 5)}},
    "evaluate": {"stages": [4], "num_images": 4, "steps": 2, "batch_size": 4, "geneval_per_task": 1,
                 "geneval_images_per_prompt": 1},
}
GIT_ID = {"GIT_AUTHOR_NAME": "microdit test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
          "GIT_COMMITTER_NAME": "microdit test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}


class Repo:
    def __init__(self, path: Path):
        self.path = path
        bindir = str(Path(sys.executable).parent)  # dvc.yaml's commands call `snakemake`
        self.env = {**os.environ, **GIT_ID, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
                    "DVC_NO_ANALYTICS": "1", "HOME": str(path.parent / "home")}
        (path.parent / "home").mkdir(exist_ok=True)

    def run(self, *cmd: str, ok: bool = True, timeout: int = 1200) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), cwd=self.path, env=self.env, capture_output=True, text=True, timeout=timeout)
        if ok:
            assert r.returncode == 0, f"{' '.join(cmd)}:\n{(r.stdout + r.stderr)[-5000:]}"
        return r

    def dvc(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, **kw)

    def repro(self) -> list[str]:
        """Run `dvc repro`; the stages it ran, in order."""
        r = self.dvc("repro")
        return re.findall(r"Running stage '([^']+)'", r.stdout)

    def set_param(self, key: str, value) -> None:
        params = load_yaml(self.path / "params.yaml")
        (self.path / "params.yaml").write_text(params_text(_set(params, key, value), "smoke", True))

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "-m", message)


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    work = copy_workflow(tmp_path_factory.mktemp("dvc") / "repo")
    shutil.copytree(REPO / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    shutil.copy2(REPO / ".dvcignore", work / ".dvcignore")
    params = deep_merge(preset_params(REPO, "smoke"), TINY)
    params["sources"]["shapes_synth"] = None  # one captioned, one LLaVA and the evaluation source
    (work / "params.yaml").write_text(params_text(params, "smoke", True))
    repo = Repo(work)
    repo.run(sys.executable, "-m", "microdit.cli", "dvc")
    repo.run("git", "init", "-q")
    repo.commit("tiny smoke world under DVC")
    return repo


@pytest.mark.slow
def test_dvc_repro_experiments_and_remote(dvc_repo, tmp_path):
    repo = dvc_repo
    stages = list(yaml.safe_load((repo.path / "dvc.yaml").read_text())["stages"])

    # 1. a fresh repository: everything runs once, to the report
    assert sorted(repo.repro()) == sorted(stages)
    assert (repo.path / "results/report.html").stat().st_size > 10_000
    assert set(yaml.safe_load((repo.path / "dvc.lock").read_text())["stages"]) == set(stages)
    # 2. nothing to do the second time
    assert repo.repro() == []
    assert "up to date" in repo.dvc("status").stdout

    # 3. one training key: that stage, what follows it, evaluation, cost and report; the stage starts
    # afresh (its persisted checkpoints belong to the old settings) and keeps them aside
    repo.set_param("train.stages.stage3.lr", 1.0e-4)
    assert sorted(repo.repro()) == ["config", "cost", "evaluate-stage4", "report", "train-stage3", "train-stage4"]
    assert "starts afresh" in (repo.path / "data/logs/train/stage3.log").read_text()
    assert (repo.path / "data/checkpoints/stage3/ckpt.superseded").is_dir()
    repo.commit("stage 3 at lr 1e-4")

    # 4. a local-directory remote: push, lose every output and the cache, pull, nothing to rerun
    store = tmp_path / "store"
    repo.dvc("remote", "add", "-d", "store", str(store))
    repo.dvc("push")
    for name in ("data", "results", ".dvc/cache"):
        shutil.rmtree(repo.path / name)
    repo.dvc("pull")
    assert "up to date" in repo.dvc("status").stdout
    assert repo.repro() == []
    # pulled files carry new timestamps; a change downstream must still not rerun anything upstream
    latents = repo.path / "data/latents/shapes_real/_summary.json"
    before = latents.stat().st_mtime_ns
    repo.set_param("train.stages.stage4.lr", 1.0e-4)
    assert sorted(repo.repro()) == ["config", "cost", "evaluate-stage4", "report", "train-stage4"]
    assert latents.stat().st_mtime_ns == before
    train_log = (repo.path / "data/logs/train/stage4.log").read_text()
    assert "starts afresh" in train_log
    repo.commit("stage 4 at lr 1e-4")

    # 5. an ablation as a DVC experiment: no patch-mixer (the paper's naive masking) vs the baseline
    repo.dvc("exp", "run", "-n", "no-mixer", "-S", "train.patch_mixer=false")
    shown = json.loads(repo.dvc("exp", "show", "--json").stdout)
    experiments = [e for commit in shown for e in (commit.get("experiments") or [])
                   for e in e.get("revs", [])]
    names = {e.get("name") for e in experiments}
    assert "no-mixer" in names, shown
    ours = next(e for e in experiments if e.get("name") == "no-mixer")["data"]
    assert ours["params"]["params.yaml"]["data"]["train"]["patch_mixer"] is False
    assert "results/eval/stage4/metrics.json" in ours["metrics"]
    diff = json.loads(repo.dvc("metrics", "diff", "--json").stdout)  # HEAD (with mixer) vs the experiment
    assert any(k.startswith("fid.") or k.startswith("clip_score.") for k in diff.get("results/eval/stage4/metrics.json", {}))
    config = json.loads((repo.path / "results/config.json").read_text())
    assert config["train"]["patch_mixer"] is False
    model_config = json.loads((repo.path / "data/checkpoints/stage4/final/config.json").read_text())
    assert model_config.get("use_patch_mixer") is False
