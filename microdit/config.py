"""Configuration: a preset supplies every key, the user's config.yaml overrides some of them.

`resolve(user_config, workflow_dir)` merges the chosen preset (`workflow/presets/<name>.yaml`)
with the user's keys, fills in the defaults of keys neither sets, expands `{root}` in strings, and
validates the result against the schema `microdit.settings` declares. Every problem is reported as
one line naming the key, before any job starts.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from microdit import settings


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or points at something that does not exist."""


def deep_merge(base: dict, override: dict) -> dict:
    """Return `base` updated recursively with `override` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _expand(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):
        for name, sub in variables.items():
            value = value.replace("{" + name + "}", sub)
        return value
    if isinstance(value, dict):
        return {k: _expand(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, variables) for v in value]
    return value


def _key_path(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def validate(config: dict, schema: dict) -> None:
    """Raise ConfigError with a one-line message for the first schema violation (most specific)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.path), list(map(str, e.path))))
    if not errors:
        return
    err = jsonschema.exceptions.best_match(errors)
    where = _key_path(err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        name = f"{where}.{extra[0]}" if err.absolute_path else extra[0]
        raise ConfigError(f"unknown config key '{name}' (allowed here: {', '.join(allowed)})")
    if err.validator == "required":
        raise ConfigError(f"config key '{where}': {err.message}")
    wanted = _wanted(err.schema) if err.validator in _VALUE_CHECKS else None
    raise ConfigError(f"config key '{where}': {err.message}" + (f"; set it to {wanted}" if wanted else ""))


# checks of a value's own type and range: the message then says what the key takes
_VALUE_CHECKS = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_BOUNDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))


def _wanted(schema: dict) -> str | None:
    """What a key with this (leaf) schema takes, in words: 'a number > 0 and < 1', 'an integer >= 1'."""
    types = schema.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    kinds = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
             "array": "a list", "object": "a mapping", "null": "null"}
    if not types or any(t not in kinds for t in types):
        return None
    words = " or ".join(kinds[t] for t in types)
    bounds = [f"{op} {schema[key]}" for key, op in _BOUNDS if key in schema]
    if bounds:
        words += " " + " and ".join(bounds)
    if "multipleOf" in schema:
        words += f" (a multiple of {schema['multipleOf']})"
    return words


def _check_model_paths(config: dict) -> None:
    for role, spec in config["models"]["roles"].items():
        path = spec.get("path")
        if path and not Path(path).is_dir():
            raise ConfigError(
                f"config key 'models.roles.{role}.path': directory '{path}' does not exist "
                "(point it at a local HF-format model directory, or set it to null to use the id)"
            )


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _check_source_inputs(config: dict) -> None:
    """A source's local input (URL list, links file, archive directory) must exist before any job,
    or the typo shows only when its download job runs, after the models are fetched. Files under
    `root` are left to the jobs: the world rule writes the smoke lists there, and the paper preset
    expects the user's SA-1B links file there by the time the download runs."""
    root = os.path.abspath(config["root"])
    for name, spec in sorted(config["sources"].items()):
        if "raw_from" in spec:  # reuses another source's download: its own input is never read
            continue
        text = spec["input"]
        if _URL.match(text) and not text.startswith("file://"):
            continue
        path = Path(os.path.abspath(text.removeprefix("file://")))
        if path.exists() or path.is_relative_to(root):
            continue
        raise ConfigError(f"config key 'sources.{name}.input': '{text}' does not exist (point it at the URL "
                          "list, links file or directory of the source, or at a URL)")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line, led by where the problem is."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: {e.problem or 'syntax error'}"
    context = getattr(e, "context_mark", None)
    if getattr(e, "context", None) and context is not None and context.line != mark.line:
        where += f" ({e.context} that starts on line {context.line + 1})"
    return where


def _check_sources(config: dict) -> None:
    """What the schema cannot say about sources, found here rather than as a failed job later."""
    sources = config["sources"]
    for name, spec in sorted(sources.items()):
        if "raw_from" in spec and spec["raw_from"] not in sources:
            raise ConfigError(f"config key 'sources.{name}.raw_from': {spec['raw_from']!r} is not a source "
                              f"(sources: {', '.join(sorted(sources))})")
    for role, needed_by in (("train", "training"), ("eval", "evaluation")):
        if not any(spec["role"] == role for spec in sources.values()):
            raise ConfigError(f"config key 'sources': no source has role '{role}', which {needed_by} needs "
                              "(was it set to null? keep or add one)")
    for name in sorted(config["train"]["stages"]):  # the training loader needs data in every stage
        stage = int(name.removeprefix("stage"))  # a source without `stages` is used in all of them
        if not any(spec["role"] == "train" and spec["weight"] > 0 and stage in spec.get("stages", [stage])
                   for spec in sources.values()):
            raise ConfigError(f"config key 'sources': no training source with weight > 0 is used in {name} "
                              "(see sources.<name>.weight and .stages)")


def stage_numbers(config: dict) -> list[int]:
    """The training stages, in order (`train.stages` keys stage1..stageN)."""
    return sorted(int(name.removeprefix("stage")) for name in config["train"]["stages"])


def released_checkpoints(config: dict) -> list[dict]:
    """`evaluate.released` as full entries: tag (released-<name>), path (the file to load; a released
    name's is <root>/models/released/<name>.pt, which its evaluation fetches when missing), name (the
    released name, or None), model, resolution, pos_interp_scale."""
    from microdit import paper

    out = []
    for entry in config["evaluate"]["released"]:
        spec = {**paper.RELEASED_ARCHITECTURE, **({"path": entry} if isinstance(entry, str) else entry)}
        name = spec["path"] if spec["path"] in paper.RELEASED_FILES else None
        path = f"{config['root']}/models/released/{name}.pt" if name else spec["path"]
        out.append({**spec, "tag": settings.released_tag(name or Path(path).stem), "path": path, "name": name})
    return out


def _check_eval_inputs(config: dict) -> None:
    tags = set()
    for i, spec in enumerate(released_checkpoints(config)):
        if spec["name"] is None and not Path(spec["path"]).is_file():
            raise ConfigError(f"config key 'evaluate.released.{i}': '{spec['path']}' is neither a released checkpoint "
                              "name nor an existing file")
        if spec["tag"] in tags:
            raise ConfigError(f"config key 'evaluate.released.{i}': a second checkpoint named {spec['tag']!r}")
        tags.add(spec["tag"])
    listed = config["evaluate"]["captions_file"]
    if listed and not Path(listed).is_file():
        raise ConfigError(f"config key 'evaluate.captions_file': '{listed}' does not exist (a caption list, one per "
                          "line or JSON lines with a 'caption'; null draws the captions from the split)")


def _check_stages(config: dict) -> None:
    """Stages are trained in order, each from the previous one: their names count up from stage1."""
    have = stage_numbers(config)
    if have != list(range(1, len(have) + 1)):
        raise ConfigError(f"config key 'train.stages': stages must be stage1 .. stage{len(have)} without gaps, got "
                          + ", ".join(f"stage{n}" for n in have))
    if config["train"]["stages"]["stage1"]["init_optimizer"]:
        raise ConfigError("config key 'train.stages.stage1.init_optimizer': stage1 has no previous stage to take "
                          "the optimizer state from; set it to false")
    for where, wanted in [("evaluate.stages", config["evaluate"]["stages"])] + [
            (f"sources.{name}.stages", spec["stages"]) for name, spec in sorted(config["sources"].items())
            if "stages" in spec]:
        unknown = sorted(set(wanted) - set(have))
        if unknown:
            raise ConfigError(f"config key '{where}': stage {unknown[0]} is not trained (train.stages has "
                              f"stage1 .. stage{len(have)})")


def _check_stage_resolutions(config: dict) -> None:
    """Training reads latents precomputed at its stage's resolution: one missing would fail the stage."""
    have = config["latents"]["resolutions"]
    for name, stage in sorted(config["train"]["stages"].items()):
        if stage["resolution"] not in have:
            raise ConfigError(f"config key 'train.stages.{name}.resolution': {stage['resolution']} is not in "
                              f"'latents.resolutions' {have} (add it there, or use one of those)")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    return data


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _subschema(schema: dict, root: dict, key: Any) -> dict:
    """The schema of `key` inside an object/array schema (following local $refs)."""
    while "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    if isinstance(key, int):
        return schema.get("items", {})
    found = schema.get("properties", {}).get(key, schema.get("additionalProperties", {}))
    return found if isinstance(found, dict) else {}


def _wants_number(schema: dict, root: dict) -> bool:
    while "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    return "number" in types and "string" not in types


def _yaml11_fixes(value: Any, schema: dict, root: dict) -> Any:
    """Undo what YAML 1.1 readers (PyYAML, hence Snakemake) make of values a YAML 1.2 writer leaves
    plain, as DVC does when `dvc exp run -S` rewrites params.yaml: `1e-4` is read as a string and an
    unquoted `no` as false. Where the schema wants a number, scientific notation becomes a float
    again; where it wants one of some strings that include "no" (img2dataset's resize mode), false
    becomes "no"."""
    if isinstance(value, dict):
        return {k: _yaml11_fixes(v, _subschema(schema, root, k), root) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml11_fixes(v, _subschema(schema, root, i), root) for i, v in enumerate(value)]
    if isinstance(value, str) and _SCIENTIFIC.match(value) and _wants_number(schema, root):
        return float(value)
    if value is False and "no" in schema.get("enum", []):
        return "no"
    return value


def command_line_config(entries: Iterable[str]) -> dict:
    """`--config key=value` entries with each value read as YAML, as config.yaml is.

    Snakemake types a whole top-level value (`seed=3`) but reads a nested one
    (`train={stages: {stage1: {steps: 3}}}`) with YAML's BaseLoader, which leaves every scalar a
    string ('3'); the schema then rejects it. An empty value is null, as Snakemake has it. Entries
    for the same key merge, as in Snakemake; a dotted key (`train.stages.stage1.steps=3`, which
    DVC's `-S` uses and Snakemake's own parser refuses today) is the nested mapping it names."""
    config: dict = {}
    for entry in entries:
        key, _, text = entry.partition("=")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {key}=...: value is not valid YAML: {_yaml_problem(e)}") from None
        for part in reversed(key.split(".")[1:]):
            value = {part: value}
        config = deep_merge(config, {key.split(".")[0]: value})
    return config


def completed(merged: dict) -> dict:
    """A preset merged with the user's keys, without the entries set to null and with every default.

    `sources` and `train.stages` merge entry by entry, so a source or a stage the user sets to null
    is removed (a two-stage run drops the preset's stage3 and stage4)."""
    merged = dict(merged)
    merged["sources"] = {k: v for k, v in merged.get("sources", {}).items() if v is not None}
    stages = merged.get("train", {}).get("stages")
    if isinstance(stages, dict):
        merged["train"] = {**merged["train"], "stages": {k: v for k, v in stages.items() if v is not None}}
    return settings.with_defaults(merged)


def resolve(user_config: dict, workflow_dir: str | Path, command_line: Iterable[str] = ()) -> dict:
    """Merge preset + user keys (+ `--config` entries, typed), expand `{root}`, validate.
    Returns a new dict."""
    workflow_dir = Path(workflow_dir)
    user_config = deep_merge(user_config, command_line_config(command_line))
    preset = user_config.get("preset", settings.Config.preset)
    preset_file = workflow_dir / "presets" / f"{preset}.yaml"
    if not isinstance(preset, str) or not preset_file.is_file():
        known = sorted(p.stem for p in (workflow_dir / "presets").glob("*.yaml"))
        raise ConfigError(f"config key 'preset': unknown preset {preset!r} (known: {', '.join(known)})")
    schema = settings.json_schema()
    merged = _yaml11_fixes(deep_merge(load_yaml(preset_file), user_config), schema, schema)
    merged["preset"] = preset
    merged = completed(merged)
    validate(merged, schema)
    merged = _expand(merged, {"root": str(merged["root"]), "results": str(merged["results"])})
    _check_model_paths(merged)
    _check_sources(merged)
    _check_source_inputs(merged)
    _check_stages(merged)
    _check_eval_inputs(merged)
    _check_stage_resolutions(merged)
    return merged


def training_sources(config: dict) -> list[str]:
    return [name for name, s in config["sources"].items() if s["role"] == "train"]


def eval_sources(config: dict) -> list[str]:
    return [name for name, s in config["sources"].items() if s["role"] == "eval"]
