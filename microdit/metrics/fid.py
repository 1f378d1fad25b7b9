"""Fréchet Inception Distance with clean-fid's "clean" resize, over image folders or PIL images.

Reference statistics (mean and covariance of the real images' features) are computed once per
(image set, extractor weights, resolution) and cached as `.npz`; generated sets are compared with
them. Two feature extractors, named by `config.json` `kind` in the `fid` model directory:

- `cleanfid_inception`: clean-fid's TorchScript Inception (`inception-2015-12-05.pt`), the network
  behind published FIDs; its numbers are comparable with the literature.
- `torchvision_inception_v3`: a torchvision Inception-v3 from `model.safetensors`. The smoke preset
  stores one with random weights (nothing can be downloaded offline): the pipeline runs for real,
  but its numbers are not comparable with any published FID, and results say so.

`resolution` is the side images are brought to before the extractor's own resize (centre square
crop, then bicubic resize, rounded to 8-bit as a saved image would be): the paper reports FID at
256 px and at the generation resolution. None keeps images as they are.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from microdit.io import atomic_path, sha256_file
from microdit.metrics.linalg import trace_sqrt

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
NOT_COMPARABLE = "untrained feature extractor: not comparable to published FIDs"


@dataclass
class FeatureExtractor:
    """A network mapping float images (N, 3, input_size, input_size) in [0, 255] to (N, D) features."""

    net: torch.nn.Module
    kind: str
    comparable: bool
    fingerprint: str  # identifies the weights; part of every cache key
    input_size: int = 299


WEIGHT_FILES = {"cleanfid_inception": "inception-2015-12-05.pt", "torchvision_inception_v3": "model.safetensors"}


def load_extractor(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> FeatureExtractor:
    """The FID feature extractor stored in `model_dir` by the models stage (kinds: module docstring).

    The network itself comes from `microdit.metrics.fid_extractor.load_fid_extractor`, the one
    reader of that format; here its files are checked and its weights fingerprinted for the
    statistics cache.
    """
    from microdit.errors import UserError
    from microdit.metrics.fid_extractor import load_fid_extractor

    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"no FID extractor at {model_dir}: config.json missing; run `microdit models` first")
    config = json.loads(config_path.read_text())
    kind = config.get("kind")
    if kind not in WEIGHT_FILES:
        raise UserError(f"{config_path}: unknown FID extractor kind {kind!r}; expected one of {sorted(WEIGHT_FILES)}")
    weights = model_dir / config.get("weights", WEIGHT_FILES[kind])
    if not weights.is_file():
        raise UserError(f"{weights} missing: rebuild the fid model with `microdit models` (or --local fid=...)")
    try:
        net = load_fid_extractor(model_dir, device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{weights} does not load as {kind}: {str(e).splitlines()[0]}") from e
    comparable = kind == "cleanfid_inception"  # the only weights published FIDs were computed with
    fingerprint = hashlib.sha256(f"{kind}:{sha256_file(weights)}".encode()).hexdigest()
    return FeatureExtractor(net.eval(), kind, comparable, fingerprint, int(config.get("input_size", 299)))


# ---------------------------------------------------------------- images to features
def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder` (recursively), sorted, so a set always reads in the same order."""
    from microdit.errors import UserError

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return files


def _as_items(images) -> list:
    return list_images(images) if isinstance(images, (str, os.PathLike)) else list(images)


def square_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Centre square crop, then bicubic (antialiased) resize to `resolution`, 8-bit RGB."""
    image = image.convert("RGB")
    w, h = image.size
    if (w, h) == (resolution, resolution):
        return image
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)


class _ImageSet(torch.utils.data.Dataset):
    """Paths or PIL images -> float (3, S, S) tensors in [0, 255]; None for an unreadable file."""

    def __init__(self, items: list, resolution: int | None, input_size: int):
        from cleanfid.resize import make_resizer

        self.items, self.resolution = items, resolution
        # clean-fid's "clean" resize: per-channel float PIL bicubic, no re-quantisation
        self.clean_resize = make_resizer("PIL", False, "bicubic", (input_size, input_size))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            if isinstance(item, Image.Image):
                image = item.convert("RGB")
            else:
                with Image.open(item) as f:
                    image = f.convert("RGB")
        except (OSError, ValueError, SyntaxError):
            return None
        if self.resolution:
            image = square_resize(image, self.resolution)
        resized = self.clean_resize(np.asarray(image))
        return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


def _keep_readable(batch: list) -> tuple[torch.Tensor | None, int]:
    good = [x for x in batch if x is not None]
    return (torch.stack(good) if good else None), len(batch) - len(good)


@torch.no_grad()
def features(
    images,
    extractor: FeatureExtractor,
    resolution: int | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
) -> tuple[np.ndarray, int]:
    """(features (N, D) float64, number of unreadable images skipped) for a folder or a list."""
    from tqdm import tqdm

    items = _as_items(images)
    loader = torch.utils.data.DataLoader(
        _ImageSet(items, resolution, extractor.input_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_keep_readable,
    )
    device = next(extractor.net.parameters(), torch.empty(0)).device
    chunks, skipped = [], 0
    for batch, bad in tqdm(loader, desc="FID features", disable=None):
        skipped += bad
        if batch is not None:
            chunks.append(extractor.net(batch.to(device)).reshape(len(batch), -1).double().cpu().numpy())
    feats = np.concatenate(chunks) if chunks else np.zeros((0, 0))
    return feats, skipped


# ---------------------------------------------------------------- the distance
def frechet_distance(mu1, sigma1, mu2, sigma2, features1: np.ndarray | None = None) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), as clean-fid's `frechet_distance`.

    tr((S1 S2)^1/2) is the sum of square roots of the eigenvalues of S1 S2, which are those of
    the symmetric PSD matrix R S2 R with R = S1^1/2 (or A S2 A^T when S1 = A^T A is given by fewer
    samples than dimensions): symmetric eigensolvers, several times faster than the general matrix
    square root clean-fid takes at 2048 dimensions, and exact for rank-deficient covariances.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature sizes differ: {mu1.shape} vs {mu2.shape}")
    if features1 is not None and len(features1) <= len(mu1):
        a = (features1 - features1.mean(0)) / np.sqrt(max(len(features1) - 1, 1))  # S1 = a^T a
        inner = a @ sigma2 @ a.T
    else:
        w, v = np.linalg.eigh(sigma1)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        inner = root @ sigma2 @ root
    trace_root = trace_sqrt(inner)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # clean-fid's defaults


def kernel_distance(generated: np.ndarray, reference: np.ndarray, subsets: int = KID_SUBSETS,
                    subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> float:
    """KID as clean-fid's `kernel_distance`: the unbiased squared MMD under the cubic polynomial
    kernel k(x, y) = (x.y / d + 1)^3, averaged over `subsets` random subsets of
    m = min(n_generated, n_reference, subset_size) images drawn from each side without replacement.
    The draws use numpy's legacy generator seeded with `seed`, in the order clean-fid's `compute_kid`
    makes them against reference features (a generated subset, then a reference one), so
    `np.random.seed(seed)` before clean-fid's `kernel_distance(reference, generated)` gives the same
    number."""
    d = generated.shape[1]
    m = min(len(generated), len(reference), subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {len(generated)} and {len(reference)}")
    rng = np.random.RandomState(seed)
    total = 0.0
    for _ in range(subsets):
        gen = generated[rng.choice(len(generated), m, replace=False)]
        ref = reference[rng.choice(len(reference), m, replace=False)]
        within = (ref @ ref.T / d + 1) ** 3 + (gen @ gen.T / d + 1) ** 3
        across = (ref @ gen.T / d + 1) ** 3
        total += (within.sum() - np.trace(within)) / (m - 1) - 2 * across.sum() / m
    return float(total / subsets / m)


def _moments(feats: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    from microdit.errors import UserError

    if len(feats) < 2:
        raise UserError(f"FID needs at least 2 readable images in {what}, got {len(feats)}")
    return feats.mean(0), np.cov(feats, rowvar=False)


# ---------------------------------------------------------------- reference statistics, cached
def _set_signature(items: list) -> str:
    """Changes when the image set changes: names and sizes of files, pixels of in-memory images."""
    digest = hashlib.sha256()
    for item in items:
        if isinstance(item, Image.Image):
            digest.update(item.tobytes())
        else:
            stat = Path(item).stat()
            digest.update(f"{Path(item).name}:{stat.st_size}".encode())
    return digest.hexdigest()


def reference_stats(
    real,
    name: str,
    extractor: FeatureExtractor,
    cache_dir: str | os.PathLike,
    resolution: int | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
) -> dict:
    """Mean and covariance of the real images' features, read from `cache_dir` when already made.

    The cache file is keyed by the set's signature, the extractor's weights and the resolution,
    so a changed evaluation split or extractor is never compared against stale statistics.
    """
    items = _as_items(real)
    key = hashlib.sha256(f"{_set_signature(items)}:{extractor.fingerprint}:{resolution}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{name}-{resolution or 'native'}px-{extractor.kind}-{key}.npz"
    cached = np.load(path) if path.is_file() else None
    if cached is not None and "features" in cached:  # older caches lack the features KID needs
        mu, sigma, n, skipped = cached["mu"], cached["sigma"], int(cached["n"]), int(cached["skipped"])
        feats = cached["features"]
    else:
        feats, skipped = features(items, extractor, resolution, batch_size, num_workers)
        mu, sigma = _moments(feats, f"reference set {name!r}")
        n = len(feats)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, n=n, skipped=skipped, features=feats.astype(np.float32))
    return {
        "name": name,
        "mu": mu,
        "sigma": sigma,
        "features": feats,
        "n": n,
        "skipped": skipped,
        "resolution": resolution,
        "extractor": extractor.kind,
        "fingerprint": extractor.fingerprint,
        "path": str(path),
    }


def fid(
    generated,
    ref: dict,
    extractor: FeatureExtractor,
    batch_size: int = 32,
    num_workers: int = 0,
    seed: int = 0,
) -> dict:
    """FID (and KID, drawn with `seed`) of a folder or list of generated images against
    `reference_stats` output; `features` are the generated images' (for intervals).

    Generated images go through the same resolution and extractor as the reference.
    """
    if ref["fingerprint"] != extractor.fingerprint:
        raise ValueError(f"reference {ref['name']!r} was made with another feature extractor; rebuild it")
    feats, skipped = features(generated, extractor, ref["resolution"], batch_size, num_workers)
    mu, sigma = _moments(feats, "the generated set")
    result = {
        "fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"], features1=feats),
        "kid": kernel_distance(feats, ref["features"], seed=seed) if ref.get("features") is not None else None,
        "comparable": extractor.comparable,
        "extractor": extractor.kind,
        "resolution": ref["resolution"],
        "reference": ref["name"],
        "n_generated": len(feats),
        "n_reference": ref["n"],
        "skipped_generated": skipped,
        "skipped_reference": ref["skipped"],
    }
    result["features"] = feats
    if not extractor.comparable:
        result["note"] = NOT_COMPARABLE
    return result
