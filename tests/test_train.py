"""`microdit train`: exact resumption (stop, crash, SIGTERM), NaN guard, checkpoints, stage hand-over.

Every run trains MicroDiT_Smoke_2 for a handful of steps on a tiny latents dataset written in
tmp_path, in this process, with the loss curve logged at every step.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import microdit.edm
from microdit.errors import UserError
from microdit.io import read_json, write_json
from microdit.checkpoint import checkpoints, load_trained
from microdit.train import EXIT_RESUMABLE, add_arguments, run
from microdit.training.log import METRIC_FIELDS
from microdit.training.loop import NonFiniteLossError
from microdit.training.state import EMA, optimizer_groups

torch.set_num_threads(1)

CAPTION = (77, 16)  # 77 tokens, as the text encoder used for the sample grid pads to
STEPS = 8
SUMMARY_KEYS = {"stage", "model", "resolution", "latent_size", "mask_ratio", "steps", "global_batch", "lr", "schedule",
                "p_mean", "p_std", "grad_clip", "ema", "ema_decay", "moe_lr_scale", "wall_s", "images_seen",
                "images_per_s", "final_loss", "device", "gpus", "world_size", "params", "flops_per_image", "mfu"}


def write_source(directory: Path, name: str, n: int, resolutions=(64, 128), seed: int = 0) -> Path:
    """A latents source as `microdit latents` writes it (latents at R/8, float16 bytes)."""
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    columns = {"key": "str", "caption": "str", "caption_latents": "bytes",
               **{f"latents_{r}": "bytes" for r in resolutions}}
    with MDSWriter(out=str(directory), columns=columns, size_limit=1 << 16) as writer:
        for i in range(n):
            row = {"key": f"{name}-{i:04d}", "caption": f"caption {i}",
                   "caption_latents": rng.standard_normal(CAPTION).astype(np.float16).tobytes()}
            for r in resolutions:
                row[f"latents_{r}"] = rng.standard_normal((4, r // 8, r // 8)).astype(np.float16).tobytes()
            writer.write(row)
    write_json(directory / "_summary.json", {
        "input": n, "encoded": n, "failed": {}, "resolutions": list(resolutions),
        "latent_shape": {f"latents_{r}": [4, r // 8, r // 8] for r in resolutions}, "caption_shape": list(CAPTION)})
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    # 20 samples, 4 per step: the 8-step runs cross an epoch boundary.
    return [write_source(root / "A", "A", 14, seed=1), write_source(root / "B", "B", 6, seed=2)]


def argv_for(out: Path, data, *extra: str) -> list[str]:
    base = ["--out", str(out), "--model", "MicroDiT_Smoke_2", "--resolution", "64", "--steps", str(STEPS),
            "--global-batch", "4", "--micro-batch", "2", "--warmup", "2", "--ckpt-every", "2", "--keep", "2",
            "--log-every", "1", "--ema-decay", "0.5", "--no-clean-shm", "--device", "cpu", "--seed", "3"]
    for src in data:
        base += ["--latents", str(src)]
    return base + ["--weights", "A=2.0", *extra]


def args_for(out: Path, data, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv_for(out, data, *extra))


def train(out: Path, data, *extra: str) -> int:
    return run(args_for(out, data, *extra))


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """An uninterrupted stage: the reference every resumed run must reproduce bitwise."""
    out = tmp_path_factory.mktemp("straight") / "stage1"
    assert train(out, data) == 0
    return out


def fail_at(monkeypatch, call: int, action) -> None:
    """Make the `call`-th loss evaluation (1-based, 2 per step here) run `action(loss)` instead."""
    real, calls = microdit.edm.edm_loss, []

    def loss(*a, **k):
        calls.append(1)
        value = real(*a, **k)
        return action(value) if len(calls) == call else value

    monkeypatch.setattr(microdit.edm, "edm_loss", loss)


# ---- resumption --------------------------------------------------------------------------------

def test_stop_mid_stage_then_rerun_gives_the_uninterrupted_curve(straight, data, tmp_path):
    out = tmp_path / "stage1"
    assert train(out, data, "--max-steps-this-run", "3") == EXIT_RESUMABLE
    assert [s for s, _ in checkpoints(out)] == [2, 3]  # periodic + at the stop
    assert not (out / "summary.json").exists() and not (out / "final").exists()
    assert losses(out) == losses(straight)[:3]

    assert train(out, data) == 0
    assert losses(out) == losses(straight)  # same data order, same noise: bitwise equal
    assert [s for s, _ in checkpoints(out)] == [6, 8]  # keep 2
    assert_same_weights(out / "final" / "model.safetensors", straight / "final" / "model.safetensors")
    assert_same_weights(out / "final" / "ema.safetensors", straight / "final" / "ema.safetensors")


def test_stop_inside_a_log_window_logs_the_same_averages(data, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train(whole, data, "--log-every", "3") == 0
    assert train(split, data, "--log-every", "3", "--max-steps-this-run", "4") == EXIT_RESUMABLE  # mid-window
    assert train(split, data, "--log-every", "3") == 0
    assert [s for s, _ in losses(whole)] == [3, 6, 8]
    assert losses(split) == losses(whole)


def test_crash_resumes_from_the_last_checkpoint_without_duplicate_rows(straight, data, tmp_path, monkeypatch):
    out = tmp_path / "stage1"

    def crash(loss):
        raise RuntimeError("node lost")

    fail_at(monkeypatch, 11, crash)  # during step 6: steps 1-5 logged, last checkpoint at step 4
    with pytest.raises(RuntimeError, match="node lost"):
        train(out, data)
    assert [s for s, _ in checkpoints(out)] == [2, 4]
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5]

    monkeypatch.undo()
    assert train(out, data) == 0
    assert losses(out) == losses(straight)  # step 5 recomputed, logged once
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))


def test_sigterm_saves_a_checkpoint_and_exits_for_a_rerun(straight, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "stage1"
    before = signal.getsignal(signal.SIGTERM)

    def preempt(loss):
        os.kill(os.getpid(), signal.SIGTERM)  # what Slurm sends before it kills the job
        return loss

    fail_at(monkeypatch, 5, preempt)  # during step 3
    assert train(out, data) == EXIT_RESUMABLE
    assert "SIGTERM" in capsys.readouterr().err
    assert [s for s, _ in checkpoints(out)] == [2, 3]  # the step in flight finished, then saved
    assert signal.getsignal(signal.SIGTERM) is before

    monkeypatch.undo()
    assert train(out, data) == 0
    assert losses(out) == losses(straight)


# ---- NaN guard -----------------------------------------------------------------------------------

def test_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "stage1"
    fail_at(monkeypatch, 7, lambda loss: loss * float("nan"))  # step 4
    with pytest.raises(NonFiniteLossError, match=r"stage 1 step 4: loss is nan.*step-000003"):
        train(out, data, "--ckpt-every", "3")
    assert [s for s, _ in checkpoints(out)] == [3]
    assert [s for s, _ in losses(out)] == [1, 2, 3]
    assert not (out / "final").exists() and not (out / "summary.json").exists()


def test_exploding_lr_is_caught(data, tmp_path):
    out = tmp_path / "stage1"
    with pytest.raises(NonFiniteLossError, match="stage 1 step 2"):
        train(out, data, "--lr", "1e30", "--warmup", "0", "--grad-clip", "0")
    assert checkpoints(out) == []


# ---- outputs -------------------------------------------------------------------------------------

def test_outputs_follow_the_contract(straight):
    from microdit.models import MicroDiT

    summary = json.loads((straight / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["stage"] == 1 and summary["steps"] == STEPS and summary["images_seen"] == 4 * STEPS
    assert summary["mfu"] is None and summary["gpus"] == 0 and summary["world_size"] == 1
    assert summary["accumulation"] == 2 and summary["latent_size"] == 8

    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [set(r) for r in rows] == [set(METRIC_FIELDS)] * STEPS
    assert rows[0]["lr"] == 0.0 and rows[2]["lr"] == pytest.approx(2.4e-4)  # warmup 2, then cosine
    assert rows[-1]["lr"] < rows[2]["lr"] and all(r["mfu"] is None for r in rows)
    assert summary["final_loss"] == pytest.approx(np.mean([r["loss"] for r in rows]))
    assert list(csv.DictReader((straight / "metrics.csv").open()))[0]["step"] == "1"
    assert any((straight / "tb").iterdir())

    state = torch.load(checkpoints(straight)[-1][1] / "train_state.pt", weights_only=True)
    assert {"step", "optimizer", "scheduler", "loader", "rng", "images_seen"} <= set(state)
    assert state["step"] == STEPS and state["scheduler"]["last_epoch"] == STEPS

    raw = MicroDiT.from_pretrained(straight / "final")
    ema = load_trained(straight / "final", ema=True)
    assert raw.config == ema.config and raw.config["input_size"] == 8
    ema_file = weights(straight / "final" / "ema.safetensors")
    assert all(torch.equal(v, ema_file[k]) for k, v in ema.state_dict().items())
    assert not torch.equal(raw.blocks[0].attn.qkv.weight, ema.blocks[0].attn.qkv.weight)


def test_stage_transition_to_512_style_resolution(straight, data, tmp_path):
    """256 -> 512 px as 64 -> 128 px here: pos_embed rebuilt with scale 2, all else carried over."""
    from microdit.models import sincos_pos_embed_2d

    out = tmp_path / "stage3"
    # lr 0: the weights after one step are exactly the ones loaded (set past the flag, whose range is
    # the config's, lr > 0: a stage that cannot learn is a config mistake, but a sharp test here)
    args = args_for(out, data, "--resolution", "128", "--init", str(straight / "final"), "--init-weights", "ema",
                    "--init-optimizer", "--steps", "1", "--schedule", "constant", "--no-ema")
    args.lr = 0.0
    assert run(args) == 0
    model = load_trained(out / "final")
    assert model.config["pos_interp_scale"] == 2.0 and model.config["input_size"] == 16
    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(model.dim, 8, 8, 2.0))
    prev = weights(straight / "final" / "ema.safetensors")
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in prev.items() if k != "pos_embed")
    assert not (out / "final" / "ema.safetensors").exists()
    state = torch.load(checkpoints(out)[-1][1] / "train_state.pt", weights_only=True)
    prev_state = torch.load(checkpoints(straight)[-1][1] / "train_state.pt", weights_only=True)
    key = "blocks.0.attn.qkv.weight"  # Adam moments carried over (lr 0 still updates them)
    assert state["optimizer"]["state"][key]["step"] == prev_state["optimizer"]["state"][key]["step"] + 1
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.0


def tiny_text_encoder(directory: Path) -> Path:
    """A 1-layer CLIP text model over a word-level vocabulary, CAPTION[1]-wide, 77 positions."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "two", "red", "blue", "circle", "squares"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                            pad_token="<pad>", model_max_length=77).save_pretrained(directory)
    config = CLIPTextConfig(vocab_size=len(words), hidden_size=CAPTION[1], intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2)
    CLIPTextModel(config).save_pretrained(directory)
    return directory


def tiny_vae(directory: Path) -> Path:
    """A 4-channel AutoencoderKL decoding 8x8 latents to 16x16 images."""
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=8, sample_size=16).save_pretrained(directory)
    return directory


def test_sample_grid_from_the_final_weights(data, tmp_path):
    vae, text = tiny_vae(tmp_path / "vae"), tiny_text_encoder(tmp_path / "text")
    out = tmp_path / "stage1"
    assert train(out, data, "--steps", "2", "--vae", str(vae), "--text-encoder", str(text),
                 "--sample-prompts", "a red circle", "two blue squares",
                 "--sample-steps", "2") == 0
    from PIL import Image

    grid = Image.open(out / "samples.png")
    assert grid.size == (2 * 16, 16)  # two 16 px images side by side (the tiny VAE upsamples 2x)
    meta = json.loads((out / "samples.json").read_text())
    assert meta["prompts"] == ["a red circle", "two blue squares"] and meta["weights"] == "ema"


def test_in_training_evaluation_leaves_training_exact(data, tmp_path):
    """Every --eval-every steps a grid and a small-n GenEval row; the weights and the loss curve are
    those of a run without it, and a resumed run redoes (and rewrites) the rows after its checkpoint."""
    vae, text = tiny_vae(tmp_path / "vae"), tiny_text_encoder(tmp_path / "text")
    detector = tmp_path / "detector"
    detector.mkdir()
    (detector / "config.json").write_text(json.dumps({"kind": "shapes"}))
    common = ("--vae", str(vae), "--text-encoder", str(text), "--sample-prompts", "a red circle", "--sample-steps", "2")
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    assert train(plain, data, *common) == 0
    assert train(watched, data, *common, "--eval-every", "2", "--detector", str(detector), "--eval-per-task", "1") == 0
    assert losses(watched) == losses(plain)
    a, b = weights(plain / "final" / "model.safetensors"), weights(watched / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (watched / "evals.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, STEPS + 1, 2))
    assert all(0 <= r["geneval"] <= 1 and r["images"] == 6 and "not comparable" in r["note"] for r in rows)
    assert all((watched / r["grid"]).is_file() for r in rows)
    # stopped after 3 steps (checkpoint at 3? at 2, ckpt-every 2), then resumed: no duplicated rows
    again = tmp_path / "again"
    flags = (*common, "--eval-every", "2", "--detector", str(detector), "--eval-per-task", "1")
    assert train(again, data, *flags, "--max-steps-this-run", "3") == EXIT_RESUMABLE
    assert train(again, data, *flags) == 0
    rows_again = [json.loads(line) for line in (again / "evals.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_again] == [r["step"] for r in rows]
    assert [r["geneval"] for r in rows_again] == [r["geneval"] for r in rows]


# ---- pieces ----------------------------------------------------------------------------------------

def test_moe_parameters_get_their_own_lr():
    from microdit.models import MicroDiT_Smoke_2
    from microdit.moe import ExpertChoiceMoE

    model = MicroDiT_Smoke_2(input_size=8, caption_channels=16)
    dense, moe = optimizer_groups(model, lr=1e-3, moe_lr_scale=0.5)
    assert moe["lr"] == 5e-4 and dense["lr"] == 1e-3
    expected = {id(p) for m in model.modules() if isinstance(m, ExpertChoiceMoE) for p in m.parameters()}
    assert {id(p) for p in moe["params"]} == expected and len(expected) >= 3
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if id(p) in expected}
    assert names == {"w1", "w2", "weight"}  # w1, w2 and the gate's weight
    assert len(dense["params"]) + len(moe["params"]) == len(list(model.parameters()))


def test_ema_copies_then_averages():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = EMA(model, decay=0.9, start=1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, steps_done=1)  # within `start`: a copy
    assert torch.equal(ema.shadow[0], torch.ones(1, 2))
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, steps_done=2)
    assert torch.allclose(ema.shadow[0], torch.full((1, 2), 0.9 * 1 + 0.1 * 3))
    assert set(ema.full_state({"weight": model.weight.detach()})) == {"weight"}


def test_bad_flags_are_one_line_errors(straight, data, tmp_path):
    with pytest.raises(UserError, match="not a multiple of --micro-batch 3"):
        train(tmp_path / "a", data, "--micro-batch", "3")
    with pytest.raises(UserError, match="no --latents source named 'C'"):
        train(tmp_path / "b", data, "--weights", "C=1")
    with pytest.raises(UserError, match="--caption-channels 32"):
        train(tmp_path / "c", data, "--caption-channels", "32")
    with pytest.raises(UserError, match="warmup"):
        train(tmp_path / "d", data, "--warmup", "20")
    with pytest.raises(UserError, match="no config.json"):
        train(tmp_path / "e", data, "--init", str(tmp_path))
    with pytest.raises(UserError, match=r"another run's checkpoints \(mask_ratio 0.75 -> 0.5\)"):
        train(straight, data, "--mask-ratio", "0.5", "--on-change", "error")


# ---- a rerun with other settings is another run ----------------------------------------------------

def test_changed_settings_start_afresh_and_set_the_old_checkpoints_aside(straight, data, tmp_path, capsys):
    out = tmp_path / "stage1"
    shutil.copytree(straight, out)
    old = {step: (path / "model.safetensors").read_bytes() for step, path in checkpoints(out)}
    assert train(out, data, "--lr", "5e-4") == 0
    assert re.search(r"held another run's checkpoints \(lr [0-9.e-]+ -> 0\.0005\); this stage starts afresh",
                     capsys.readouterr().out)
    # the old run is kept under its fingerprint's key, not resumed and not lost
    [kept] = (out / "ckpt.superseded").iterdir()
    assert {int(p.name.split("-")[1]): (p / "model.safetensors").read_bytes()
            for p in (kept / "ckpt").glob("step-*")} == old
    ours = losses(out)
    assert [s for s, _ in ours] == list(range(1, STEPS + 1))  # trained from step 1, rows of the old run gone
    assert ours[0] == losses(straight)[0]  # same init, data and noise: only the update differs
    assert ours[-1] != losses(straight)[-1]
    assert read_json(out / "summary.json")["lr"] == 5e-4


def test_more_steps_extend_a_constant_schedule_but_reshape_a_cosine_one(straight, data, tmp_path, capsys):
    constant = ("--schedule", "constant", "--warmup", "0")
    out = tmp_path / "constant"
    assert train(out, data, *constant, "--steps", "4") == 0
    short = losses(out)
    capsys.readouterr()
    assert train(out, data, *constant, "--steps", "6") == 0  # train longer: the same run, resumed
    assert "resuming" in capsys.readouterr().out and not (out / "ckpt.superseded").exists()
    assert losses(out)[:4] == short and len(losses(out)) == 6

    cosine = tmp_path / "cosine"
    shutil.copytree(straight, cosine)
    assert train(cosine, data, "--steps", str(STEPS + 2)) == 0  # the decay would have been another
    assert "schedule_steps 8 -> 10" in capsys.readouterr().out and (cosine / "ckpt.superseded").is_dir()


def test_fingerprint_follows_the_data_and_the_previous_stage(straight, data, tmp_path):
    from microdit.train import run_fingerprint
    from microdit.training.state import fingerprint_changes

    init = tmp_path / "init"
    shutil.copytree(straight / "final", init)
    args = args_for(tmp_path / "x", data, "--init", str(init))
    config = {"architecture": "MicroDiT_Smoke_2"}
    before = run_fingerprint(args, config, 8)
    assert fingerprint_changes(before, run_fingerprint(args, config, 8)) == []
    # another micro-batch, checkpoint cadence or log interval: the same run
    same = args_for(tmp_path / "x", data, "--init", str(init), "--micro-batch", "4", "--keep", "5", "--log-every", "3")
    assert fingerprint_changes(before, run_fingerprint(same, config, 8)) == []
    (init / "model.safetensors").write_bytes((straight / "final" / "ema.safetensors").read_bytes())
    assert fingerprint_changes(before, run_fingerprint(args, config, 8)) == [
        "the --init weights changed (previous stage retrained)"]
    summary = Path(data[0]) / "_summary.json"
    text = summary.read_text()
    try:
        summary.write_text(text + " ")
        assert "the training data changed" in fingerprint_changes(before, run_fingerprint(args, config, 8))
    finally:
        summary.write_text(text)


# ---- several processes (torchrun, gloo on the CPU) -----------------------------------------------

LAUNCHER = """
import argparse, sys
import torch
torch.set_num_threads(1)
from microdit.train import add_arguments, run
parser = argparse.ArgumentParser()
add_arguments(parser)
sys.exit(run(parser.parse_args(sys.argv[1:])))
"""


@pytest.mark.slow
def test_ddp_and_fsdp_on_two_processes(data, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)

    def torchrun(out: Path, *extra: str) -> int:
        flags = argv_for(out, data, "--steps", "4", "--micro-batch", "1", *extra)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
        done = subprocess.run(cmd + flags, env=env, capture_output=True, text=True, timeout=300)
        print(done.stdout[-2000:], done.stderr[-2000:])  # shown when the test fails
        return done.returncode

    assert torchrun(tmp_path / "ddp") == 0
    assert torchrun(tmp_path / "fsdp", "--fsdp", "--max-steps-this-run", "2") != 0  # preempted: rerun me
    assert [s for s, _ in checkpoints(tmp_path / "fsdp")] == [2]
    assert torchrun(tmp_path / "fsdp", "--fsdp") == 0
    ddp, fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert [s for s, _ in fsdp] == [1, 2, 3, 4]
    assert [v for _, v in fsdp] == pytest.approx([v for _, v in ddp], rel=1e-5)
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["fsdp"] is True and summary["accumulation"] == 2
    load_trained(tmp_path / "fsdp" / "final", ema=True)  # gathered from the shards into one file
