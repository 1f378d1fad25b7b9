"""Faults as the user meets them: bad config through a real `snakemake -n`, and a real `microdit train`
process killed (-9), preempted (SIGTERM) or diverging (NaN), then rerun.

Training reuses test_train's tiny latents and 8-step MicroDiT_Smoke_2 stage (`data`, `straight`): the
rerun must reproduce the uninterrupted run bitwise.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_faults_workflow import _snakemake
from test_train import STEPS, argv_for, assert_same_weights, data, losses, straight, train  # noqa: F401 (fixtures)

from microdit.checkpoint import checkpoints, read_checkpoint
from microdit.train import EXIT_RESUMABLE

torch.set_num_threads(1)


# ---- bad config: one line from snakemake, before any job ---------------------------------------------

def _stage1(key: str, value) -> str:
    return f"train={{stages: {{stage1: {{{key}: {value}}}}}}}"


# (--config entry, or a function of tmp_path giving it; the start of the one `config error:` line)
BAD_CONFIG = {
    "unknown key": (_stage1("stpes", 3), "unknown config key 'train.stages.stage1.stpes' (allowed here: ema, "),
    "wrong type": (_stage1("steps", "three"), "config key 'train.stages.stage1.steps': 'three' is not of type "
                   "'integer'; set it to an integer >= 1"),
    "mask_ratio 1.5": (_stage1("mask_ratio", 1.5), "config key 'train.stages.stage1.mask_ratio': 1.5 is greater "
                       "than or equal to the maximum of 1; set it to a number >= 0 and < 1"),
    "lr negative": (_stage1("lr", -1e-4), "config key 'train.stages.stage1.lr': -0.0001 is less than or equal to "
                    "the minimum of 0; set it to a number > 0"),
    "lr 0": (_stage1("lr", 0), "config key 'train.stages.stage1.lr': 0 is less than or equal to the minimum of 0; "
             "set it to a number > 0"),
    "steps 0": (_stage1("steps", 0), "config key 'train.stages.stage1.steps': 0 is less than the minimum of 1; "
                "set it to an integer >= 1"),
    "guidance < 0": ("evaluate={guidance: -0.5}", "config key 'evaluate.guidance': -0.5 is less than the minimum "
                     "of 0; set it to a number >= 0"),
    "preset typo": ("preset=papr", "config key 'preset': unknown preset 'papr' (known: paper, smoke)"),
    "missing model path": (lambda tmp: f"models={{roles: {{vae: {{path: {tmp / 'no-vae'}}}}}}}",
                           lambda tmp: f"config key 'models.roles.vae.path': directory '{tmp / 'no-vae'}' does not "
                           "exist (point it at a local HF-format model directory, or set it to null to use the id)"),
    "missing source input": (lambda tmp: f"sources={{shapes_real: {{input: {tmp / 'lists' / 'real.parquet'}}}}}",
                             lambda tmp: f"config key 'sources.shapes_real.input': '{tmp / 'lists' / 'real.parquet'}'"
                             " does not exist (point it at the URL list, links file or directory of the source, "
                             "or at a URL)"),
}


@pytest.mark.parametrize("case", BAD_CONFIG)
def test_bad_config_is_one_line_from_snakemake(tmp_path, case):
    entry, message = (v(tmp_path) if callable(v) else v for v in BAD_CONFIG[case])
    r = _snakemake(tmp_path, "-n", "--config", entry)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if "config error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"config error: {message}"), out[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], [".snakemake"])  # no job, no output


def test_a_local_source_input_under_root_is_left_to_its_job(tmp_path):
    """The world rule writes the smoke URL lists under root, and the paper preset's SA-1B links file is
    expected there too: neither exists before the run, and `snakemake -n` plans it."""
    r = _snakemake(tmp_path, "-n", "--config", "sources={shapes_real: {input: data/lists/mine.parquet}}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


# ---- a real trainer killed, preempted, rerun -----------------------------------------------------------

# `microdit train` with a fault at one point: SIGKILL (no handler runs, nothing is flushed) or SIGTERM,
# sent by the process to itself so that the point is exact
FAULTY_TRAINER = """
import io, os, signal, sys
import torch
torch.set_num_threads(1)
import microdit.edm, microdit.training.loop
from microdit.cli import main

fault, where, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
send = lambda: os.kill(os.getpid(), getattr(signal, fault))

if where == "loss":  # at the `at`-th loss evaluation (2 per step here), before the step is applied
    real_loss, calls = microdit.edm.edm_loss, []
    def edm_loss(*a, **k):
        calls.append(1)
        if len(calls) == at:
            send()
        return real_loss(*a, **k)
    microdit.edm.edm_loss = edm_loss
elif where == "after-checkpoint":  # once checkpoint step-`at` is in place, before anything else
    real_save = microdit.training.loop.save_checkpoint
    def save_checkpoint(out, step, *a, **k):
        saved = real_save(out, step, *a, **k)
        if step == at:
            send()
        return saved
    microdit.training.loop.save_checkpoint = save_checkpoint
elif where == "mid-checkpoint":  # half of step-`at`'s train_state.pt on disk, the weights written
    real_torch_save = torch.save
    def save(obj, path, *a, **k):
        if f"step-{at:06d}" in str(path):
            buffer = io.BytesIO()
            real_torch_save(obj, buffer)
            with open(path, "wb") as f:
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            send()
        return real_torch_save(obj, path, *a, **k)
    torch.save = save
sys.exit(main(["train", *sys.argv[4:]]))
"""


def faulty_train(tmp_path: Path, out: Path, data, fault: str, where: str, at: int) -> subprocess.CompletedProcess:
    script = tmp_path / "faulty_trainer.py"
    script.write_text(textwrap.dedent(FAULTY_TRAINER))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), fault, where, str(at), *argv_for(out, data)],
                          env=env, capture_output=True, text=True, timeout=300)


# 8 steps, a checkpoint every 2, 2 loss evaluations a step. (fault, where, at): what is on disk after it
FAULTS = {
    "kill before the first checkpoint": (("SIGKILL", "loss", 3), [], [1]),  # in step 2
    "kill between checkpoints": (("SIGKILL", "loss", 7), [2], [1, 2, 3]),  # in step 4
    "kill right after a checkpoint": (("SIGKILL", "after-checkpoint", 4), [2, 4], [1, 2, 3, 4]),
    "kill while writing a checkpoint": (("SIGKILL", "mid-checkpoint", 4), [2], [1, 2, 3, 4]),
    "SIGTERM between checkpoints": (("SIGTERM", "loss", 5), [2, 3], [1, 2, 3]),  # in step 3: it finishes it
}


@pytest.mark.parametrize("case", FAULTS)
def test_a_killed_or_preempted_trainer_resumes_to_the_uninterrupted_weights(straight, data, tmp_path, case):
    (fault, where, at), saved, logged = FAULTS[case]
    out = tmp_path / "stage1"
    r = faulty_train(tmp_path, out, data, fault, where, at)
    if fault == "SIGKILL":
        assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    else:  # Slurm's preemption: checkpoint at the signal, exit "resumable" so the job is requeued
        assert r.returncode == EXIT_RESUMABLE and "Traceback" not in r.stderr, r.stderr[-3000:]
        said = r.stdout.strip().splitlines()[-1]
        assert said == (f"stopped at step 3/{STEPS} (SIGTERM); checkpoint {out / 'ckpt' / 'step-000003'}; "
                        "rerun the same command to resume")
    assert [s for s, _ in checkpoints(out)] == saved
    assert [s for s, _ in losses(out)] == logged
    assert not (out / "final").exists() and not (out / "summary.json").exists()

    assert train(out, data) == 0  # the rerun, as Snakemake or Slurm's requeue starts it
    assert [s for s, _ in losses(out)] == list(range(1, STEPS + 1))  # each step logged once
    assert losses(out) == losses(straight)
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_weights(out / "final" / name, straight / "final" / name)
    assert [s for s, _ in checkpoints(out)] == [6, 8]
    assert not list((out / "ckpt").glob(".*.tmp")), "a half-written checkpoint was left behind"


def test_a_diverging_trainer_stops_with_one_line_and_keeps_the_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "stage1"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = argv_for(out, data, "--lr", "1e30", "--warmup", "0", "--grad-clip", "0", "--ckpt-every", "1")
    r = subprocess.run([sys.executable, "-m", "microdit.cli", "train", *flags], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last_good = out / "ckpt" / "step-000001"
    assert r.stderr.strip().splitlines()[-1] == (
        f"microdit train: error: stage 1 step 2: loss is nan; the step was not applied and nothing was saved "
        f"(last good checkpoint: {last_good}); lower --lr or --grad-clip, or check the data")
    assert checkpoints(out) == [(1, last_good)] and [s for s, _ in losses(out)] == [1]
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    kept = read_checkpoint(last_good, ema=True)  # whole and finite: a rerun with a sane lr can start from it
    assert kept.train_state["step"] == 1
    assert all(torch.isfinite(t).all() for t in (*kept.state.values(), *kept.ema_state.values()))
