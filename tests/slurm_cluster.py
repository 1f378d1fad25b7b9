"""A real Slurm cluster on this machine, for the Slurm tests.

Debian's packages (munge, slurmctld, slurmd, slurm-client; installed with apt-get when missing and
we are root) run as children of the test process: munged (unless one already answers), slurmctld
and one slurmd per node. No accounting database (job state comes from `squeue`, and finished jobs
stay visible for a day), no cgroups. Each node is CPU-only but offers two GPU slots without devices
(`Gres=gpu:2`) so that a rule's `gpu` resource can be scheduled and checked.

Nodes: partition `local` is one node named after the machine. Where the machine's name and
`localhost` are two different names that resolve, a second node `localhost` (a second slurmd on its
own port, which Debian's build allows) joins it in partition `multi`, for multi-node jobs; the tests
run one job at a time on it, so the doubled CPU count is never used at once.

The configuration is written to Slurm's compiled-in path (/etc/slurm/slurm.conf) because the
executor plugin clears every SLURM_* variable, SLURM_CONF included, before the `srun` inside each
job, so a private path would be invisible there. A file we did not write is never touched, and ours
is removed on stop.

    with LocalSlurm(tmp_dir) as cluster:    # raises SlurmUnavailable(reason) if it cannot start
        subprocess.run(["sbatch", "-p", cluster.partition, ...])
        cluster.jobs()                       # every job since start: id, state, comment, name
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# written by microdit's tests/slurm_cluster.py; removed when the test cluster stops"
PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["munged", "slurmctld", "slurmd"]
CLIENTS = ["sbatch", "squeue", "sinfo", "srun", "scancel", "scontrol"]
FAKE_GPUS = 2
# Slurm wants a character device per GPU slot; nothing is bound to them (no cgroups)
FAKE_GPU_FILES = "/dev/null,/dev/zero"


class SlurmUnavailable(Exception):
    """This machine cannot run the local cluster; the message says why (the test skips with it)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def ensure_installed() -> None:
    """Install Debian's Slurm and munge packages if their programs are missing."""
    missing = [p for p in DAEMONS + CLIENTS if _which(p) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and not root to install them")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {(r.stdout + r.stderr).strip()[-500:]}")
    still = [p for p in DAEMONS + CLIENTS if _which(p) is None]
    if still:
        raise SlurmUnavailable(f"installed {PACKAGES} but {', '.join(still)} still missing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise SlurmUnavailable("no MemTotal in /proc/meminfo")


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


def _munge_answers() -> bool:
    if _which("munge") is None or _which("unmunge") is None:
        return False
    try:
        token = subprocess.run([_which("munge"), "-n"], capture_output=True, timeout=10)
        check = subprocess.run([_which("unmunge")], input=token.stdout, capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return token.returncode == 0 and check.returncode == 0


class LocalSlurm:
    """Start/stop the cluster; its state, spool and logs live under `workdir`."""

    partition = "local"

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.node = socket.gethostname().split(".")[0]
        self.nodes = [self.node]
        if self.node != "localhost" and _resolves(self.node) and _resolves("localhost"):
            self.nodes.append("localhost")
        # partition spanning two nodes, or None where the machine offers only one name
        self.multi_partition = "multi" if len(self.nodes) > 1 else None
        self.cpus = os.cpu_count() or 1
        # leave the OS some room: a job asking for more than RealMemory is rejected at submit time
        total = _mem_mb()
        self.mem_mb = total - min(2048, total // 4)
        self._procs: dict[str, subprocess.Popen] = {}
        self._wrote_conf = False

    # --- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmctld/slurmd must run as root and the tests are not root")
        ensure_installed()
        if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text():
            raise SlurmUnavailable(f"{SLURM_CONF} belongs to a real Slurm installation; not replacing it")
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i"])
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node])
            self._wait_idle(timeout=60)
            self._check_srun()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if "slurmctld" in self._procs:
            subprocess.run(["scancel", "--user", "root"], capture_output=True, timeout=30)
        # daemons in reverse start order: nodes, controller, then munged if it is ours
        for name in reversed(list(self._procs)):
            proc = self._procs.pop(name)
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._wrote_conf and SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text():
            SLURM_CONF.unlink()
            (SLURM_CONF.parent / "gres.conf").unlink(missing_ok=True)
        self._wrote_conf = False

    # --- queries ---------------------------------------------------------------------------------
    def jobs(self) -> list[dict]:
        """Every job slurmctld still remembers (all states): id, state, comment, name."""
        r = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%T|%k|%j"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"squeue failed: {r.stderr.strip()}")
        rows = []
        for line in r.stdout.splitlines():
            job_id, state, comment, name = line.strip().split("|", 3)
            rows.append({"id": job_id, "state": state, "comment": comment, "name": name})
        return rows

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key -> value (only the simple `Key=Value` fields)."""
        r = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id} failed: {r.stderr.strip()}")
        return dict(tok.split("=", 1) for tok in r.stdout.split() if "=" in tok)

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted((self.workdir / "log").glob("*.log")):
            parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    # --- internals -------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], user: str | None = None) -> None:
        out_path = self.workdir / "log" / f"{name}.out"
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        with open(out_path, "wb") as out:
            self._procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, start_new_session=True)
        time.sleep(0.5)
        if self._procs[name].poll() is not None:
            self._procs.pop(name)
            raise SlurmUnavailable(f"{name} exited at start: {out_path.read_text(errors='replace').strip()[-800:]}")

    def _start_munge(self) -> None:
        """Reuse a munged that answers; otherwise start one as the `munge` user."""
        (self.workdir / "log").mkdir(parents=True, exist_ok=True)
        if _munge_answers():
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run([_which("mungekey"), "--create"], check=True, capture_output=True, timeout=30)
            shutil.chown(key, "munge", "munge")
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        run.chmod(0o755)
        self._spawn("munged", [_which("munged"), "--foreground"], user="munge")
        for _ in range(50):
            if _munge_answers():
                return
            time.sleep(0.2)
        raise SlurmUnavailable("munged started but does not answer `munge -n | unmunge`")

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        w = self.workdir
        lines = [
            MARKER,
            "ClusterName=microdit-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"StateSaveLocation={w}/state",
            f"SlurmdSpoolDir={w}/spool/%n",
            f"SlurmctldPidFile={w}/slurmctld.pid",
            f"SlurmdPidFile={w}/slurmd-%n.pid",
            f"SlurmctldLogFile={w}/log/slurmctld.log",
            f"SlurmdLogFile={w}/log/slurmd-%n.log",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "GresTypes=gpu",
            "ReturnToService=2",
            "MinJobAge=86400",
            "KillWait=10",
            "SchedulerType=sched/backfill",
        ]
        for node in self.nodes:
            lines.append(f"NodeName={node} NodeHostname={self.node} NodeAddr=127.0.0.1 Port={free_port()} "
                         f"CPUs={self.cpus} RealMemory={self.mem_mb} Gres=gpu:{FAKE_GPUS} State=UNKNOWN")
        lines.append(f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP")
        if self.multi_partition:
            lines.append(f"PartitionName={self.multi_partition} Nodes={','.join(self.nodes)} MaxTime=INFINITE State=UP")
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text("\n".join(lines) + "\n")
        (SLURM_CONF.parent / "gres.conf").write_text(
            f"{MARKER}\nNodeName={','.join(self.nodes)} Name=gpu File={FAKE_GPU_FILES}\n")
        self._wrote_conf = True

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: set[str] = set()
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} died while starting:\n{self.log_tail()}")
            r = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %T"],
                               capture_output=True, text=True, timeout=30)
            states = {line.split()[1].rstrip("*~#") for line in r.stdout.splitlines() if line.strip()}
            if r.returncode == 0 and states == {"idle"}:
                return
            if states & {"inval", "drained", "draining"}:  # a config mismatch, not a slow start
                break
            time.sleep(0.5)
        raise SlurmUnavailable(f"nodes not idle (sinfo: {sorted(states)})\n{self.log_tail()}")

    def _check_srun(self) -> None:
        checks = [["srun", "--partition", self.partition, "--time=1", "hostname"]]
        if self.multi_partition:
            checks.append(["srun", "--partition", self.multi_partition, f"--nodes={len(self.nodes)}",
                           "--time=1", "hostname"])
        for cmd in checks:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if r.returncode != 0 or not r.stdout.strip():
                raise SlurmUnavailable(f"`{' '.join(cmd)}` failed: {r.stderr.strip()[-500:]}\n{self.log_tail()}")
