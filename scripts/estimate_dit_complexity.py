"""Parameters and compute of a DiT: total and token-average active parameters, forward MACs and FLOPs per
image, and training FLOPs per image, for one or more mask ratios (masked pretraining / unmasked stages).

    uv run python scripts/estimate_dit_complexity.py nanoflow_h1024_d20 --mask-ratio 0.75 0
    uv run python scripts/estimate_dit_complexity.py configs/model/dit_xl2.yaml
    uv run python scripts/estimate_dit_complexity.py class_cond_dit depth=4 hidden_size=64 num_heads=4 --json

The model is a `models_dit.DIT_MODELS` name or a model config YAML (`name:` + constructor kwargs), with
optional key=value overrides (values parsed as YAML: `mlp_ratio=[0.5,4.0]`). It is built on the meta
device, so even the 695M-parameter model costs no memory, and counted analytically from its layer shapes.

Conventions (those of the write-up's figures, e.g. 14.45 G MACs -> 86.72 G train FLOPs per image):
1 MAC = one multiply-add; forward FLOPs = 2 x MACs; a training step (forward + backward) = 3 x forward:
the backward does two matmuls per forward matmul (activation and weight gradients). Counted: every matmul,
i.e. the patch embedding, time MLP, adaLN, q/k/v/out projections, attention scores and values (2 T^2 a per
block for T tokens and attention width a), MLPs, MoE router and experts, the mixer -> backbone projections
and the final layer. Not counted: norms, activations, softmax, RoPE, gathers/scatters (O(T d) elementwise
work, well under 1 % here). Expert choice: each of the E experts takes c T_batch / E of the batch's tokens,
so per image the experts cost c x T x (one expert's MACs per token), the token average; it is exact when
c B T / E is an integer. tests/test_estimators.py checks all of this against torch's FlopCounterMode.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import models_dit as md  # noqa: E402
from models import count_parameters  # noqa: E402


def parse_overrides(items: list[str]) -> dict:
    """["depth=4", "mlp_ratio=[0.5,4.0]"] -> {"depth": 4, "mlp_ratio": [0.5, 4.0]}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        out[key] = yaml.safe_load(value)
    return out


def build_model(spec: str, overrides: dict | None = None) -> md.DiT:
    """A DIT_MODELS name or a model config YAML path (+ kwargs overrides) -> the DiT on the meta device."""
    overrides = dict(overrides or {})
    if spec.endswith((".yaml", ".yml")):
        kwargs = yaml.safe_load(Path(spec).read_text())
        name = kwargs.pop("name")
    else:
        name, kwargs = spec, {}
    if name not in md.DIT_MODELS:
        raise ValueError(f"unknown DiT {name!r}; choose a config YAML or one of: {', '.join(md.DIT_MODELS)}")
    with torch.device("meta"):
        return md.DIT_MODELS[name](**{**kwargs, **overrides})


def linear_macs(layer: nn.Linear, tokens: float = 1) -> float:
    return tokens * layer.in_features * layer.out_features


def block_macs(block: md.DiTBlock, tokens: int) -> dict[str, float]:
    """MACs of one block on one image of `tokens` tokens, split by part."""
    attn, mlp = block.attn, block.mlp
    width = attn.num_heads * attn.head_dim  # attention width a (may be < the residual width)
    out = {
        "adaln": linear_macs(block.adaLN_modulation[-1]),  # once per image: conditioning is per sample
        "attn_proj": linear_macs(attn.qkv, tokens) + linear_macs(attn.proj, tokens),
        "attn_scores": 2 * tokens * tokens * width,  # Q K^T and softmax(.) V over all heads
    }
    if isinstance(mlp, md.ExpertChoiceMoE):
        per_token = mlp.w1.shape[1] * mlp.w1.shape[2] + mlp.w2.shape[1] * mlp.w2.shape[2]  # one expert
        out["moe_router"] = linear_macs(mlp.router, tokens)
        out["moe_experts"] = mlp.capacity_factor * tokens * per_token  # c experts per token on average
    else:
        out["mlp"] = linear_macs(mlp.fc1, tokens) + linear_macs(mlp.fc2, tokens)
    return out


def forward_macs(model: md.DiT, mask_ratio: float = 0.0) -> dict[str, float]:
    """Forward MACs per image by part (+ 'total'), at the model's input size, with deferred masking of
    `mask_ratio` of the tokens after the mixer (as in training; 0 = the unmasked / sampling cost)."""
    if mask_ratio > 0 and model.mask_token is None:
        raise ValueError("this DiT has no mixer or mask token, so it cannot be trained masked")
    num_tokens = model.grid**2
    kept = md.num_kept(num_tokens, mask_ratio) if mask_ratio > 0 else num_tokens
    embed = model.x_embedder
    parts = {
        "patch_embed": num_tokens * embed.in_channels * embed.kernel_size[0] * embed.kernel_size[1]
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


def complexity(model: md.DiT, mask_ratio: float = 0.0) -> dict[str, float]:
    """Parameters and per-image compute of `model` for one stage."""
    macs = forward_macs(model, mask_ratio)["total"]
    num_tokens = model.grid**2
    return {
        "mask_ratio": mask_ratio,
        "tokens": num_tokens,
        "backbone_tokens": md.num_kept(num_tokens, mask_ratio) if mask_ratio > 0 else num_tokens,
        "total_params": count_parameters(model),
        "active_params": md.active_parameters(model),
        "forward_macs": macs,
        "forward_flops": 2 * macs,
        "train_flops": 6 * macs,  # forward + backward = 3 x forward
    }


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"**{title}**", "",
             "| mask ratio | backbone tokens | total params | active params | fwd GMACs/img | fwd GFLOPs/img "
             "| train GFLOPs/img |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mask_ratio']:g} | {r['backbone_tokens']} / {r['tokens']} | "
                     f"{r['total_params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M | "
                     f"{r['forward_macs'] / 1e9:.2f} | {r['forward_flops'] / 1e9:.2f} | "
                     f"{r['train_flops'] / 1e9:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a models_dit.DIT_MODELS name or a model config YAML")
    parser.add_argument("overrides", nargs="*", help="constructor key=value overrides")
    parser.add_argument("--mask-ratio", type=float, nargs="+", default=None,
                        help="stages to report (default: the model's mask_ratio, then 0 if that is > 0)")
    parser.add_argument("--breakdown", action="store_true", help="also print MACs per part")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)

    model = build_model(args.model, parse_overrides(args.overrides))
    ratios = args.mask_ratio
    if ratios is None:
        ratios = [model.mask_ratio, 0.0] if model.mask_ratio > 0 else [0.0]
    rows = [complexity(model, r) for r in ratios]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(markdown(rows, " ".join([args.model, *args.overrides])))
    if args.breakdown:
        for r in ratios:
            parts = forward_macs(model, r)
            print(f"\nmask ratio {r:g}: forward GMACs per image by part")
            for part, macs in parts.items():
                print(f"  {part:24s} {macs / 1e9:9.3f}  ({100 * macs / parts['total']:5.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
