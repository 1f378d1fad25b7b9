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
from microdit.config import ConfigError, resolve

# rules call `microdit`: find the one installed beside the Python that runs Snakemake, even when the
# virtual environment is not activated (`.venv/bin/snakemake --cores all`)
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

configfile: str(Path(workflow.basedir) / "config.yaml")

try:
    _resolved = resolve(dict(config), Path(workflow.basedir) / "workflow")
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
