"""Networks for the small stages: MLPs for 2-D toy data, U-Nets for 16-32 px images and 32x32 latents
(the CNN classifier for proxy metrics and rewards is in classifier.py).

Every model is called as ``model(x, t, y)``: x [B, ...] in data space, t [B] float in [0, 1]
(0 = noise, 1 = data), y [B] long class labels or None. It returns a tensor shaped like x
whose meaning (velocity, data or noise) is set by ``flow.prediction``; flow.py converts.
A model built with ``interval_conditioning=True`` (a flow map, flow_map.py) also takes ``r=`` [B], the
time its output jumps to; ``r=None`` means r = t, the instantaneous velocity. One built with
``guidance_conditioning=True`` also takes ``w=`` [B], the CFG scale it is asked for (``w=None``: 1, none).
Class-conditional models reserve label index ``num_classes`` as the learned null label that
classifier-free guidance uses for the unconditional branch.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of t [B] in [0, 1] -> [B, dim].

    t is scaled by 1000 so the frequencies span the same range as DDPM's integer timesteps
    (Ho et al. 2020); without it the lowest frequencies barely change over [0, 1].
    """
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)  # float32, or float64 for a float64 t
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = scale * t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal features -> 2-layer MLP, the usual DDPM/DiT time conditioning."""

    def __init__(self, dim: int, freq_dim: int = 64, scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale  # scale: t's multiplier in the sinusoidal features
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim, scale=self.scale))


class ZeroInitEmbedding(TimeEmbedding):
    """A scalar condition [B] -> [B, dim], added to the time embedding: the flow-map interval r - t
    (IntervalEmbedding) and the guidance scale (GuidanceEmbedding). Its last layer starts at zero, so a model
    with it computes exactly what the same weights compute without it until training moves that layer, and a
    checkpoint saved without it loads (checkpoint.init_from_checkpoint keeps the zero init for these keys)."""

    def __init__(self, dim: int, freq_dim: int = 64, scale: float = 1.0):
        # Built on a forked RNG, so the model's other parameters get the same initial values as without it.
        with torch.random.fork_rng(devices=[]):
            super().__init__(dim, freq_dim, scale=scale)
        zero_init(self.mlp[-1])


class IntervalEmbedding(ZeroInitEmbedding):
    """The flow-map interval r - t [B] (target time minus the state's time) -> [B, dim]."""

    def __init__(self, dim: int, freq_dim: int = 64):
        # Scale 1, not 1000: the JVP differentiates the network in t, and features of frequency up to 1000
        # make d_t u, and with it the MeanFlow target, large (experiments/flow_maps.md).
        super().__init__(dim, freq_dim, scale=1.0)

    def forward(self, t: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        return super().forward(torch.zeros_like(t) if r is None else r - t)


class GuidanceEmbedding(ZeroInitEmbedding):
    """The CFG scale w [B] the model is asked for (guidance as a model condition, improved MeanFlow, arXiv
    2512.02012; flow_map.py) -> [B, dim], embedded as w - 1 so that w = 1 (no guidance) is the zero input."""

    def __init__(self, dim: int, freq_dim: int = 64):
        # Scale 100: w - 1 spans a few units (0 to ~5), so its features span about the frequencies t's
        # 1000 x [0, 1] does. Nothing differentiates in w (the JVP's tangent has no w part).
        super().__init__(dim, freq_dim, scale=100.0)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return super().forward(w - 1)


def interval_embedding(enabled: bool, dim: int, freq_dim: int) -> IntervalEmbedding | None:
    return IntervalEmbedding(dim, freq_dim) if enabled else None


def guidance_embedding(enabled: bool, dim: int, freq_dim: int) -> GuidanceEmbedding | None:
    return GuidanceEmbedding(dim, freq_dim) if enabled else None


def add_conditions(
    model: nn.Module, cond: torch.Tensor, t: torch.Tensor, r: torch.Tensor | None, w: torch.Tensor | None = None
) -> torch.Tensor:
    """cond [B, D] plus the interval embedding of (t, r) and the guidance embedding of w [B] (None = 1, no
    guidance), each where the model has it; a model without one refuses its input (r or w)."""
    for embed, value, flag, what in (
        (model.interval_embed, r, "interval_conditioning", "a target time r (a flow map)"),
        (model.guidance_embed, w, "guidance_conditioning", "a guidance scale w"),
    ):
        if embed is None and value is not None:
            raise ValueError(
                f"{type(model).__name__} was built without {flag}, so it cannot take {what}; it needs model.{flag}=true"
            )
    if model.interval_embed is not None:
        cond = cond + model.interval_embed(t, r)
    if model.guidance_embed is not None:
        cond = cond + model.guidance_embed(torch.ones_like(t) if w is None else w.to(t.dtype))
    return cond


class LabelEmbedding(nn.Embedding):
    """Class labels y [B] -> [B, dim] (a lookup table with num_classes + 1 rows). Row num_classes is the
    learned null label: label dropout trains it, CFG's unconditional branch uses it, and y = None means
    "all null". Subclassing nn.Embedding keeps the parameter named `<attr>.weight`."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__(num_classes + 1, dim)
        self.num_classes = num_classes

    def forward(self, y: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        if y is None:
            y = torch.full((batch,), self.num_classes, device=device, dtype=torch.long)
        return super().forward(y)


class MLP(nn.Module):
    """Residual MLP velocity field for low-dimensional data (two moons)."""

    def __init__(
        self,
        dim: int = 2,  # data dimension
        hidden_dim: int = 128,  # width of every hidden layer
        num_blocks: int = 2,  # residual blocks after the input projection
        time_freq_dim: int = 64,  # sinusoidal features fed to the time MLP
        interval_conditioning: bool = False,  # also embed r - t (a flow map, flow_map.py); zero-initialised
        guidance_conditioning: bool = False,  # also embed the CFG scale w (forward's w=); zero-initialised
        time_scale: float = 1000.0,  # t's multiplier in the sinusoidal features (lower: smoother in t)
    ):
        super().__init__()
        self.dim = dim
        self.interval_conditioning = interval_conditioning
        self.time_embed = TimeEmbedding(hidden_dim, time_freq_dim, time_scale)
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
        self.interval_embed = interval_embedding(interval_conditioning, hidden_dim, time_freq_dim)
        self.guidance_conditioning = guidance_conditioning
        self.guidance_embed = guidance_embedding(guidance_conditioning, hidden_dim, time_freq_dim)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.time_embed(t)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
        w: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cond = add_conditions(self, self.condition(t, y), t, r, w)  # [B, hidden]
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
        self.class_embed = LabelEmbedding(num_classes, hidden_dim)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.time_embed(t) + self.class_embed(y, t.shape[0], t.device)


# --- U-Net ------------------------------------------------------------------------------------------


def group_count(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """GroupNorm groups for `channels`: at most 32 (ADM), at least 4 channels per group, dividing channels.

    32 groups on a 32-wide layer would be InstanceNorm, which throws away every channel's own mean and
    scale over the image; with 4+ channels per group the 32-wide Fashion levels get 8 groups (as in the
    reference U-Net) and the 128+ wide CIFAR levels ADM's 32.
    """
    groups = min(max_groups, max(1, channels // min_group_size))
    while channels % groups:
        groups -= 1
    return groups


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weight and bias: the last layer of every residual branch and of the network.

    Each residual (and attention) block then starts as the identity, so the untrained U-Net is a clean
    stack of skip paths whatever its depth and every branch learns a correction to it (ADM; Goyal et al.
    2017); the zero output layer makes the untrained field exactly 0, as in MLP. Training is not stuck:
    the output layer sees non-zero inputs, so it moves first, and then the branches behind it get gradient.
    """
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, adaptive GroupNorm (FiLM by the embedding), SiLU-dropout-conv, plus a skip path."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(group_count(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # "adaGN" (ADM's use_scale_shift_norm): GroupNorm, then x * (1 + scale) + shift with per-sample
        # scale and shift from the time (+ class) embedding. The norm has no affine of its own: a constant
        # gain and bias would be absorbed exactly by the weights and bias of this projection.
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(group_count(out_ch), out_ch, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, out_ch, H, W]
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)  # 2 x [B, out_ch, 1, 1]
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Pre-norm multi-head self-attention over the H*W positions of a feature map, residual."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the {channels} channels attention runs at")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(group_count(channels), channels)
        # Linear layers on [B, H*W, C] tokens: the same parameters as 1x1 convs, one matmul each, and under
        # channels_last the NCHW -> token permute below is a free view.
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        # emb is accepted and ignored so a level can call all its layers as layer(h, emb).
        B, C, H, W = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        qkv = self.qkv(tokens).view(B, H * W, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, heads, H*W, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, H*W, head_dim]
        out = self.proj(out.transpose(1, 2).reshape(B, H * W, C))  # [B, H*W, C]
        return x + out.view(B, H, W, C).permute(0, 3, 1, 2)  # back to [B, C, H, W] (channels_last strides)


class UNet(nn.Module):
    """Time-conditioned U-Net velocity field for small images and latents.

    `depth` levels, each: `num_res_blocks` residual blocks at width base_ch * mult, then a stride-2 conv
    that also widens to the next level (so H must be divisible by 2**depth: 28 -> 14 -> 7 for depth 2,
    32 -> 16 -> 8 -> 4 for depth 3). A middle block (+ optional attention) runs at H / 2**depth. The decoder
    mirrors it: nearest 2x upsample, concatenate the level's skip, residual blocks that narrow to the next
    level's width (as in the NanoFlow reference U-Net). Every residual block is modulated by the time
    embedding (plus the class embedding in ClassCondUNet) through adaptive GroupNorm.
    """

    def __init__(
        self,
        in_ch: int = 1,  # image channels: 1 grayscale, 3 RGB, 4 SD-VAE latents; the output has the same
        base_ch: int = 32,  # width of the first (full-resolution) level
        channel_mults: list[int] | None = None,  # width multiplier per level; None -> 1, 2, 4, ... (depth)
        depth: int = 2,  # levels = stride-2 downsamplings, used when channel_mults is None
        num_res_blocks: int = 1,  # residual blocks per level, in the encoder and again in the decoder
        attention_resolutions: list[int] | tuple[int, ...] = (),  # levels with self-attention, given by
        # downsampling factor (1 = input resolution, 2 = half, ...; ADM's internal `ds`): fits 28 and 32 px
        bottleneck_attention: bool = False,  # self-attention in the middle block, at H / 2**depth
        num_heads: int = 8,  # attention heads; must divide the width wherever attention runs
        dropout: float = 0.0,  # inside every residual block, before its last conv
        emb_dim: int | None = None,  # width of the time (+ class) embedding; None -> 2 * base_ch
        time_freq_dim: int | None = None,  # sinusoidal features fed to the time MLP; None -> emb_dim
        interval_conditioning: bool = False,  # also embed r - t (a flow map, flow_map.py); zero-initialised
        guidance_conditioning: bool = False,  # also embed the CFG scale w (forward's w=); zero-initialised
        time_scale: float = 1000.0,  # t's multiplier in the sinusoidal features (lower: smoother in t)
    ):
        super().__init__()
        mults = list(channel_mults) if channel_mults is not None else [2**i for i in range(depth)]
        if not mults:
            raise ValueError("the U-Net needs at least one level (depth >= 1 or a non-empty channel_mults)")
        widths = [base_ch * m for m in mults]
        factors = [2**level for level in range(len(widths))]  # downsampling factor of each level
        bad = set(attention_resolutions) - set(factors)
        if bad:
            raise ValueError(
                f"attention_resolutions {sorted(bad)} are not level downsampling factors "
                f"{factors}; use bottleneck_attention for the middle block"
            )
        self.in_ch = in_ch
        self.depth = len(widths)
        self.emb_dim = emb_dim or 2 * base_ch
        self.time_embed = TimeEmbedding(self.emb_dim, time_freq_dim or self.emb_dim, time_scale)

        def level(in_width: int, width: int, factor: int) -> nn.ModuleList:
            layers = []
            for i in range(num_res_blocks):
                layers.append(ResBlock(in_width if i == 0 else width, width, self.emb_dim, dropout))
                if factor in attention_resolutions:
                    layers.append(Attention(width, num_heads))
            return nn.ModuleList(layers)

        self.conv_in = nn.Conv2d(in_ch, widths[0], 3, padding=1)

        # Encoder: level l runs at widths[l]; its stride-2 conv widens to widths[l + 1] (the last keeps its
        # width), so the decoder's concatenated skip always has the level's width.
        self.encoder = nn.ModuleList(level(w, w, f) for w, f in zip(widths, factors))
        next_widths = [*widths[1:], widths[-1]]
        self.downsample = nn.ModuleList(nn.Conv2d(w, n, 3, 2, padding=1) for w, n in zip(widths, next_widths))

        bottleneck = widths[-1]
        self.middle = nn.ModuleList([ResBlock(bottleneck, bottleneck, self.emb_dim, dropout)])
        if bottleneck_attention:
            self.middle.append(Attention(bottleneck, num_heads))

        # Decoder, deepest level first: upsampled h (width of the level below, or the bottleneck) ++ skip
        # -> the next shallower level's width (level 0 keeps widths[0]).
        self.decoder = nn.ModuleList()
        h_width = bottleneck
        for lvl in reversed(range(self.depth)):
            out_width = widths[max(lvl - 1, 0)]
            self.decoder.append(level(h_width + widths[lvl], out_width, factors[lvl]))
            h_width = out_width

        self.out = nn.Sequential(
            nn.GroupNorm(group_count(widths[0]), widths[0]),
            nn.SiLU(),
            zero_init(nn.Conv2d(widths[0], in_ch, 3, padding=1)),
        )
        self.interval_conditioning = interval_conditioning
        self.interval_embed = interval_embedding(interval_conditioning, self.emb_dim, time_freq_dim or self.emb_dim)
        self.guidance_conditioning = guidance_conditioning
        self.guidance_embed = guidance_embedding(guidance_conditioning, self.emb_dim, time_freq_dim or self.emb_dim)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.time_embed(t)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
        w: torch.Tensor | None = None,
    ) -> torch.Tensor:
        stride = 2**self.depth
        if x.shape[-2] % stride or x.shape[-1] % stride:
            raise ValueError(
                f"U-Net with {self.depth} levels needs H and W divisible by {stride}, got {tuple(x.shape[-2:])}"
            )
        # SiLU once here rather than in every block's projection (ADM applies it per block; same function).
        emb = F.silu(add_conditions(self, self.condition(t, y), t, r, w))  # [B, emb_dim]
        h = self.conv_in(x)  # [B, widths[0], H, W]
        skips = []
        for layers, down in zip(self.encoder, self.downsample):
            for layer in layers:
                h = layer(h, emb)
            skips.append(h)
            h = down(h)  # [B, widths[l + 1], H / 2**(l + 1), W / 2**(l + 1)]
        for layer in self.middle:
            h = layer(h, emb)
        for layers in self.decoder:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = torch.cat([h, skips.pop()], dim=1)  # [B, h_width + widths[l], H / 2**l, W / 2**l]
            for layer in layers:
                h = layer(h, emb)
        return self.out(h)  # [B, in_ch, H, W]


class ClassCondUNet(UNet):
    """U-Net with a learned class embedding (plus a null label for CFG) added to the time embedding."""

    def __init__(self, num_classes: int = 10, **unet_kwargs):
        super().__init__(**unet_kwargs)
        self.num_classes = num_classes
        self.class_embed = LabelEmbedding(num_classes, self.emb_dim)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.time_embed(t) + self.class_embed(y, t.shape[0], t.device)


MODELS = {"mlp": MLP, "class_cond_mlp": ClassCondMLP, "unet": UNet, "class_cond_unet": ClassCondUNet}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
