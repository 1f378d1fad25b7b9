"""The Slurm profile: `snakemake --profile slurm` on a real Slurm cluster on this machine
(tests/slurm_cluster.py: Debian's slurmctld + slurmd + munge, no accounting database).

The cluster tests skip, with the reason, where the daemons cannot start (not root, no apt-get, a real
Slurm configuration already on the machine). What they check:
- a rule with `gpu: 2` is one Slurm task holding both GPUs, and torchrun inside it starts 2 ranks;
- the multi-node recipe of slurm/README.md (srun + torchrun, c10d rendezvous) on two nodes;
- the whole smoke DAG (tiny) runs with every job submitted through Slurm and writes the report;
- preemption: a training job requeued by Slurm mid-stage resumes from its checkpoint within the same
  Snakemake run, and one cancelled mid-stage resumes when Snakemake is rerun.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from slurm_cluster import LocalSlurm, SlurmUnavailable, free_port

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "slurm"
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")
RUN_ID = re.compile(r"SLURM run ID: (\S+)")

# Long enough training stages for the test to interrupt them mid-stage (a checkpoint every 4 steps).
INTERRUPTED_STEPS = 40
# The smoke preset shrunk to seconds per job; one source of each kind (captioned, LLaVA, eval).
TINY = {
    "world": {"counts": {"shapes_real": 16, "shapes_sa": 10, "shapes_synth": 4, "shapes_eval": 8},
              "bad_per_source": 1},
    "sources": {"shapes_synth": None},
    "models": {"build": {"vae_steps": 20, "vae_batch_size": 8}},
    "download": {"samples_per_shard": 10},
    "caption": {"batch_size": 4, "max_new_tokens": 8},
    "train": {
        "micro_batch": 4, "ckpt_every": 4, "keep": 2, "log_every": 1, "sample_prompts": ["a red circle"],
        "stages": {
            "stage1": {"steps": INTERRUPTED_STEPS, "global_batch": 4, "warmup": 0},
            "stage2": {"steps": INTERRUPTED_STEPS, "global_batch": 4, "warmup": 0},
            "stage3": {"steps": 2, "global_batch": 4, "warmup": 0},
            "stage4": {"steps": 2, "global_batch": 4, "warmup": 0},
        },
    },
    "evaluate": {"stages": [], "num_images": 4, "steps": 2, "batch_size": 4, "geneval_per_task": 1,
                 "geneval_images_per_prompt": 1},
}


def slurm_env(partition: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_ACCOUNT", "SLURM_PARTITION")}
    if partition:
        env["SLURM_PARTITION"] = partition
    return env


def snakemake_args(work: Path, *extra: str) -> list[str]:
    """What a user runs, plus test-only speed-ups: squeue status (no accounting database on the test
    cluster), a 2 s first status check, no automatic retries (reruns are explicit here)."""
    return [
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--profile", str(PROFILE),
        "--directory", str(work), "--retries", "0",
        "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
        "--slurm-logdir", str(work / "slurm-logs"), "--slurm-keep-successful-logs", *extra,
    ]


def job_stats(output: str) -> dict[str, int]:
    """The first `Job stats` table Snakemake prints: rule -> job count (without `total`)."""
    lines = output[output.index("Job stats:"):].splitlines()[3:]
    stats = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        stats[parts[0]] = int(parts[1])
    return stats


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalSlurm(tmp_path_factory.mktemp("slurm-cluster"))
    try:
        c.start()
    except SlurmUnavailable as e:
        pytest.skip(f"no local Slurm cluster on this machine: {e}")
    yield c
    c.stop()


# --- the profile itself (no cluster needed) -----------------------------------------------------------

def dry_run_resources(tmp_path: Path, env: dict) -> list[str]:
    # from the repository root, exactly as documented: Snakemake finds ./slurm/config.yaml
    r = subprocess.run([sys.executable, "-m", "snakemake", "--profile", "slurm", "--directory", str(tmp_path),
                        "-n"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "Using profile slurm" in r.stdout + r.stderr
    lines = [line.strip() for line in r.stdout.splitlines() if line.strip().startswith("resources:")]
    assert len(lines) >= 5, r.stdout[-3000:]
    return lines


def test_profile_takes_account_and_partition_from_the_environment(tmp_path):
    env = slurm_env(None)
    env.update(SLURM_ACCOUNT="proj123", SLURM_PARTITION="gpu_a")
    for line in dry_run_resources(tmp_path, env):
        assert "slurm_account=proj123" in line and "slurm_partition=gpu_a" in line, line
        assert "tasks_per_gpu=0" in line and "--signal=TERM@300" in line, line
    # unset: nothing is passed, so sbatch uses the cluster's default account and partition
    for line in dry_run_resources(tmp_path, slurm_env(None)):
        assert "slurm_account" not in line and "slurm_partition" not in line, line


# --- GPU layout -----------------------------------------------------------------------------------------

GPU_SNAKEFILE = """
rule probe:
    output: "ranks.txt"
    threads: {threads}
    resources: gpu=2, mem_mb=500, runtime=5
    shell: "{python} -m torch.distributed.run --standalone --nproc_per_node {{resources.gpu}} probe.py && cat rank-*.txt > {{output}}"
"""
# Each rank writes its own file: ranks sharing one output stream can interleave mid-line.
PROBE = """import os
fields = (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ.get("CUDA_VISIBLE_DEVICES"),
          os.environ.get("SLURM_STEP_NUM_TASKS"), os.environ.get("SLURM_JOB_ID"))
with open(f"rank-{os.environ['RANK']}.txt", "w") as f:
    f.write(" ".join(str(x) for x in fields) + "\\n")
"""


@pytest.mark.slow
def test_gpu_rule_is_one_task_holding_all_its_gpus(cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(GPU_SNAKEFILE.format(threads=min(2, cluster.cpus), python=sys.executable))
    (tmp_path / "probe.py").write_text(PROBE)
    cmd = snakemake_args(tmp_path)
    cmd[cmd.index("-s") + 1] = str(tmp_path / "Snakefile")
    r = subprocess.run(cmd, cwd=tmp_path, env=slurm_env(cluster.partition), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = [line.split() for line in (tmp_path / "ranks.txt").read_text().splitlines() if line.strip()]
    # torchrun started one process per GPU, all inside the single task that holds both GPUs
    assert sorted(row[0] for row in rows) == ["0", "1"] and {row[1] for row in rows} == {"2"}, rows
    assert {row[2] for row in rows} == {"0,1"}, rows
    assert {row[3] for row in rows} == {"1"}, rows
    info = cluster.job_info(rows[0][4])
    assert info["NumTasks"] == "1" and "gpu:2" in info["TresPerJob"], info
    assert info["NumCPUs"] == str(min(2, cluster.cpus)), info


# The multi-node recipe from slurm/README.md: the plugin's `mpi` mode (the rule runs its own srun), one
# torchrun per node meeting at the allocation's first node, the GPUs asked for per node.
MULTI_NODE_SNAKEFILE = """
rule probe:
    output: "ranks.txt"
    threads: 1
    resources: nodes=2, tasks=2, mpi="srun", mem_mb=500, runtime=5, slurm_extra="--gpus-per-node=2 --signal=TERM@300"
    shell:
        "HEAD=$(scontrol show hostnames \\"$(squeue -h -j $SLURM_JOB_ID -o %N)\\" | head -n1); "
        "srun --nodes 2 --ntasks-per-node 1 --cpus-per-task {{threads}} --kill-on-bad-exit=1 "
        "{python} -m torch.distributed.run --nnodes 2 --nproc_per_node 2 --rdzv_backend c10d "
        "--rdzv_id $SLURM_JOB_ID --rdzv_endpoint $HEAD:{port} all_reduce.py && cat rank-*.txt > {{output}}"
"""
ALL_REDUCE = """import os
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
total = torch.ones(1)
dist.all_reduce(total)
fields = (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"], os.environ.get("SLURMD_NODENAME"),
          os.environ.get("CUDA_VISIBLE_DEVICES"), int(total.item()), os.environ.get("SLURM_JOB_ID"))
with open(f"rank-{os.environ['RANK']}.txt", "w") as f:
    f.write(" ".join(str(x) for x in fields) + "\\n")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_multi_node_recipe_runs_one_torchrun_per_node(cluster, tmp_path):
    if cluster.multi_partition is None:
        pytest.skip("this machine has only one host name, so the test cluster has one node")
    (tmp_path / "Snakefile").write_text(MULTI_NODE_SNAKEFILE.format(python=sys.executable, port=free_port()))
    (tmp_path / "all_reduce.py").write_text(ALL_REDUCE)
    cmd = snakemake_args(tmp_path)
    cmd[cmd.index("-s") + 1] = str(tmp_path / "Snakefile")
    r = subprocess.run(cmd, cwd=tmp_path, env=slurm_env(cluster.multi_partition), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = [line.split() for line in (tmp_path / "ranks.txt").read_text().splitlines()]
    assert sorted(int(row[0]) for row in rows) == [0, 1, 2, 3] and {row[1] for row in rows} == {"4"}, rows
    by_node = {}
    for rank, _, local_rank, node, gpus, total, _ in rows:
        by_node.setdefault(node, []).append(local_rank)
        assert gpus == "0,1" and total == "4", rows  # two GPUs on every node; all four ranks reduced
    assert set(by_node) == set(cluster.nodes) and all(sorted(v) == ["0", "1"] for v in by_node.values()), rows
    info = cluster.job_info(rows[0][6])
    assert info["NumNodes"] == "2" and info["NumTasks"] == "2", info


# --- the smoke DAG, with a requeue and a cancellation mid-training ------------------------------------------

def tiny_config(cluster: LocalSlurm) -> dict:
    """TINY, with every rule group's threads and memory capped to what the test node has."""
    preset = yaml.safe_load((REPO / "workflow/presets/smoke.yaml").read_text())
    resources = {
        group: {"threads": min(r["threads"], cluster.cpus), "mem_mb": min(r["mem_mb"], cluster.mem_mb // 2)}
        for group, r in preset["resources"].items()
    }
    return {**TINY, "resources": resources}


def checkpoints(stage_dir: Path) -> list[Path]:
    return sorted(p for p in (stage_dir / "ckpt").glob("step-*") if re.fullmatch(r"step-\d+", p.name))


def interrupt_training(cluster: LocalSlurm, proc: subprocess.Popen, work: Path, stage: int, action: str,
                       timeout: float = 1800) -> dict:
    """Once stage `stage` has a checkpoint and is still training, requeue or cancel its Slurm job."""
    stage_dir = work / "data" / "checkpoints" / f"stage{stage}"
    comment = f"rule_train_wildcards_{stage}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"Snakemake exited ({proc.returncode}) before stage {stage} checkpointed"
        assert not (stage_dir / "summary.json").exists(), (
            f"stage {stage} finished before the test could interrupt it; raise INTERRUPTED_STEPS")
        found = checkpoints(stage_dir)
        running = [j for j in cluster.jobs() if j["comment"] == comment and j["state"] == "RUNNING"] if found else []
        if running:
            job_id = running[0]["id"]
            cmd = ["scontrol", "requeue", job_id] if action == "requeue" else ["scancel", job_id]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            if action == "requeue":
                release_requeued(cluster, job_id)
            return {"job": job_id, "checkpoint": found[-1].name}
        time.sleep(0.2)
    raise AssertionError(f"no running stage {stage} with a checkpoint after {timeout} s")


def release_requeued(cluster: LocalSlurm, job_id: str, timeout: float = 120) -> None:
    """Slurm holds a requeued job for two minutes (its BeginTime); let it start at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job_info(job_id)
        if info["Restarts"] != "0" and info["JobState"] in ("RUNNING", "COMPLETED"):
            return  # already started again
        if info["Restarts"] != "0" and info["JobState"] == "PENDING":
            r = subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            return
        time.sleep(0.5)
    raise AssertionError(f"requeued job {job_id} never went back to PENDING: {cluster.job_info(job_id)}")


@pytest.fixture(scope="module")
def dag_runs(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm-dag")
    (work / "test-config.yaml").write_text(yaml.safe_dump(tiny_config(cluster)))
    cmd = snakemake_args(work, "--configfile", str(work / "test-config.yaml"))
    env = slurm_env(cluster.partition)
    started = time.monotonic()
    with open(work / "first-run.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            requeued = interrupt_training(cluster, proc, work, stage=1, action="requeue")
            cancelled = interrupt_training(cluster, proc, work, stage=2, action="cancel")
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    first = (work / "first-run.log").read_text()
    second = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    return SimpleNamespace(work=work, first=first, first_rc=proc.returncode, second=second.stdout + second.stderr,
                           second_rc=second.returncode, requeued=requeued, cancelled=cancelled,
                           seconds=time.monotonic() - started)


@pytest.mark.slow
def test_smoke_dag_runs_every_job_through_slurm_and_writes_the_report(cluster, dag_runs):
    assert dag_runs.first_rc != 0, "the first run should stop at the cancelled training job"
    assert dag_runs.second_rc == 0, dag_runs.second[-6000:]
    stats = job_stats(dag_runs.first)
    assert {"train", "evaluate", "report"} <= set(stats), stats
    expected = sum(n for rule, n in stats.items() if rule != "all")  # `all` only collects inputs
    submitted = [slurm_id for _, slurm_id in SUBMITTED.findall(dag_runs.first + dag_runs.second)]
    slurm = {j["id"]: j for j in cluster.jobs()}
    assert set(submitted) <= set(slurm), (submitted, slurm)
    ours = [slurm[i] for i in submitted]
    assert {j["name"] for j in ours} == set(RUN_ID.findall(dag_runs.first + dag_runs.second)), ours
    # one completed Slurm job per DAG job, plus the cancelled training attempt
    done = [j for j in ours if j["state"] == "COMPLETED"]
    assert len(done) == expected and len({j["comment"] for j in done}) == expected, (stats, ours)
    assert {j["comment"].split("_wildcards_")[0][len("rule_"):] for j in done} == set(stats) - {"all"}
    assert [j["id"] for j in ours if j["state"] != "COMPLETED"] == [dag_runs.cancelled["job"]], ours
    assert (dag_runs.work / "results/report.html").stat().st_size > 1000
    funnel = json.loads((dag_runs.work / "results/data/funnel.json").read_text())
    assert set(funnel["sources"]) == {"shapes_real", "shapes_sa", "shapes_eval"}
    print(f"smoke DAG through Slurm: {expected} jobs, {dag_runs.seconds:.0f} s")
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                        str(dag_runs.work), "--configfile", str(dag_runs.work / "test-config.yaml"), "-n"],
                       cwd=dag_runs.work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]


def assert_resumed(work: Path, stage: int, checkpoint: str) -> None:
    stage_dir = work / "data" / "checkpoints" / f"stage{stage}"
    log = (work / "data" / "logs" / "train" / f"stage{stage}.log").read_text()
    resumed = re.search(r"resuming \S+ from (step-\d+)", log)
    assert resumed, log[-3000:]
    # it continued from the checkpoint seen before the interruption, or one saved on SIGTERM after it
    assert resumed.group(1) >= checkpoint, (resumed.group(1), checkpoint)
    steps = [json.loads(line)["step"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, INTERRUPTED_STEPS + 1)), steps
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert summary["images_seen"] == INTERRUPTED_STEPS * TINY["train"]["stages"][f"stage{stage}"]["global_batch"]


@pytest.mark.slow
def test_training_requeued_by_slurm_resumes_in_the_same_run(cluster, dag_runs):
    info = cluster.job_info(dag_runs.requeued["job"])
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert_resumed(dag_runs.work, 1, dag_runs.requeued["checkpoint"])


@pytest.mark.slow
def test_training_cancelled_mid_stage_resumes_on_rerun(cluster, dag_runs):
    assert "rule_train_wildcards_2" in {j["comment"] for j in cluster.jobs() if j["id"] == dag_runs.cancelled["job"]}
    assert f"SLURM-job '{dag_runs.cancelled['job']}' failed" in dag_runs.first, dag_runs.first[-4000:]
    assert_resumed(dag_runs.work, 2, dag_runs.cancelled["checkpoint"])
