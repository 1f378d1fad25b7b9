"""The conda envs in envs/ (`snakemake --sdm conda`) against pyproject.toml and the rules that use them.

No conda here: the workflow is parsed through the Snakemake API with conda deployment switched on,
which is all it takes to see each rule's env and how the rules start microdit under conda.
"""
import ast
import json
import os
import subprocess
import sys
import tomllib
import venv
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from microdit.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
ENVS = REPO / "envs"

# pyproject dependencies that no rule needs: they run the workflow, not its jobs
DRIVER_ONLY = {
    "snakemake": "runs the DAG (the `dag` rule calls it with the driver's Python)",
    "snakemake-executor-plugin-slurm": "submits the jobs to Slurm",
    "dvc": "`dvc repro`, caches and remotes",
    "pyyaml": "reads config.yaml and the presets, in the Snakefile",
    "jsonschema": "validates the merged config, in the Snakefile",
}

# Parses the workflow twice (plain and with conda deployment) and writes what the tests check. In a
# subprocess: the Snakefile changes sys.path and PATH. `_workflow` is the parsed Workflow (Snakemake 9
# has no public accessor for a rule's conda env).
LOAD_WORKFLOW = r"""
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import (ConfigSettings, DeploymentMethod, DeploymentSettings, OutputSettings,
                                      ResourceSettings)

snakefile, workdir, out = map(Path, sys.argv[1:4])
result = {}
for mode, methods in (("plain", frozenset()), ("conda", frozenset({DeploymentMethod.CONDA}))):
    with SnakemakeApi(OutputSettings()) as api:
        wf = api.workflow(resource_settings=ResourceSettings(cores=1), config_settings=ConfigSettings(),
                          deployment_settings=DeploymentSettings(deployment_method=methods),
                          snakefile=snakefile, workdir=workdir)._workflow
        rules = {}
        for rule in wf.rules:
            conda = rule.basedir.join(rule.conda_env).get_path_or_uri(secret_free=True) if rule.conda_env else None
            is_run = not rule.norun and not (rule.shellcmd or rule.script or rule.notebook or rule.wrapper)
            rules[rule.name] = {"conda": conda, "shell": rule.shellcmd, "run": is_run}
        g = wf.globals
        launch = {"plain": g["launcher"]("train")}
        g["config"]["resources"]["train"]["gpu"] = 2
        launch["torchrun"] = g["launcher"]("train")
        g["config"]["resources"]["train"]["nodes"] = 2
        launch["srun"] = g["launcher"]("train")
        result[mode] = {"rules": rules, "microdit": g["MICRODIT"], "launch": launch}
out.write_text(json.dumps(result))
"""


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("envs")
    out = tmp / "workflow.json"
    r = subprocess.run([sys.executable, "-c", LOAD_WORKFLOW, str(REPO / "Snakefile"), str(tmp), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return json.loads(out.read_text())


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pyproject_requirements() -> dict[str, Requirement]:
    reqs = [Requirement(line) for line in pyproject()["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def env_files() -> list[Path]:
    return sorted(ENVS.glob("*.yaml"))


def env_spec(path: Path) -> tuple[list[str], list[Requirement]]:
    """(conda packages, pip requirements) of an env file."""
    deps = yaml.safe_load(path.read_text())["dependencies"]
    conda = [d for d in deps if isinstance(d, str)]
    pip = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, f"{path.name}: expected one pip section"
    return conda, [Requirement(line) for line in pip[0]]


def env_names(path: Path) -> set[str]:
    return {canonicalize_name(r.name) for r in env_spec(path)[1]}


def microdit_command(shell: str | None) -> str | None:
    """The microdit subcommand a rule's shell command runs, or None."""
    for start in ("{MICRODIT} ", "{params.launch} "):
        if shell and shell.startswith(start):
            return shell[len(start):].split()[0]
    return None


def test_envs_exist():
    assert {p.stem for p in env_files()} == {"data", "encode", "train", "evaluate", "report"}


@pytest.mark.parametrize("path", env_files(), ids=lambda p: p.name)
def test_env_pins_python_and_pip(path):
    conda, _ = env_spec(path)
    pythons = [c for c in conda if c.startswith("python")]
    assert len(pythons) == 1 and "pip" in conda, f"{path.name}: conda section must hold python=X.Y and pip"
    version = pythons[0].split("=", 1)[1]
    assert Version(version) in SpecifierSet(pyproject()["requires-python"]) and Version(version) == Version("3.11")


@pytest.mark.parametrize("path", env_files(), ids=lambda p: p.name)
def test_env_requirements_are_pyproject_ones(path):
    declared = pyproject_requirements()
    _, reqs = env_spec(path)
    assert len({canonicalize_name(r.name) for r in reqs}) == len(reqs), f"{path.name}: a package is listed twice"
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in declared, f"{path.name}: {req} is not a dependency in pyproject.toml"
        want = declared[name]
        assert (req.specifier, req.extras, req.marker) == (want.specifier, want.extras, want.marker), \
            f"{path.name}: {req} differs from pyproject's {want}"


def test_every_pyproject_dependency_is_in_an_env_or_driver_only():
    in_envs = set().union(*(env_names(p) for p in env_files()))
    declared = set(pyproject_requirements())
    assert not (in_envs & set(DRIVER_ONLY)), "a driver-only package is in a rule env"
    assert declared - in_envs == set(DRIVER_ONLY)


def test_every_microdit_rule_has_an_existing_env(workflow):
    rules = workflow["conda"]["rules"]
    used = set()
    for name, rule in rules.items():
        command = microdit_command(rule["shell"])
        if rule["run"]:
            # a run: block executes in Snakemake's own process; a conda env there would be ignored
            assert rule["conda"] is None, f"run: rule {name} has a conda env Snakemake would ignore"
        elif command is not None:
            assert command in COMMANDS, f"rule {name} runs an unknown command {command!r}"
            assert rule["conda"], f"rule {name} runs `microdit {command}` without a conda: directive"
            env = Path(rule["conda"]).resolve()
            assert env.is_file() and env.parent == ENVS.resolve(), f"rule {name}: {rule['conda']} is not in envs/"
            used.add(env.name)
        elif rule["shell"] is not None:
            assert "microdit" not in rule["shell"], f"rule {name} starts microdit without MICRODIT/launcher"
    assert {"world", "download", "mds", "caption", "latents", "train", "evaluate", "cost", "report"} <= {
        n for n, r in rules.items() if r["conda"]}
    assert used == {p.name for p in env_files()}, "an env file no rule uses"


def third_party_imports(module: str) -> set[str]:
    """Top-level non-stdlib modules imported anywhere (function bodies too) by `module` and the
    microdit modules it reaches: what the command can import at run time."""
    seen, todo, found = set(), [module, "microdit.cli"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = REPO / Path(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        if not path.is_file():
            continue  # `from microdit.x import function`: the name is not a module
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top == "microdit":
                    parts = target.split(".")
                    todo += [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
                elif top and top not in sys.stdlib_module_names and top != "__future__":
                    found.add(top)
    return found


def test_each_env_provides_what_its_commands_import(workflow):
    dists = packages_distributions()
    checked = 0
    for name, rule in workflow["conda"]["rules"].items():
        command = microdit_command(rule["shell"])
        if command is None or rule["run"]:
            continue
        env = Path(rule["conda"])
        have = env_names(env)
        for module in sorted(third_party_imports(COMMANDS[command][0])):
            assert module in dists, f"`microdit {command}` imports {module}, which is not installed"
            assert {canonicalize_name(d) for d in dists[module]} & have, \
                f"rule {name} (`microdit {command}`) imports {module}; {env.name} does not install it"
        checked += 1
    assert checked >= 9


def test_third_party_imports_follow_the_package():
    # the walk goes through microdit modules and function-level imports
    assert {"torch", "transformers"} <= third_party_imports("microdit.data.caption")
    assert "cleanfid" in third_party_imports("microdit.evaluate")  # via microdit.metrics.fid
    assert third_party_imports("microdit.data.funnel") == set()


def test_plain_runs_call_the_installed_microdit(workflow):
    plain = workflow["plain"]
    assert plain["microdit"] == "microdit" and plain["launch"]["plain"] == "microdit"
    assert plain["launch"]["torchrun"].startswith("torchrun ") and plain["launch"]["srun"].startswith("srun ")


def test_conda_runs_take_microdit_from_the_checkout(workflow):
    conda = workflow["conda"]
    prefix = f"PYTHONPATH={REPO} "
    assert conda["microdit"] == prefix + "python -m microdit.cli"
    assert conda["launch"]["plain"] == conda["microdit"]
    assert conda["launch"]["torchrun"].startswith(prefix + "torchrun ") and "-m microdit.cli" in conda["launch"]["torchrun"]
    assert conda["launch"]["srun"].startswith(prefix + "srun ") and "-m microdit.cli" in conda["launch"]["srun"]


def test_conda_command_runs_in_an_env_without_microdit(workflow, tmp_path):
    """What a conda job does: another Python first on PATH, no microdit installed in it, PYTHONPATH
    cleared by Snakemake, the job's working directory elsewhere."""
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)  # stands in for the conda env: its own Python, no microdit
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ["PATH"] = os.pathsep.join([str(bin_dir), environ.get("PATH", "")])
    work = tmp_path / "work"
    work.mkdir()

    def shell(cmd):
        return subprocess.run(["bash", "-c", cmd], cwd=work, env=environ, capture_output=True, text=True, timeout=60)

    assert shell("python -c 'import microdit'").returncode != 0  # the env really lacks the package
    r = shell(workflow["conda"]["microdit"] + " --help")
    assert r.returncode == 0, r.stderr
    assert "usage: microdit COMMAND" in r.stdout and "evaluate" in r.stdout
