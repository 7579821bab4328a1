"""Inception reference statistics of real images (FID, sFID, KID, precision/recall) for inception.inception_metrics.

    python scripts/build_reference_stats.py dataset=cifar10 dataset.split=train out=stats/cifar10_train.npz
    python scripts/build_reference_stats.py images=data/imagenet/train image_size=256 out=stats/in256.npz
    python scripts/build_reference_stats.py dataset=digits dataset.split=test out=/tmp/digits.npz device=cpu

The images: a dataset of the registry (`dataset=NAME` and its keys as dataset.KEY=VALUE, as in the
training commands, e.g. `dataset.split=train`, `dataset.root=./data`, `dataset.download=false`; the
CIFAR-10 protocol is the 50k train split), or any folder of images (`images=DIR`:
image_folder.load_imagefolder, ADM's centre crop to image_size). Every image is
scored as its stored 8-bit pixels; grayscale is repeated to RGB. The output (.npz, see
inception.ReferenceStatistics.save) holds the pool-feature mean/covariance, the sFID statistics, up to
`features` pool features (for KID and precision/recall), the image count, and the sha256 of the
Inception weights, so statistics from other weights are refused at load. Building twice gives
byte-identical files (fixed order, no timestamps).

Weights: torch-fidelity's TF-2015 Inception-v3 (see inception.load_inception); `weights=PATH`, or the
torch hub cache where torch-fidelity keeps its download. Nothing is downloaded here.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import build
import inception
from cli import parse_keys
from config import DEVICES, ConfigError, check, check_choice
from dataset_registry import DATASETS
from image_folder import ImageFolderDataset, load_imagefolder
from runtime import run_main, select_device


@dataclass
class ReferenceStatsConfig:
    out: str | None = None  # required: the .npz to write
    dataset: dict[str, Any] | None = None  # dataset=NAME and its keys, e.g. dataset=cifar10 dataset.split=train
    images: str | None = None  # a folder of images (root/<class>/<image> or flat) instead of a dataset
    image_size: int = 256  # images=: centre-crop size
    weights: str | None = None  # Inception weights (.pth); null: the torch hub cache
    device: str = "auto"
    batch_size: int = 100
    features: int = 10000  # pool features kept for KID / precision-recall (ADM's 10000; 0 none, -1 all)
    limit: int | None = None  # only the first N images (smoke tests)
    progress: bool = True  # show a progress bar


def parse_args(argv: list[str]) -> ReferenceStatsConfig:
    args = parse_keys(argv, ReferenceStatsConfig, __doc__, named=("dataset",))
    check(bool(args.out), "out", args.out, "is required: the .npz to write, e.g. out=stats/cifar10_train.npz")
    check(
        bool(args.images) != bool(args.dataset),
        "images",
        args.images,
        "give either dataset=NAME [dataset.KEY=VALUE ...] or images=DIR, not both",
    )
    check_choice("device", args.device, DEVICES)
    for key in ("batch_size", "image_size"):
        check(getattr(args, key) >= 1, key, getattr(args, key), "must be >= 1")
    check(args.limit is None or args.limit >= 2, "limit", args.limit, "must be null or >= 2")
    return args


def open_images(args) -> tuple[object, str]:
    """-> (a dataset whose uint8 images `image_batch` can read, a description for the file's `source`)."""
    if args.images:
        return load_imagefolder(
            "cpu", root=args.images, image_size=args.image_size
        ), f"images={args.images} image_size={args.image_size}"
    spec = dict(args.dataset)
    if "name" not in spec:
        raise ConfigError(f"dataset = {spec}: needs a name, dataset=NAME (or use images=DIR)")
    name = spec.pop("name")
    if name not in DATASETS:
        raise ConfigError(f"dataset={name!r} is not a dataset; choose one of: {', '.join(DATASETS)}")
    try:
        dataset = build.build_dataset({"name": name, **spec}, "cpu")
    except TypeError as e:  # a key the loader does not take
        raise ConfigError(f"dataset={name!r}: {e}") from None
    x = getattr(dataset, "x", None)
    if not isinstance(dataset, ImageFolderDataset) and not (
        isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4
    ):
        raise ConfigError(
            f"dataset={name!r} holds no 8-bit images (Inception statistics score images, not 2-D points or latents)"
        )
    return dataset, " ".join(f"{key}={value}" for key, value in [("dataset", name), *spec.items()])


def image_batch(dataset, start: int, stop: int) -> torch.Tensor:
    """uint8 images [B, C, H, W] of rows start..stop-1, on the CPU."""
    if isinstance(dataset, ImageFolderDataset):
        return dataset.decode(np.arange(start, stop))
    return dataset.x[start:stop]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = select_device(args.device)
    extractor = inception.load_inception(args.weights, device)
    dataset, source = open_images(args)
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    if count < 2:
        raise ConfigError(f"{source}: {count} image(s); statistics need at least 2")
    if args.limit is not None:
        source += f" limit={args.limit}"
    parts: dict[str, list[np.ndarray]] = {}
    with tqdm(total=count, desc="inception features", unit="img", disable=not args.progress) as bar:
        for start in range(0, count, args.batch_size):
            stop = min(start + args.batch_size, count)
            for key, value in inception.inception_features(
                extractor, image_batch(dataset, start, stop), args.batch_size
            ).items():
                parts.setdefault(key, []).append(value)
            bar.update(stop - start)
    features = {key: np.concatenate(values) for key, values in parts.items() if key != "logits"}
    keep = None if args.features < 0 else args.features
    stats = inception.ReferenceStatistics.from_features(features, extractor.weights_sha256, keep, source)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats.save(out)
    kept = 0 if stats.features is None else len(stats.features)
    print(
        f"wrote {out}: {count} images ({source}); FID and sFID statistics, {kept} pool features; "
        f"Inception weights sha256 {extractor.weights_sha256}"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
