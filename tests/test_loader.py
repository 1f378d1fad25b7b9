"""The training loader: mixing, batch layout, caption drop, mid-epoch resumption."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from microdit.errors import UserError
from microdit.data.loader import build_latent_loader, caption_dropped
from microdit.io import write_json

LATENT = (4, 2, 2)  # a 16 px image through a factor-8 VAE
CAPTION = (77, 4)


def write_source(directory: Path, name: str, n: int, resolution: int = 16) -> Path:
    """A latents source as `microdit latents` writes it; values encode (source, index)."""
    from streaming import MDSWriter

    columns = {"key": "str", "caption": "str", "caption_latents": "bytes", f"latents_{resolution}": "bytes"}
    source_id = sum(map(ord, name)) % 100
    with MDSWriter(out=str(directory), columns=columns, size_limit=1 << 14) as writer:
        for i in range(n):
            latents = np.full(LATENT, source_id, np.float16)
            latents[0, 0, 0] = i
            captions = np.full(CAPTION, i % 50 + 1, np.float16)
            writer.write({"key": f"{name}-{i:04d}", "caption": f"caption {i}",
                          "caption_latents": captions.tobytes(), f"latents_{resolution}": latents.tobytes()})
    write_json(directory / "_summary.json", {"input": n, "encoded": n, "failed": {}, "resolutions": [resolution],
                                             "latent_shape": {f"latents_{resolution}": list(LATENT)},
                                             "caption_shape": list(CAPTION)})
    return directory


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    return write_source(root / "real", "real", 120), write_source(root / "synth", "synth", 80)


def loader(srcs, **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("clean_shm", False)  # other jobs on this machine may be streaming right now
    return build_latent_loader([str(s) for s in srcs], 16, **kw)


def batches(it, n):
    return [next(it) for _ in range(n)]


def test_batch_layout_and_zeroed_captions(sources):
    batch = next(iter(loader(sources, caption_drop=0.5, seed=1)))
    assert batch["latents"].shape == (8, *LATENT) and batch["latents"].dtype == torch.float32
    assert batch["captions"].shape == (8, 1, *CAPTION) and batch["captions"].dtype == torch.float32
    assert batch["drop"].shape == (8,) and batch["drop"].dtype == torch.bool
    assert len(batch["key"]) == 8 and all(isinstance(k, str) for k in batch["key"])
    assert 0 < batch["drop"].sum() < 8  # p = 0.5 over 8 samples, seed 1: both kinds present
    for k, key in enumerate(batch["key"]):
        index = int(key.split("-")[1])
        assert batch["latents"][k, 0, 0, 0] == index
        expected = 0.0 if batch["drop"][k] else float(index % 50 + 1)
        assert torch.all(batch["captions"][k] == expected)


def test_mixing_proportions_and_repeats(sources):
    def share_of_real(**kw):
        keys = [k for b in loader(sources, batch_size=10, **kw) for k in b["key"]]
        return sum(k.startswith("real") for k in keys), len(keys)

    real, total = share_of_real(weights=[0.8, 0.2], epoch_size=400)
    assert total == 400 and abs(real / total - 0.8) < 0.03
    real, total = share_of_real(weights=[0.5, 2.0], weighting="repeat")
    assert (real, total) == (60, 220)  # 120 x 0.5 + 80 x 2
    real, total = share_of_real()  # no weights: every sample once
    assert (real, total) == (120, 200)


def test_caption_drop_rate_and_determinism(tmp_path):
    big = write_source(tmp_path / "big", "big", 1000)

    def drops(**kw):
        return {k: bool(d) for b in loader([big], batch_size=50, **kw) for k, d in zip(b["key"], b["drop"])}

    first = drops(seed=7)
    assert len(first) == 1000 and 0.07 < np.mean(list(first.values())) < 0.13
    assert drops(seed=7) == first
    assert drops(seed=8) != first
    assert not any(drops(seed=7, caption_drop=0.0).values())
    assert caption_dropped(7, 0, 5, 0.1) == caption_dropped(7, 0, 5, 0.1)
    flips = [caption_dropped(7, epoch, 5, 0.5) for epoch in range(40)]
    assert 0 < sum(flips) < 40  # the decision changes with the epoch


def test_next_epoch_drops_other_captions(sources):
    dl = loader(sources, caption_drop=0.3, seed=2)
    epochs = [{k: bool(d) for b in dl for k, d in zip(b["key"], b["drop"])} for _ in range(2)]
    common = sorted(set(epochs[0]) & set(epochs[1]))
    assert len(common) > 150
    assert [epochs[0][k] for k in common] != [epochs[1][k] for k in common]


def assert_same(a, b):
    assert a["key"] == b["key"]
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["captions"], b["captions"])
    assert torch.equal(a["drop"], b["drop"])


@pytest.mark.parametrize("epoch", [0, 1])
def test_state_restore_continues_exactly(sources, epoch):
    kw = dict(weights=[0.7, 0.3], epoch_size=160, seed=5, caption_drop=0.3)
    uninterrupted = loader(sources, **kw)
    for _ in range(epoch):
        for _ in uninterrupted:
            pass
    it = iter(uninterrupted)
    batches(it, 3)
    state = uninterrupted.state_dict()
    expected = batches(it, 4)

    resumed = loader(sources, **kw)
    resumed.load_state_dict(state)
    got = batches(iter(resumed), 4)
    for a, b in zip(expected, got):
        assert_same(a, b)
    assert any(b["drop"].any() for b in got)


def test_workers_see_the_same_drops(sources):
    def by_key(**kw):
        return {k: (bool(d), float(c.abs().sum())) for b in loader(sources, seed=4, caption_drop=0.3, **kw)
                for k, d, c in zip(b["key"], b["drop"], b["captions"])}

    assert by_key(num_workers=2) == by_key(num_workers=0)


def test_bad_sources_are_clear_errors(tmp_path, sources):
    with pytest.raises(UserError, match="no index.json"):
        loader([tmp_path / "missing"])
    with pytest.raises(UserError, match="no latents at 32 px"):
        build_latent_loader([str(sources[0])], 32, batch_size=2, clean_shm=False)
    with pytest.raises(UserError, match="listed twice"):
        loader([sources[0], sources[0]])
    with pytest.raises(UserError, match="2 weights"):
        loader([sources[0]], weights=[1, 2])
    other = write_source(tmp_path / "wide", "wide", 4)
    write_json(other / "_summary.json", {"latent_shape": {"latents_16": [16, 2, 2]}, "caption_shape": [77, 4]})
    with pytest.raises(UserError, match="cannot mix"):
        loader([sources[0], other])


def test_cleans_stale_shared_memory_first(sources, monkeypatch):
    import streaming.base.util

    calls = []
    monkeypatch.setattr(streaming.base.util, "clean_stale_shared_memory", lambda: calls.append(1))
    build_latent_loader([str(sources[0])], 16, batch_size=2)
    assert calls == [1]
