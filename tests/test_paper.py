"""The paper preset says what the paper says (`microdit.paper`): an edit that drifts from it fails here."""
from pathlib import Path

import pytest

from microdit import paper
from microdit.config import load_yaml

PRESET = Path(__file__).resolve().parents[1] / "workflow" / "presets" / "paper.yaml"


@pytest.fixture(scope="module")
def preset() -> dict:
    return load_yaml(PRESET)


def test_training_schedule_is_the_papers(preset):
    stages = preset["train"]["stages"]
    assert sorted(stages) == [f"stage{n}" for n in sorted(paper.STAGES)]
    for n, expected in paper.STAGES.items():
        got = stages[f"stage{n}"]
        assert got == expected, f"stage{n}: " + ", ".join(
            f"{k}: preset {got.get(k)!r}, paper {expected.get(k)!r}" for k in sorted({*got, *expected})
            if got.get(k) != expected.get(k))


def test_model_and_cost_are_the_papers(preset):
    assert preset["train"]["model"] == paper.MODEL
    assert preset["cost"] and all(preset["cost"][k] == paper.COST[k] for k in preset["cost"]), preset["cost"]


def test_paper_facts_agree_with_each_other():
    assert all(s["global_batch"] == paper.GLOBAL_BATCH for s in paper.STAGES.values())
    assert paper.COST["gpu_hours"] == pytest.approx(paper.COST["days"] * 24 * paper.COST["gpus"])
    # the paper's dollars are its GPU-hours at its price, rounded (2.6 days is itself rounded)
    assert paper.COST["dollars"] == pytest.approx(paper.COST["gpu_hours"] * paper.COST["price_per_gpu_hour"], rel=0.02)
    assert [paper.schedule_text(paper.STAGES[n]) for n in (1, 2, 3, 4)] == [
        "2.5K warmup, cosine to 0.33x", "constant", "500 warmup, constant", "constant"]
