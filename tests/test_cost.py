"""`microdit cost`: the arithmetic on hand-made benchmark TSVs and training summaries."""
import argparse
import json
from pathlib import Path

import pytest

from microdit import cost
from microdit.errors import UserError

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
RESOURCES = {
    "models": {"gpu": 0}, "world": {"gpu": 0}, "download": {"gpu": 0}, "caption": {"gpu": 8}, "mds": {"gpu": 0},
    "latents": {"gpu": 8}, "train": {"gpu": 8}, "evaluate": {"gpu": 1}, "report": {"gpu": 0},
}


def bench(root: Path, name: str, s, cpu_time, earlier: list | None = None) -> None:
    path = root / "benchmarks" / f"{name}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{x}\t0:00:00\t100\t200\t90\t95\t1\t2\t50.0\t{c}\n" for x, c in (earlier or []) + [(s, cpu_time)]]
    path.write_text(HEADER + "".join(rows))


def summary(root: Path, n: int, **fields) -> None:
    path = root / "checkpoints" / f"stage{n}" / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stage": n, **fields}))


def paper_like(root: Path, with_configs: bool = False) -> None:
    """A run of the paper's model on 8 H100s at the paper's resolutions."""
    for n, (res, ips) in {1: (256, 8000.0), 2: (256, 4000.0), 3: (512, 2000.0), 4: (512, 1000.0)}.items():
        summary(root, n, model="MicroDiT_XL_2", device="NVIDIA H100 80GB HBM3", gpus=8, world_size=8,
                resolution=res, mask_ratio=cost.PAPER_SCHEDULE[n]["mask_ratio"], images_per_s=ips, wall_s=1000.0 * n)
        if with_configs:
            config = root / "checkpoints" / f"stage{n}" / "final" / "config.json"
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(json.dumps({"architecture": "MicroDiT_XL_2", "input_size": res // 8}))


@pytest.fixture
def measured(tmp_path):
    bench(tmp_path, "models", 100, 150)
    bench(tmp_path, "download/shapes_real", 50, 20)
    bench(tmp_path, "caption/shapes_sa", 360, 300)
    bench(tmp_path, "latents/shapes_real", 720, "NA")
    bench(tmp_path, "train/stage1", 3600, 3000, earlier=[(99999, 1)])  # only the latest row counts
    bench(tmp_path, "evaluate/stage4", 1800, 1700)
    bench(tmp_path, "report", 10, 9)
    (tmp_path / "benchmarks" / "broken.tsv").write_text("not\ta benchmark\n1\t2\n")
    paper_like(tmp_path)
    return tmp_path


def test_phases_jobs_and_total(measured):
    c = cost.compute_cost(measured, {"resources": RESOURCES}, price=3.75, gpu_type="H100")
    p = c["phases"]
    assert set(p) == {"data", "captions", "latents", "training", "evaluation", "report"}
    assert p["data"] == {"wall_s": 150, "gpu_hours": 0, "cpu_hours": pytest.approx(170 / 3600), "dollars": 0, "jobs": 2}
    assert p["captions"]["gpu_hours"] == pytest.approx(0.8) and p["captions"]["dollars"] == pytest.approx(3.0)
    assert p["latents"]["gpu_hours"] == pytest.approx(1.6) and p["latents"]["cpu_hours"] is None  # NA cpu_time
    assert p["training"]["wall_s"] == 3600 and p["training"]["gpu_hours"] == pytest.approx(8.0)
    assert p["training"]["dollars"] == pytest.approx(30.0)
    assert p["evaluation"]["gpu_hours"] == pytest.approx(0.5) and p["evaluation"]["dollars"] == pytest.approx(1.875)
    assert p["report"]["dollars"] == 0
    total = c["total"]
    assert total["wall_s"] == 100 + 50 + 360 + 720 + 3600 + 1800 + 10
    assert total["gpu_hours"] == pytest.approx(0.8 + 1.6 + 8 + 0.5)
    assert total["dollars"] == pytest.approx(3.75 * (0.8 + 1.6 + 8 + 0.5))
    assert total["jobs"] == 7 and len(c["jobs"]) == 7
    assert len(c["skipped"]) == 1 and "broken.tsv" in c["skipped"][0]
    assert c["price_per_gpu_hour"] == 3.75 and c["gpu_type"] == "H100"


def test_training_stages_take_benchmark_time_else_summary_time(measured):
    c = cost.compute_cost(measured, {"resources": RESOURCES}, price=2.0, gpu_type="A100")
    s1, s2 = c["stages"]["stage1"], c["stages"]["stage2"]
    assert s1["timed_by"] == "benchmark" and s1["wall_s"] == 3600 and s1["cpu_hours"] == pytest.approx(3000 / 3600)
    assert s2["timed_by"] == "summary" and s2["wall_s"] == 2000 and s2["cpu_hours"] is None
    assert s2["gpu_hours"] == pytest.approx(2000 * 8 / 3600) and s2["dollars"] == pytest.approx(2 * 2000 * 8 / 3600)
    assert s1["images_per_s_per_gpu"] == 1000 and c["stages"]["stage4"]["images_per_s_per_gpu"] == 125


def test_projection_of_the_paper_schedule(measured):
    c = cost.compute_cost(measured, {"resources": RESOURCES}, price=3.75, gpu_type="H100")
    proj = c["projection"]
    # stage n: 2048 x steps images at (images/s / 8 GPUs) per GPU
    expected = {1: 2048 * 250_000 / 1000, 2: 2048 * 30_000 / 500, 3: 2048 * 50_000 / 250, 4: 2048 * 5_000 / 125}
    for n, seconds in expected.items():
        stage = proj["per_stage"][f"stage{n}"]
        assert stage["images"] == 2048 * cost.PAPER_SCHEDULE[n]["steps"]
        assert stage["gpu_hours"] == pytest.approx(seconds / 3600)
        assert stage["dollars"] == pytest.approx(3.75 * seconds / 3600)
    hours = sum(expected.values()) / 3600
    assert proj["gpu_hours"] == pytest.approx(hours) and proj["dollars"] == pytest.approx(3.75 * hours)
    assert proj["days_on_8_gpus"] == pytest.approx(hours / 8 / 24)
    assert proj["comparable"] is True and proj["complete"] is True
    assert proj["model"] == "MicroDiT_XL_2" and proj["hardware"] == "NVIDIA H100 80GB HBM3"
    assert c["paper"] == {**c["paper"], "days": 2.6, "gpus": 8, "gpu_type": "H100", "dollars": 1890,
                          "pixart_alpha_dollars": 28400}
    assert c["paper"]["gpu_hours"] == pytest.approx(499.2)


def test_flops_scaled_projection_is_the_measured_one_for_the_paper_model(tmp_path):
    paper_like(tmp_path, with_configs=True)
    proj = cost.compute_cost(tmp_path, {}, price=1.0, gpu_type="H100")["projection"]
    assert proj["flops_scaled"]["gpu_hours"] == pytest.approx(proj["gpu_hours"])
    for stage in proj["per_stage"].values():
        assert stage["flops_scaled_gpu_hours"] == pytest.approx(stage["gpu_hours"])


def test_flops_scaling_of_a_smaller_model(tmp_path):
    """A model with fewer FLOPs per image at the same throughput projects to more XL hours, by the ratio."""
    summary(tmp_path, 1, model="MicroDiT_Tiny_2", device="NVIDIA H100", gpus=1, resolution=256, mask_ratio=0.75,
            images_per_s=100.0, wall_s=10.0)
    config = tmp_path / "checkpoints" / "stage1" / "final" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"architecture": "MicroDiT_Tiny_2", "input_size": 32}))
    stage = cost.compute_cost(tmp_path, {}, 1.0, "H100")["projection"]["per_stage"]["stage1"]
    tiny = cost.measured_forward_flops(tmp_path, 1, {"mask_ratio": 0.75})
    ratio = cost.paper_forward_flops(1) / tiny
    assert ratio > 3  # XL does several times the work of Tiny per image
    assert stage["flops_scaled_gpu_hours"] == pytest.approx(stage["gpu_hours"] * ratio)


def test_smoke_run_on_cpu_costs_no_gpu_hours_and_is_labelled(tmp_path):
    bench(tmp_path, "train/stage1", 60, 110)
    for n in (1, 2, 3):  # stage 4 never ran
        summary(tmp_path, n, model="MicroDiT_Smoke_2", device="cpu", gpus=0, world_size=1, resolution=64,
                mask_ratio=0.5, images_per_s=20.0, wall_s=30.0)
    smoke_resources = {k: {"gpu": 0} for k in RESOURCES}
    c = cost.compute_cost(tmp_path, {"resources": smoke_resources}, 3.75, "H100")
    assert c["total"]["gpu_hours"] == 0 and c["total"]["dollars"] == 0
    assert c["total"]["cpu_hours"] == pytest.approx(110 / 3600)
    assert c["stages"]["stage1"]["images_per_s_per_gpu"] == 20.0  # per device: one CPU process
    proj = c["projection"]
    assert proj["complete"] is False and proj["comparable"] is False
    assert proj["gpu_hours"] is None and proj["dollars"] is None and "4" in proj["note"]
    assert proj["per_stage"]["stage1"]["gpu_hours"] == pytest.approx(2048 * 250_000 / 20 / 3600)
    assert proj["per_stage"]["stage4"]["gpu_hours"] is None
    summary(tmp_path, 4, model="MicroDiT_Smoke_2", device="cpu", gpus=0, world_size=1, resolution=64,
            mask_ratio=0.0, images_per_s=40.0, wall_s=30.0)
    proj = cost.compute_cost(tmp_path, {"resources": smoke_resources}, 3.75, "H100")["projection"]
    assert proj["complete"] is True and proj["comparable"] is False and proj["dollars"] > 0
    assert "MicroDiT_Smoke_2" in proj["note"] and "cpu" in proj["note"] and "not comparable" in proj["note"]


def test_training_by_hand_is_counted_from_the_summaries(tmp_path):
    summary(tmp_path, 1, model="MicroDiT_Smoke_2", device="cuda", gpus=2, resolution=64, mask_ratio=0.75,
            images_per_s=10.0, wall_s=1800.0)
    c = cost.compute_cost(tmp_path, {}, 4.0, "H100")
    assert c["phases"]["training"]["gpu_hours"] == pytest.approx(1.0) and c["total"]["dollars"] == pytest.approx(4.0)


def test_rule_names_map_to_phases_and_gpu_groups():
    assert [cost.phase_of(r) for r in ("models", "world", "download", "mds", "caption", "latents", "train_stage3",
                                       "evaluate", "cost", "report", "funnel", "something")] == [
        "data", "data", "data", "data", "captions", "latents", "training", "evaluation", "report", "report",
        "report", "other"]
    res = {"train": {"gpu": 8}, "evaluate": {"gpu": 2}, "train_stage4": {"gpu": 4}}
    assert cost.gpus_for("train_stage1", res) == 8
    assert cost.gpus_for("train_stage4", res) == 4
    assert cost.gpus_for("evaluate_stage2", res) == 2
    assert cost.gpus_for("report", res) == 0
    assert cost.stage_of_job({"rule": "train", "job": "stage3"}) == 3
    assert cost.stage_of_job({"rule": "train_stage2", "job": ""}) == 2
    assert cost.stage_of_job({"rule": "evaluate", "job": "stage2"}) is None


def _args(tmp_path, **over):
    ns = argparse.Namespace(root=tmp_path, results=None, config=None, out=tmp_path / "results" / "cost.json",
                            price_per_gpu_hour=3.75, gpu_type="H100")
    for k, v in over.items():
        setattr(ns, k, v)
    return ns


def test_cli_writes_cost_json_and_rejects_bad_input(measured, capsys):
    config = measured / "config.json"
    config.write_text(json.dumps({"resources": RESOURCES}))
    parser = argparse.ArgumentParser()
    cost.add_arguments(parser)
    args = parser.parse_args(["--root", str(measured), "--config", str(config), "--out", str(measured / "cost.json")])
    assert args.price_per_gpu_hour == 3.75 and args.gpu_type == "H100"
    assert cost.run(args) == 0
    written = json.loads((measured / "cost.json").read_text())
    assert set(written) >= {"price_per_gpu_hour", "gpu_type", "phases", "stages", "total", "projection", "paper"}
    assert set(written["projection"]) >= {"hardware", "model", "gpu_hours", "days_on_8_gpus", "dollars", "per_stage"}
    assert "paper: $1,890" in capsys.readouterr().out
    with pytest.raises(UserError, match="price"):
        cost.run(_args(measured, price_per_gpu_hour=-1.0))
    with pytest.raises(UserError, match="config"):
        cost.run(_args(measured, config=measured / "nope.json"))
    # nothing measured at all: zeros, not a crash
    empty = measured / "empty"
    cost.run(_args(empty))
    assert json.loads((empty / "results" / "cost.json").read_text())["total"]["wall_s"] == 0
