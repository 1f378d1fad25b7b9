"""Learning-rate schedules of the four MicroDiT stages, as multipliers of the base lr.

The paper's stages use three shapes (composer's schedulers in the released configs):
    stage 1  linear warmup 2.5K steps, then half a cosine down to `final_ratio` (0.33) at the end
    stage 2  constant
    stage 3  linear warmup 500 steps, then constant
    stage 4  constant
Step k (0-based, the number of optimizer steps already taken) trains with base_lr * m(k):
    warmup    m(k) = k / warmup                                   for k < warmup (step 0 has lr 0)
    cosine    m(k) = r + (1 - r) (1 + cos(pi tau)) / 2,  tau = (k - warmup) / (total - warmup) in [0, 1]
    constant  m(k) = 1
so the cosine reaches r only at k = total, one step after the last update, as in composer.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "constant")


def check_schedule(schedule: str, total_steps: int, warmup: int = 0, final_ratio: float = 1.0) -> None:
    """ValueError with one line saying which setting is impossible."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ValueError(f"a schedule needs at least one step, got {total_steps}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 steps, got {warmup}")
    if schedule == "cosine" and warmup > total_steps:
        raise ValueError(f"cosine schedule: warmup ({warmup}) is longer than the run ({total_steps} steps)")
    if not 0.0 <= final_ratio <= 1.0:
        raise ValueError(f"final lr ratio must be in [0, 1], got {final_ratio}")


def lr_multiplier(step: int, schedule: str, total_steps: int, warmup: int = 0, final_ratio: float = 1.0) -> float:
    """m(step): the factor on the base learning rate for 0-based optimizer step `step`."""
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = total_steps - warmup
        tau = min(1.0, (step - warmup) / span) if span > 0 else 0.0
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * tau))
    raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup: int = 0, final_ratio: float = 1.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying m(k) to every param group's own base lr (so group lr ratios hold).

    Call `scheduler.step()` once after each optimizer step.
    """
    check_schedule(schedule, total_steps, warmup, final_ratio)

    def multiplier(step: int) -> float:
        return lr_multiplier(step, schedule, total_steps, warmup, final_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
