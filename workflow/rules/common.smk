# Helpers shared by the rule files: which sources exist, where their files live, resources.
# Rules pass config sections to their commands with SETTINGS.flags (one flag per key, same name).
from microdit import settings as SETTINGS
from microdit.config import stage_numbers as _stage_numbers

SOURCES = sorted(config["sources"])
TRAIN_SOURCES = [s for s in SOURCES if config["sources"][s]["role"] == "train"]
EVAL_SOURCES = [s for s in SOURCES if config["sources"][s]["role"] == "eval"]
# sources with their own download (others reuse one with `raw_from`)
DOWNLOADED = [s for s in SOURCES if "raw_from" not in config["sources"][s]]
LLAVA_SOURCES = [s for s in SOURCES if config["sources"][s]["captions"] == "llava"]
MODEL_ROLES = sorted(config["models"]["roles"])
STAGES = _stage_numbers(config)  # train.stages: stage1 .. stageN
FINAL_STAGE = STAGES[-1]
IS_SMOKE_WORLD = config["models"]["source"] == "build" and bool(config["world"]["counts"])

def constraint(wildcard, pattern):
    """A wildcard's pattern, narrowed to one value under `--config only=<wildcard>=<value>` (Snakefile)."""
    import re

    return re.escape(ONLY[wildcard]) if wildcard in ONLY else pattern


wildcard_constraints:
    source=constraint("source", "|".join(SOURCES) or "NO_SOURCE"),
    role="|".join(MODEL_ROLES),


# How a rule starts `microdit`. Normally the console script installed beside the Python that runs
# Snakemake (the Snakefile puts it on PATH). Under `--sdm conda` each rule's shell runs in its env from
# envs/, which holds the third-party packages only: the package comes from this checkout instead, as
# `python -m microdit.cli` with the checkout on PYTHONPATH. Set on the command line because Snakemake
# clears PYTHONPATH from the environment of conda jobs; `python` is the env's (activation puts it first
# on PATH, ahead of the driver's `microdit`). Not a `pip install -e` in the env files: Snakemake copies
# an env file into .snakemake/conda/ before `conda env create`, so a relative path to the checkout would
# resolve from there, not from envs/.
from shlex import quote as _quote
from snakemake.settings.types import DeploymentMethod as _DeploymentMethod

if _DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    CHECKOUT_ON_PYTHONPATH = f"PYTHONPATH={_quote(workflow.basedir)} "
    MICRODIT = f"{CHECKOUT_ON_PYTHONPATH}python -m microdit.cli"
else:
    CHECKOUT_ON_PYTHONPATH = ""
    MICRODIT = "microdit"


def q(value):
    """A config-derived value as one shell word: config strings (paths, ids, prompts) may hold spaces,
    quotes or `$(...)`, and rule shells must pass them on, never run them. Shell templates use `:q`."""
    return _quote(str(value))


def res(group, key):
    return config["resources"][group][key]


def group_resources(group):
    """Snakemake resources for a rule group; `gpu` is what the Slurm executor maps to --gpus.

    With `nodes: K > 1` the job is K Slurm tasks, one per node, each holding `gpu` GPUs
    (slurm/README.md, "Several nodes")."""
    r = config["resources"][group]
    nodes = r.get("nodes", 1)
    if nodes > 1:
        return dict(mem_mb=r["mem_mb"], runtime=r["runtime"], nodes=nodes, tasks=nodes, mpi="srun",
                    slurm_extra=f"--gpus-per-node={r['gpu']} --signal=TERM@300")
    return dict(mem_mb=r["mem_mb"], runtime=r["runtime"], gpu=r["gpu"])


def launcher(group):
    """How a rule group's command starts: plain, torchrun on one node, or srun + torchrun on K nodes."""
    gpus, nodes = res(group, "gpu"), config["resources"][group].get("nodes", 1)
    if nodes > 1:
        first_node = '$(scontrol show hostnames "$(squeue -h -j $SLURM_JOB_ID -o %N)" | head -n1)'
        return (f"{CHECKOUT_ON_PYTHONPATH}srun --nodes {nodes} --ntasks-per-node 1 --cpus-per-task {res(group, 'threads')}"
                f" --kill-on-bad-exit=1 torchrun --nnodes {nodes} --nproc_per_node {gpus}"
                f" --rdzv_backend c10d --rdzv_id $SLURM_JOB_ID --rdzv_endpoint {first_node}:29500"
                " -m microdit.cli")
    if gpus > 1:
        return f"{CHECKOUT_ON_PYTHONPATH}torchrun --standalone --nproc_per_node {gpus} -m microdit.cli"
    return MICRODIT


def model_info(role):
    return f"{ROOT}/models/{role}/MODEL_INFO.json"


def raw_dir(source):
    return f"{ROOT}/raw/{config['sources'][source].get('raw_from', source)}"


def source_min_size(source):
    """A source's own `min_size`, where it sets one, over `mds.min_size`."""
    own = config["sources"][source].get("min_size")
    return {} if own is None else {"min_size": own}


def world_input(source):
    """A smoke source's URL list comes from the world rule; paper inputs are URLs or user files."""
    path = config["sources"][source]["input"]
    return [path] if path.startswith(f"{ROOT}/world/") else []


def cli_options(options):
    """Turn a source's `options` mapping into `--opt key=value` flags (quoted for the shell)."""
    return " ".join(f"--opt {q(f'{k}={v}')}" for k, v in sorted(options.items()))


def data_targets():
    targets = [f"{ROOT}/latents/{s}/_summary.json" for s in TRAIN_SOURCES]
    targets += [f"{ROOT}/mds/{s}/_summary.json" for s in EVAL_SOURCES]
    targets.append(f"{RESULTS}/data/funnel.json")
    return targets
