"""Inception reference statistics of real images (FID, sFID, KID, precision/recall) for metrics.inception_metrics.

    python scripts/build_reference_stats.py dataset=cifar10 split=train --out stats/cifar10_train.npz
    python scripts/build_reference_stats.py --images data/imagenet/train --image-size 256 --out stats/in256.npz
    python scripts/build_reference_stats.py dataset=digits split=test --out /tmp/digits.npz --device cpu

The images: a dataset of the registry (`dataset=NAME` and its keys as key=value, e.g. `split=train`,
`root=./data`, `download=false`; the CIFAR-10 protocol is the 50k train split), or any folder of
images (`--images DIR`: datasets.load_imagefolder, ADM's centre crop to --image-size). Every image is
scored as its stored 8-bit pixels; grayscale is repeated to RGB. The output (.npz, see
metrics.ReferenceStatistics.save) holds the pool-feature mean/covariance, the sFID statistics, up to
--features pool features (for KID and precision/recall), the image count, and the sha256 of the
Inception weights, so statistics from other weights are refused at load. Building twice gives
byte-identical files (fixed order, no timestamps).

Weights: torch-fidelity's TF-2015 Inception-v3 (see metrics.load_inception); `--weights PATH`, or the
torch hub cache where torch-fidelity keeps its download. Nothing is downloaded here.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import build  # noqa: E402
import inception  # noqa: E402
from config import DEVICES, ConfigError  # noqa: E402
from dataset_registry import DATASETS  # noqa: E402
from datasets import ImageFolderDataset, load_imagefolder  # noqa: E402
from runtime import run_main, select_device  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Inception reference statistics of a dataset split or an image folder (an .npz for "
                    "metrics.load_reference_statistics).")
    parser.add_argument("dataset", nargs="*", metavar="KEY=VALUE",
                        help="dataset=NAME and its keys, e.g. dataset=cifar10 split=train root=./data")
    parser.add_argument("--images", metavar="DIR", help="a folder of images (root/<class>/<image> or flat) "
                        "instead of a dataset")
    parser.add_argument("--image-size", type=int, default=256, help="--images: centre-crop size (default 256)")
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--weights", default=None, help="Inception weights (.pth); default: the torch hub cache")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--features", type=int, default=10000,
                        help="pool features kept for KID / precision-recall: a fixed-seed subset of this many "
                             "(default 10000, ADM's reference-batch size; 0 keeps none, -1 all)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (smoke tests)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar (default on)")
    args = parser.parse_args(argv)
    if bool(args.images) == bool(args.dataset):
        parser.error("give either dataset=NAME [key=value ...] or --images DIR")
    if args.batch_size < 1 or args.image_size < 1 or (args.limit is not None and args.limit < 2):
        parser.error("--batch-size and --image-size must be >= 1, --limit >= 2")
    return args


def open_images(args) -> tuple[object, str]:
    """-> (a dataset whose uint8 images `image_batch` can read, a description for the file's `source`)."""
    if args.images:
        return load_imagefolder("cpu", root=args.images, image_size=args.image_size), \
            f"images={args.images} image_size={args.image_size}"
    try:
        spec = build.parse_overrides(args.dataset)
    except ValueError as e:
        raise ConfigError(f"{e}; dataset arguments are key=value, e.g. dataset=cifar10 split=train") from None
    if "dataset" not in spec:
        raise ConfigError("dataset=NAME is required with dataset keys (or use --images DIR)")
    name = spec.pop("dataset")
    if name not in DATASETS:
        raise ConfigError(f"dataset={name!r} is not a dataset; choose one of: {', '.join(DATASETS)}")
    try:
        dataset = build.build_dataset({"name": name, **spec}, "cpu")
    except TypeError as e:  # a key the loader does not take
        raise ConfigError(f"dataset={name!r}: {e}") from None
    x = getattr(dataset, "x", None)
    if not isinstance(dataset, ImageFolderDataset) and not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8
                                                           and x.dim() == 4):
        raise ConfigError(f"dataset={name!r} holds no 8-bit images (Inception statistics score images, not "
                          f"2-D points or latents)")
    return dataset, " ".join(f"{key}={value}" for key, value in [("dataset", name), *spec.items()])


def image_batch(dataset, start: int, stop: int) -> torch.Tensor:
    """uint8 images [B, C, H, W] of rows start..stop-1, on the CPU."""
    if isinstance(dataset, ImageFolderDataset):
        return dataset.decode(np.arange(start, stop))
    return dataset.x[start:stop]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
            for key, value in inception.inception_features(extractor, image_batch(dataset, start, stop),
                                                           args.batch_size).items():
                parts.setdefault(key, []).append(value)
            bar.update(stop - start)
    features = {key: np.concatenate(values) for key, values in parts.items() if key != "logits"}
    keep = None if args.features < 0 else args.features
    stats = inception.ReferenceStatistics.from_features(features, extractor.weights_sha256, keep, source)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats.save(out)
    kept = 0 if stats.features is None else len(stats.features)
    print(f"wrote {out}: {count} images ({source}); FID and sFID statistics, {kept} pool features; "
          f"Inception weights sha256 {extractor.weights_sha256}")
    return 0


if __name__ == "__main__":
    run_main(main)
