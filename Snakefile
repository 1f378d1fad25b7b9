# microdit: MicroDiT (Sehwag et al. 2024) end to end as one DAG.
#
#   snakemake --cores all                    smoke preset, CPU, minutes
#   snakemake --cores all --config preset=paper --profile slurm
#
# All logic lives in the `microdit` package; the rules only name inputs, outputs, resources and one
# `microdit <command>` call. config.yaml documents every key.
import os
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)  # so a checkout works before `pip install -e .`
from microdit.config import ConfigError, load_yaml, resolve

# rules call `microdit`: find the one installed beside the Python that runs Snakemake, even when the
# virtual environment is not activated (`.venv/bin/snakemake --cores all`)
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

# Snakemake's message for a YAML error names neither the file nor the line: read the file first. (Files
# given with --configfile are read by Snakemake before this code runs; README, "When things go wrong".)
_CONFIG_YAML = Path(workflow.basedir) / "config.yaml"
if _CONFIG_YAML.is_file():
    try:
        load_yaml(_CONFIG_YAML)
    except ConfigError as e:
        raise WorkflowError(f"config error: {e}") from None

configfile: str(_CONFIG_YAML)

# `--config only=<wildcard>=<value>` (source, stage or tag) narrows that wildcard to one value, so every
# other job's outputs are plain input files here and Snakemake never reruns them, whatever their
# timestamps. dvc.yaml's commands use it: DVC decides what is out of date, each of its stages runs one
# phase (e.g. `only=stage=2` with `--allowed-rules train`: training stage 2 and nothing else).
ONLY = {}
if "only" in config:
    _wildcard, _, _value = str(config.pop("only")).partition("=")
    if _wildcard not in ("source", "stage", "tag") or not _value:
        raise WorkflowError(f"config error: 'only' must be source=<name>, stage=<1-4> or tag=stage<N>, got {_wildcard}={_value}")
    ONLY[_wildcard] = _value

# the `--config` entries again, their values read as YAML: Snakemake leaves nested scalars strings
_COMMAND_LINE = [e for e in workflow.config_settings.config_args or [] if not e.startswith("only=")]
try:
    _resolved = resolve(dict(config), Path(workflow.basedir) / "workflow", command_line=_COMMAND_LINE)
except ConfigError as e:
    raise WorkflowError(f"config error: {e}") from None
config.clear()
config.update(_resolved)

ROOT = config["root"]
RESULTS = config["results"]
PYTHON = sys.executable

include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/caption.smk"
include: "workflow/rules/latents.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        f"{RESULTS}/report.html",


rule data:
    """The data half only: every source up to latents (training) or MDS (evaluation) + the funnel."""
    input:
        data_targets(),
