"""Configuration: a preset supplies every key, the user's config.yaml overrides some of them.

`resolve(user_config, workflow_dir)` merges the chosen preset (`workflow/presets/<name>.yaml`)
with the user's keys, expands `{root}` in strings, and validates the result against
`workflow/schemas/config.schema.yaml`. Every problem is reported as one line naming the key, before
any job starts.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml


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
    raise ConfigError(f"config key '{where}': {err.message}")


def _check_model_paths(config: dict) -> None:
    for role, spec in config["models"]["roles"].items():
        path = spec.get("path")
        if path and not Path(path).is_dir():
            raise ConfigError(
                f"config key 'models.roles.{role}.path': directory '{path}' does not exist "
                "(point it at a local HF-format model directory, or set it to null to use the id)"
            )


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
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


def resolve(user_config: dict, workflow_dir: str | Path) -> dict:
    """Merge preset + user keys, expand `{root}`, validate. Returns a new dict."""
    workflow_dir = Path(workflow_dir)
    preset = user_config.get("preset", "smoke")
    preset_file = workflow_dir / "presets" / f"{preset}.yaml"
    if not isinstance(preset, str) or not preset_file.is_file():
        known = sorted(p.stem for p in (workflow_dir / "presets").glob("*.yaml"))
        raise ConfigError(f"config key 'preset': unknown preset {preset!r} (known: {', '.join(known)})")
    schema = yaml.safe_load((workflow_dir / "schemas" / "config.schema.yaml").read_text())
    merged = _yaml11_fixes(deep_merge(load_yaml(preset_file), user_config), schema, schema)
    merged["preset"] = preset
    # `sources` is replaced whole only where the user names a source; a source set to null is removed
    merged["sources"] = {k: v for k, v in merged.get("sources", {}).items() if v is not None}
    validate(merged, schema)
    merged = _expand(merged, {"root": str(merged["root"]), "results": str(merged["results"])})
    _check_model_paths(merged)
    return merged


def training_sources(config: dict) -> list[str]:
    return [name for name, s in config["sources"].items() if s["role"] == "train"]


def eval_sources(config: dict) -> list[str]:
    return [name for name, s in config["sources"].items() if s["role"] == "eval"]
