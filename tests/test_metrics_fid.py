"""FID: the distance itself, clean-fid's resize, cached reference statistics, the extractor formats."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from microdit.errors import UserError
from microdit.metrics import fid as fidlib


class TinyFeatures(torch.nn.Module):
    """A fixed random conv net (stand-in for Inception): [0, 255] images -> 8 features; counts calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(
            torch.nn.AvgPool2d(4), torch.nn.Conv2d(3, 8, 3), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1)
        )
        self.images_seen = 0

    def forward(self, x):
        self.images_seen += len(x)
        return self.net(x / 255).flatten(1)


def tiny_extractor(input_size: int = 32) -> fidlib.FeatureExtractor:
    return fidlib.FeatureExtractor(TinyFeatures(), "tiny", comparable=False, fingerprint="tiny-v1", input_size=input_size)


def draw_set(folder, n=12, shift=0, size=40, seed=0):
    """n images of a random coloured disc on a plain background; `shift` brightens every pixel."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(150, 230, 3)))
        x, y, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(4, 8))]
        ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        if shift:
            image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + shift, 0, 255).astype(np.uint8))
        image.save(folder / f"{i:03d}.png")
    return folder


def gaussian_moments(rng, n, d, scale=1.0):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * scale / np.sqrt(d)
    return x, x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # clean-fid passes scipy a deprecated argument
@pytest.mark.parametrize("n1", [200, 10])  # full-rank covariance, then fewer samples than dimensions
def test_frechet_distance_matches_cleanfid(n1):
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    rng = np.random.default_rng(0)
    x1, mu1, s1 = gaussian_moments(rng, n1, 16)
    _, mu2, s2 = gaussian_moments(rng, 300, 16, scale=1.5)
    mu2 = mu2 + 0.3
    reference = cleanfid_frechet(mu1, s1, mu2, s2)
    assert fidlib.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)
    assert fidlib.frechet_distance(mu1, s1, mu2, s2, features1=x1) == pytest.approx(reference, rel=1e-6)
    assert fidlib.frechet_distance(mu1, s1, mu1, s1, features1=x1) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_of_known_gaussians():
    # N(0, I) vs N(m, 4I) in d dims: |m|^2 + d(1 + 4 - 2*2) = |m|^2 + d
    d, m = 5, np.full(5, 2.0)
    assert fidlib.frechet_distance(np.zeros(d), np.eye(d), m, 4 * np.eye(d)) == pytest.approx(20 + 5)
    with pytest.raises(ValueError, match="feature sizes"):
        fidlib.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_features_use_cleanfids_clean_resize(tmp_path):
    from cleanfid.fid import get_folder_features

    folder = draw_set(tmp_path / "real", n=4)
    extractor = tiny_extractor(input_size=299)  # clean-fid's own pipeline always resizes to 299
    ours, skipped = fidlib.features(folder, extractor)
    theirs = get_folder_features(str(folder), extractor.net, num_workers=0, batch_size=2, device=torch.device("cpu"), mode="clean", verbose=False)
    assert skipped == 0 and ours.shape == (4, 8)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(tmp_path):
    real = draw_set(tmp_path / "real")
    extractor = tiny_extractor()
    ref = fidlib.reference_stats(real, "shapes_eval", extractor, tmp_path / "cache", resolution=32)
    same = fidlib.fid(real, ref, extractor)
    assert same["fid"] == pytest.approx(0, abs=1e-6)
    assert same["n_generated"] == same["n_reference"] == 12 and same["resolution"] == 32
    assert same["comparable"] is False and "not comparable" in same["note"] and same["extractor"] == "tiny"

    small = fidlib.fid(draw_set(tmp_path / "shift40", shift=40), ref, extractor)["fid"]
    large = fidlib.fid(draw_set(tmp_path / "shift120", shift=120), ref, extractor)["fid"]
    assert 1e-4 < small < large
    # in-memory PIL images give the same numbers as their files
    pil = [Image.open(p).convert("RGB") for p in sorted((tmp_path / "shift40").glob("*.png"))]
    assert fidlib.fid(pil, ref, extractor)["fid"] == pytest.approx(small, rel=1e-9)


def test_reference_stats_are_cached_and_keyed_by_the_set(tmp_path):
    real = draw_set(tmp_path / "real", n=6)
    extractor = tiny_extractor()
    first = fidlib.reference_stats(real, "ev", extractor, tmp_path / "cache", resolution=32)
    seen = extractor.net.images_seen
    again = fidlib.reference_stats(real, "ev", extractor, tmp_path / "cache", resolution=32)
    assert extractor.net.images_seen == seen == 6  # second call read the cache
    assert again["path"] == first["path"] and np.array_equal(again["sigma"], first["sigma"])

    draw_set(tmp_path / "real", n=7)  # the split changed: stale statistics must not be reused
    changed = fidlib.reference_stats(real, "ev", extractor, tmp_path / "cache", resolution=32)
    assert changed["path"] != first["path"] and changed["n"] == 7
    other_res = fidlib.reference_stats(real, "ev", extractor, tmp_path / "cache", resolution=16)
    assert other_res["path"] != changed["path"]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3

    wrong = tiny_extractor()
    wrong.fingerprint = "other-weights"
    with pytest.raises(ValueError, match="another feature extractor"):
        fidlib.fid(real, first, wrong)


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    real = draw_set(tmp_path / "real", n=5)
    (real / "zz_corrupt.png").write_bytes(b"not a png")
    extractor = tiny_extractor()
    ref = fidlib.reference_stats(real, "ev", extractor, tmp_path / "cache")
    assert ref["n"] == 5 and ref["skipped"] == 1
    result = fidlib.fid(real, ref, extractor)
    assert result["skipped_generated"] == 1 and result["n_generated"] == 5

    with pytest.raises(UserError, match="no images"):
        fidlib.list_images(tmp_path / "cache")
    with pytest.raises(UserError, match="does not exist"):
        fidlib.list_images(tmp_path / "missing")
    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "a.png")
    with pytest.raises(UserError, match="at least 2"):
        fidlib.fid(tmp_path / "one", ref, extractor)


def test_square_resize_crops_the_centre():
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # blue centre square between red sides
    out = fidlib.square_resize(image, 10)
    assert out.size == (10, 10)
    assert np.asarray(out)[..., 2].min() == 255 and np.asarray(out)[..., 0].max() == 0


def test_torchvision_inception_extractor_format(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    inception = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True).eval()
    model_dir = tmp_path / "fid"
    model_dir.mkdir()
    save_file(inception.state_dict(), model_dir / "model.safetensors")
    config = {"kind": "torchvision_inception_v3", "feature_dim": 2048, "comparable": False, "input_size": 75}
    (model_dir / "config.json").write_text(json.dumps(config))  # 75 px: Inception's smallest input, fast

    extractor = fidlib.load_extractor(model_dir)
    assert extractor.kind == "torchvision_inception_v3" and not extractor.comparable and extractor.input_size == 75
    images = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 48), (30, 30, 200))]
    feats, skipped = fidlib.features(images, extractor, resolution=64, batch_size=2)
    assert feats.shape == (2, 2048) and skipped == 0 and np.isfinite(feats).all()
    assert not np.allclose(feats[0], feats[1])
    again, _ = fidlib.features(images, fidlib.load_extractor(model_dir), resolution=64)
    np.testing.assert_allclose(again, feats, rtol=1e-4, atol=1e-5)

    # other weights, another fingerprint: cached statistics are never mixed up
    state = dict(inception.state_dict())
    state["Conv2d_1a_3x3.conv.weight"] = state["Conv2d_1a_3x3.conv.weight"] + 1
    save_file(state, model_dir / "model.safetensors")
    assert fidlib.load_extractor(model_dir).fingerprint != extractor.fingerprint

    save_file({"not_inception.weight": torch.zeros(1)}, model_dir / "model.safetensors")
    with pytest.raises(UserError, match="does not load as torchvision_inception_v3"):
        fidlib.load_extractor(model_dir)


def test_extractor_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="config.json missing"):
        fidlib.load_extractor(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"kind": "cleanfid_inception", "comparable": True}))
    with pytest.raises(UserError, match="inception-2015-12-05.pt"):
        fidlib.load_extractor(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"kind": "vgg"}))
    with pytest.raises(UserError, match="unknown FID extractor kind"):
        fidlib.load_extractor(tmp_path)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # clean-fid's weights are TorchScript, which torch deprecates
def test_cleanfid_inception_kind_is_comparable(tmp_path):
    """The paper kind: a TorchScript file with clean-fid's layout (`.layers` -> 2048 features); a
    stand-in network here, since the real weights cannot be downloaded in tests."""

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(3, 2048, 1))

        def forward(self, x):
            return self.layers(x)

    torch.jit.script(Scripted()).save(str(tmp_path / "inception-2015-12-05.pt"))
    (tmp_path / "config.json").write_text(json.dumps({"kind": "cleanfid_inception", "feature_dim": 2048, "comparable": True, "input_size": 299}))
    extractor = fidlib.load_extractor(tmp_path)
    assert extractor.comparable and extractor.kind == "cleanfid_inception" and extractor.input_size == 299
    real = draw_set(tmp_path / "real", n=4)
    ref = fidlib.reference_stats(real, "coco", extractor, tmp_path / "cache", resolution=32)
    result = fidlib.fid(real, ref, extractor)
    assert result["comparable"] is True and "note" not in result
    assert result["fid"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("n_gen, n_ref, size", [(40, 70, 1000), (300, 200, 128)])
def test_kernel_distance_matches_cleanfid(n_gen, n_ref, size):
    from cleanfid.fid import kernel_distance as theirs

    from microdit.metrics.fid import kernel_distance

    rng = np.random.default_rng(n_gen)
    gen, ref = rng.normal(size=(n_gen, 32)) + 0.1, rng.normal(size=(n_ref, 32))
    np.random.seed(7)
    expected = theirs(ref, gen, num_subsets=20, max_subset_size=size)
    assert kernel_distance(gen, ref, subsets=20, subset_size=size, seed=7) == pytest.approx(expected, rel=1e-12)
    # the same set against itself is about zero next to a shifted one; a larger shift is further
    shifted = kernel_distance(gen + 1.0, ref, seed=1)
    assert abs(kernel_distance(ref, ref, subsets=5, seed=0)) < shifted / 10
    assert shifted > kernel_distance(gen + 0.5, ref, seed=1) > 0
