"""Train the small CNN behind the image proxy metrics (accuracy, classifier-FD) and classifier rewards.

    python scripts/train_classifier.py dataset=fashion_mnist out=runs/reward_models/fashion_classifier.safetensors
    python scripts/train_classifier.py dataset=digits out=runs/classifiers/digits.safetensors epochs=20 device=cpu

Keys (key=value, all optional but dataset and out): see `ClassifierTrainConfig`; the training
commands' `dataset.root=DIR` and `dataset.download=false` work too. Trains on the
dataset's train split, reports accuracy on the held-out test split, and writes exactly one file,
`out` (safetensors, atomically). Its metadata holds everything `classifier.load_classifier` needs
(architecture, constructor kwargs, dataset name, image shape [C, H, W]) plus the test accuracy
and the training settings. No augmentation: the classifier should judge images as the dataset
presents them, and a hflip would be wrong for digits.
"""

import dataclasses
import sys
from dataclasses import dataclass

from classifier import IMAGE_DATASETS, train_classifier
from cli import parse_keys
from config import DEVICES, check, check_choice
from runtime import run_main


@dataclass
class ClassifierTrainConfig:
    dataset: str | None = None  # required: digits | mnist | fashion_mnist | cifar10 (dataset_registry.DATASETS keys)
    out: str | None = None  # required: the .safetensors file to write
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3  # peak AdamW lr; linear warmup over 5% of the steps, then cosine to 0
    weight_decay: float = 0.05
    width: int = 32  # Classifier width: stages of width, 2 width, 4 width channels; features 4 width
    dropout: float = 0.3
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0  # model init, dropout and batch order
    root: str = "./data"  # dataset root (dataset.root in training configs)
    download: bool = True  # fetch a missing dataset (needs network)
    image_size: int | None = None  # digits only: resize to this side (dataset.image_size in training configs)


# Short names accepted for `dataset=` (experiments/fashion_mnist.md uses `dataset=fashion`).
DATASET_ALIASES = {"fashion": "fashion_mnist"}
# train.py's keys for the same settings: `dataset.root=DIR` works as `root=DIR`.
TRAINING_SPELLINGS = {
    "dataset.name": "dataset",
    "dataset.root": "root",
    "dataset.download": "download",
    "dataset.image_size": "image_size",
    "+dataset.image_size": "image_size",
}


def parse_args(argv: list[str]) -> ClassifierTrainConfig:
    """`key=value` strings -> a checked config; unknown keys, wrong types and bad values fail with
    the key named (the training config's messages, via cli.parse_keys)."""
    cfg = parse_keys(argv, ClassifierTrainConfig, __doc__, spellings=TRAINING_SPELLINGS)
    cfg.dataset = DATASET_ALIASES.get(cfg.dataset, cfg.dataset)
    check(cfg.dataset is not None, "dataset", cfg.dataset, f"required; choose one of: {', '.join(IMAGE_DATASETS)}")
    check_choice("dataset", cfg.dataset, IMAGE_DATASETS)
    check(bool(cfg.out), "out", cfg.out, "required: the .safetensors file to write")
    check_choice("device", cfg.device, DEVICES)
    for key in ("epochs", "batch_size", "width"):
        check(getattr(cfg, key) >= 1, key, getattr(cfg, key), "must be >= 1")
    check(cfg.lr > 0, "lr", cfg.lr, "must be > 0")
    check(cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, "must be >= 0")
    check(
        cfg.image_size is None or (cfg.dataset == "digits" and cfg.image_size >= 8),
        "image_size",
        cfg.image_size,
        "only for dataset=digits, >= 8 (the other datasets have a fixed size)",
    )
    check(0 <= cfg.dropout < 1, "dropout", cfg.dropout, "must be in [0, 1)")
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    accuracy = train_classifier(**dataclasses.asdict(cfg))
    print(f"test accuracy {accuracy:.4f} ({cfg.dataset}, held-out split); wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
