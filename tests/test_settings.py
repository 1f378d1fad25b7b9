"""One name per setting: every config key reaches the command that uses it, under its own name.

The Snakemake DAG is built for the smoke and paper presets and for a smoke config with every flag
key moved off its preset value; each job's `microdit <command>` line is parsed with that command's
own parser, and every key of the sections the command reads must arrive with its config value.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import shlex
import typing
from pathlib import Path

import pytest
import yaml

from microdit import settings
from microdit.cli import COMMANDS
from microdit.config import resolve
from microdit.dvc import snakemake_jobs

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflow"

# The flags of each command that are not config keys: what to read and write (paths, names), what a
# job is (its source, stage or tag), values the workflow derives, and debugging aids.
CONTEXT = {
    "world": {"out", "count"},
    "models": {"out", "preset", "source", "roles", "ids", "local", "link", "force", "captions", "images", "released"},
    "download": {"source", "kind", "input", "out", "opt"},
    "caption": {"raw", "out", "model", "min_size", "max_images"},
    "mds": {"raw", "out", "captions", "caption_field", "workers"},
    "latents": {"mds", "out", "vae", "text_encoder", "image_column", "caption_column"},
    "train": {"out", "latents", "weights", "init", "vae", "text_encoder", "detector", "clip", "stage", "pos_interp_scale",
              "sample_prompts_file", "sample_seed", "max_steps_this_run", "clean_shm"},
    "evaluate": {"tag", "checkpoint", "untrained", "released", "pos_interp_scale", "ema", "model", "resolution",
                 "caption_channels", "patch_mixer",
                 "eval_mds", "vae", "text_encoder", "clip", "fid", "detector", "out", "cache"},
    "cost": {"root", "results", "config", "out"},
}


def parser_for(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"microdit {command}")
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    return parser


def calls(configfile: Path):
    """(job, command, parsed args) of every job that runs a `microdit` command."""
    for job in snakemake_jobs(REPO, configfile):
        if not job.shellcmd:
            continue
        words = shlex.split(job.shellcmd)
        start = next((i for i, w in enumerate(words) if w in ("microdit", "microdit.cli")), None)
        if start is None:
            continue
        command, argv = words[start + 1], words[start + 2:]
        argv = argv[:argv.index(">")] if ">" in argv else argv
        yield job, command, parser_for(command).parse_args(argv)


def _lookup(config: dict, path: str) -> dict:
    for part in path.split("."):
        config = config[part]
    return config


def expected(config: dict, command: str, job) -> dict:
    """Each flag key the command should receive in this job, with its config value."""
    paths, top = settings.COMMAND_SECTIONS[command]
    want = {name: config[name] for name in top}
    for path in paths:
        values = _lookup(config, path.replace("*", f"stage{job.wildcards.get('stage')}"))
        for f, _ in settings.fields(settings.section(path)):
            if f.metadata.get("flag", True):
                want[f.name] = values[f.name]
    if command == "mds":  # a source's own min_size wins over mds.min_size
        want["min_size"] = config["sources"][job.wildcards["source"]].get("min_size", want["min_size"])
    return want


def _perturbed(value, tp, meta: dict):
    """Another valid value than `value` for a key of this type and range."""
    tp, _ = settings._without_none(tp)
    if typing.get_origin(tp) is typing.Literal:
        choices = [c for c in typing.get_args(tp) if c != value]
        return choices[0]
    if tp is bool:
        return not value
    if value is None:
        return 1
    if tp is int:
        step = meta.get("multiple_of") or 1
        return value - step if meta.get("le") is not None and value + step > meta["le"] else value + step
    if tp is float:
        return value / 2 if value > 0 else 0.5
    if tp is str:
        return "cuda:1" if meta.get("pattern") else value + " x"
    if typing.get_origin(tp) is list and typing.get_args(tp)[0] is int:
        return [*value, value[-1]]
    if typing.get_origin(tp) is list and typing.get_args(tp)[0] is float:
        return [v * 0.99 for v in value]
    if typing.get_origin(tp) is list and typing.get_args(tp)[0] is str:
        return [*value, "another prompt"]
    return None


# Keys that other keys constrain (a stage's resolution must have latents); left at the preset value.
FIXED = {"resolution", "resolutions", "init_optimizer", "geneval_prompts", "captions_file", "captions_sha256"}


def perturbed_config() -> dict:
    """The smoke preset with every flag key of every command's sections set off its value."""
    config = resolve({"preset": "smoke"}, WORKFLOW)
    out = {"preset": "smoke", "seed": config["seed"] + 1, "device": "cpu"}
    for command, (paths, _) in settings.COMMAND_SECTIONS.items():
        for path in paths:
            names = sorted(config["train"]["stages"]) if path.endswith("*") else [None]
            for name in names:
                real = path.replace("*", name) if name else path
                values = _lookup(config, real)
                changed = {f.name: _perturbed(values[f.name], tp, dict(f.metadata))
                           for f, tp in settings.fields(settings.section(path))
                           if f.metadata.get("flag", True) and f.name not in FIXED}
                node = out
                for part in real.split(".")[:-1]:
                    node = node.setdefault(part, {})
                node.setdefault(real.split(".")[-1], {}).update({k: v for k, v in changed.items() if v is not None})
    return out


def _configs(tmp_path: Path) -> dict[str, Path]:
    where = {"root": str(tmp_path / "data"), "results": str(tmp_path / "results")}
    files = {}
    for name, content in (("smoke", {"preset": "smoke"}), ("paper", {"preset": "paper"}),
                          ("perturbed", perturbed_config())):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**content, **where}))
        files[name] = path
    return files


def test_every_key_reaches_its_command_under_its_name(tmp_path):
    for name, path in _configs(tmp_path).items():
        config = resolve(yaml.safe_load(path.read_text()), WORKFLOW)
        seen: dict[str, set[str]] = {}
        for job, command, args in calls(path):
            if command not in settings.COMMAND_SECTIONS:  # funnel, report: files only
                continue
            for key, value in expected(config, command, job).items():
                got = getattr(args, key)
                assert got == value, f"{name}: {job.rule} {job.wildcards}: --{key} is {got!r}, config has {value!r}"
                seen.setdefault(command, set()).add(key)
        # every command that takes config keys ran in this DAG and received all of them
        for command, (paths, top) in settings.COMMAND_SECTIONS.items():
            if command == "world" and not config["world"]["counts"]:
                continue
            keys = {f.name for p in paths for f, _ in settings.fields(settings.section(p)) if f.metadata.get("flag", True)}
            assert seen.get(command, set()) >= keys | set(top), f"{name}: {command} never received {sorted(keys - seen.get(command, set()))}"


def test_the_perturbed_config_differs_from_the_preset_in_every_flag_key():
    """The check above is only as good as the values differ: a rule passing a constant that happens
    to equal the preset's value is caught only by a config where it does not."""
    smoke = resolve({"preset": "smoke"}, WORKFLOW)
    moved = resolve(perturbed_config(), WORKFLOW)
    for command, (paths, top) in settings.COMMAND_SECTIONS.items():
        for path in paths:
            for real in ([f"train.stages.{s}" for s in smoke["train"]["stages"]] if path.endswith("*") else [path]):
                for f, _ in settings.fields(settings.section(path)):
                    if f.metadata.get("flag", True) and f.name not in FIXED:
                        assert _lookup(smoke, real)[f.name] != _lookup(moved, real)[f.name], f"{real}.{f.name}"
        for key in top:
            assert smoke[key] != moved[key]


@pytest.mark.parametrize("command", sorted(settings.COMMAND_SECTIONS))
def test_every_flag_is_a_config_key_or_context(command):
    """No setting a command accepts is out of config's reach: its flags are the keys of its
    sections plus the named context flags (paths, what the job is)."""
    parser = parser_for(command)
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    paths, top = settings.COMMAND_SECTIONS[command]
    keys = {f.name for p in paths for f, _ in settings.fields(settings.section(p)) if f.metadata.get("flag", True)}
    keys |= set(top)
    assert keys <= dests, f"{command}: keys without a flag: {sorted(keys - dests)}"
    assert dests - keys == CONTEXT[command], f"{command}: flags that are neither keys nor context: {sorted(dests - keys - CONTEXT[command])}"


@pytest.mark.parametrize("command", sorted(settings.COMMAND_SECTIONS))
def test_a_flag_default_is_the_key_default(command):
    parser = parser_for(command)
    defaults = {a.dest: a.default for a in parser._actions}
    paths, top = settings.COMMAND_SECTIONS[command]
    for path in paths:
        for f, _ in settings.fields(settings.section(path)):
            if f.metadata.get("flag", True) and settings._has_default(f):
                assert defaults[f.name] == settings._default(f), f"{command} --{f.name}"


def test_a_flag_checks_the_range_the_config_checks(capsys):
    parser = parser_for("train")
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--latents", "y", "--resolution", "64", "--steps", "1", "--mask-ratio", "1.0"])
    assert "--mask-ratio takes < 1" in capsys.readouterr().err
    with pytest.raises(Exception, match="train.stages.stage1.mask_ratio"):
        resolve({"train": {"stages": {"stage1": {"mask_ratio": 1.0}}}}, WORKFLOW)


def test_defaults_fill_what_a_preset_leaves_out():
    config = resolve({"preset": "smoke"}, WORKFLOW)
    assert config["train"]["weight_decay"] == 0.1 and config["train"]["caption_drop"] == 0.1
    assert config["evaluate"]["dtype"] == "auto"
    # a preset's own value is kept
    assert config["train"]["ema_decay"] == 0.98


def test_a_stage_key_left_out_takes_the_paper_value():
    stages = copy.deepcopy(resolve({"preset": "smoke"}, WORKFLOW)["train"]["stages"])
    del stages["stage1"]["p_std"]
    merged = settings.with_defaults({"train": {"stages": stages}})
    assert merged["train"]["stages"]["stage1"]["p_std"] == 1.2


def test_the_number_of_stages_comes_from_config(tmp_path):
    """Two stages instead of four: the DAG trains and evaluates two."""
    smoke = resolve({"preset": "smoke"}, WORKFLOW)
    two = {k: smoke["train"]["stages"][k] for k in ("stage1", "stage2")}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"root": str(tmp_path / "d"), "results": str(tmp_path / "r"),
                                    "train": {"stages": two}, "evaluate": {"stages": [2]}}))
    # the preset's stages 3-4 merge in unless removed: a user's stages mapping replaces keys only
    config = yaml.safe_load(path.read_text())
    config["train"]["stages"].update({"stage3": None, "stage4": None})
    path.write_text(yaml.safe_dump(config))
    jobs = snakemake_jobs(REPO, path)
    assert sorted(j.wildcards["stage"] for j in jobs if j.rule == "train") == ["1", "2"]
    assert sorted(j.wildcards["tag"] for j in jobs if j.rule == "evaluate") == ["stage0", "stage2"]
    stage0 = next(j for j in jobs if j.rule == "evaluate" and j.wildcards["tag"] == "stage0")
    assert f"--resolution {two['stage2']['resolution']}" in stage0.shellcmd


def test_stages_must_count_up_from_stage1():
    with pytest.raises(Exception, match="stage1 .. stage"):
        resolve({"train": {"stages": {"stage7": {"resolution": 64, "steps": 1}}}}, WORKFLOW)
    with pytest.raises(Exception, match="evaluate.stages"):
        resolve({"evaluate": {"stages": [5]}}, WORKFLOW)


def test_run_defining_keys_are_declared_once():
    from microdit.train import RUN_DEFINING

    assert RUN_DEFINING == settings.run_defining()
    assert {"mask_ratio", "lr", "seed", "weight_decay"} <= set(RUN_DEFINING)
    assert not {"steps", "micro_batch", "compile", "ckpt_every", "sample_prompts"} & set(RUN_DEFINING)


def test_schema_is_generated_from_the_declarations():
    schema = settings.json_schema()
    stage = schema["properties"]["train"]["properties"]["stages"]["additionalProperties"]
    assert stage["properties"]["mask_ratio"] == {"type": "number", "minimum": 0, "exclusiveMaximum": 1,
                                                 "description": "share of patches dropped after the patch-mixer"}
    assert set(stage["required"]) == {"resolution", "steps"}
    assert all(dataclasses.is_dataclass(settings.section(p)) for p in ("train", "train.stages.*", "models.build"))


def test_config_yaml_documents_every_key_as_declared():
    """config.yaml's key reference is generated from the declarations (`microdit keys --write`)."""
    from microdit import keys

    text = (REPO / "config.yaml").read_text()
    assert text[text.index(keys.REFERENCE_MARK):] == keys.reference(keys.smoke_values(WORKFLOW))
    for f, _ in settings.fields(settings.Train):
        assert f"#   {f.name}:" in text or f"#   # {f.name}:" in text
