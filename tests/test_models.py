"""MicroDiT architecture: sizes, checkpoint layout, masking, position embedding, guidance, FLOPs."""
import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from microdit import settings
from microdit.models import (
    MODEL_CONFIGS,
    MODELS,
    MicroDiT,
    MicroDiT_Smoke_2,
    MicroDiT_Tiny_2,
    MicroDiT_XL_2,
    build_model,
    flops_per_image,
    model_from_config,
    random_patch_mask,
    sincos_pos_embed_2d,
)

CAPTION_CHANNELS = 64


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Deterministic, well-scaled random weights for every parameter (the released init zeroes
    the output layers, which would make most comparisons vacuous). Depends only on names/shapes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() == 1:  # norm scales around 1, biases around 0
                value = 1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise
            else:
                fan_in = p.shape[1] * (math.prod(p.shape[2:]) if p.dim() == 4 else 1)
                value = noise / fan_in**0.5
            p.copy_(value)
    return model


def smoke(**overrides) -> MicroDiT:
    return randomize(MicroDiT_Smoke_2(**{"input_size": 16, "caption_channels": CAPTION_CHANNELS, **overrides}))


def inputs(model: MicroDiT, n: int = 2, caption_len: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    s = model.input_size
    x = torch.randn(n, model.in_channels, s, s, generator=g)
    t = torch.randn(n, generator=g)
    y = torch.randn(n, 1, caption_len, model.caption_channels, generator=g)
    return x, t, y


# ---- sizes and checkpoint layout -----------------------------------------------------------------

def test_parameter_counts_match_paper():
    with torch.device("meta"):
        xl, tiny = MicroDiT_XL_2(caption_channels=1024, in_channels=4), MicroDiT_Tiny_2(caption_channels=1024, in_channels=4)
    assert sum(p.numel() for p in xl.parameters()) == 1_165_442_320
    assert sum(p.numel() for p in tiny.parameters()) == 200_692_752


def test_xl_state_dict_layout_is_the_released_one():
    with torch.device("meta"):
        sd = MicroDiT_XL_2().state_dict()
    assert len(sd) == 478
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    expected = {
        "x_embedder.proj.weight": (1024, 4, 2, 2),
        "x_embedder.proj.bias": (1024,),
        "pos_embed": (1, 256, 1024),
        "mask_token": (1, 1, 16),
        "t_embedder.mlp.0.weight": (1024, 512),
        "y_embedder.y_proj.fc1.weight": (1024, 1024),
        "y_embedder.y_proj.norm.weight": (1024,),
        "y_emb_preprocess.attn.qkv.weight": (3072, 1024),
        "y_emb_preprocess.mlp.w1.weight": (2816, 1024),
        "pooled_y_emb_process.fc2.bias": (1024,),
        "patch_mixer.0.mlp.w1.weight": (2048, 768),  # dense SwiGLU in mixer block 0
        "patch_mixer.5.mlp.w1": (8, 768, 3072),  # MoE in mixer blocks 1, 3, 5
        "patch_mixer.5.mlp.gate.weight": (8, 768),
        "patch_mixer.0.adaLN_modulation.1.weight": (4608, 1024),
        "patch_mixer_map_xin.1.weight": (768, 1024),
        "patch_mixer_map_xout.0.weight": (768,),
        "patch_mixer_map_y.1.weight": (768, 1024),
        "blocks.0.attn.qkv.weight": (1536, 1024),  # layer-wise scaling: qkv 0.5x at the bottom
        "blocks.0.attn.ln_q.weight": None,
        "blocks.0.mlp.w1.weight": (512, 1024),
        "blocks.1.mlp.w1": (8, 1024, 768),
        "blocks.13.mlp.w2": (8, 2304, 1024),
        "blocks.25.mlp.w1": (8, 1024, 3840),
        "blocks.27.attn.qkv.weight": (3072, 1024),  # ... 1.0x at the top
        "blocks.27.mlp.w3.weight": (1024, 2816),  # the last block is dense
        "blocks.27.cross_attn.kv_linear.weight": (2048, 1024),
        "final_layer.linear.weight": (16, 1024),
        "final_layer.adaLN_modulation.1.weight": (2048, 1024),
        "final_layer.norm_final.weight": (1024,),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    moe_blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.endswith("mlp.gate.weight")})
    assert moe_blocks == list(range(1, 27, 2))
    assert not any(k.endswith(".bias") and k.startswith(("blocks", "patch_mixer.")) and "adaLN" not in k for k in sd)


def test_named_models_and_config():
    assert set(MODELS) == {"MicroDiT_XL_2", "MicroDiT_Tiny_2", "MicroDiT_Smoke_2"}
    model = MicroDiT_Smoke_2(input_size=16, caption_channels=CAPTION_CHANNELS, pos_interp_scale=2.0)
    assert model.config == {"architecture": "MicroDiT_Smoke_2", "input_size": 16, "caption_channels": 64, "pos_interp_scale": 2.0}
    rebuilt = model_from_config(json.loads(json.dumps(model.config)))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    torch.testing.assert_close(rebuilt.pos_embed, model.pos_embed)
    assert build_model("Smoke_2").config == {"architecture": "MicroDiT_Smoke_2"}
    with pytest.raises(ValueError, match="unknown MicroDiT size"):
        build_model("Huge_2")


def test_smoke_model_has_every_mechanism():
    m = MicroDiT_Smoke_2()
    kinds = lambda blocks: [type(b.mlp).__name__ for b in blocks]  # noqa: E731
    assert kinds(m.patch_mixer) == ["SwiGLU", "ExpertChoiceMoE"]
    assert kinds(m.blocks) == ["SwiGLU", "ExpertChoiceMoE", "SwiGLU", "SwiGLU"]
    qkv = [b.attn.qkv.out_features for b in m.blocks]
    ffn = [b.mlp.hidden_dim for b in m.blocks]
    assert qkv == sorted(qkv) and qkv[0] < qkv[-1]  # layer-wise scaling
    assert ffn[0] < ffn[-1]
    assert isinstance(m.patch_mixer_map_xin, torch.nn.Sequential)  # mixer at its own width


def test_official_init_scheme():
    m = MicroDiT_Smoke_2()
    assert m.final_layer.linear.weight.abs().max() == 0
    assert all(b.adaLN_modulation[-1].weight.abs().max() == 0 for b in [*m.blocks, *m.patch_mixer])
    assert m.y_emb_preprocess.attn.proj.weight.abs().max() == 0
    assert m.y_emb_preprocess.mlp.w3.weight.abs().max() == 0
    # depth-scaled output projections: std 0.02 / sqrt(2 (i + 1))
    assert m.blocks[0].out_std == pytest.approx(0.02 / 2**0.5)
    assert m.blocks[3].out_std == pytest.approx(0.02 / 8**0.5)
    assert m.patch_mixer[0].out_std == pytest.approx(0.02 / 8**0.5)
    # with zero output layers a fresh model predicts exactly zero
    fresh = MicroDiT_Smoke_2(input_size=16, caption_channels=CAPTION_CHANNELS)
    assert fresh(*inputs(fresh))["sample"].abs().max() == 0


# ---- forward -------------------------------------------------------------------------------------

@pytest.mark.parametrize("latent,scale", [(32, 1.0), (64, 2.0)])  # 256 px and 512 px
def test_output_shapes(latent, scale):
    model = smoke(input_size=latent, pos_interp_scale=scale)
    x, t, y = inputs(model, n=1, caption_len=5)
    with torch.no_grad():
        out = model(x, t, y)
        masked = model(x, t, y, mask_ratio=0.75)
    assert out["sample"].shape == x.shape and out["mask"] is None
    assert masked["sample"].shape == x.shape and masked["mask"].shape == (1, (latent // 2) ** 2)


def test_deferred_masking_keeps_expected_patches():
    model = smoke()
    tokens = (16 // 2) ** 2
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = args[0].shape[1]  # tokens entering the block
        return hook

    model.patch_mixer[0].register_forward_hook(record("mixer"))
    model.blocks[0].register_forward_hook(record("backbone"))
    model.mask_token.fill_(7.0)
    x, t, y = inputs(model, n=3)
    with torch.no_grad():
        out = model(x, t, y, mask_ratio=0.75)
    mask = out["mask"]
    assert seen == {"mixer": tokens, "backbone": int(tokens * 0.25)}
    assert mask.shape == (3, tokens) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert (mask.sum(dim=1) == tokens - int(tokens * 0.25)).all()
    assert len({tuple(row.tolist()) for row in mask}) == 3  # each sample draws its own mask
    # dropped patches come back as the mask token, kept ones as predictions
    patches = out["sample"].unfold(2, 2, 2).unfold(3, 2, 2).reshape(3, 4, tokens, 4)
    assert (patches[mask.bool().unsqueeze(1).expand(-1, 4, -1)] == 7.0).all()
    assert (patches[~mask.bool().unsqueeze(1).expand(-1, 4, -1)] != 7.0).all()


def test_mask_ratio_rounding_and_generator():
    ids_keep, ids_restore, mask = random_patch_mask(2, 10, 0.75, torch.device("cpu"))
    assert ids_keep.shape == (2, 2) and mask.sum().item() == 16  # int(10 * 0.25) = 2 kept
    for row in range(2):
        assert mask[row, ids_keep[row]].sum() == 0
    model = smoke()
    x, t, y = inputs(model)
    run = lambda seed: model(x, t, y, mask_ratio=0.5, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    with torch.no_grad():
        a, b, c = run(3), run(3), run(4)
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["sample"], b["sample"])
    assert not torch.equal(a["mask"], c["mask"])
    # without a generator the global RNG draws the mask, as in the released code
    torch.manual_seed(9)
    d = model(x, t, y, mask_ratio=0.5)
    torch.manual_seed(9)
    e = model(x, t, y, mask_ratio=0.5)
    assert torch.equal(d["mask"], e["mask"])


def test_pos_interp_scale():
    base = sincos_pos_embed_2d(64, grid=16, base_size=16, pos_interp_scale=1.0).view(16, 16, 64)
    fine = sincos_pos_embed_2d(64, grid=32, base_size=32, pos_interp_scale=2.0).view(32, 32, 64)
    torch.testing.assert_close(fine[::2, ::2], base)  # 512 px covers the 256 px range, twice as finely
    plain = sincos_pos_embed_2d(64, grid=32, base_size=32, pos_interp_scale=1.0).view(32, 32, 64)
    torch.testing.assert_close(plain[:16, :16], base)  # without interpolation it extrapolates instead
    assert not torch.allclose(plain[::2, ::2], base)
    # first half encodes the column, second half the row; sin then cos at frequency 1 for offset 0
    assert torch.equal(base[0, 5, :32], base[3, 5, :32]) and torch.equal(base[5, 0, 32:], base[5, 3, 32:])
    assert base[0, 1, 0].item() == pytest.approx(math.sin(1.0)) and base[0, 1, 16].item() == pytest.approx(math.cos(1.0))
    model = MicroDiT_Smoke_2(input_size=32, pos_interp_scale=2.0)
    assert model.pos_embed.shape == (1, 256, 128)
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed_2d(128, 16, 16, 2.0))


def test_timestep_and_caption_layouts_are_equivalent():
    model = smoke()
    x, t, y = inputs(model)
    with torch.no_grad():
        full = model(x, t[:1].expand(2).contiguous(), y)["sample"]
        single = model(x, t[:1], y)["sample"]
        flat = model(x, t[:1], y[:, 0])["sample"]
    torch.testing.assert_close(single, full)
    torch.testing.assert_close(flat, full)


def test_classifier_free_guidance():
    model = smoke()
    x, t, y = inputs(model)
    with torch.no_grad():
        cond = model(x, t, y)["sample"]
        uncond = model(x, t, torch.zeros_like(y))["sample"]
        assert not torch.allclose(cond, uncond)
        torch.testing.assert_close(model(x, t, y, cfg=1.0)["sample"], cond)
        for scale in (0.0, 2.5, 5.0):
            guided = model(x, t, y, cfg=scale)
            torch.testing.assert_close(guided["sample"], uncond + scale * (cond - uncond), rtol=1e-4, atol=1e-4)
            assert guided["mask"] is None
        with pytest.raises(ValueError, match="guidance"):
            model(x, t, y, cfg=2.0, mask_ratio=0.5)


def test_bad_inputs_fail_clearly():
    model = smoke()
    x, t, y = inputs(model)
    with pytest.raises(ValueError, match="built for 16x16"):
        model(torch.randn(2, 4, 32, 32), t, y)
    with pytest.raises(ValueError, match="latents must be"):
        model(torch.randn(2, 3, 16, 16), t, y)
    with pytest.raises(ValueError, match="captions must be"):
        model(x, t, torch.randn(2, 7, 32))
    with pytest.raises(ValueError, match="noise levels"):
        model(x, torch.randn(3), y)


def test_backward_reaches_every_parameter():
    model = smoke()
    x, t, y = inputs(model)
    model(x, t, y, mask_ratio=0.5)["sample"].square().mean().backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert dead == []


# ---- equality with the released implementation ---------------------------------------------------
# Fingerprints of the released micro_diffusion DiT (same config as MicroDiT_Smoke_2 with
# caption_channels=64), given `randomize(seed=0)` weights and `inputs()`: output sum, sum of
# absolute values, and 5 entries of the flattened output. Masked: torch.manual_seed(123) first.
RELEASED = {
    "plain": [-133.198554, 2472.19434, -0.324346215, 0.663526177, 1.3967129, 1.94107425, 1.91252124],
    "mask": [-20.7635076, 620.505659, 0.0, 0.0, 1.34262276, 0.0, 0.0],
    "cfg": [1311.16901, 8496.83954, -6.45890093, -2.67934084, 6.37864828, 3.45511127, 12.0767441],
    "512px": [-1100.36171, 10652.4321, 3.41877222, -1.58084285, -0.63155216, -2.81480169, 0.823508859],
}
PROBES = [0, 100, 777, 1500, 2047]


def fingerprint(sample: torch.Tensor) -> list[float]:
    flat = sample.double().flatten()
    return [flat.sum().item(), flat.abs().sum().item(), *[flat[i].item() for i in PROBES]]


def released_cases(model_factory):
    """(name, output) for each fingerprinted case; `model_factory(**overrides)` builds the model."""
    out = {}
    with torch.no_grad():
        model = model_factory(input_size=16)
        x, t, y = inputs(model)
        out["plain"] = model(x, t, y)["sample"]
        torch.manual_seed(123)
        out["mask"] = model(x, t, y, mask_ratio=0.75)["sample"]
        out["cfg"] = model(x, t, y, cfg=3.0)["sample"]
        model = model_factory(input_size=32, pos_interp_scale=2.0)
        x, t, y = inputs(model)
        out["512px"] = model(x, t, y)["sample"]
    return out


def test_matches_released_implementation():
    got = released_cases(lambda **kw: smoke(**kw))
    for case, expected in RELEASED.items():
        assert fingerprint(got[case]) == pytest.approx(expected, rel=1e-4, abs=1e-5), case


# ---- FLOPs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_ratio", [0.0, 0.75])
def test_flops_per_image_matches_flop_counter(mask_ratio):
    model = smoke()
    x, t, y = inputs(model, n=2, caption_len=77)
    # The math backend writes attention as matmuls, which the counter sees. Its table has no entry for
    # the fused CPU kernel (`_scaled_dot_product_flash_attention_for_cpu`, chosen by default since torch
    # 2.14), so under the default backend every attention FLOP would go uncounted.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y, mask_ratio=mask_ratio)
    assert flops_per_image(model, mask_ratio, caption_len=77) * 2 == counter.get_total_flops()


def test_flops_xl_ballpark():
    with torch.device("meta"):
        xl = MicroDiT_XL_2()
    full, masked = flops_per_image(xl, 0.0), flops_per_image(xl, 0.75)
    # ~119 GMACs at 256 px (DiT-XL/2 is 119 GMACs with 675M dense parameters); masking 75% of the
    # patches leaves the caption path and the mixer at full cost
    assert 0.2e12 < full < 0.3e12
    assert 0.2 < masked / full < 0.5


def test_settings_offer_exactly_the_sizes_the_models_build():
    assert settings.MODEL_SIZES == tuple(MODEL_CONFIGS) == tuple(MODELS)
    for name in settings.MODEL_SIZES:
        with torch.device("meta"):  # construction only: XL's weights would cost seconds and gigabytes
            model = build_model(name, input_size=4)
            assert MODELS[name](input_size=4).config == model.config == {"architecture": name, "input_size": 4}
        assert model.grid_size == 2 and len(model.blocks) == MODEL_CONFIGS[name]["depth"]
