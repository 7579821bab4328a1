"""Networks for the small stages: MLPs for 2-D toy data.

Every model is called as ``model(x, t, y)``: x [B, ...] in data space, t [B] float in [0, 1]
(0 = noise, 1 = data), y [B] long class labels or None. It returns a tensor shaped like x
whose meaning (velocity, data or noise) is set by ``flow.prediction``; flow.py converts.
Class-conditional models reserve label index ``num_classes`` as the learned null label that
classifier-free guidance uses for the unconditional branch.
"""

import math

import torch
import torch.nn as nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of t [B] in [0, 1] -> [B, dim].

    t is scaled by 1000 so the frequencies span the same range as DDPM's integer timesteps
    (Ho et al. 2020); without it the lowest frequencies barely change over [0, 1].
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal features -> 2-layer MLP, the usual DDPM/DiT time conditioning."""

    def __init__(self, dim: int, freq_dim: int = 64):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class MLP(nn.Module):
    """Residual MLP velocity field for low-dimensional data (two moons)."""

    def __init__(
        self,
        dim: int = 2,  # data dimension
        hidden_dim: int = 128,  # width of every hidden layer
        num_blocks: int = 2,  # residual blocks after the input projection
        time_freq_dim: int = 64,  # sinusoidal features fed to the time MLP
    ):
        super().__init__()
        self.dim = dim
        self.time_embed = TimeEmbedding(hidden_dim, time_freq_dim)
        self.in_proj = nn.Linear(dim, hidden_dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
            for _ in range(num_blocks)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, dim))
        # Zero-init the output so the untrained field is 0 everywhere: the first steps learn the
        # mean flow instead of undoing a random one (as in DiT / ADM).
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.time_embed(t)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.condition(t, y)  # [B, hidden]
        h = self.in_proj(x) + cond
        for block in self.blocks:
            h = h + block(h + cond)
        return self.out(h)


class ClassCondMLP(MLP):
    """MLP with a learned class embedding (plus a null label for CFG) added to the time embedding."""

    def __init__(self, num_classes: int = 2, **mlp_kwargs):
        super().__init__(**mlp_kwargs)
        self.num_classes = num_classes
        hidden_dim = self.in_proj.out_features
        self.class_embed = nn.Embedding(num_classes + 1, hidden_dim)  # index num_classes = null label

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            y = torch.full((t.shape[0],), self.num_classes, device=t.device, dtype=torch.long)
        return self.time_embed(t) + self.class_embed(y)


MODELS = {"mlp": MLP, "class_cond_mlp": ClassCondMLP}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
