"""How cheap can a recognisable digit be in JPEG, and how far from the data is it? Frontiers on real images.

    uv run python experiments/jpeg_compression_grpo/digit_transforms.py root=data/standin_digits28 \
        anchor=runs/jpeg28/judge28.safetensors judge=runs/jpeg28/clf28.safetensors [n=500] [fd_samples=200]

The images are the first n training images of a 28x28 set in Fashion-MNIST's layout
(scripts/make_standin_idx.py), each in every combination of isotropic scale, horizontal squeeze,
contrast, Gaussian blur and a background threshold (144 variants). Every set below is scored as GRPO's
evaluation scores a policy: mean JPEG bpp, accuracy under the judge (a classifier no choice here ever
sees) and the judge's classifier-FD to the held-out split at fd_samples images (balanced over the
classes, averaged over DRAWS draws; fd_samples = 200 is the scale of the GRPO guard's FD bound).

1. Per-image oracle: for each anchor threshold tau, each image's cheapest variant whose anchor
   classifier still gives the true class p >= tau. It sees the answer, so no policy does better within
   this family on JPEG at that anchor confidence: the GRPO setting of experiment.md, with the anchor as
   the reward's class term and the judge as the evaluation.
2. One transform for every image: the variants on the (JPEG, classifier-FD) Pareto front, i.e. the
   least FD any of these distribution shifts pays for its compression.
3. The data's own cheapest images: the fraction q of each class's training images with the lowest JPEG
   size, as a policy that only preferred the compressible part of the data would sample them, untransformed
   (q = 1 is the real-vs-real FD floor at that count) and after each transform of the front of 2 that keeps
   0.95 of the data's judge accuracy.
"""

import itertools
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from classifier import classifier_outputs, load_classifier, reference_statistics
from cli import parse_keys
from config import check
from datasets import load_fashion_mnist, model_space_to_uint8, uint8_to_model_space
from metrics import constant_image_bits_per_pixel, feature_statistics, frechet_distance, jpeg_bits_per_pixel
from runtime import run_main

SCALES, SQUEEZES, CONTRASTS, BLURS, THRESHOLDS = (1, 0.85, 0.7), (1, 0.75, 0.55), (1, 0.6, 0.4, 0.3), (0, 1), (0, 0.15)
TAUS = (0.5, 0.8, 0.9, 0.95, 0.99)
FRACTIONS = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)
DRAWS = 5  # balanced draws per FD, averaged: at 200 images one draw's FD moves by ~0.5


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


def transform(x: torch.Tensor, scale: float, squeeze: float, contrast: float, sigma: float, threshold: float):
    """One variant of images x [N, 1, H, W] in [0, 1] -> uint8 [N, 1, H, W] (the 8-bit image a user gets)."""
    image = blur(resize_about_centre(x, scale, squeeze), sigma)
    image = torch.where(image < threshold, 0.0, image) * contrast
    return model_space_to_uint8(image.clamp(0, 1) * 2 - 1)


def cheapest_per_class(bpp: torch.Tensor, labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ceil(fraction * count) lowest-bpp rows of each label (bpp, labels [N]), label by label."""
    keep = []
    for label in labels.unique():
        rows = (labels == label).nonzero().squeeze(1)
        keep.append(rows[bpp[rows].argsort()[: math.ceil(fraction * len(rows))]])
    return torch.cat(keep)


def balanced_draw(labels: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """count // K indices of each of the K labels of labels [N], without replacement (all of a smaller label)."""
    classes = labels.unique()
    picks = []
    for label in classes:
        rows = (labels == label).nonzero().squeeze(1)
        picks.append(rows[torch.randperm(len(rows), generator=generator)[: count // len(classes)]])
    return torch.cat(picks)


def mean_fd(features: torch.Tensor, labels: torch.Tensor, reference, fd_samples: int) -> float:
    """Classifier-FD of features [N, F] to reference (mean, covariance), averaged over DRAWS balanced draws
    of fd_samples rows (the same draws for every set of the same labels)."""
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(DRAWS):
        pick = balanced_draw(labels, fd_samples, generator)
        total += frechet_distance(*feature_statistics(features[pick]), *reference)
    return total / DRAWS


def pareto_front(cost: list[float], distance: list[float]) -> list[int]:
    """Indices of the points no other point beats on both (lower cost and lower distance), by cost."""
    order = sorted(range(len(cost)), key=lambda i: (cost[i], distance[i]))
    front, best = [], math.inf
    for i in order:
        if distance[i] < best:
            front.append(i)
            best = distance[i]
    return front


def main(root: str, anchor_path: str, judge_path: str, n: int, fd_samples: int) -> None:
    train = load_fashion_mnist(root=root, split="train", download=False)
    anchor, judge = load_classifier(anchor_path), load_classifier(judge_path)
    reference = reference_statistics(judge, load_fashion_mnist(root=root, split="test", download=False))
    x, y = train.x[:n].float() / 255, train.y[:n]  # [n, 1, 28, 28] in [0, 1]
    fixed = constant_image_bits_per_pixel(tuple(x.shape[1:]), "jpeg")
    variants = list(itertools.product(SCALES, SQUEEZES, CONTRASTS, BLURS, THRESHOLDS))
    bpp, anchor_log_p, judged, features = [], [], [], []
    for variant in variants:
        image = transform(x, *variant)
        bpp.append(jpeg_bits_per_pixel(uint8_to_model_space(image)))
        anchor_log_p.append(torch.log_softmax(classifier_outputs(anchor, image)[1], 1)[torch.arange(n), y])
        judge_features, judge_logits = classifier_outputs(judge, image)
        judged.append((judge_logits.argmax(1) == y).float())
        features.append(judge_features)
    bpp, anchor_log_p, judged, features = map(torch.stack, (bpp, anchor_log_p, judged, features))
    identity = variants.index((1, 1, 1, 0, 0))
    real_bpp = bpp[identity].mean().item()

    def row(name: str, choice: torch.Tensor) -> str:
        """choice [n]: each image's variant index -> a table row scored as GRPO's evaluation scores a policy."""
        rows = torch.arange(n)
        total = bpp[choice, rows].mean().item()
        fd = mean_fd(features[choice, rows], y, reference, fd_samples)
        accuracy = judged[choice, rows].mean().item()
        change = 100 * (total / real_bpp - 1)
        return f"| {name} | {total:.2f} | {total - fixed:.2f} | {change:+.1f} % | {accuracy:.3f} | {fd:.2f} |"

    header = "| JPEG bpp (total) | payload | vs the data | judge accuracy | classifier-FD |\n|---|---|---|---|---|---|"
    print(
        f"{n} training images of {root}; {len(variants)} variants each; constant image {fixed:.2f} bpp; "
        f"classifier-FD to the held-out split, {DRAWS} balanced draws of {fd_samples}"
    )
    print(f"\n| per image: cheapest with anchor p >= tau {header}")
    print(row("(the data)", torch.full((n,), identity)))
    for tau in TAUS:
        allowed = anchor_log_p >= math.log(tau)
        print(row(str(tau), torch.where(allowed, bpp, torch.full_like(bpp, math.inf)).argmin(0)))  # none: the cheapest

    print(f"\n| one transform for all: scale, squeeze, contrast, blur sigma, threshold {header}")
    mean_bpp = bpp.mean(1).tolist()
    fds = [mean_fd(features[v], y, reference, fd_samples) for v in range(len(variants))]
    front = pareto_front(mean_bpp, fds)
    for v in front:
        print(row(", ".join(map(str, variants[v])), torch.full((n,), v)))

    print(
        f"\n| all {len(train)} training images: transform, cheapest fraction of each class | JPEG bpp "
        "| vs the data | judge accuracy | classifier-FD |\n|---|---|---|---|---|"
    )
    whole = jpeg_bits_per_pixel(uint8_to_model_space(train.x)).mean().item()
    kept = [v for v in front if judged[v].mean() >= 0.95 * judged[identity].mean()]
    for v in sorted(kept, key=lambda v: -mean_bpp[v]):
        image = transform(train.x.float() / 255, *variants[v])
        image_bpp = jpeg_bits_per_pixel(uint8_to_model_space(image))
        image_features, image_logits = classifier_outputs(judge, image)
        for fraction in FRACTIONS:
            keep = cheapest_per_class(image_bpp, train.y, fraction)
            jpeg = image_bpp[keep].mean().item()
            accuracy = (image_logits[keep].argmax(1) == train.y[keep]).float().mean().item()
            fd = mean_fd(image_features[keep], train.y[keep], reference, fd_samples)
            name = f"{', '.join(map(str, variants[v]))}; {fraction}"
            print(f"| {name} | {jpeg:.3f} | {100 * (jpeg / whole - 1):+.1f} % | {accuracy:.3f} | {fd:.2f} |")


@dataclass
class TransformsConfig:
    root: str | None = None  # required: the stand-in data root (scripts/make_standin_idx.py root=)
    anchor: str | None = None  # required: the anchor classifier (.safetensors)
    judge: str | None = None  # required: the judge classifier (.safetensors)
    n: int = 500  # training images transformed
    fd_samples: int = 200  # images per classifier-FD (GRPO's evaluations score 200: its guard's FD scale)


def cli(argv: list[str] | None = None) -> int:
    args = parse_keys(sys.argv[1:] if argv is None else argv, TransformsConfig, __doc__)
    for key in ("root", "anchor", "judge"):
        check(bool(getattr(args, key)), key, getattr(args, key), "is required")
    check(args.n >= 1, "n", args.n, "must be >= 1")
    check(args.fd_samples >= 20, "fd_samples", args.fd_samples, "must be >= 20 (two images of each of 10 classes)")
    main(args.root, args.anchor, args.judge, args.n, args.fd_samples)
    return 0


if __name__ == "__main__":
    run_main(cli)
