"""Write offline stand-ins for unseen 28x28 grayscale data in Fashion-MNIST's IDX layout.

    python scripts/make_standin_idx.py kind=digits28 root=data/standin_digits28 [n_train=4000 n_test=1000 seed=0]
    python scripts/make_standin_idx.py kind=shapes28 root=data/standin_shapes28

Each writes ROOT/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, so the real loader reads
it: `dataset=fashion_mnist dataset.root=ROOT dataset.download=false` (train.py, inference.py,
scripts/train_classifier.py). Used by the 28x28 recipe study in experiments/fashion_mnist.md.

- digits28: MNIST-like digits from scikit-learn's 1,797 real 8x8 digits. Each is upsampled to 20x20
  (bilinear), put in a 28x28 frame (MNIST's 4-pixel margin) and given a random affine jitter (rotation
  +-12 deg, scale 0.85-1.1, shear +-0.15, shift +-2 px) and a random stroke gain (1.0-1.6, thicker
  strokes). Train images come only from the digits datasets.load_digits puts in 'train' (1,442),
  test images only from its 'test' digits (355), so no held-out image shares a source digit with
  a training image.
- shapes28: 10 classes of antialiased strokes and shapes (ring, disc, square outline, filled square,
  triangle outline, plus, x-cross, double bar, diamond outline, L), random centre (+-4 px), size,
  stroke width and a small rotation (+-15 deg), rendered at 4x and box-downsampled.
"""

import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cli import parse_keys
from config import check, check_choice
from runtime import run_main

KINDS = ("digits28", "shapes28")


@dataclass
class StandinConfig:
    kind: str | None = None  # required: digits28 | shapes28
    root: str | None = None  # required: writes ROOT/FashionMNIST/raw/
    n_train: int = 4000
    n_test: int = 1000
    seed: int = 0


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: big-endian magic 0x0000 08 NDIM (uint8), each dimension as a big-endian int32, then the bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    tmp.replace(path)


def jittered_digits(base: torch.Tensor, labels: torch.Tensor, n: int, gen: torch.Generator):
    """base: float [M, 1, 8, 8] in 0..1 -> (uint8 [n, 28, 28], labels [n]), balanced over classes."""
    # balanced: n // 10 per class (the remainder to the first classes), sources drawn uniformly within a class
    idx = []
    for k in range(10):
        members = (labels == k).nonzero().squeeze(1)
        count = n // 10 + (1 if k < n % 10 else 0)
        idx.append(members[torch.randint(len(members), (count,), generator=gen)])
    idx = torch.cat(idx)
    idx = idx[torch.randperm(len(idx), generator=gen)]
    digits = F.interpolate(base[idx], size=(20, 20), mode="bilinear", align_corners=False)
    canvas = F.pad(digits, (4, 4, 4, 4))  # [n, 1, 28, 28], MNIST-style margin
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)  # noqa: E731
    angle, scale, shear = u(-12, 12) * math.pi / 180, u(0.85, 1.1), u(-0.15, 0.15)
    shift = u(-2, 2), u(-2, 2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output -> input coordinates (normalised [-1, 1]): inverse of rotate*scale*shear, then shift
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos / scale, (-sin + shear) / scale
    theta[:, 1, 0], theta[:, 1, 1] = sin / scale, cos / scale
    theta[:, 0, 2], theta[:, 1, 2] = -shift[0] * 2 / 28, -shift[1] * 2 / 28
    grid = F.affine_grid(theta, list(canvas.shape), align_corners=False)
    out = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = (out * u(1.0, 1.6).view(n, 1, 1, 1)).clamp(0, 1)
    return (out[:, 0] * 255).round().to(torch.uint8).numpy(), labels[idx].numpy().astype(np.uint8)


def make_digits28(n_train: int, n_test: int, seed: int):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16
    labels = torch.from_numpy(bunch.target).long()
    rank = torch.empty_like(labels)  # the same fixed split as datasets.load_digits
    for k in range(10):
        rank[labels == k] = torch.arange(int((labels == k).sum()))
    test = rank % 5 == 4
    gen = torch.Generator().manual_seed(seed)
    return (
        jittered_digits(images[~test], labels[~test], n_train, gen),
        jittered_digits(images[test], labels[test], n_test, gen),
    )


def _segment_distance(px, py, ax, ay, bx, by):
    dx, dy = bx - ax, by - ay
    t = (((px - ax) * dx + (py - ay) * dy) / max(dx * dx + dy * dy, 1e-9)).clip(0, 1)
    return np.hypot(px - (ax + t * dx), py - (ay + t * dy))


def _polyline(px, py, points, closed):
    pts = points + ([points[0]] if closed else [])
    return np.min([_segment_distance(px, py, *a, *b) for a, b in zip(pts[:-1], pts[1:])], axis=0)


def render_shape(k: int, rng: np.random.Generator, ss: int = 4) -> np.ndarray:
    size = 28 * ss
    c = (np.arange(size) + 0.5) / ss  # pixel-centre coordinates in 28-px units
    px, py = np.meshgrid(c, c)
    cx, cy = 14 + rng.uniform(-4, 4), 14 + rng.uniform(-4, 4)
    r = rng.uniform(5.5, 9.5)
    w = rng.uniform(1.2, 2.8)  # stroke width
    a = rng.uniform(-15, 15) * math.pi / 180
    # rotate the sampling grid about the centre
    qx = math.cos(a) * (px - cx) + math.sin(a) * (py - cy)
    qy = -math.sin(a) * (px - cx) + math.cos(a) * (py - cy)
    stroke = lambda d: d <= w / 2  # noqa: E731
    if k == 0:  # ring
        mask = stroke(np.abs(np.hypot(qx, qy) - r))
    elif k == 1:  # disc
        mask = np.hypot(qx, qy) <= r * 0.8
    elif k == 2:  # square outline
        mask = stroke(np.abs(np.maximum(np.abs(qx), np.abs(qy)) - r * 0.8))
    elif k == 3:  # filled square
        mask = np.maximum(np.abs(qx), np.abs(qy)) <= r * 0.65
    elif k == 4:  # triangle outline
        pts = [(r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        mask = stroke(_polyline(qx, qy, pts, True))
    elif k == 5:  # plus
        mask = stroke(
            np.minimum(np.where(np.abs(qy) <= r, np.abs(qx), 1e9), np.where(np.abs(qx) <= r, np.abs(qy), 1e9))
        )
    elif k == 6:  # x-cross
        d = r / math.sqrt(2)
        mask = stroke(np.minimum(_segment_distance(qx, qy, -d, -d, d, d), _segment_distance(qx, qy, -d, d, d, -d)))
    elif k == 7:  # double bar (=)
        g = r * 0.45
        mask = stroke(np.minimum(_segment_distance(qx, qy, -r, -g, r, -g), _segment_distance(qx, qy, -r, g, r, g)))
    elif k == 8:  # diamond outline
        mask = stroke(_polyline(qx, qy, [(0, -r), (r, 0), (0, r), (-r, 0)], True))
    else:  # L
        mask = stroke(_polyline(qx, qy, [(-r * 0.6, -r), (-r * 0.6, r), (r * 0.6, r)], False))
    img = mask.astype(np.float32).reshape(28, ss, 28, ss).mean(axis=(1, 3))
    return (img * 255).round().astype(np.uint8)


def make_shapes28(n_train: int, n_test: int, seed: int):
    out = []
    for split, n in enumerate((n_train, n_test)):
        rng = np.random.default_rng([seed, split])
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        out.append((np.stack([render_shape(int(k), rng) for k in labels]), labels))
    return out


def main(argv: list[str] | None = None) -> int:
    cfg = parse_keys(sys.argv[1:] if argv is None else argv, StandinConfig, __doc__)
    check(cfg.kind is not None, "kind", cfg.kind, f"is required; choose one of: {', '.join(KINDS)}")
    check_choice("kind", cfg.kind, KINDS)
    check(bool(cfg.root), "root", cfg.root, "is required: the data root, e.g. root=data/standin_digits28")
    for key in ("n_train", "n_test"):
        check(getattr(cfg, key) >= 1, key, getattr(cfg, key), "must be >= 1")
    make = make_digits28 if cfg.kind == "digits28" else make_shapes28
    (train_x, train_y), (test_x, test_y) = make(cfg.n_train, cfg.n_test, cfg.seed)
    raw = Path(cfg.root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, x, y in (("train", train_x, train_y), ("t10k", test_x, test_y)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    print(f"{cfg.kind}: {len(train_y)} train / {len(test_y)} test images [28, 28] -> {raw}")
    return 0


if __name__ == "__main__":
    run_main(main)
