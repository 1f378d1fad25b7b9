"""Training batches streamed from precomputed latents, mixed across sources.

Each source is a `microdit latents` output dir (an MDS dataset plus `_summary.json`, which gives
the array shapes). The sources become mosaicml-streaming `Stream`s of one `StreamingDataset`, so
mixing weights, shuffling, sharding across ranks and workers, and mid-epoch resumption are
streaming's. A batch is
    latents   (B, C, h, w) float32   the requested resolution's VAE latents (already scaled)
    captions  (B, 1, 77, D) float32  caption embeddings, zeroed where `drop` is set
    drop      (B,) bool              caption dropped for classifier-free guidance training
    key       list[str]
The loader zeroes the dropped captions itself (the mask is returned for logging). Whether a
sample's caption is dropped is a pure function of (seed, epoch, sample id), so a resumed run
drops exactly what the uninterrupted run would have; an up-sampled sample seen twice in one
epoch gets the same decision both times.

Each shard is checked against the xxh3 its index.json recorded the first time a process reads
from it (bytes changed on disk after the latents stage must not train silently); a mismatch is
a `DamagedShard` error naming the shard, raised before any of its samples is used.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from microdit.errors import UserError
from microdit.io import read_json

CAPTION_DROP = 0.1  # the paper's caption drop probability


def caption_dropped(seed: int, epoch: int, sample_id: int, p: float) -> bool:
    """Seeded, stateless coin flip: the same (seed, epoch, sample_id) always gives the same answer."""
    if p <= 0.0:
        return False
    return bool(np.random.default_rng([seed, epoch, sample_id]).random() < p)


class DamagedShard(UserError):
    """A latents shard whose bytes no longer match its index.json."""

    # torch re-raises an error from a loader worker as `type(message=<its traceback text>)` when
    # the type has this attribute; we keep only our own line of that text
    message = "damaged shard"

    def __init__(self, line: str = "", *, message: str | None = None):
        if message is not None:
            line = message.rstrip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(line)


def check_shard(shard) -> None:
    """Fail with `DamagedShard` if a streaming shard reader's file no longer matches its index."""
    from microdit.data.shard_hash import shard_matches

    for raw_info, zip_info in shard.file_pairs:
        raw = Path(shard.dirname, shard.split or "", raw_info.basename)
        path, info = (raw, raw_info) if raw.is_file() or zip_info is None else \
            (Path(shard.dirname, shard.split or "", zip_info.basename), zip_info)
        if path.is_file() and not shard_matches(path, info.hashes):
            source = Path(shard.dirname)
            raise DamagedShard(f"latents shard {path} does not match the xxh3 in {source / 'index.json'} (changed or "
                               f"damaged after the latents stage wrote it): delete {path.parent} and "
                               f"{source / '_summary.json'} and rerun the latents stage (only that part is redone)")


def source_layout(source: str | os.PathLike, resolution: int) -> tuple[list[int], list[int]]:
    """(latent shape, caption shape) of a latents source at `resolution`, from its `_summary.json`."""
    source = Path(source)
    if not (source / "index.json").is_file():
        raise UserError(f"{source} is not a latents dataset (no index.json): run `microdit latents` first")
    summary_path = source / "_summary.json"
    if not summary_path.is_file():
        raise UserError(f"{summary_path} is missing, so the latent shapes are unknown: rerun `microdit latents`")
    summary = read_json(summary_path)
    column = f"latents_{resolution}"
    if column not in summary.get("latent_shape", {}):
        raise UserError(f"{source} has no latents at {resolution} px (has {sorted(summary.get('latent_shape', {}))}); "
                        f"rerun `microdit latents` with --resolutions including {resolution}")
    return list(summary["latent_shape"][column]), list(summary["caption_shape"])


def _streaming_dataset_class():
    from streaming import StreamingDataset

    class LatentDataset(StreamingDataset):
        """StreamingDataset decoding one resolution's latents and the caption embeddings."""

        def __init__(self, *, resolution: int, latent_shape: Sequence[int], caption_shape: Sequence[int],
                     caption_drop: float, drop_seed: int, **kwargs: Any):
            super().__init__(**kwargs)
            self.column = f"latents_{resolution}"
            self.latent_shape = tuple(latent_shape)
            self.caption_shape = (1, *caption_shape)
            self.caption_drop = caption_drop
            self.drop_seed = drop_seed
            self.epoch = 0
            self.checked_shards: set[int] = set()  # per process: each loader worker checks its own

        def _resume_incr_epoch(self) -> tuple[int, int]:
            # Each worker learns here which epoch it is iterating; the caption drop depends on it.
            epoch, sample_in_epoch = super()._resume_incr_epoch()
            self.epoch = epoch
            return epoch, sample_in_epoch

        def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
            shard_id, _ = self.spanner[sample_id]
            if shard_id not in self.checked_shards:
                check_shard(self.shards[shard_id])
                self.checked_shards.add(shard_id)
            sample = super().get_item(sample_id, retry)
            latents = np.frombuffer(sample[self.column], np.float16).reshape(self.latent_shape)
            captions = np.frombuffer(sample["caption_latents"], np.float16).reshape(self.caption_shape)
            drop = caption_dropped(self.drop_seed, self.epoch, sample_id, self.caption_drop)
            captions = torch.zeros(self.caption_shape) if drop else torch.from_numpy(captions.astype(np.float32))
            return {"latents": torch.from_numpy(latents.astype(np.float32)), "captions": captions,
                    "drop": drop, "key": str(sample.get("key", sample_id))}

    return LatentDataset


def build_latent_loader(
    sources: Sequence[str | os.PathLike],
    resolution: int,
    batch_size: int,
    *,
    weights: Sequence[float] | None = None,
    weighting: str = "proportion",
    seed: int = 0,
    caption_drop: float = CAPTION_DROP,
    shuffle: bool = True,
    epoch_size: int | None = None,
    num_workers: int = 0,
    drop_last: bool = True,
    clean_shm: bool = True,
    **loader_kwargs: Any,
):
    """A `StreamingDataLoader` over latents sources; `batch_size` is per rank.

    weights: one per source; with weighting="proportion" the share of each source in an epoch
        (normalised; `epoch_size` sets the epoch length, default the sources' total size), with
        weighting="repeat" how many times each source is seen per epoch (fractions sub-sample).
    clean_shm: first remove shared memory left by a killed streaming job (which otherwise makes
        the next job hang or fail). It removes every streaming block on the machine, so call the
        builder once per process, before any other StreamingDataset exists.
    Under torchrun, streaming reads RANK/WORLD_SIZE and gives each rank its own samples. Data are
    local: each stream's `local` is the source dir and there is no remote, so nothing is copied.
    `state_dict()`/`load_state_dict()` of the returned loader save and restore the position.
    """
    from streaming import Stream, StreamingDataLoader

    if not sources:
        raise UserError("no latents sources given to the training loader")
    if weights is not None and len(weights) != len(sources):
        raise UserError(f"{len(weights)} weights for {len(sources)} latents sources")
    if weights is not None and any(w < 0 for w in weights):
        raise UserError(f"source weights must be non-negative, got {list(weights)}")
    if weighting not in ("proportion", "repeat"):
        raise UserError(f"weighting must be 'proportion' or 'repeat', got {weighting!r}")
    if not 0.0 <= caption_drop < 1.0:
        raise UserError(f"caption drop probability must be in [0, 1), got {caption_drop}")
    local = [str(Path(s).resolve()) for s in sources]
    if len(set(local)) != len(local):
        raise UserError(f"a latents source is listed twice: {list(map(str, sources))}")

    layouts = {src: source_layout(src, resolution) for src in local}
    latent_shape, caption_shape = layouts[local[0]]
    for src, layout in layouts.items():
        if layout != (latent_shape, caption_shape):
            raise UserError(f"{src} has latents {layout[0]} / captions {layout[1]} but {local[0]} has "
                            f"{latent_shape} / {caption_shape}: sources encoded with different models cannot mix")

    if clean_shm:
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
    streams = [Stream(local=src, remote=None, **({} if weights is None else {weighting: float(w)}))
               for src, w in zip(local, weights or [None] * len(local))]
    dataset = _streaming_dataset_class()(
        streams=streams, resolution=resolution, latent_shape=latent_shape, caption_shape=caption_shape,
        caption_drop=caption_drop, drop_seed=seed, shuffle=shuffle, shuffle_seed=seed,
        batch_size=batch_size, epoch_size=epoch_size,
    )
    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                               **loader_kwargs)
