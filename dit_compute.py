"""Parameter and compute accounting of the DiT family (models_dit.py): active parameters under
expert-choice routing, parameter counts of named sizes, forward MACs per image by block part, and the
training FLOPs per image that scripts/estimate_dit_complexity.py and estimate_training_cost.py report
(conventions in estimate_dit_complexity.py's docstring)."""

import torch
from torch import nn

from models import count_parameters
from models_dit import DIT_MODELS, DiT, DiTBlock, num_kept
from moe import ExpertChoiceMoE


def active_parameters(model: DiT) -> float:
    """Token-average active parameters: all of them, except that each MoE layer counts `c` experts
    (every expert processes c N / E of the N tokens of each sample, so a token meets c experts on
    average) instead of E."""
    inactive = 0.0
    for block in model.blocks:
        moe = block.mlp
        if isinstance(moe, ExpertChoiceMoE):
            inactive += (moe.num_experts - moe.capacity_factor) * moe.expert_parameters()
    return count_parameters(model) - inactive


def dit_parameter_counts(name_or_ctor="class_cond_dit", **kwargs) -> dict[str, float]:
    """{'total', 'active'} parameter counts of DIT_MODELS[name](**kwargs), built on the meta device."""
    ctor = DIT_MODELS[name_or_ctor] if isinstance(name_or_ctor, str) else name_or_ctor
    with torch.device("meta"):
        model = ctor(**kwargs)
    return {"total": count_parameters(model), "active": active_parameters(model)}


# --- compute accounting (scripts/estimate_dit_complexity.py; conventions in its docstring) ---------


def linear_macs(layer: nn.Linear, tokens: float = 1) -> float:
    return tokens * layer.in_features * layer.out_features


def block_macs(block: DiTBlock, tokens: int) -> dict[str, float]:
    """MACs of one block on one image of `tokens` tokens, split by part."""
    attn, mlp = block.attn, block.mlp
    width = attn.num_heads * attn.head_dim  # attention width a (may be < the residual width)
    out = {
        "adaln": linear_macs(block.adaLN_modulation[-1]),  # once per image: conditioning is per sample
        "attn_proj": linear_macs(attn.qkv, tokens) + linear_macs(attn.proj, tokens),
        "attn_scores": 2 * tokens * tokens * width,  # Q K^T and softmax(.) V over all heads
    }
    if isinstance(mlp, ExpertChoiceMoE):
        per_token = mlp.w1.shape[1] * mlp.w1.shape[2] + mlp.w2.shape[1] * mlp.w2.shape[2]  # one expert
        out["moe_router"] = linear_macs(mlp.router, tokens)
        out["moe_experts"] = mlp.capacity_factor * tokens * per_token  # c experts per token on average
    else:
        out["mlp"] = linear_macs(mlp.fc1, tokens) + linear_macs(mlp.fc2, tokens)
    return out


def forward_macs(model: DiT, mask_ratio: float = 0.0) -> dict[str, float]:
    """Forward MACs per image by part (+ 'total'), at the model's input size, with deferred masking of
    `mask_ratio` of the tokens after the mixer (as in training; 0 = the unmasked / sampling cost)."""
    if mask_ratio > 0 and model.mask_token is None:
        raise ValueError("this DiT has no mixer or mask token, so it cannot be trained masked")
    num_tokens = model.grid**2
    kept = num_kept(num_tokens, mask_ratio) if mask_ratio > 0 else num_tokens
    embed = model.x_embedder
    parts = {
        "patch_embed": num_tokens
        * embed.in_channels
        * embed.kernel_size[0]
        * embed.kernel_size[1]
        * embed.out_channels,
        "time_embed": linear_macs(model.t_embedder.mlp[0]) + linear_macs(model.t_embedder.mlp[2]),
    }
    if isinstance(model.token_proj, nn.Linear):  # narrow mixer -> backbone width
        parts["mixer_to_backbone"] = linear_macs(model.token_proj, kept) + linear_macs(model.cond_proj)
    for i, block in enumerate(model.blocks):
        stage = "mixer" if i < model.mixer_depth else "backbone"
        for part, macs in block_macs(block, num_tokens if i < model.mixer_depth else kept).items():
            parts[f"{stage}_{part}"] = parts.get(f"{stage}_{part}", 0.0) + macs
    final = model.final_layer
    # The final layer runs on all tokens: dropped positions are refilled with the mask token first.
    parts["final"] = linear_macs(final.adaLN_modulation[-1]) + linear_macs(final.linear, num_tokens)
    parts["total"] = sum(parts.values())
    return parts


def complexity(model: DiT, mask_ratio: float = 0.0) -> dict[str, float]:
    """Parameters and per-image compute of `model` for one stage."""
    macs = forward_macs(model, mask_ratio)["total"]
    num_tokens = model.grid**2
    return {
        "mask_ratio": mask_ratio,
        "tokens": num_tokens,
        "backbone_tokens": num_kept(num_tokens, mask_ratio) if mask_ratio > 0 else num_tokens,
        "total_params": count_parameters(model),
        "active_params": active_parameters(model),
        "forward_macs": macs,
        "forward_flops": 2 * macs,
        "train_flops": 6 * macs,  # forward + backward = 3 x forward
    }
