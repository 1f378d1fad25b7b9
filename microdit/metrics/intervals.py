"""95% percentile-bootstrap intervals for the evaluation metrics, so two checkpoints are called
different only when their intervals say so.

- GenEval: prompts are resampled within each task (a task keeps its number of prompts, every image
  of a drawn prompt comes along), task accuracies and their mean are recomputed per draw.
- CLIP score: the image-caption pairs are resampled.
- FID: the generated images' features are resampled against fixed reference statistics. With fewer
  images than feature dimensions (every smoke run) a draw costs O(n^3): the Frechet distance of a
  resampled set is written in terms of the n x n matrices F F^T and F S_ref F^T, computed once.
  With more images a draw recomputes the d x d covariance (on the evaluation device when it is a
  GPU). A resample repeats images, so it looks less diverse and its FID is higher: the draws sit
  above the estimate (on the smoke run, all 1000 of them). The interval keeps their spread but is
  centred on the estimate, the draws shifted by their median's excess over it; it shows how much
  the finite image set moves FID, it does not correct the value.
"""
from __future__ import annotations

import numpy as np

from microdit.metrics.linalg import trace_sqrt

LEVEL = 0.95


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> list[float]:
    """[low, high] holding the central `level` of `samples`."""
    low, high = np.quantile(np.asarray(samples, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]


def _record(samples: np.ndarray, draws: int, over: str) -> dict:
    return {"interval": percentile_interval(samples), "level": LEVEL, "draws": draws, "over": over}


def bootstrap_mean(values, draws: int, seed: int = 0) -> dict | None:
    """Interval of the mean of `values` (e.g. one CLIP score per image-caption pair)."""
    values = np.asarray(values, dtype=np.float64)
    if draws < 1 or len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(draws, len(values)))].mean(axis=1)
    return _record(means, draws, f"{len(values)} image-caption pairs")


def bootstrap_geneval(per_prompt: list[dict], draws: int, seed: int = 0) -> dict | None:
    """Intervals of GenEval overall and of each task, from `summarize`'s `per_prompt` records
    ({"tag", "correct": [bool per image]})."""
    if draws < 1 or not per_prompt:
        return None
    rng = np.random.default_rng(seed)
    tasks: dict[str, list[list[bool]]] = {}
    for p in per_prompt:
        tasks.setdefault(p["tag"], []).append(p["correct"])
    per_task = {}
    for tag, prompts in tasks.items():
        hits = np.array([sum(c) for c in prompts], dtype=np.float64)
        images = np.array([len(c) for c in prompts], dtype=np.float64)
        pick = rng.integers(0, len(prompts), size=(draws, len(prompts)))
        per_task[tag] = hits[pick].sum(axis=1) / images[pick].sum(axis=1)
    overall = np.mean(np.stack(list(per_task.values())), axis=0)
    record = _record(overall, draws, f"{len(per_prompt)} prompts, resampled within each task")
    record["tasks"] = {tag: percentile_interval(v) for tag, v in per_task.items()}
    return record


def bootstrap_fid(features: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, draws: int, seed: int = 0,
                  device: str = "cpu") -> dict | None:
    """Interval of FID over resamples of the generated features (n x d) against fixed reference
    moments; the same formula as `metrics.fid.frechet_distance`."""
    feats = np.asarray(features, dtype=np.float64)
    n, d = feats.shape
    if draws < 1 or n < 3:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(draws, n))
    ref_mu, ref_sigma = np.asarray(ref_mu, dtype=np.float64), np.asarray(ref_sigma, dtype=np.float64)
    every = np.arange(n)[None]  # the set itself: the estimate, by the same arithmetic as the draws
    if n <= d:
        values, estimate = (_fid_draws_small(feats, ref_mu, ref_sigma, p) for p in (picks, every))
    else:
        values, estimate = (_fid_draws_large(feats, ref_mu, ref_sigma, p, device) for p in (picks, every))
    bias = float(np.median(values) - estimate[0])
    record = _record(values - bias, draws, f"{n} generated images (reference fixed)")
    record["bias"] = bias  # how far the resamples' median sat above the estimate, removed from the interval
    return record


def _fid_draws_small(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """A resample F_b = P F has S_b = F^T M^T M F with M = (I - 11^T/n) P / sqrt(n - 1), so
    tr(S_b) = tr(M K M^T) and the eigenvalues of S_b S_ref are those of M G M^T (n x n), with
    K = F F^T and G = F S_ref F^T."""
    n = len(feats)
    gram, inner = feats @ feats.T, feats @ ref_sigma @ feats.T
    trace_ref = float(np.trace(ref_sigma))
    out = np.empty(len(picks))
    for b, pick in enumerate(picks):
        select = np.eye(n)[pick]  # F_b = select @ F
        m = (select - select.mean(0)) / np.sqrt(n - 1)
        diff = feats[pick].mean(0) - ref_mu
        out[b] = diff @ diff + np.trace(m @ gram @ m.T) + trace_ref - 2 * trace_sqrt(m @ inner @ m.T)
    return out


def _fid_draws_large(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, picks: np.ndarray,
                     device: str) -> np.ndarray:
    import torch

    on = torch.device(device if torch.cuda.is_available() or not str(device).startswith("cuda") else "cpu")
    f = torch.as_tensor(feats, dtype=torch.float64, device=on)
    sigma2 = torch.as_tensor(ref_sigma, dtype=torch.float64, device=on)
    w, v = torch.linalg.eigh(sigma2)
    root2 = (v * w.clamp(min=0).sqrt()) @ v.T  # S_ref^1/2: the eigenvalues of S_b S_ref are those of R S_b R
    mu2 = torch.as_tensor(ref_mu, dtype=torch.float64, device=on)
    trace_ref = float(torch.trace(sigma2))
    out = np.empty(len(picks))
    for b, pick in enumerate(picks):
        x = f[torch.as_tensor(pick, device=on)]
        xc = x - x.mean(0)
        sigma = xc.T @ xc / (len(x) - 1)
        inner = root2 @ sigma @ root2
        eig = torch.linalg.eigvalsh((inner + inner.T) / 2)
        eig = torch.where(eig > eig.max().clamp(min=0) * len(eig) * torch.finfo(eig.dtype).eps, eig, 0.0)
        diff = x.mean(0) - mu2
        out[b] = float(diff @ diff + torch.trace(sigma) + trace_ref - 2 * eig.sqrt().sum())
    return out
