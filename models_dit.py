"""Diffusion Transformers for the 256 px stages: DiT with adaLN-Zero (Peebles & Xie 2023), JiT options
(Li & He 2025), a patch mixer with deferred token masking and expert-choice MoE routed within each
sample (Sehwag et al. 2024, "Stretching Each Dollar"), and layerwise width scaling. A sample's output
never depends on the other samples of its batch (under masking: given its row of keep_ids).

Every model is called as ``model(x, t, y)``: x [B, C, H, W], t [B] float in [0, 1] (0 = noise, 1 = data),
y [B] long labels in [0, num_classes) or None (= the learned null label ``num_classes``, used by CFG). It
returns a tensor shaped like x whose meaning (velocity, data or noise) is set by ``flow.prediction``.
Built with ``interval_conditioning=True`` (a flow map, flow_map.py) it also takes ``r=`` [B], the time
its output jumps to (None: r = t), through a zero-initialised embedding of r - t (models.IntervalEmbedding);
with ``guidance_conditioning=True`` also ``w=`` [B], the CFG scale asked for (models.GuidanceEmbedding).

Deferred masking (training only): ``model(x, t, y, generator=g, return_mask=True)`` returns
``(out, keep)`` with keep [B, num_tokens] bool (True = the token went through the backbone; None when no
masking happened). ``model.loss_mask(keep, (H, W))`` turns it into the [B, 1, H, W] mask that
``flow.flow_matching_loss(..., mask=...)`` takes. Without ``return_mask`` the call is the plain contract.
Under torch.compile, draw the subset outside the compiled model and pass it in: ``keep_ids =
model.sample_keep(B, model.grid ** 2, model.mask_ratio, g, device)``, ``model(x, t, y, keep_ids=keep_ids,
return_mask=True)`` (a Generator argument is a graph break).

Named sizes (``DIT_MODELS``): the DiT paper's S/2, B/2, L/2, XL/2 and the NanoFlow b2 / m2 / H1024 D20
families (see NANOFLOW_SIZES); the configs/model/ files for those sizes name one (``name: dit_xl2``), and any
constructor argument they or the command line add overrides the size's value; the small digits and smoke
models (dit_digits, dit_digits_moe, dit_smoke, jit_digits) spell out ``class_cond_dit`` kwargs instead.
Parameter counts of any size, MoE-active counts included, come from ``dit_compute.dit_parameter_counts``, which builds
the model on the meta device (no memory, no init cost); per-image MACs / FLOPs from
scripts/estimate_dit_complexity.py.
"""

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import LabelEmbedding, TimeEmbedding, add_conditions, guidance_embedding, interval_embedding, zero_init
from moe import ExpertChoiceMoE, Mlp

# --- positions --------------------------------------------------------------------------------------


def sincos_2d(dim: int, grid_h: int, grid_w: int, device=None) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / DiT) -> [grid_h * grid_w, dim], row-major tokens.

    Half of the channels encode the row, half the column, each as 1-D sin-cos over dim / 4 frequencies.
    """
    if dim % 4:
        raise ValueError(f"sin-cos 2-D positions need the width divisible by 4, got {dim}")
    omega = 1.0 / 10_000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, device=device, dtype=torch.float32),
        torch.arange(grid_w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    parts = []
    for pos in (rows.flatten(), cols.flatten()):
        angle = pos[:, None] * omega[None]  # [N, dim / 4]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1)


def rope_2d_angles(head_dim: int, grid_h: int, grid_w: int, theta: float = 10_000.0, device=None) -> torch.Tensor:
    """Rotation angles of 2-D RoPE -> [grid_h * grid_w, head_dim / 2], one per (even, odd) channel pair.

    The first half of the pairs rotate with the token's row, the second half with its column (axial RoPE,
    as in JiT / FiT), so q . k depends only on the 2-D offset between tokens.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, device=device, dtype=torch.float32),
        torch.arange(grid_w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.cat([rows.flatten()[:, None] * freqs, cols.flatten()[:, None] * freqs], dim=1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x [B, heads, N, head_dim] by angles [B or 1, 1, N, head_dim / 2]."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, heads, N, head_dim / 2, 2]
    cos, sin = angles.cos(), angles.sin()
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


# --- patches ----------------------------------------------------------------------------------------


def grid_size(size: int, patch: int, stride: int) -> int:
    """Tokens along one side; every pixel must be covered, so (size - patch) must be a multiple of stride."""
    if size < patch or (size - patch) % stride:
        raise ValueError(
            f"side {size} is not tiled by patches of {patch} at stride {stride}: need (size - patch) % stride == 0"
        )
    return (size - patch) // stride + 1


def patchify(x: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """x [B, C, H, W] -> patches [B, N, C * patch * patch] (channel-major, the Conv2d weight's layout)."""
    return F.unfold(x, patch, stride=stride).transpose(1, 2)


def unpatchify(patches: torch.Tensor, size: tuple[int, int], patch: int, stride: int) -> torch.Tensor:
    """patches [B, N, C * patch * patch] -> [B, C, H, W], averaging where patches overlap.

    fold sums overlapping contributions; dividing by the per-pixel patch count (fold of ones) turns the
    sum into a mean, so unpatchify(patchify(x)) == x for any stride <= patch. With stride == patch the
    count is 1 everywhere and this is DiT's reshape.
    """
    cols = patches.transpose(1, 2)  # [B, C * p * p, N]
    out = F.fold(cols, size, patch, stride=stride)
    if stride == patch:
        return out
    ones = torch.ones_like(cols[:1, : patch * patch])  # one channel's worth of columns
    count = F.fold(ones, size, patch, stride=stride)  # [1, 1, H, W], >= 1 where tiled
    return out / count


# --- layers -----------------------------------------------------------------------------------------


def make_norm(kind: str, dim: int, affine: bool = False) -> nn.Module:
    """LayerNorm (DiT) or RMSNorm (JiT); without affine inside adaLN blocks, whose shift/scale replace it."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, elementwise_affine=affine, eps=1e-6)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, N, D] * (1 + scale [B, D]) + shift [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention with `num_heads * head_dim` inner width (may differ from the residual width).

    qk_norm: RMSNorm on each head's q and k (JiT, SD3), which bounds the attention logits and keeps bf16
    training stable at large width. RoPE, when used, rotates q and k after the norm.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, heads, N, head_dim]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))  # [B, N, dim]


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning (DiT, Peebles & Xie 2023).

    From the conditioning c [B, D] one linear gives shift/scale for both norms and a gate for each
    residual branch. Zero-init of that linear makes every gate 0, so each block starts as the identity and
    the untrained network is a clean skip path whatever its depth (DiT sec. 3.2; Goyal et al. 2017).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        mlp_hidden: int,
        norm: str = "layernorm",
        qk_norm: bool = False,
        swiglu: bool = False,
        num_experts: int = 0,
        capacity_factor: float = 2.0,
        moe_weight: float = 1.0,
    ):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, num_heads, head_dim, qk_norm)
        self.norm2 = make_norm(norm, dim)
        if num_experts:
            expert_hidden = max(1, round(moe_weight * mlp_hidden))
            self.mlp = ExpertChoiceMoE(dim, expert_hidden, num_experts, capacity_factor, swiglu)
        else:
            self.mlp = Mlp(dim, mlp_hidden, swiglu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(dim, 6 * dim)))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 x [B, D]
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + linear to patch pixels; zero-init so the untrained model outputs exactly 0."""

    def __init__(self, dim: int, patch_dim: int, norm: str = "layernorm"):
        super().__init__()
        self.norm = make_norm(norm, dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(dim, 2 * dim)))
        self.linear = zero_init(nn.Linear(dim, patch_dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))  # [B, N, patch_dim]


def ramp(value, depth: int) -> list[float]:
    """Layerwise scaling: a number, or (first, last) endpoints interpolated linearly over `depth` blocks."""
    first, last = (value, value) if isinstance(value, int | float) else value
    return [first + (last - first) * i / max(depth - 1, 1) for i in range(depth)]


def round_up(x: float, multiple: int = 1) -> int:
    """Smallest multiple of `multiple` >= x (the 1e-6 keeps 2.0000000001 * 64 from becoming 192)."""
    return max(multiple, math.ceil(x / multiple - 1e-6) * multiple)


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """Tokens that survive deferred masking: round(N (1 - mask_ratio)), at least 1 (64 of 256 at 0.75)."""
    return max(1, round(num_tokens * (1 - mask_ratio)))


# --- the model --------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Unconditional DiT (time conditioning only); ClassCondDiT adds labels.

    Tokens: a Conv2d patch embedding (stride < patch gives overlapping JiT-style patches, folded back with
    overlap averaging). The first `mixer_depth` blocks (the patch mixer) see every token; during training
    with mask_ratio > 0 a random (1 - mask_ratio) subset of tokens per sample then goes through the
    remaining blocks (the backbone), and a learned mask token fills the dropped positions before the
    final layer. The mixer may be narrower than the backbone (mixer_hidden_size, as in Sehwag et al.
    2024 and the NanoFlow H1024 model): the patch embedding, the conditioning and the mixer then run at
    that width, and one linear each lifts the kept tokens and the conditioning to the backbone width.
    """

    def __init__(
        self,
        input_size: int = 32,  # H = W of the input (latent 32 for ImageNet-256 SD-VAE latents)
        in_channels: int = 4,  # input channels; the output has the same
        patch_size: int = 2,
        patch_stride: int | None = None,  # None -> patch_size; smaller -> overlapping patches (JiT)
        hidden_size: int = 384,  # residual width D of the backbone (the blocks after the mixer)
        depth: int = 12,  # blocks, mixer included (NanoFlow's "D20" with a 2-block mixer is depth 22)
        num_heads: int = 6,  # backbone heads at attn_scale 1; head_dim = hidden_size // num_heads everywhere
        mlp_ratio: float | tuple[float, float] = 4.0,  # backbone MLP hidden / D; (first, last) ramps
        attn_scale: float | tuple[float, float] = 1.0,  # backbone heads multiplier; (first, last) ramps
        width_multiple: int = 1,  # MLP widths are rounded up to multiples of it (heads: up to an integer)
        pos_embed: str = "sincos",  # "sincos" (added to tokens) or "rope" (2-D RoPE on q, k)
        norm: str = "layernorm",  # or "rmsnorm"
        qk_norm: bool = False,
        swiglu: bool = False,
        mixer_depth: int = 0,  # blocks before deferred masking (the patch mixer)
        mixer_hidden_size: int | None = None,  # mixer width (also patch embedding, conditioning); None -> D
        mixer_mlp_ratio: float = 4.0,  # MLP hidden / mixer width; the mixer is not layerwise-scaled
        mask_ratio: float = 0.0,  # fraction of tokens dropped after the mixer, training only
        num_experts: int = 0,  # 0 -> dense; otherwise expert-choice MoE in every moe_every-th block
        moe_every: int = 2,  # MoE in blocks i with (i + 1) % moe_every == 0, counted over all blocks
        moe_last: bool = False,  # may the last block be an MoE one (NanoFlow H1024: yes; default: never)
        capacity_factor: float = 2.0,  # expert-choice c: each expert takes c * N / E tokens per sample
        moe_weight: float = 1.0,  # expert hidden width as a fraction of the dense MLP width at that depth
        time_freq_dim: int = 256,  # sinusoidal features fed to the time MLP (DiT)
        interval_conditioning: bool = False,  # also embed r - t (a flow map, flow_map.py); zero-initialised
        guidance_conditioning: bool = False,  # also embed the CFG scale w (forward's w=); zero-initialised
        time_scale: float = 1000.0,  # t's multiplier in the sinusoidal features (lower: smoother in t)
    ):
        super().__init__()
        if pos_embed not in ("sincos", "rope"):
            raise ValueError(f"pos_embed must be 'sincos' or 'rope', got {pos_embed!r}")
        if hidden_size % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
        if not 0.0 <= mask_ratio < 1.0 or not 0 <= mixer_depth <= depth:
            raise ValueError(f"need 0 <= mask_ratio < 1 and 0 <= mixer_depth <= depth, got {mask_ratio}, {mixer_depth}")
        self.head_dim = hidden_size // num_heads
        embed_size = mixer_hidden_size or hidden_size
        if embed_size % self.head_dim:
            raise ValueError(f"mixer_hidden_size={embed_size} must be a multiple of head_dim={self.head_dim}")
        self.input_size, self.in_channels, self.hidden_size = input_size, in_channels, hidden_size
        self.embed_size = embed_size  # width of tokens and conditioning up to the end of the mixer
        self.patch_size, self.patch_stride = patch_size, patch_stride or patch_size
        self.pos_embed, self.mixer_depth, self.mask_ratio = pos_embed, mixer_depth, mask_ratio
        self.grid = grid_size(input_size, patch_size, self.patch_stride)

        self.x_embedder = nn.Conv2d(in_channels, embed_size, patch_size, stride=self.patch_stride)
        self.t_embedder = TimeEmbedding(embed_size, time_freq_dim, time_scale)
        # Position tables for the construction size are non-persistent buffers (recomputed, never
        # checkpointed); other sizes are computed on the fly.
        table = (
            sincos_2d(embed_size, self.grid, self.grid)
            if pos_embed == "sincos"
            else rope_2d_angles(self.head_dim, self.grid, self.grid)
        )
        self.register_buffer("pos_table", table, persistent=False)

        # Per-block widths. The mixer is a plain transformer at its own width. In the backbone, layerwise
        # scaling (Sehwag et al. 2024, after OpenELM) ramps the attention heads and the MLP ratio linearly
        # over depth, so the early blocks, which see the most tokens under deferred masking, are the
        # cheapest; head_dim is fixed so RoPE tables are shared and only the head count changes. Head
        # counts and MLP widths are rounded *up* (the latter to width_multiple), as the NanoFlow reference
        # rounds its attention and MLP widths up to multiples of 64.
        back = depth - mixer_depth
        heads = [embed_size // self.head_dim] * mixer_depth + [round_up(num_heads * s) for s in ramp(attn_scale, back)]
        hiddens = [round_up(embed_size * mixer_mlp_ratio, width_multiple)] * mixer_depth + [
            round_up(hidden_size * r, width_multiple) for r in ramp(mlp_ratio, back)
        ]
        widths = [embed_size] * mixer_depth + [hidden_size] * back
        # Expert-choice MoE replaces the MLP of every moe_every-th block, counted from the first block with
        # the mixer included (the NanoFlow H1024 reference alternates dense / MoE through its mixer and
        # backbone). The last block stays dense unless moe_last: it maps straight to the output.
        self.moe_blocks = [
            i for i in range(depth) if num_experts and (i + 1) % moe_every == 0 and (moe_last or i < depth - 1)
        ]
        self.blocks = nn.ModuleList(
            DiTBlock(
                widths[i],
                heads[i],
                self.head_dim,
                hiddens[i],
                norm,
                qk_norm,
                swiglu,
                num_experts if i in self.moe_blocks else 0,
                capacity_factor,
                moe_weight,
            )
            for i in range(depth)
        )
        # Mixer -> backbone width: a linear on the kept tokens (after masking, so 1 - mask_ratio of the
        # cost) and one on the conditioning vector, which the backbone's adaLN layers read.
        wide = embed_size != hidden_size
        self.token_proj = nn.Linear(embed_size, hidden_size) if wide else nn.Identity()
        self.cond_proj = nn.Linear(embed_size, hidden_size) if wide else nn.Identity()
        # Learned fill-in for dropped tokens (MAE decoder style). It exists whenever the model has a mixer
        # or a mask ratio, so a masked pretrain and its unmasked fine-tune (mask_ratio 0, same mixer_depth)
        # share one state dict; during the unmasked stage it gets no gradient (DDP: find_unused_parameters).
        has_masking = mixer_depth > 0 or mask_ratio > 0
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if has_masking else None
        self.final_layer = FinalLayer(hidden_size, in_channels * patch_size**2, norm)
        self.initialize_weights()
        # After the init above, so every other weight is the one the same seed gives without it.
        self.interval_conditioning = interval_conditioning
        self.interval_embed = interval_embedding(interval_conditioning, embed_size, time_freq_dim)
        self.guidance_conditioning = guidance_conditioning
        self.guidance_embed = guidance_embedding(guidance_conditioning, embed_size, time_freq_dim)

    def initialize_weights(self):
        """DiT's init: xavier-uniform linears, N(0, 0.02) embeddings; adaLN and output stay zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # adaLN-Zero and the zero output layer (see DiTBlock, FinalLayer), undone by the loop above.
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            zero_init(layer)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like the Linear it is, on flattened patches
        nn.init.zeros_(self.x_embedder.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            if isinstance(block.mlp, ExpertChoiceMoE):
                nn.init.normal_(block.mlp.router.weight, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    # -- conditioning, positions, masking --

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.t_embedder(t)  # [B, embed_size]

    def positions(self, grid_h: int, grid_w: int, device) -> torch.Tensor:
        if (grid_h, grid_w) == (self.grid, self.grid):
            return self.pos_table
        if self.pos_embed == "sincos":
            return sincos_2d(self.embed_size, grid_h, grid_w, device)
        return rope_2d_angles(self.head_dim, grid_h, grid_w, device=device)

    def sample_keep(
        self, batch: int, num_tokens: int, mask_ratio: float, generator: torch.Generator | None, device
    ) -> torch.Tensor:
        """Indices [B, n_keep] (sorted) of a uniformly random token subset per sample.

        Drawn on the generator's device and then moved, so a (seed, rank, step) generator replays exactly.
        """
        num_keep = num_kept(num_tokens, mask_ratio)
        gen_device = generator.device if generator is not None else device
        noise = torch.rand(batch, num_tokens, generator=generator, device=gen_device)
        return noise.argsort(dim=1)[:, :num_keep].sort(dim=1).values.to(device)

    def loss_mask(self, keep: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """keep [B, N] -> [B, 1, H, W] float, 1 where every patch covering the pixel was kept.

        Pass it as flow_matching_loss(mask=...). With overlapping patches a pixel next to a dropped
        token is also excluded, so the loss never sees a mask-token output.
        """
        p, s = self.patch_size, self.patch_stride
        dropped = (~keep).float()[:, None].expand(-1, p * p, -1)  # [B, p * p, N]
        return (F.fold(dropped, size, p, stride=s) == 0).float()

    # -- forward --

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        mask_ratio: float | None = None,
        keep_ids: torch.Tensor | None = None,
        return_mask: bool = False,
        r: torch.Tensor | None = None,
        w: torch.Tensor | None = None,
    ):
        """x [B, C, H, W], t [B], y [B] | None -> out [B, C, H, W] (and keep [B, N] | None if return_mask);
        r [B]: a flow map's target time (interval_conditioning; None = t); w [B]: the CFG scale asked for
        (guidance_conditioning; None = 1).

        Masking happens only in training mode with mask_ratio (default self.mask_ratio) > 0, or wherever
        keep_ids [B, n_keep] (from sample_keep) are given. Drawing them outside the model keeps a
        torch.Generator out of a compiled forward, which torch.compile cannot trace (a graph break).
        """
        B, _, H, W = x.shape
        p, s = self.patch_size, self.patch_stride
        grid_h, grid_w = grid_size(H, p, s), grid_size(W, p, s)
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2)  # [B, N, embed_size]
        pos = self.positions(grid_h, grid_w, x.device)
        rope = None
        if self.pos_embed == "sincos":
            tokens = tokens + pos.to(tokens.dtype)
        else:
            rope = pos[None, None]  # [1, 1, N, head_dim / 2]
        c = add_conditions(self, self.condition(t, y), t, r, w)  # [B, embed_size]

        for block in self.blocks[: self.mixer_depth]:
            tokens = block(tokens, c, rope)

        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        keep = None
        ids = keep_ids
        if ids is None and self.training and ratio > 0:
            ids = self.sample_keep(B, tokens.shape[1], ratio, generator, x.device)  # [B, n_keep]
        if ids is not None:
            if self.mask_token is None:
                raise ValueError("this DiT was built without masking (mixer_depth = mask_ratio = 0)")
            N, D = tokens.shape[1:]
            tokens = tokens.gather(1, ids[..., None].expand(-1, -1, D))  # [B, n_keep, embed_size]
            if rope is not None:
                rope = pos[ids][:, None]  # [B, 1, n_keep, head_dim / 2]
            keep = torch.zeros(B, N, dtype=torch.bool, device=x.device).scatter_(1, ids, True)

        tokens, c = self.token_proj(tokens), self.cond_proj(c)  # [B, n_keep, D], [B, D]
        for block in self.blocks[self.mixer_depth :]:
            tokens = block(tokens, c, rope)

        if ids is not None:  # put kept tokens back among mask tokens: [B, N, D]
            fill = self.mask_token.to(tokens.dtype).expand(B, keep.shape[1], -1)
            tokens = fill.scatter(1, ids[..., None].expand(-1, -1, tokens.shape[-1]), tokens)

        out = unpatchify(self.final_layer(tokens, c), (H, W), p, s)  # [B, C, H, W]
        return (out, keep) if return_mask else out

    def moe_load(self) -> dict[int, torch.Tensor]:
        """Block index -> fraction of tokens picked by (0, 1, 2+) experts in the last forward."""
        return {i: self.blocks[i].mlp.load for i in self.moe_blocks}


class ClassCondDiT(DiT):
    """DiT with a learned class embedding (plus a null label for CFG) added to the time embedding."""

    def __init__(self, num_classes: int = 1000, **dit_kwargs):
        super().__init__(**dit_kwargs)
        self.num_classes = num_classes
        self.y_embedder = LabelEmbedding(num_classes, self.embed_size)
        nn.init.normal_(self.y_embedder.weight, std=0.02)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.t_embedder(t) + self.y_embedder(y, t.shape[0], t.device)


# --- named sizes ------------------------------------------------------------------------------------

# DiT paper (Peebles & Xie 2023, Table 1): depth / width / heads, patch 2, on 32x32x4 SD-VAE latents.
DIT_SIZES = {
    "dit_s2": dict(depth=12, hidden_size=384, num_heads=6),
    "dit_b2": dict(depth=12, hidden_size=768, num_heads=12),
    "dit_l2": dict(depth=24, hidden_size=1024, num_heads=16),
    "dit_xl2": dict(depth=28, hidden_size=1152, num_heads=16),
}

# NanoFlow families, all on 32x32x4 SD-VAE latents with patch 2 (256 tokens) and 2-D RoPE, the names
# of the write-up's configs: "b2" = B/2 width (768, 12 heads), "m2" = a 2-block patch mixer at 768 in
# front of a 1024-wide backbone (16 heads), "masked" = deferred masking of 75 % of the tokens after the
# mixer (the write-up: "mask out 75% of tokens after some initial DiT blocks (the patch mixer)").
#
# The final model, "H1024 D20 E16 c2 moew0.5", is given as 695.1M total / 314.0M token-average active
# parameters and 14.45 G / 47.48 G forward MACs per image masked / unmasked. Read as:
#   H1024   -> backbone width 1024 (16 heads of 64); the m2 mixer is 2 blocks at 768 (12 heads, MLP 3072),
#              lifted to 1024 by one linear on the kept tokens and one on the conditioning.
#   D20     -> 20 backbone blocks after the mixer (depth 22 here, which counts the mixer).
#   E16 c2  -> expert-choice MoE with 16 experts and capacity factor 2 (a token meets 2 experts on
#              average), in every second block counted from the first mixer block: the second mixer
#              block and backbone blocks 1, 3, ..., 19, the last one included (moe_last).
#   moew0.5 -> expert width = 0.5 x the dense MLP width at that depth, so with c = 2 an MoE block costs
#              the FLOPs of the dense block it replaces while holding 8x its MLP parameters.
#   layerwise -> over the 20 backbone blocks, attention width 0.5 -> 1.0 x 1024 (8 -> 16 heads) and MLP
#              ratio 0.5 -> 4.0, rounded up to multiples of 64 (512 ... 3968 dense, 352 ... 2048 experts).
# The per-block widths are those of the public NanoFlow reference config, which this ramp reproduces
# exactly; with its 768-wide sinusoidal time features the preset has 695,120,720 total / 314,011,152
# active parameters (write-up: 695.1M / 314.0M) and, counted as scripts/estimate_dit_complexity.py
# does, 14.46 G MACs/image at 64 kept tokens and 47.48 G unmasked: the write-up's figures. Other
# readings miss (total / active): a dense last block -8.5 % / 0.0 %, a 1024-wide mixer +6.0 / +5.1 %,
# MLP ratio 2 -> 4 +19.6 / +10.0 %, full-width experts +62.6 / +17.3 % (tests/test_dit_compute.py).
_M2 = dict(mixer_depth=2, mixer_hidden_size=768, hidden_size=1024, num_heads=16, pos_embed="rope", mask_ratio=0.75)
# Expert-choice MoE at capacity 2 (last block included) with the layerwise attention / MLP width ramp.
_MOE_LAYERWISE = dict(
    capacity_factor=2.0, moe_last=True, mlp_ratio=(0.5, 4.0), attn_scale=(0.5, 1.0), width_multiple=64
)
NANOFLOW_SIZES = {
    "nanoflow_b2": dict(depth=12, hidden_size=768, num_heads=12, pos_embed="rope"),  # dense B/2, RoPE
    "nanoflow_b2_masked": dict(
        depth=14, mixer_depth=2, hidden_size=768, num_heads=12, pos_embed="rope", mask_ratio=0.75
    ),
    "nanoflow_m2": dict(depth=14, **_M2),  # 12 dense backbone blocks, MLP 4096
    # The first MoE + layerwise step: 12 backbone blocks, 8 full-width experts (moew 1).
    "nanoflow_m2_moe_layerwise": dict(depth=14, **_M2, **_MOE_LAYERWISE, num_experts=8),
    "nanoflow_h1024_d20_e16_c2_moew05": dict(
        depth=22, **_M2, **_MOE_LAYERWISE, num_experts=16, moe_every=2, moe_weight=0.5, time_freq_dim=768
    ),
    # JiT-style pixel DiT for 256 px RGB (celeba256_jit): 16 px patches at stride 12 (overlap),
    # 2-D RoPE, QK-norm, SwiGLU, RMSNorm; width 768 / 12 blocks (~JiT-B/16).
    "jit_b16": dict(
        input_size=256,
        in_channels=3,
        patch_size=16,
        patch_stride=12,
        depth=12,
        hidden_size=768,
        num_heads=12,
        pos_embed="rope",
        norm="rmsnorm",
        qk_norm=True,
        swiglu=True,
    ),
}
NANOFLOW_SIZES["nanoflow_h1024_d20"] = NANOFLOW_SIZES["nanoflow_h1024_d20_e16_c2_moew05"]


# A named size is the constructor with its defaults replaced (functools.partial), so every other
# argument can still be set from a config (`model.name=dit_b2 model.num_classes=10`) and
# config.check_spec sees the real signature. jit_b16 is unconditional (celeba256_jit).
DIT_MODELS = {"dit": DiT, "class_cond_dit": ClassCondDiT}
DIT_MODELS.update(
    {
        name: partial(DiT if name == "jit_b16" else ClassCondDiT, **size)
        for name, size in {**DIT_SIZES, **NANOFLOW_SIZES}.items()
    }
)
