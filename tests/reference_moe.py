"""Expert-choice MoE written the plain way, with a one-hot (N, E, k, T) dispatch tensor.

This is the formulation of the released MicroDiT code, kept as the ground truth that the fast
gather / batched-matmul / scatter-add version in `microdit.moe` is tested and benchmarked against.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def one_hot_expert_choice(
    x: torch.Tensor, gate_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, capacity: float
) -> torch.Tensor:
    """x (N, T, D); gate_weight (E, D); w1 (E, D, H); w2 (E, H, D) -> (N, T, D)."""
    num_tokens, num_experts = x.shape[1], w1.shape[0]
    k = int(capacity * num_tokens / num_experts)
    probs = F.softmax(F.linear(x, gate_weight), dim=-1)  # (N, T, E)
    weights, picked = torch.topk(probs.transpose(1, 2), k, dim=-1)  # (N, E, k)
    dispatch = F.one_hot(picked, num_classes=num_tokens).to(x.dtype)  # (N, E, k, T)
    expert_in = torch.einsum("nekt,ntd->nekd", dispatch, x)
    hidden = F.gelu(torch.einsum("nekd,edh->nekh", expert_in, w1))
    expert_out = torch.einsum("nekh,ehd->nekd", hidden, w2) * weights.unsqueeze(-1)
    return torch.einsum("nekt,nekd->ntd", dispatch, expert_out)


class OneHotExpertChoiceMoE(nn.Module):
    """Same parameters as `microdit.moe.ExpertChoiceMoE`; forward via the one-hot formulation."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int = 8, capacity: float = 2.0):
        super().__init__()
        self.capacity = capacity
        self.w1 = nn.Parameter(torch.randn(num_experts, dim, hidden_dim) * 0.02)
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden_dim, dim) * 0.02)
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return one_hot_expert_choice(x, self.gate.weight, self.w1, self.w2, self.capacity)
