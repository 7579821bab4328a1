"""Train the small CNN behind the image proxy metrics (accuracy, classifier-FD) and classifier rewards.

    python scripts/train_classifier.py dataset=fashion_mnist out=runs/reward_models/fashion_classifier.safetensors
    python scripts/train_classifier.py dataset=digits out=runs/classifiers/digits.safetensors epochs=20 device=cpu

Keys (key=value, all optional but dataset and out): see `ClassifierTrainConfig`; the training
commands' `dataset.root=DIR` and `dataset.download=false` work too. Trains on the
dataset's train split, reports accuracy on the held-out test split, and writes exactly one file,
`out` (safetensors, atomically). Its metadata holds everything `metrics.load_classifier` needs
(architecture, constructor kwargs, dataset name, image shape [C, H, W]) plus the test accuracy
and the training settings. No augmentation: the classifier should judge images as the dataset
presents them, and a hflip would be wrong for digits.
"""

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from config import DEVICES, ConfigError, check, check_choice, parse_keys
from datasets import DATASET_INFO, DATASETS
from metrics import CLASSIFIER_FORMAT, class_accuracy, classifier_logits
from models import CLASSIFIERS, count_parameters
from runtime import learning_rate, run_main, select_device

# datasets of images [C, H, W] (not moons)
IMAGE_DATASETS = tuple(name for name in DATASETS if len(DATASET_INFO.get(name, {}).get("shape", ())) == 3)


@dataclass
class ClassifierTrainConfig:
    dataset: str | None = None  # required: digits | mnist | fashion_mnist | cifar10 (datasets.DATASETS keys)
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
TRAINING_SPELLINGS = {"dataset.name": "dataset", "dataset.root": "root", "dataset.download": "download",
                      "dataset.image_size": "image_size", "+dataset.image_size": "image_size"}


def parse_args(argv: list[str]) -> ClassifierTrainConfig:
    """`key=value` strings -> a checked config; unknown keys, wrong types and bad values fail with
    the key named (the training config's messages, via config.parse_keys)."""
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
    check(cfg.image_size is None or (cfg.dataset == "digits" and cfg.image_size >= 8), "image_size", cfg.image_size,
          "only for dataset=digits, >= 8 (the other datasets have a fixed size)")
    check(0 <= cfg.dropout < 1, "dropout", cfg.dropout, "must be in [0, 1)")
    return cfg


def train_classifier(dataset: str, out: str | Path, epochs: int = 10, batch_size: int = 128, lr: float = 2e-3,
                     weight_decay: float = 0.05, width: int = 32, dropout: float = 0.3, device: str = "auto",
                     seed: int = 0, root: str = "./data", download: bool = True, image_size: int | None = None,
                     log=print) -> float:
    """Train `models.CLASSIFIERS["cnn"]` on `dataset`'s train split, save it to `out`; -> test accuracy.

    Deterministic given seed on CPU; the caller's CPU RNG state is left as it was.
    """
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed}
    device = select_device(device)
    sized = {} if image_size is None else {"image_size": image_size}
    train_set = DATASETS[dataset](device=device, root=root, split="train", download=download, hflip=False, **sized)
    test_set = DATASETS[dataset](device=device, root=root, split="test", download=download, hflip=False, **sized)
    if train_set.x.dim() != 4:
        raise ConfigError(f"dataset = {dataset!r} holds no images [N, C, H, W]; choose one of: {', '.join(IMAGE_DATASETS)}")
    kwargs = {"in_ch": train_set.sample_shape[0], "num_classes": train_set.num_classes, "width": width,
              "dropout": dropout}

    batch_size = min(batch_size, len(train_set))
    steps_per_epoch = len(train_set) // batch_size  # drop the ragged last batch: BatchNorm needs > 1 sample
    total_steps = epochs * steps_per_epoch
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # init and dropout
        model = CLASSIFIERS["cnn"](**kwargs).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        order = torch.Generator().manual_seed(seed)
        log(f"classifier: {dataset} train {len(train_set)} / test {len(test_set)} images {list(train_set.sample_shape)}, "
            f"{count_parameters(model) / 1e6:.2f}M parameters, {total_steps} steps on {device}")
        step = 0
        for epoch in range(epochs):
            model.train()
            permutation = torch.randperm(len(train_set), generator=order).to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            for i in range(steps_per_epoch):
                x, y = train_set.batch(permutation[i * batch_size:(i + 1) * batch_size])  # no generator: no flips
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, lr, max(1, total_steps // 20), total_steps, "cosine", 0.0)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                # accumulated on device: one host sync per epoch
                loss_sum += loss.detach()
                correct += (logits.argmax(1) == y).sum()
            seen = steps_per_epoch * batch_size
            log(f"epoch {epoch + 1}/{epochs}: train loss {loss_sum.item() / steps_per_epoch:.4f}, "
                f"train accuracy {correct.item() / seen:.4f}")

    accuracy = class_accuracy(classifier_logits(model, test_set.x), test_set.y)
    metadata = {
        "format": CLASSIFIER_FORMAT,
        "architecture": "cnn",
        "kwargs": json.dumps(kwargs),
        "dataset": dataset,
        "image_shape": json.dumps(list(train_set.sample_shape)),
        "class_names": json.dumps(list(train_set.class_names or [])),
        "test_accuracy": f"{accuracy:.6f}",
        "train_settings": json.dumps(settings),
    }
    _save_atomic(model, Path(out), metadata)
    return accuracy


def _save_atomic(model: torch.nn.Module, out: Path, metadata: dict[str, str]) -> None:
    """safetensors to a temporary file beside `out`, then os.replace: `out` is never half-written."""
    from safetensors.torch import save

    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        # serialise to bytes and write ourselves: safetensors' save_file creates files mode 0600
        tmp.write_bytes(save(tensors, metadata=metadata))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    accuracy = train_classifier(**dataclasses.asdict(cfg))
    print(f"test accuracy {accuracy:.4f} ({cfg.dataset}, held-out split); wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
