"""Parameters and compute of a DiT: total and token-average active parameters, forward MACs and FLOPs per
image, and training FLOPs per image, for one or more mask ratios (masked pretraining / unmasked stages).

    uv run python scripts/estimate_dit_complexity.py model=nanoflow_h1024_d20 mask_ratio=[0.75,0]
    uv run python scripts/estimate_dit_complexity.py model=configs/model/dit_xl2.yaml
    uv run python scripts/estimate_dit_complexity.py model=class_cond_dit model.depth=4 model.hidden_size=64 \\
        model.num_heads=4 json=true

The model is a `models_dit.DIT_MODELS` name or a model config YAML (`name:` + constructor kwargs), with
optional constructor overrides as in the training commands: `model.KEY=VALUE` (`model.mlp_ratio=[0.5,4.0]`).
It is built on the meta device, so even the 695M-parameter model costs no memory, and counted analytically
from its layer shapes.

Conventions (those of the write-up's figures, e.g. 14.45 G MACs -> 86.72 G train FLOPs per image):
1 MAC = one multiply-add; forward FLOPs = 2 x MACs; a training step (forward + backward) = 3 x forward:
the backward does two matmuls per forward matmul (activation and weight gradients). Counted: every matmul,
i.e. the patch embedding, time MLP, adaLN, q/k/v/out projections, attention scores and values (2 T^2 a per
block for T tokens and attention width a), MLPs, MoE router and experts, the mixer -> backbone projections
and the final layer. Not counted: norms, activations, softmax, RoPE, gathers/scatters (O(T d) elementwise
work, well under 1 % here). Expert choice: each of the E experts takes c T_batch / E of the batch's tokens,
so per image the experts cost c x T x (one expert's MACs per token), the token average; it is exact when
c B T / E is an integer. tests/test_dit_compute.py checks all of this against torch's FlopCounterMode.
"""

import json
import sys
from dataclasses import dataclass
from typing import Any

from build import meta_dit_from_keys
from cli import markdown_table, parse_keys
from config import check
from dit_compute import complexity, forward_macs
from runtime import run_main

COLUMNS = ["mask ratio", "backbone tokens", "total params", "active params", "fwd GMACs/img", "fwd GFLOPs/img"]


def markdown(rows: list[dict], title: str) -> str:
    cells = [
        [
            f"{r['mask_ratio']:g}",
            f"{r['backbone_tokens']} / {r['tokens']}",
            f"{r['total_params'] / 1e6:.2f}M",
            f"{r['active_params'] / 1e6:.2f}M",
            f"{r['forward_macs'] / 1e9:.2f}",
            f"{r['forward_flops'] / 1e9:.2f}",
            f"{r['train_flops'] / 1e9:.2f}",
        ]
        for r in rows
    ]
    return markdown_table(title, [*COLUMNS, "train GFLOPs/img"], cells, "r" * 7)


@dataclass
class ComplexityConfig:
    model: dict[str, Any] | None = None  # required: model=NAME|CONFIG.yaml [model.KEY=VALUE ...]
    mask_ratio: Any = None  # a ratio or a list, e.g. [0.75,0] (null: the model's mask_ratio, then 0 if > 0)
    breakdown: bool = False  # also print MACs per part
    json: bool = False  # print JSON instead of a markdown table


def mask_ratios(value) -> list[float] | None:
    ratios = value if isinstance(value, list) or value is None else [value]
    check(
        ratios is None or (ratios and all(isinstance(r, (int, float)) and 0 <= r < 1 for r in ratios)),
        "mask_ratio",
        value,
        "must be a ratio in [0, 1) or a list of them, e.g. [0.75,0]",
    )
    return None if ratios is None else [float(r) for r in ratios]


def main(argv: list[str] | None = None) -> int:
    args = parse_keys(sys.argv[1:] if argv is None else argv, ComplexityConfig, __doc__, named=("model",))
    ratios = mask_ratios(args.mask_ratio)
    model, title = meta_dit_from_keys("model", args.model)
    if ratios is None:
        ratios = [model.mask_ratio, 0.0] if model.mask_ratio > 0 else [0.0]
    rows = [complexity(model, r) for r in ratios]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(markdown(rows, title))
    if args.breakdown:
        for r in ratios:
            parts = forward_macs(model, r)
            print(f"\nmask ratio {r:g}: forward GMACs per image by part")
            for part, macs in parts.items():
                print(f"  {part:24s} {macs / 1e9:9.3f}  ({100 * macs / parts['total']:5.1f} %)")
    return 0


if __name__ == "__main__":
    run_main(main)
