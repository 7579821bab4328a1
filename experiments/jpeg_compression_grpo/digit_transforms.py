"""How cheap can a recognisable digit be in JPEG? A per-image frontier over simple transforms of real data.

    uv run python experiments/jpeg_compression_grpo/digit_transforms.py root=data/standin_digits28 \
        anchor=runs/jpeg28/judge28.safetensors judge=runs/jpeg28/clf28.safetensors [n=500]

Takes the first n held-out images of a 28x28 set in Fashion-MNIST's layout (scripts/make_standin_idx.py)
and, for each image, every combination of isotropic scale, horizontal squeeze, contrast, Gaussian blur
and a background threshold (144 variants). For each anchor threshold tau it keeps, per image, the
variant with the lowest JPEG size whose anchor classifier still gives the true class p >= tau (an
oracle that sees the answer, so no policy does better within this family) and prints that set's mean
JPEG bpp and its accuracy under the judge, a classifier the choice never saw: the GRPO setting of
experiment.md, with the anchor as the reward's class term and the judge as the evaluation.
"""

import itertools
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from classifier import classifier_logits, load_classifier
from cli import parse_keys
from config import check
from datasets import load_fashion_mnist, uint8_to_model_space
from metrics import constant_image_bits_per_pixel, jpeg_bits_per_pixel
from runtime import run_main

SCALES, SQUEEZES, CONTRASTS, BLURS, THRESHOLDS = (1, 0.85, 0.7), (1, 0.75, 0.55), (1, 0.6, 0.4, 0.3), (0, 1), (0, 0.15)
TAUS = (0.5, 0.8, 0.9, 0.95, 0.99)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, 1, H, W] (edges replicated)."""
    if sigma == 0:
        return x
    radius = int(3 * sigma) + 1
    taps = torch.exp(-(torch.arange(-radius, radius + 1).float() ** 2) / (2 * sigma**2))
    taps = taps / taps.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), taps.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), taps.view(1, 1, -1, 1))


def resize_about_centre(x: torch.Tensor, scale: float, squeeze: float) -> torch.Tensor:
    """Shrink [N, 1, H, W] about the image centre: width by scale * squeeze, height by scale."""
    theta = torch.tensor([[1 / (scale * squeeze), 0.0, 0.0], [0.0, 1 / scale, 0.0]]).expand(len(x), 2, 3)
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def main(root: str, anchor_path: str, judge_path: str, n: int) -> None:
    data = load_fashion_mnist(root=root, split="test", download=False)
    x, y = data.x[:n].float() / 255, data.y[:n]  # [n, 1, 28, 28] in [0, 1]
    anchor, judge = load_classifier(anchor_path), load_classifier(judge_path)
    fixed = constant_image_bits_per_pixel(tuple(x.shape[1:]), "jpeg")
    bpp, anchor_log_p, judged = [], [], []
    for scale, squeeze, contrast, sigma, threshold in itertools.product(SCALES, SQUEEZES, CONTRASTS, BLURS, THRESHOLDS):
        image = blur(resize_about_centre(x, scale, squeeze), sigma)
        image = torch.where(image < threshold, 0.0, image) * contrast
        image = image.clamp(0, 1) * 2 - 1
        bpp.append(jpeg_bits_per_pixel(image))
        anchor_log_p.append(torch.log_softmax(classifier_logits(anchor, image), 1)[torch.arange(n), y])
        judged.append((classifier_logits(judge, image).argmax(1) == y).float())
    bpp, anchor_log_p, judged = torch.stack(bpp), torch.stack(anchor_log_p), torch.stack(judged)
    real = uint8_to_model_space(data.x[:n])
    real_bpp = jpeg_bits_per_pixel(real).mean().item()
    real_acc = (classifier_logits(judge, real).argmax(1) == y).float().mean().item()
    print(f"{n} held-out images of {root}; {len(bpp)} variants each; constant image {fixed:.2f} bpp")
    print(f"| anchor p >= tau | JPEG bpp (total) | payload | vs the data ({real_bpp:.2f}) | judge accuracy |")
    print("|---|---|---|---|---|")
    print(f"| (the data) | {real_bpp:.2f} | {real_bpp - fixed:.2f} | 0 % | {real_acc:.3f} |")
    rows = torch.arange(n)
    for tau in TAUS:
        allowed = anchor_log_p >= math.log(tau)
        choice = torch.where(allowed, bpp, torch.full_like(bpp, math.inf)).argmin(0)  # untransformed if none passes
        total = bpp[choice, rows].mean().item()
        print(
            f"| {tau} | {total:.2f} | {total - fixed:.2f} | {100 * (total / real_bpp - 1):+.1f} % | "
            f"{judged[choice, rows].mean().item():.3f} |"
        )


@dataclass
class TransformsConfig:
    root: str | None = None  # required: the stand-in data root (scripts/make_standin_idx.py root=)
    anchor: str | None = None  # required: the anchor classifier (.safetensors)
    judge: str | None = None  # required: the judge classifier (.safetensors)
    n: int = 500  # held-out images


def cli(argv: list[str] | None = None) -> int:
    args = parse_keys(sys.argv[1:] if argv is None else argv, TransformsConfig, __doc__)
    for key in ("root", "anchor", "judge"):
        check(bool(getattr(args, key)), key, getattr(args, key), "is required")
    check(args.n >= 1, "n", args.n, "must be >= 1")
    main(args.root, args.anchor, args.judge, args.n)
    return 0


if __name__ == "__main__":
    run_main(cli)
