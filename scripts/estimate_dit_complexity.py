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

from build import build_meta_dit, parse_overrides
from models_dit import complexity, forward_macs


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

    model = build_meta_dit(args.model, parse_overrides(args.overrides))
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
