"""The DiT's feed-forward layers: the dense MLP (GELU or SwiGLU) and the expert-choice mixture of experts
(Zhou et al. 2022, arXiv 2202.09368) with packed dispatch and routing within each sample."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """Dense feed-forward: GELU-tanh (DiT) or SwiGLU (JiT). `hidden` is the GELU width; SwiGLU uses 2/3
    of it for each of its two input projections, so both variants have about the same parameters."""

    def __init__(self, dim: int, hidden: int, swiglu: bool = False):
        super().__init__()
        self.swiglu = swiglu
        hidden = swiglu_hidden(hidden) if swiglu else hidden
        self.fc1 = nn.Linear(dim, 2 * hidden if swiglu else hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.fc1(x), self.swiglu))


def swiglu_hidden(hidden: int) -> int:
    return max(1, round(2 * hidden / 3))


def activation(h: torch.Tensor, swiglu: bool) -> torch.Tensor:
    """GELU-tanh, or SwiGLU's silu(gate) * value on the two halves of h."""
    if swiglu:
        gate, value = h.chunk(2, dim=-1)
        return F.silu(gate) * value
    return F.gelu(h, approximate="tanh")


class ExpertChoiceMoE(nn.Module):
    """Expert-choice mixture of experts (Zhou et al. 2022, arXiv 2202.09368): experts pick tokens,
    routing within each sample, as in MicroDiT (Sehwag et al. 2024) and the NanoFlow reference.

    Router scores S = softmax_experts(x W_g) [B, N, E]; in every sample each expert takes its top
    k = capacity_factor * N / E of that sample's N tokens by score (N = the tokens the layer sees per
    image: all of them, or the kept ones under deferred masking), so every expert gets exactly k tokens
    from every image (no load-balancing loss, no dropped capacity) and a token is processed by 0..E
    experts, c on average. Routing never looks across samples, so a sample's output does not depend on
    the rest of its batch: batch-sharded evaluation and the conditional / unconditional halves of a CFG
    batch (which must not compete for expert capacity) give the same result as one image at a time.
    Dispatch is one batched op per layer: gather [E, B * k, D] (each expert's picks from every sample),
    two einsums over the stacked expert weights, and an index_add of the gate-weighted outputs back onto
    the tokens. A token no expert picks gets 0 from this layer; the residual connection carries it.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, capacity_factor: float = 2.0, swiglu: bool = False):
        super().__init__()
        self.num_experts, self.capacity_factor, self.swiglu = num_experts, capacity_factor, swiglu
        hidden = swiglu_hidden(hidden) if swiglu else hidden
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden if swiglu else hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, self.w1.shape[-1]))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        for w in (self.w1, self.w2):  # xavier-uniform per expert, as DiT initialises its Linear layers
            bound = math.sqrt(6.0 / (w.shape[1] + w.shape[2]))
            nn.init.uniform_(w, -bound, bound)
        nn.init.normal_(self.router.weight, std=0.02)
        # Fraction of tokens picked by 0, 1 and 2+ experts in the last forward, per sample and averaged
        # over the batch (detached, for logging).
        self.register_buffer("load", torch.zeros(3), persistent=False)

    def expert_parameters(self) -> int:
        """Parameters of one expert (its slice of w1, b1, w2, b2)."""
        return sum(p[0].numel() for p in (self.w1, self.b1, self.w2, self.b2))

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert takes from one sample of `num_tokens` tokens: c * N / E rounded to the
        nearest integer (Python's round, half to even), clamped to [1, N]."""
        return max(1, min(num_tokens, round(self.capacity_factor * num_tokens / self.num_experts)))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, N, D] -> (gates [B, E, k], token indices [B, E, k] in 0..N-1): each expert's top-k tokens
        of each sample and their scores, k = capacity(N)."""
        scores = self.router(x).float().softmax(dim=-1)  # [B, N, E]
        gates, index = scores.transpose(1, 2).topk(self.capacity(x.shape[1]), dim=-1)  # [B, E, k] each
        return gates, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., N, D] -> [..., N, D]; the leading dims are samples (a 2-D x is one sample)."""
        shape = x.shape
        x = x.reshape(-1, *shape[-2:])  # [B, N, D]
        B, N, D = x.shape
        gates, index = self.route(x)  # [B, E, k]
        # Flat token ids b * N + n, expert-major: [E, B * k], so the expert matmuls batch over E alone.
        flat = (index + N * torch.arange(B, device=x.device)[:, None, None]).transpose(0, 1).flatten(1)
        x = x.reshape(B * N, D)
        h = torch.einsum("ekd,edh->ekh", x[flat], self.w1) + self.b1[:, None]  # [E, B * k, hidden (x2)]
        y = torch.einsum("ekh,ehd->ekd", activation(h, self.swiglu), self.w2) + self.b2[:, None]  # [E, Bk, D]
        gates = gates.transpose(0, 1).flatten(1)  # [E, B * k], matching flat
        y = (gates[..., None].to(y.dtype) * y).flatten(0, 1)  # [E * B * k, D]
        out = torch.zeros_like(x).index_add_(0, flat.flatten(), y.to(x.dtype))
        with torch.no_grad():  # experts per token; index_add (not bincount) keeps shapes static for compile
            picks = (
                torch.zeros(B * N, device=x.device)
                .index_add_(0, flat.flatten(), torch.ones(flat.numel(), device=x.device))
                .view(B, N)
            )
            # Per-sample fractions, then the batch mean (every sample has the same N).
            self.load.copy_(
                torch.stack(
                    [(picks == 0).float().mean(1), (picks == 1).float().mean(1), (picks >= 2).float().mean(1)], dim=-1
                ).mean(0)
            )
        return out.view(shape)
