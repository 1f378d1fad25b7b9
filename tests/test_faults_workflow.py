"""Hostile and broken configuration against the workflow: every config string stays one shell word,
command-line values are typed, and bad input fails with one line before any job starts."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from microdit.config import ConfigError, _subschema, load_yaml, resolve
from microdit.dvc import snakemake_jobs
from microdit.settings import json_schema

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflow"
SCHEMA = json_schema()

# ---- shell injection: every config string reaches the rule shells as one quoted word ----------------

# {m} is a marker file the payload creates if a shell ever evaluates it
PAYLOADS = {
    "subshell": "$(touch {m})",
    "backticks": "`touch {m}`",
    "double_quotes": '"; touch {m}; "',
    "single_quotes": "'; touch {m}; '",
    "semicolon": "; touch {m};",
}
MARKER = "INJECTED-"


def _free_string(schema: dict) -> bool:
    """The schema takes any string here (not only one of an enum)."""
    while "$ref" in schema:
        schema = SCHEMA["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    types = schema.get("type", [])
    return "string" in ([types] if isinstance(types, str) else types) and "enum" not in schema \
        and "pattern" not in schema


def _string_keys(value, schema: dict, path: tuple = ()) -> list[tuple]:
    """Key paths of every config value the schema lets be a free string, found from the schema itself
    so that a string key added later is covered too."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _string_keys(v, _subschema(schema, SCHEMA, k), (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _string_keys(v, _subschema(schema, SCHEMA, i), (*path, i))]
    if _free_string(schema):
        return [path]
    return []


def _set(config, path: tuple, value) -> None:
    for part in path[:-1]:
        config = config[part]
    config[path[-1]] = value


def _keep(path: tuple, preset: dict) -> bool:
    """Keys left alone: `raw_from` must name a source (test_raw_from_must_name_a_source); smoke sources
    keep their world URL lists (but one), so that the world rule stays in the DAG."""
    if path[-1] == "raw_from":
        return True
    return path[0] == "sources" and path[-1] == "input" and "{root}/world/" in preset["sources"][path[1]]["input"] \
        and path[1] != "shapes_synth"


def hostile_config(tmp_path: Path, preset: str, payload: str) -> tuple[dict, dict]:
    """The preset with `payload` in every free string key (each with its own marker); the payloads
    by key. Paths are absolute inside tmp_path; model paths and source inputs exist, as the config
    check wants."""
    raw = load_yaml(WORKFLOW / "presets" / f"{preset}.yaml")
    config = resolve({"preset": preset}, WORKFLOW)
    config["sources"] = {k: {**v, "input": raw["sources"][k]["input"]} for k, v in config["sources"].items()}
    payloads = {}
    for path in _string_keys(config, SCHEMA):
        if path[0] == "preset" or _keep(path, raw):
            continue
        key = ".".join(map(str, path))
        text = payload.format(m=MARKER + key)
        if path in (("root",), ("results",)):
            text = str(tmp_path / "work" / text)
        elif path[-1] == "path":  # a model directory the config check finds
            (tmp_path / "models" / text).mkdir(parents=True)
            text = str(tmp_path / "models" / text)
        elif path[-1] == "captions_file":  # the evaluation's caption list, which the config check finds
            (tmp_path / "inputs").mkdir(exist_ok=True)
            (tmp_path / "inputs" / text).touch()
            text = str(tmp_path / "inputs" / text)
        elif path[-1] == "input":  # a source's URL list, which the config check finds too
            (tmp_path / "inputs").mkdir(exist_ok=True)
            (tmp_path / "inputs" / text).touch()
            text = str(tmp_path / "inputs" / text)
        _set(config, path, text)
        payloads[key] = text
    first = sorted(config["sources"])[0]  # a free-form option key, besides the option values
    config["sources"][first]["options"][payload.format(m=MARKER + "option-key")] = "1"
    payloads["option-key"] = payload.format(m=MARKER + "option-key")
    return config, payloads


def write_stubs(bin_dir: Path) -> None:
    """`microdit` and the launchers, recording their arguments instead of running anything."""
    bin_dir.mkdir()
    for name in ("microdit", "torchrun", "srun", "python"):
        stub = bin_dir / name
        stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        "with open(os.environ['STUB_CALLS'], 'a') as f:\n"
                        "    f.write(json.dumps(sys.argv) + '\\n')\n")
        stub.chmod(0o755)


def run_job_shells(jobs, work: Path, bin_dir: Path, calls: Path) -> list[str]:
    """Each job's shell command through bash as Snakemake runs it, `microdit` replaced by the stub."""
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_CALLS": str(calls)}
    failures = []
    for job in jobs:
        if job.shellcmd is None:  # `run:` rules execute in Snakemake's own process, no shell
            continue
        for path in (*job.output, *job.log):  # Snakemake creates these directories before the job
            (work / path).parent.mkdir(parents=True, exist_ok=True)
        cmd = job.shellcmd.replace(shlex.quote(sys.executable), str(bin_dir / "python"))
        r = subprocess.run(["bash", "-c", f"set -euo pipefail; {cmd}"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            failures.append(f"{job.rule} {job.wildcards}: {r.stderr.strip()[-300:]}")
    return failures


@pytest.mark.parametrize("preset, payload", [("smoke", name) for name in PAYLOADS] + [("paper", "subshell")])
def test_config_strings_never_reach_a_shell_unquoted(tmp_path, preset, payload):
    config, payloads = hostile_config(tmp_path, preset, PAYLOADS[payload])
    configfile = tmp_path / "hostile.yaml"
    configfile.write_text(yaml.safe_dump(config))
    work, bin_dir, calls = tmp_path / "work", tmp_path / "bin", tmp_path / "calls.jsonl"
    work.mkdir(exist_ok=True)
    write_stubs(bin_dir)
    jobs = snakemake_jobs(REPO, configfile)
    assert {"train", "evaluate", "models", "funnel", "cost", "report", "dag"} <= {j.rule for j in jobs}
    failures = run_job_shells(jobs, work, bin_dir, calls)
    injected = sorted(p.name for p in tmp_path.rglob(f"{MARKER}*"))
    assert not injected, f"a shell evaluated the config value of: {injected}"
    assert not failures, "\n".join(failures)
    # every payload arrived intact, inside one argument of some command (a source with `raw_from`
    # reuses another's download: its own input and options are read by no command)
    args = [a for line in calls.read_text().splitlines() for a in json.loads(line)[1:]]
    reused = tuple(f"sources.{s}." for s, spec in config["sources"].items() if "raw_from" in spec)
    mangled = [key for key, text in payloads.items() if not key.startswith(reused) and not any(text in a for a in args)]
    assert not mangled, f"these keys did not reach any command as one argument: {mangled}"


def test_raw_from_and_world_names_cannot_carry_shell():
    """The two config strings that name things rather than pass through: checked, never quoted away."""
    with pytest.raises(ConfigError, match=r"^config key 'sources.shapes_sa.raw_from': '\$\(touch x\)' is not a source"):
        resolve({"sources": {"shapes_sa": {"raw_from": "$(touch x)"}}}, WORKFLOW)
    with pytest.raises(ConfigError, match=r"^config key 'world.counts'"):
        resolve({"world": {"counts": {"$(touch x)": 3}}}, WORKFLOW)


# ---- command-line values are YAML, as in config.yaml --------------------------------------------------

def test_nested_command_line_values_are_typed():
    # what Snakemake hands over for `--config train={stages: {stage1: {steps: 3, mask_ratio: 0.5}}} ...`
    snakemake_config = {"train": {"stages": {"stage1": {"steps": "3", "mask_ratio": "0.5"}}},
                        "sources": {"shapes_synth": "null"}, "download": {"resize_mode": "no"}}
    entries = ["train={stages: {stage1: {steps: 3, mask_ratio: 0.5}}}", "sources={shapes_synth: null}",
               "download={resize_mode: no}"]
    config = resolve(snakemake_config, WORKFLOW, command_line=entries)
    assert config["train"]["stages"]["stage1"]["steps"] == 3
    assert config["train"]["stages"]["stage1"]["mask_ratio"] == 0.5
    assert "shapes_synth" not in config["sources"] and config["download"]["resize_mode"] == "no"
    with pytest.raises(ConfigError, match=r"^--config train=\.\.\.: value is not valid YAML: line 1"):
        resolve({}, WORKFLOW, command_line=["train={stages: {"])



def test_dotted_and_repeated_command_line_keys_nest_and_merge():
    # dotted keys are what `dvc exp run -S` takes; repeated entries for one key merge, as in Snakemake
    entries = ["train.stages.stage1.steps=3", "train.stages.stage2.lr=1.5e-4", "train={stages: {stage3: {steps: 2}}}"]
    config = resolve({}, WORKFLOW, command_line=entries)
    stages = config["train"]["stages"]
    assert (stages["stage1"]["steps"], stages["stage2"]["lr"], stages["stage3"]["steps"]) == (3, 1.5e-4, 2)
    assert stages["stage4"]["steps"] > 0  # the preset's keys beside them are kept

def _snakemake(workdir: Path, *args: str, snakefile: Path = REPO / "Snakefile") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir),
                           "--cores", "1", *args], capture_output=True, text=True, timeout=300)


def test_snakemake_takes_a_nested_number_from_the_command_line(tmp_path):
    r = _snakemake(tmp_path, "-n", "-p", "--config", "train={stages: {stage1: {steps: 3, mask_ratio: 0.5}}}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    stage1 = next(line for line in r.stdout.splitlines() if "train --out" in line and "--stage 1 " in line)
    assert "--steps 3 " in stage1 and "--mask-ratio 0.5 " in stage1


# ---- bad input: one line, before any job -------------------------------------------------------------

def test_yaml_syntax_error_names_file_and_line(tmp_path):
    broken = tmp_path / "a.yaml"
    broken.write_text("preset: smoke\ntrain:\n  stages: {stage1: {steps: 3}\nseed: 1\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(broken)
    assert str(err.value).startswith(f"config file '{broken}' is not valid YAML: line 4, column 1:")
    assert "starts on line 3" in str(err.value) and "\n" not in str(err.value)
    # the workflow's own config.yaml: read before Snakemake's `configfile:`, whose message has neither
    workflow = tmp_path / "wf"
    workflow.mkdir()
    for name in ("Snakefile", "workflow"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, workflow / name)
    shutil.copy2(broken, workflow / "config.yaml")
    r = _snakemake(tmp_path, "-n", snakefile=workflow / "Snakefile")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "Traceback" not in out
    assert f"config error: config file '{workflow / 'config.yaml'}' is not valid YAML: line 4, column 1:" in out


@pytest.mark.parametrize("override, message", [
    ({"train": {"stages": {"stage3": {"resolution": 256}}}},
     "config key 'train.stages.stage3.resolution': 256 is not in 'latents.resolutions' [64, 128]"),
    ({"sources": {"shapes_eval": None}}, "config key 'sources': no source has role 'eval'"),
    ({"sources": {"shapes_real": None, "shapes_sa": None, "shapes_synth": None}},
     "config key 'sources': no source has role 'train'"),
    ({"sources": {name: {"stages": [1, 2]} for name in ("shapes_real", "shapes_sa", "shapes_synth")}},
     "config key 'sources': no training source with weight > 0 is used in stage3"),
])
def test_what_would_fail_a_job_fails_the_config(override, message):
    with pytest.raises(ConfigError) as err:
        resolve(override, WORKFLOW)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_dropping_the_eval_source_is_one_line_from_snakemake(tmp_path):
    r = _snakemake(tmp_path, "-n", "--config", "sources={shapes_eval: null}")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "Traceback" not in out and "Exception" not in out
    assert "config error: config key 'sources': no source has role 'eval'" in out


# ---- SIGTERM to Snakemake -----------------------------------------------------------------------------

def test_sigterm_to_snakemake_keeps_the_running_job_and_a_rerun_goes_on(tmp_path):
    """Snakemake's own behaviour, documented in README ("What happens when things go wrong"): on SIGTERM
    it starts nothing new, lets the running job finish (its output is kept and counts as done), then
    exits 1 with "At least one job did not complete successfully" for the jobs it never started.
    Rerunning the same command goes on from there."""
    (tmp_path / "Snakefile").write_text(
        'rule all:\n    input: "b.txt"\n'
        'rule a:\n    output: "a.txt"\n    shell: "touch started; sleep 2; echo a > {output}"\n'
        'rule b:\n    input: "a.txt"\n    output: "b.txt"\n    shell: "echo b > {output}"\n')
    cmd = [sys.executable, "-m", "snakemake", "--cores", "1"]
    run = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=60)
    assert run.returncode == 1 and "did not complete" in out
    assert (tmp_path / "a.txt").read_text() == "a\n" and not (tmp_path / "b.txt").exists()
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and (tmp_path / "b.txt").exists()
    assert "rule a:" not in again.stdout + again.stderr  # the finished job is not redone
