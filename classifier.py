"""The image classifier behind the proxy metrics (accuracy, classifier-FD) and the classifier rewards.

One concept, one file: the network (`Classifier`), its training loop (`train_classifier`, run by
`scripts/train_classifier.py`), its file format (safetensors whose metadata holds everything needed to
rebuild it: `load_classifier`), and the metrics computed with it (`classifier_outputs`,
`class_accuracy`, `class_diversity`, `reference_statistics`, `image_sample_metrics`, `real_fd_floor`,
`EvalClassifier`).

Classifier-FD is FID's formula with a dataset-specific network in place of Inception, so it is
comparable only between runs that use the same classifier file and the same number of samples.
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ConfigError
from dataset_registry import DATASETS
from datasets import DATASET_INFO, model_space_to_uint8, uint8_to_model_space
from metrics import feature_statistics, frechet_distance, image_compression_metrics
from models import count_parameters
from runtime import Progress, epoch_permutation, learning_rate, select_device

# --- the network --------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """Small CNN for 16-32 px images: three stages of (conv-BN-ReLU) x 2 + 2x2 max-pool, global average
    pool, a hidden layer whose activations are the Frechet-distance features, dropout, logits."""

    def __init__(
        self,
        in_ch: int = 1,  # image channels
        num_classes: int = 10,  # logits
        width: int = 32,  # channels of the first stage; stages use width, 2 width, 4 width
        dropout: float = 0.3,  # before the logits layer
    ):
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            # conv bias is redundant before BatchNorm
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),  # floors odd sizes: 28 -> 14 -> 7 -> 3
            )

        self.feature_dim = 4 * width
        self.stages = nn.Sequential(stage(in_ch, width), stage(width, 2 * width), stage(2 * width, 4 * width))
        self.hidden = nn.Sequential(nn.Linear(4 * width, self.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in [-1, 1] -> penultimate features [B, 4 * width] (post-ReLU, pre-logits)."""
        return self.hidden(self.stages(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [B, num_classes]


CLASSIFIERS = {"cnn": Classifier}

# datasets of images [C, H, W] (not moons)
IMAGE_DATASETS = tuple(name for name in DATASETS if len(DATASET_INFO.get(name, {}).get("shape", ())) == 3)


# --- the file format -----------------------------------------------------------------------------------


class ClassifierError(ConfigError):
    """A classifier file that is missing, unreadable or trained for other data. A ConfigError, since
    it comes from a config value (training.classifier), so entry points report it as one."""


NEAR_CHANCE = 1.5  # held-out accuracy below this many times chance: a classifier that learned (almost) nothing
CLASSIFIER_FORMAT = "nanoflow-classifier-v1"  # metadata["format"] of files written by scripts/train_classifier.py


def _how_to_train(dataset: str | None) -> str:
    return f"train one with: python scripts/train_classifier.py dataset={dataset or 'NAME'} out=PATH"


def load_classifier(
    path, device="cpu", expected_dataset: str | None = None, expected_shape: tuple[int, ...] | None = None
) -> torch.nn.Module:
    """A classifier file written by `scripts/train_classifier.py` -> the model in eval mode on `device`.

    Everything needed to rebuild it (architecture, constructor kwargs, dataset name, image shape
    [C, H, W]) is in the safetensors metadata. With expected_dataset / expected_shape given, a
    file trained for other data is an error rather than a silently meaningless metric. The model
    gets `.dataset_name`, `.image_shape` and `.metadata` (the raw string dict) attributes.
    Raises ClassifierError naming the file, and how to train one, if it is missing or does not fit.
    """
    from safetensors import SafetensorError, safe_open

    from checkpoint import load_weights

    path = Path(path)
    if not path.is_file():
        raise ClassifierError(f"classifier file {path} does not exist; {_how_to_train(expected_dataset)}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            weights = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ClassifierError(f"classifier file {path} is not a readable safetensors file ({e})") from None
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise ClassifierError(
            f"{path} is not a classifier written by scripts/train_classifier.py (metadata format "
            f"{meta.get('format')!r}, expected {CLASSIFIER_FORMAT!r}); {_how_to_train(expected_dataset)}"
        )
    dataset, shape = meta["dataset"], tuple(json.loads(meta["image_shape"]))
    if expected_dataset is not None and dataset != expected_dataset:
        raise ClassifierError(
            f"classifier {path} was trained on dataset '{dataset}', not '{expected_dataset}'; "
            f"{_how_to_train(expected_dataset)}"
        )
    if expected_shape is not None and shape != tuple(expected_shape):
        raise ClassifierError(
            f"classifier {path} was trained on images of shape {list(shape)}, not "
            f"{list(expected_shape)}; {_how_to_train(expected_dataset or dataset)}"
        )
    classifier = CLASSIFIERS[meta["architecture"]](**json.loads(meta["kwargs"]))
    load_weights(classifier, weights, f"classifier {path}")
    classifier.dataset_name, classifier.image_shape, classifier.metadata = dataset, shape, meta
    return classifier.to(device).eval()


def classifier_num_classes(classifier: torch.nn.Module) -> int | None:
    """Logit count of a classifier: its metadata kwargs (files from `load_classifier`), else the
    out_features of its last Linear layer (`Classifier`); None if neither exists."""
    metadata = getattr(classifier, "metadata", None)
    if metadata and "kwargs" in metadata:
        return int(json.loads(metadata["kwargs"])["num_classes"])
    linears = [m for m in classifier.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1].out_features if linears else None


def classifier_class_names(classifier: torch.nn.Module) -> list[str]:
    """Class names from a classifier file's metadata (`load_classifier`); [] for a bare module."""
    return json.loads(getattr(classifier, "metadata", {}).get("class_names", "[]"))


@torch.no_grad()
def classifier_outputs(
    classifier: torch.nn.Module, images: torch.Tensor, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """images [N, C, H, W] (float in [-1, 1], or uint8 0..255) -> (features [N, F], logits [N, K]),
    float32 on the classifier's device; eval mode during the call (the previous mode is restored).

    Batches move to the classifier's device and are converted one at a time, so a whole uint8
    dataset can stay where it is. Features and logits come from one pass: the classifier's
    forward is head(features(x)).
    """
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    features, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        x = uint8_to_model_space(x) if x.dtype == torch.uint8 else x.float()
        f = classifier.features(x)
        features.append(f.float())
        logits.append(classifier.head(f).float())
    classifier.train(was_training)
    return torch.cat(features), torch.cat(logits)


def classifier_features(classifier: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """images [N, C, H, W] -> penultimate features [N, F] (see `classifier_outputs`)."""
    return classifier_outputs(classifier, images, batch_size)[0]


def classifier_logits(classifier: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """images [N, C, H, W] -> logits [N, K] (see `classifier_outputs`)."""
    return classifier_outputs(classifier, images, batch_size)[1]


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of logits [N, K] whose argmax equals labels [N]."""
    return (logits.argmax(dim=1) == labels.to(logits.device)).double().mean().item()


def class_diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise L2 distance between the features [N, F] of samples of the same label [N], averaged over
    the labels with >= 2 samples (NaN when none has): how varied each class is. Mode collapse within a class
    (every "7" the same image) drives it towards 0 while accuracy and a pooled FD can still look fine. The
    within-class mean over pairs i != j is unbiased in the sample count, so runs with different counts compare."""
    features, labels = features.double(), labels.to(features.device)
    means = []
    for label in labels.unique():
        group = features[labels == label]
        count = len(group)
        if count >= 2:  # the diagonal of cdist is 0, so the sum over all pairs / (n (n - 1)) is over i != j
            means.append(torch.cdist(group, group).sum() / (count * (count - 1)))
    return float(torch.stack(means).mean()) if means else float("nan")


REAL_DIVERSITY_PER_CLASS = 500  # held-out images per class for the real data's class_diversity (cdist is O(n^2))


def real_class_diversity(classifier: torch.nn.Module, dataset) -> float:
    """class_diversity of a labelled real split (use the held-out one), up to REAL_DIVERSITY_PER_CLASS images
    of each class (the first ones: deterministic): what a generator that matches the data scores."""
    keep = torch.cat(
        [(dataset.y == label).nonzero().squeeze(1)[:REAL_DIVERSITY_PER_CLASS] for label in dataset.y.unique()]
    )
    return class_diversity(classifier_features(classifier, dataset.x[keep]), dataset.y[keep])


def reference_statistics(classifier: torch.nn.Module, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature (mean, covariance) of a real image dataset (use the held-out split), float64 CPU."""
    return feature_statistics(classifier_features(classifier, dataset.x))


def image_sample_metrics(
    samples: torch.Tensor,
    labels: torch.Tensor | None,
    classifier: torch.nn.Module,
    reference_stats: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, float]:
    """samples [N, C, H, W] in [-1, 1] and the labels [N] they were drawn for (None: unconditional,
    no accuracy or diversity) -> classifier_accuracy, class_diversity, classifier_fd (to
    `reference_statistics` of real data), jpeg_bpp, png_bpp, jpeg_payload_bpp, png_payload_bpp.

    classifier_fd is biased upwards at small N, like FID: compare runs at equal N. Everything is
    scored on the 8-bit image a user gets (clipped to [-1, 1] and rounded), as JPEG/PNG must be:
    the classifier never saw out-of-range pixels, and a policy pushed off the data manifold (GRPO)
    can put many there, which float scoring would hide.
    """
    if samples.dtype != torch.uint8:
        samples = model_space_to_uint8(samples)
    features, logits = classifier_outputs(classifier, samples)
    metrics = {}
    if labels is not None:
        metrics["classifier_accuracy"] = class_accuracy(logits, labels)
        metrics["class_diversity"] = class_diversity(features, labels)
    metrics["classifier_fd"] = frechet_distance(*feature_statistics(features), *reference_stats)
    return {**metrics, **image_compression_metrics(samples)}


def real_fd_floor(classifier, dataset, reference_stats, count: int, seed: int = 0) -> float:
    """Classifier-FD of `count` real training images to the held-out statistics: what a perfect
    generator scores with as many samples (FD is biased upwards at small N, so compare equal N)."""
    count = min(count, len(dataset))
    device = dataset.x.device
    real = dataset.batch(epoch_permutation(len(dataset), seed, -1, device)[:count])[0]
    return frechet_distance(*feature_statistics(classifier_features(classifier, real)), *reference_stats)


@dataclass
class EvalClassifier:
    """A metrics classifier with the statistics its scores need (built by `build.load_eval_classifier`)."""

    classifier: torch.nn.Module
    reference_statistics: tuple[torch.Tensor, torch.Tensor]  # features of the held-out real split
    fd_floor: float  # real-vs-real classifier-FD at the evaluation sample count
    real_diversity: float | None = None  # class_diversity of the held-out split (real_class_diversity)

    def score(self, samples: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        """image_sample_metrics of samples [N, C, H, W] (on any device) plus the floor, and with labels the
        class diversity relative to the real data's (class_diversity_ratio: 1 = as varied as real images)."""
        device = next(self.classifier.parameters()).device
        values = image_sample_metrics(samples.to(device), labels, self.classifier, self.reference_statistics)
        values["classifier_fd_real_floor"] = self.fd_floor
        if "class_diversity" in values and self.real_diversity:
            values["class_diversity_ratio"] = values["class_diversity"] / self.real_diversity
        recorded = getattr(self.classifier, "metadata", {}).get("test_accuracy")
        if recorded is not None:  # how good the judge is, beside every score it gives
            values["classifier_test_accuracy"] = float(recorded)
        return values


# --- training (scripts/train_classifier.py) -------------------------------------------------------------


def train_classifier(
    dataset: str,
    out: str | Path,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    width: int = 32,
    dropout: float = 0.3,
    device: str = "auto",
    seed: int = 0,
    root: str = "./data",
    download: bool = True,
    image_size: int | None = None,
    log=None,
) -> float:
    """Train `CLASSIFIERS["cnn"]` on `dataset`'s train split, save it to `out`; -> test accuracy.

    Deterministic given seed on CPU; the caller's CPU RNG state is left as it was. log: where its lines go
    (default: stdout, beside the step bar a terminal shows; elsewhere a progress line every
    runtime.PROGRESS_LINE_EVERY_S seconds within an epoch, runtime.Progress).
    """
    if log is None:
        from tqdm import tqdm

        log = tqdm.write
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed}
    device = select_device(device)
    sized = {} if image_size is None else {"image_size": image_size}
    train_set = DATASETS[dataset](device=device, root=root, split="train", download=download, hflip=False, **sized)
    test_set = DATASETS[dataset](device=device, root=root, split="test", download=download, hflip=False, **sized)
    if train_set.x.dim() != 4:
        raise ConfigError(
            f"dataset = {dataset!r} holds no images [N, C, H, W]; choose one of: {', '.join(IMAGE_DATASETS)}"
        )
    kwargs = {
        "in_ch": train_set.sample_shape[0],
        "num_classes": train_set.num_classes,
        "width": width,
        "dropout": dropout,
    }

    batch_size = min(batch_size, len(train_set))
    steps_per_epoch = len(train_set) // batch_size  # drop the ragged last batch: BatchNorm needs > 1 sample
    total_steps = epochs * steps_per_epoch
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # init and dropout
        model = CLASSIFIERS["cnn"](**kwargs).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        order = torch.Generator().manual_seed(seed)
        log(
            f"classifier: {dataset} train {len(train_set)} / test {len(test_set)} images "
            f"{list(train_set.sample_shape)}, "
            f"{count_parameters(model) / 1e6:.2f}M parameters, {total_steps} steps on {device}"
        )
        step = 0
        bar = Progress(total_steps, "classifier", "step", write=log)
        for epoch in range(epochs):
            model.train()
            permutation = torch.randperm(len(train_set), generator=order).to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            for i in range(steps_per_epoch):
                x, y = train_set.batch(permutation[i * batch_size : (i + 1) * batch_size])  # no generator: no flips
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
                bar.update(1)
            seen = steps_per_epoch * batch_size
            mean_loss, train_accuracy = loss_sum.item() / steps_per_epoch, correct.item() / seen
            bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{mean_loss:.4f}")
            log(f"epoch {epoch + 1}/{epochs}: train loss {mean_loss:.4f}, train accuracy {train_accuracy:.4f}")
        bar.close()

    accuracy = class_accuracy(classifier_logits(model, test_set.x), test_set.y)
    chance = 1 / train_set.num_classes
    near_chance = accuracy < NEAR_CHANCE * chance
    if near_chance:  # written anyway (the caller may want it), but loudly, and the file says so
        print(
            f"WARNING: classifier {out}: held-out accuracy {accuracy:.3f} is near chance ({chance:.3f} for "
            f"{train_set.num_classes} classes): its accuracy, classifier-FD and rewards mean little. Train longer "
            f"or check the data; the file records near_chance=true",
            file=sys.stderr,
        )
    metadata = {
        "format": CLASSIFIER_FORMAT,
        "architecture": "cnn",
        "kwargs": json.dumps(kwargs),
        "dataset": dataset,
        "image_shape": json.dumps(list(train_set.sample_shape)),
        "class_names": json.dumps(list(train_set.class_names or [])),
        "test_accuracy": f"{accuracy:.6f}",
        "near_chance": json.dumps(near_chance),
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
