"""The fast expert-choice MoE computes the same function as the one-hot formulation."""
import pytest
import torch

from microdit.moe import ExpertChoiceMoE
from reference_moe import one_hot_expert_choice


def _pair(dim, hidden, experts, capacity, seed=0):
    torch.manual_seed(seed)
    moe = ExpertChoiceMoE(dim, hidden, experts, capacity)
    with torch.no_grad():  # larger weights than init so the outputs are far from zero
        moe.w1.normal_(std=0.3)
        moe.w2.normal_(std=0.3)
        moe.gate.weight.normal_(std=0.5)
    return moe


def _reference(moe, x):
    return one_hot_expert_choice(x, moe.gate.weight, moe.w1, moe.w2, moe.capacity)


def _grads(fn, moe, x, upstream):
    moe.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    (fn(moe, x) * upstream).sum().backward()
    return [x.grad, moe.w1.grad.clone(), moe.w2.grad.clone(), moe.gate.weight.grad.clone()]


@pytest.mark.parametrize(
    "n,t,dim,hidden,experts,capacity",
    [(2, 16, 8, 12, 4, 1.0), (3, 64, 16, 32, 8, 2.0), (1, 37, 12, 20, 8, 2.0), (2, 256, 32, 64, 8, 2.0), (4, 10, 8, 8, 2, 1.5)],
)
def test_outputs_and_gradients_match_one_hot_reference(n, t, dim, hidden, experts, capacity):
    moe = _pair(dim, hidden, experts, capacity).double()
    x = torch.randn(n, t, dim, dtype=torch.float64)
    upstream = torch.randn(n, t, dim, dtype=torch.float64)

    fast, ref = moe(x), _reference(moe, x)
    assert fast.shape == (n, t, dim)
    assert fast.abs().max() > 1e-3  # a real signal, not two matching zeros
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)

    names = ["x", "w1", "w2", "gate"]
    for name, g_fast, g_ref in zip(names, _grads(lambda m, z: m(z), moe, x, upstream), _grads(_reference, moe, x, upstream)):
        assert g_fast.abs().max() > 0, name
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12, msg=f"gradient of {name} differs")


def test_float32_matches_to_rounding():
    moe = _pair(24, 48, 8, 2.0)
    x = torch.randn(2, 100, 24)
    torch.testing.assert_close(moe(x), _reference(moe, x), rtol=1e-5, atol=1e-6)


def test_tokens_per_expert_and_routing():
    moe = _pair(8, 8, 8, 2.0)
    assert moe.tokens_per_expert(64) == 16
    assert moe.tokens_per_expert(37) == 9  # int(2 * 37 / 8), as released
    x = torch.randn(2, 64, 8)
    weights, picked = moe.route(x)
    assert picked.shape == weights.shape == (2, 8, 16)
    probs = torch.softmax(moe.gate(x), dim=-1)
    # every expert takes its top-16 tokens by probability; weights are those probabilities
    for b in range(2):
        for e in range(8):
            assert set(picked[b, e].tolist()) == set(probs[b, :, e].topk(16).indices.tolist())
            torch.testing.assert_close(weights[b, e], probs[b, picked[b, e], e])


def test_unpicked_tokens_get_zero_and_ties_route_like_reference():
    moe = _pair(8, 16, 4, 0.5)  # k = 2 of 16 tokens per expert: most tokens are skipped
    base = torch.randn(1, 4, 8)
    x = base.repeat(1, 4, 1)  # every token appears 4 times: exact ties in the routing scores
    out, ref = moe(x), _reference(moe, x)
    torch.testing.assert_close(out, ref)
    _, picked = moe.route(x)
    skipped = sorted(set(range(16)) - set(picked.flatten().tolist()))
    assert skipped and out[0, skipped].abs().max() == 0


def test_zero_capacity_gives_zero_output():
    moe = _pair(8, 8, 8, 1.0)
    x = torch.randn(2, 4, 8, requires_grad=True)  # int(1.0 * 4 / 8) = 0 tokens per expert
    out = moe(x)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(out, _reference(moe, x))
    out.sum().backward()  # still differentiable


def test_bfloat16_autocast_close_to_float32():
    moe = _pair(32, 64, 8, 2.0)
    x = torch.randn(2, 64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, ref = moe(x), _reference(moe, x)
    exact = _reference(moe, x)
    assert (fast.float() - exact).abs().max() < 0.05 * exact.abs().max()
    assert (ref.float() - exact).abs().max() < 0.05 * exact.abs().max()


def test_parameter_layout_matches_released_checkpoints():
    moe = ExpertChoiceMoE(dim=1024, hidden_dim=2237, num_experts=8, capacity=2.0, multiple_of=256)
    shapes = {k: tuple(v.shape) for k, v in moe.state_dict().items()}
    assert shapes == {"w1": (8, 1024, 2304), "w2": (8, 2304, 1024), "gate.weight": (8, 1024)}
