"""Bootstrap intervals: FID's fast path against recomputing every resample, GenEval's resampling
within tasks, CLIP score's over pairs."""
import numpy as np
import pytest

from microdit.metrics import intervals
from microdit.metrics.fid import frechet_distance


@pytest.mark.parametrize("n, d", [(12, 40), (60, 16)])  # fewer images than dimensions, and more
def test_fid_draws_equal_the_frechet_distance_of_each_resample(n, d):
    rng = np.random.default_rng(n)
    feats, ref = rng.normal(size=(n, d)), rng.normal(size=(300, d)) + 0.2
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    picks = rng.integers(0, n, size=(6, n))
    direct = [frechet_distance(feats[p].mean(0), np.cov(feats[p], rowvar=False), mu, sigma) for p in picks]
    if n <= d:
        np.testing.assert_allclose(intervals._fid_draws_small(feats, mu, sigma, picks), direct, rtol=1e-9)
    np.testing.assert_allclose(intervals._fid_draws_large(feats, mu, sigma, picks, "cpu"), direct, rtol=1e-9)
    record = intervals.bootstrap_fid(feats, mu, sigma, draws=200, seed=0)
    low, high = record["interval"]
    assert low < high and record["draws"] == 200 and record["level"] == 0.95
    # centred on the estimate: the resamples sit above it, by the recorded bias
    estimate = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu, sigma)
    assert low <= estimate <= high and record["bias"] > 0
    assert record == intervals.bootstrap_fid(feats, mu, sigma, draws=200, seed=0)  # seeded


def test_geneval_resamples_prompts_within_their_task():
    # a task with all prompts correct stays at 1.0 in every draw; one with mixed prompts varies
    per_prompt = [{"tag": "single_object", "correct": [True, True]} for _ in range(5)]
    per_prompt += [{"tag": "counting", "correct": [i % 2 == 0, False]} for i in range(8)]
    record = intervals.bootstrap_geneval(per_prompt, draws=500, seed=1)
    assert record["tasks"]["single_object"] == [1.0, 1.0]
    low, high = record["tasks"]["counting"]
    assert 0.0 <= low < 0.25 < high <= 0.5
    overall = (1.0 + 0.25) / 2
    assert record["interval"][0] <= overall <= record["interval"][1]
    assert intervals.bootstrap_geneval(per_prompt, draws=0) is None


def test_clip_interval_narrows_with_more_pairs():
    rng = np.random.default_rng(2)
    few, many = rng.normal(30, 3, size=20), rng.normal(30, 3, size=2000)
    w_few = np.diff(intervals.bootstrap_mean(few, 1000)["interval"])[0]
    w_many = np.diff(intervals.bootstrap_mean(many, 1000)["interval"])[0]
    assert w_many < w_few / 5
    lo, hi = intervals.bootstrap_mean(many, 1000)["interval"]
    assert lo <= many.mean() <= hi
