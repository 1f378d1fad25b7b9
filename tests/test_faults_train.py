"""Faults around `microdit train` and what it writes: two trainers in one directory, an orphaned
trainer, settings A -> B -> A, a full disk, a truncated checkpoint, Ctrl-C, safetensors bytes.

Runs reuse test_train's tiny latents and 8-step MicroDiT_Smoke_2 stage (`data`, `straight`).
"""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_train import STEPS, argv_for, data, fail_at, losses, straight, train  # noqa: F401 (fixtures)

import microdit.io
from microdit.checkpoint import CheckpointError
from microdit.cli import main
from microdit.io import read_json
from microdit.checkpoint import checkpoints
from microdit.checkpoint import LOCK_FILE, SUPERSEDED_DIR
from microdit.train import EXIT_RESUMABLE

torch.set_num_threads(1)


def cli_train(out: Path, data, *extra: str) -> int:
    return main(["train", *argv_for(out, data, *extra)])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


# ---- item 3: one trainer per stage directory ------------------------------------------------------

def test_a_second_trainer_on_the_same_out_is_refused(data, tmp_path, capsys):
    out = tmp_path / "stage1"
    out.mkdir()
    with open(out / LOCK_FILE, "w") as held:  # what a running trainer holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on node7\n")
        held.flush()
        assert cli_train(out, data) == 2
        line = error_line(capsys)
        assert f"{out} is in use: another trainer (pid 4242 on node7) holds {out / LOCK_FILE}" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing read or written

    assert train(out, data, "--steps", "3") == 0  # released: the next trainer runs
    assert (out / LOCK_FILE).read_text() == ""  # an idle directory's lock file is empty


PARENT = """
import subprocess, sys, time
child = subprocess.Popen(sys.argv[2:], stdout=open(sys.argv[1], "w"), stderr=subprocess.STDOUT)
print(child.pid, flush=True)
time.sleep(600)
"""


def running(pid: int) -> bool:
    """True while `pid` runs (a grandchild: once it exits it may linger as a zombie nobody reaps)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_an_orphaned_trainer_stops_and_meanwhile_holds_its_directory(data, tmp_path, capsys):
    """snakemake killed -9 leaves its trainer behind: the trainer owns --out until it stops, and it
    stops (checkpointing) because its parent died."""
    out, log = tmp_path / "stage1", tmp_path / "trainer.log"
    trainer = [sys.executable, "-m", "microdit.cli", "train",
               *argv_for(out, data, "--steps", "100000", "--ckpt-every", "100000")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(log), *trainer], stdout=subprocess.PIPE, text=True,
                              env=env)
    pid = int(parent.stdout.readline())
    try:
        assert wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text(), 120), \
            log.read_text()
        capsys.readouterr()
        assert cli_train(out, data) == 2  # the rerun snakemake's --unlock advice starts
        assert f"another trainer (pid {pid} on " in error_line(capsys)

        parent.kill()
        parent.wait()
        assert wait_for(lambda: not running(pid), 60), "the orphaned trainer kept running"
        assert "received SIGTERM" in log.read_text()
        assert checkpoints(out), "it saved a checkpoint on the way out"
    finally:
        if running(pid):
            os.kill(pid, signal.SIGKILL)
        parent.kill()
    with open(out / LOCK_FILE) as lock:  # and it let go of the directory
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---- item 4: settings A -> B -> A ------------------------------------------------------------------

def test_settings_a_then_b_then_a_resume_a_finished_run(straight, data, tmp_path, capsys):
    import shutil

    out = tmp_path / "stage1"
    shutil.copytree(straight, out)  # run A, finished
    a_state = out / "ckpt" / f"step-{STEPS:06d}" / "train_state.pt"
    a_inode, a_final = a_state.stat().st_ino, (out / "final" / "model.safetensors").read_bytes()
    keep = ("--keep-superseded", "1")

    assert train(out, data, "--lr", "5e-4", *keep) == 0  # B
    assert read_json(out / "summary.json")["lr"] == 5e-4
    capsys.readouterr()

    assert train(out, data, *keep) == 0  # A again: resumed where it finished, nothing retrained
    said = capsys.readouterr().out
    assert "the earlier run with these settings resumes" in said and f"resuming {out} from step-{STEPS:06d}" in said
    assert a_state.stat().st_ino == a_inode  # A's own checkpoint, moved back
    assert losses(out) == losses(straight)  # A's metrics, not B's
    assert read_json(out / "summary.json")["lr"] == pytest.approx(2.4e-4)
    assert (out / "final" / "model.safetensors").read_bytes() == a_final
    [b] = (out / SUPERSEDED_DIR).iterdir()  # B, set aside in turn
    assert read_json(b / "run.json")["fingerprint"]["lr"] == 5e-4 and (b / "final").is_dir()

    assert train(out, data, "--lr", "1e-4", "--steps", "3", *keep) == 0  # C: A aside, B (oldest) dropped
    [a] = (out / SUPERSEDED_DIR).iterdir()
    assert read_json(a / "run.json")["fingerprint"]["lr"] == pytest.approx(2.4e-4)


# ---- item 9: a full disk ---------------------------------------------------------------------------

def fail_writes(monkeypatch, target, name: str, error: Exception, when=lambda *a, **k: True) -> None:
    real = getattr(target, name)

    def write(*a, **k):
        if when(*a, **k):
            raise error
        return real(*a, **k)

    monkeypatch.setattr(target, name, write)


def test_a_full_disk_while_checkpointing_names_the_place_and_keeps_the_checkpoints(straight, data, tmp_path,
                                                                                  monkeypatch, capsys):
    out = tmp_path / "stage1"
    calls = []
    fail_writes(monkeypatch, torch, "save", OSError(errno.ENOSPC, "No space left on device"),
                when=lambda *a, **k: calls.append(1) or len(calls) == 2)  # the step-4 checkpoint
    assert cli_train(out, data) == 2
    assert error_line(capsys) == (f"microdit train: error: no space left on {out / 'ckpt'}; free some space there "
                                  "and rerun (what was finished is kept)")
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step-000002"]  # no half-written step dir
    monkeypatch.undo()
    assert train(out, data) == 0
    assert losses(out) == losses(straight)


def test_a_full_disk_while_writing_the_final_weights(straight, data, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    out = tmp_path / "stage1"
    full = SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
    fail_writes(monkeypatch, safetensors.torch, "save_file", full, when=lambda t, path, **k: ".final.tmp" in path)
    assert cli_train(out, data) == 2
    assert f"no space left on {out};" in error_line(capsys)
    assert not (out / "final").exists() and not (out / ".final.tmp").exists()
    assert [s for s, _ in checkpoints(out)] == [6, 8]
    monkeypatch.undo()
    assert train(out, data) == 0  # from the step-8 checkpoint: nothing to train, final/ written
    assert (out / "final" / "model.safetensors").read_bytes() == (straight / "final" / "model.safetensors").read_bytes()


def test_torch_s_file_write_failed_counts_as_a_full_disk_only_when_it_is(data, tmp_path, monkeypatch, capsys):
    torch_says = RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                              "data/0: file write failed")
    fail_writes(monkeypatch, torch, "save", torch_says)
    monkeypatch.setattr(microdit.io, "free_bytes", lambda path: 4096)
    assert cli_train(tmp_path / "full", data, "--steps", "3") == 2
    assert f"no space left on {tmp_path / 'full' / 'ckpt'};" in error_line(capsys)

    monkeypatch.setattr(microdit.io, "free_bytes", lambda path: 1 << 40)  # space left: another I/O error
    with pytest.raises(RuntimeError, match="file write failed"):
        cli_train(tmp_path / "io", data, "--steps", "3")


def test_a_full_disk_in_the_models_stage_is_one_line(tmp_path, monkeypatch, capsys):
    import microdit.zoo

    fail_writes(monkeypatch, microdit.zoo, "write_json", OSError(errno.ENOSPC, "No space left on device"))
    out = tmp_path / "models"
    assert main(["models", "--out", str(out), "--roles", "detector"]) == 2
    assert error_line(capsys).startswith(f"microdit models: error: no space left on {out};")
    assert list(out.iterdir()) == []  # the staged directory went too


# ---- item 12: a truncated checkpoint, Ctrl-C -------------------------------------------------------

@pytest.mark.parametrize("damaged", ["train_state.pt", "model.safetensors"])
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(straight, data, tmp_path, capsys, damaged):
    out = tmp_path / "stage1"
    assert train(out, data, "--max-steps-this-run", "4") == EXIT_RESUMABLE
    newest = out / "ckpt" / "step-000004" / damaged
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()
    assert train(out, data) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "unreadable" in line]
    assert len(notes) == 1 and f"checkpoint {newest.parent} is unreadable (" in notes[0]
    assert notes[0].endswith("; resuming from the previous one, step-000002")
    assert losses(out) == losses(straight)  # steps 3-4 recomputed, exactly
    assert [s for s, _ in checkpoints(out)] == [6, 8]


def test_every_checkpoint_unreadable_is_one_line(data, tmp_path):
    out = tmp_path / "stage1"
    assert train(out, data, "--max-steps-this-run", "4") == EXIT_RESUMABLE
    for _, directory in checkpoints(out):
        (directory / "train_state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"ckpt: no checkpoint reads back \(newest step-000004: .*\); move"):
        train(out, data)


def test_ctrl_c_saves_a_checkpoint_and_exits_for_a_rerun(straight, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "stage1"
    before = signal.getsignal(signal.SIGINT)
    fail_at(monkeypatch, 5, lambda loss: os.kill(os.getpid(), signal.SIGINT) or loss)  # during step 3
    try:
        assert train(out, data) == EXIT_RESUMABLE
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C stopped the stage without a checkpoint")
    assert "received SIGINT" in capsys.readouterr().err
    assert [s for s, _ in checkpoints(out)] == [2, 3]
    assert signal.getsignal(signal.SIGINT) is before
    monkeypatch.undo()
    assert train(out, data) == 0
    assert losses(out) == losses(straight)


@pytest.mark.parametrize("command, module", [("train", "microdit.train"), ("models", "microdit.zoo")])
def test_cli_turns_a_keyboard_interrupt_into_one_line(data, tmp_path, monkeypatch, capsys, command, module):
    import importlib

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), "run", interrupted)
    argv = argv_for(tmp_path / "out", data) if command == "train" else ["--out", str(tmp_path / "out")]
    try:
        assert main([command, *argv]) == 130
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped as a traceback")
    assert error_line(capsys) == f"microdit {command}: interrupted"


# ---- item 13: safetensors files ---------------------------------------------------------------------

WRITER = """
import os, sys
from pathlib import Path
import torch
from microdit.checkpoint import save_pretrained
from microdit.weights import save_safetensors
from microdit.models import build_model
from microdit.checkpoint import write_model_dir

os.umask(0o002)
out = Path(sys.argv[1])
torch.manual_seed(0)
model = build_model("MicroDiT_Smoke_2", input_size=8, in_channels=4, caption_channels=16)
state = {k: v.detach().clone() for k, v in model.state_dict().items()}
meta = {k: k.upper() for k in ("format", "architecture", "stage", "step", "seed", "origin", "note", "kind")}
for i in range(4):  # safetensors orders metadata anew for every file, not just every process
    save_pretrained(model, out / f"pretrained{i}")
    write_model_dir(out / f"stage{i}", dict(model.config), state, state)
    save_safetensors(state, out / f"many{i}.safetensors", metadata=meta)
"""


def test_identical_weights_give_byte_identical_safetensors_with_the_umask_s_modes(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(WRITER))
    files = {}
    for seed in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, str(script), str(tmp_path / seed)], env=env, check=True, timeout=300)
        files[seed] = sorted((tmp_path / seed).rglob("*.safetensors"))
        assert len(files[seed]) == 4 * 4
    for a, b in zip(*files.values()):
        assert a.relative_to(tmp_path / "1") == b.relative_to(tmp_path / "2")
        assert a.read_bytes() == b.read_bytes(), a.name
        assert stat.S_IMODE(a.stat().st_mode) == 0o664, a  # 0666 & ~umask, as open() gives
    weights = [f.read_bytes() for f in files["1"] if f.name == "model.safetensors"]
    assert len(weights) == 8 and len(set(weights)) == 1  # save_pretrained and a stage's final/ alike
