"""The stage lr schedules: composer's warmup / cosine-to-alpha_f / constant semantics."""
import math

import pytest
import torch

from microdit.schedules import build_scheduler, check_schedule, lr_multiplier


def test_warmup_is_linear_from_zero():
    assert [lr_multiplier(k, "constant", 100, warmup=4) for k in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert [lr_multiplier(k, "cosine", 100, warmup=4, final_ratio=0.33) for k in range(4)] == [0.0, 0.25, 0.5, 0.75]


def test_cosine_decays_to_the_final_ratio_at_the_end():
    total, warmup, r = 250_000, 2_500, 0.33  # the paper's stage 1
    m = lambda k: lr_multiplier(k, "cosine", total, warmup, r)  # noqa: E731
    assert m(warmup) == 1.0
    middle = warmup + (total - warmup) // 2
    assert m(middle) == pytest.approx(r + (1 - r) / 2)
    assert m(total) == pytest.approx(r)
    assert m(total - 1) > r and m(total - 1) - r < 1e-9  # the last update is a hair above r
    assert m(10 * total) == pytest.approx(r)  # past the end it stays at r
    steps = [m(k) for k in range(warmup, total, 997)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # monotone after warmup


def test_constant_and_no_warmup():
    assert lr_multiplier(0, "constant", 10) == 1.0
    assert lr_multiplier(0, "cosine", 10, final_ratio=0.5) == 1.0
    assert lr_multiplier(5, "cosine", 10, final_ratio=0.5) == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_scheduler_keeps_group_ratios_and_steps_like_composer():
    w = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.AdamW([{"params": [w[0]], "lr": 1e-3}, {"params": [w[1]], "lr": 5e-4}], lr=1e-3)
    sched = build_scheduler(opt, "cosine", total_steps=10, warmup=2, final_ratio=0.33)
    seen = []
    for _ in range(10):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen[0] == [0.0, 0.0]  # step 0 trains at lr 0, as composer's warmup does
    assert seen[1] == pytest.approx([5e-4, 2.5e-4])
    assert seen[2] == pytest.approx([1e-3, 5e-4])
    assert all(a[1] == pytest.approx(a[0] / 2) for a in seen)
    state = sched.state_dict()
    assert state["last_epoch"] == 10 and state["lr_lambdas"] == [None, None]  # plain data, resumable


@pytest.mark.parametrize("bad", [
    dict(schedule="linear", total_steps=10),
    dict(schedule="cosine", total_steps=0),
    dict(schedule="cosine", total_steps=10, warmup=11),
    dict(schedule="constant", total_steps=10, warmup=-1),
    dict(schedule="cosine", total_steps=10, final_ratio=1.5),
])
def test_impossible_settings_are_refused(bad):
    with pytest.raises(ValueError):
        check_schedule(**bad)
