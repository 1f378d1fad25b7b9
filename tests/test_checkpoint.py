"""Saving, loading and converting MicroDiT weights."""
import json

import pytest
import torch
from safetensors.torch import save_file

from microdit.checkpoint import (
    CheckpointError,
    from_pretrained,
    load_previous_stage,
    load_released_checkpoint,
    read_state_dict,
    save_pretrained,
)
from microdit.errors import UserError
from microdit.models import MicroDiT_Smoke_2
from test_models import CAPTION_CHANNELS, inputs, randomize, smoke


class Timestamp:  # any class a training framework might pickle into its checkpoints
    def __init__(self, batch):
        self.batch = batch


def fresh(**overrides):
    """An untrained model of the same architecture as `smoke()` (different weights)."""
    return MicroDiT_Smoke_2(**{"input_size": 16, "caption_channels": CAPTION_CHANNELS, **overrides})


def same_weights(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if k not in skip)


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = smoke(pos_interp_scale=2.0)
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config == {"architecture": "MicroDiT_Smoke_2", "input_size": 16, "caption_channels": 64, "pos_interp_scale": 2.0}
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]

    loaded = from_pretrained(tmp_path / "ckpt")
    assert same_weights(model, loaded)
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    assert loaded.config == model.config
    x, t, y = inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, t, y)["sample"], loaded(x, t, y)["sample"])
        torch.manual_seed(0)
        a = model(x, t, y, mask_ratio=0.75)["sample"]
        torch.manual_seed(0)
        b = type(model).from_pretrained(tmp_path / "ckpt")(x, t, y, mask_ratio=0.75)["sample"]
    assert torch.equal(a, b)


def test_save_pretrained_unwraps_compiled_or_ddp_style_wrappers(tmp_path):
    model = smoke()

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel's `.module`
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    save_pretrained(Wrapper(model), tmp_path / "w")
    assert same_weights(model, from_pretrained(tmp_path / "w"))


def test_from_pretrained_rejects_incomplete_directories(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "MicroDiT_Huge_2"}))
    with pytest.raises(CheckpointError, match="unknown architecture"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "MicroDiT_Smoke_2", "input_size": 16}))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "layout",
    ["bare_pt", "dit_prefix_pt", "bare_safetensors", "dit_prefix_safetensors", "state_dict", "composer", "ema", "module_prefix"],
)
def test_load_released_checkpoint_formats(tmp_path, layout):
    source = smoke()
    sd = source.state_dict()
    others = {"vae.decoder.weight": torch.ones(3), "text_encoder.embed.weight": torch.ones(2, 2)}
    prefixed = {**{f"dit.{k}": v for k, v in sd.items()}, **others}
    obj, name = {
        "bare_pt": (sd, "w.pt"),
        "dit_prefix_pt": (prefixed, "w.pth"),
        "bare_safetensors": (sd, "w.safetensors"),
        "dit_prefix_safetensors": (prefixed, "w.safetensors"),
        "state_dict": ({"state_dict": sd, "epoch": 3}, "w.pt"),
        "composer": ({"state": {"model": prefixed, "timestamp": {"batch": 10}}, "rng": [{"torch": 1}]}, "w.pt"),
        "ema": ({"ema": sd}, "w.pt"),
        "module_prefix": ({f"module.{k}": v for k, v in sd.items()}, "w.pt"),
    }[layout]
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    target = fresh()
    assert not same_weights(source, target)
    assert load_released_checkpoint(target, path) is target
    assert same_weights(source, target)


def test_low_precision_checkpoint_loads_into_float32_model(tmp_path):
    source = smoke()
    torch.save({k: v.half() for k, v in source.state_dict().items()}, tmp_path / "half.pt")
    target = load_released_checkpoint(fresh(), tmp_path / "half.pt")
    assert target.blocks[0].attn.qkv.weight.dtype == torch.float32
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight.half().float())


def test_model_entry_preferred_over_ema_unless_asked(tmp_path):
    trained, averaged = smoke(), randomize(fresh(), seed=5)
    torch.save({"model": trained.state_dict(), "ema": averaged.state_dict()}, tmp_path / "both.pt")
    assert same_weights(trained, load_released_checkpoint(fresh(), tmp_path / "both.pt"))
    assert same_weights(averaged, load_released_checkpoint(fresh(), tmp_path / "both.pt", which="ema"))
    with pytest.raises(CheckpointError, match="no entry 'ema_weights'"):
        load_released_checkpoint(fresh(), tmp_path / "both.pt", which="ema_weights")


def test_missing_key_is_named(tmp_path):
    sd = smoke().state_dict()
    del sd["blocks.1.mlp.w2"]
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.1\.mlp\.w2'") as err:
        load_released_checkpoint(fresh(), tmp_path / "w.pt")
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError) and isinstance(err.value, UserError)


def test_unexpected_key_is_named(tmp_path):
    sd = smoke().state_dict()
    sd["blocks.0.attn.extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"unexpected key 'blocks\.0\.attn\.extra\.weight'"):
        load_released_checkpoint(fresh(), tmp_path / "w.pt")


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    smoke(caption_channels=32).save_pretrained(tmp_path / "c32")
    with pytest.raises(CheckpointError) as err:
        load_released_checkpoint(fresh(), tmp_path / "c32")
    message = str(err.value)
    assert "key 'y_embedder.y_proj.fc1.weight' has shape (128, 32) in the checkpoint but (128, 64) in the model" in message
    assert "more keys" not in message and "\n" not in message
    smoke(in_channels=16).save_pretrained(tmp_path / "c16")  # several keys differ: the first is named, the rest counted
    with pytest.raises(CheckpointError, match=r"key 'mask_token' has shape \(1, 1, 64\).*\(1, 1, 16\).*and 3 more keys"):
        load_released_checkpoint(fresh(), tmp_path / "c16")


def test_unreadable_files_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_state_dict(tmp_path / "nope.pt")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        read_state_dict(tmp_path / "w.npz")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(tmp_path / "broken.safetensors")
    good = tmp_path / "good.pt"
    torch.save(smoke().state_dict(), good)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(tmp_path / "truncated.pt")
    torch.save({"model": smoke().state_dict(), "timestamp": Timestamp(3)}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        read_state_dict(tmp_path / "pickled.pt")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no MicroDiT weights found"):
        read_state_dict(tmp_path / "other.pt")


def test_stage_transition_256_to_512(tmp_path):
    stage2 = smoke(input_size=16)
    stage2.save_pretrained(tmp_path / "stage2")
    stage3 = fresh(input_size=32, pos_interp_scale=2.0)
    pos_512 = stage3.pos_embed.clone()

    with pytest.raises(CheckpointError, match=r"'pos_embed' has shape \(1, 64, 128\).*\(1, 256, 128\).*load_previous_stage"):
        load_released_checkpoint(stage3, tmp_path / "stage2")

    load_previous_stage(stage3, tmp_path / "stage2")
    assert torch.equal(stage3.pos_embed, pos_512)  # recomputed sincos table kept
    assert same_weights(stage2, stage3, skip=("pos_embed",))
    x, t, y = inputs(stage3)
    assert stage3(x, t, y)["sample"].shape == (2, 4, 32, 32)

    # anything but pos_embed must still match
    with pytest.raises(CheckpointError, match="y_embedder.y_proj.fc1.weight"):
        load_previous_stage(fresh(input_size=32, caption_channels=32), tmp_path / "stage2")
