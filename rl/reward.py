"""Terminal rewards for Flow-GRPO: r(x1, c) for a batch of final samples and the labels they were drawn for.

Every reward is a callable

    reward(images [B, C, H, W] float in [-1, 1], labels [B] long) -> rewards [B] float32

on the images' device, computed batched. Rewards are black boxes to the policy gradient: they
are computed under torch.no_grad on detached inputs, so a returned tensor never carries
requires_grad and backward never reaches a reward classifier (the `Reward` base class asserts
it). Each reward has a short `name` for logging.

    classifier_logprob   log p(requested class | x) under a frozen classifier ("prompt alignment"),
                         optionally capped at log(ceiling)
    fixed_class_logprob  log p(target class | x), ignoring the prompt (Fashion Trouser = 1: "pantsiness")
    jpeg                 -JPEG bits per pixel at `quality` (compressibility)
    png                  -PNG bits per pixel
    weighted_sum         sum_i w_i r_i(x, c), e.g. jpeg + 0.5 * classifier_logprob

Configs build them with `build_reward(spec, device)` from plain `{"name": ..., **args}` dicts;
classifier specs name a file written by `scripts/train_classifier.py`.
"""

import math
from os import PathLike
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from classifier import classifier_class_names, classifier_logits, classifier_num_classes, load_classifier
from config import ConfigError
from metrics import jpeg_bits_per_pixel, png_bits_per_pixel


class Reward:
    """Base class: checks shapes, runs `compute` without autograd, returns float32 [B] on the images' device."""

    name = "reward"
    uses_labels = False  # False: labels may be None and are ignored

    def compute(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """images [B, C, H, W] (detached), labels [B] or None -> rewards [B] (any float dtype / device)."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"reward '{self.name}': expected images [B, C, H, W], got shape {tuple(images.shape)}")
        batch = images.shape[0]
        if labels is not None:
            if labels.shape != (batch,):
                raise ValueError(f"reward '{self.name}': expected labels [{batch}], got shape {tuple(labels.shape)}")
            labels = labels.detach()
        elif self.uses_labels:
            raise ValueError(f"reward '{self.name}' scores x against its requested class: pass labels [B]")
        with torch.no_grad():
            rewards = self.compute(images.detach(), labels).to(device=images.device, dtype=torch.float32)
        assert rewards.shape == (batch,), (self.name, tuple(rewards.shape))
        assert not rewards.requires_grad, f"reward '{self.name}' must not be part of the autograd graph"
        return rewards

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


# --- classifier rewards -----------------------------------------------------------------------------


class _ClassifierReward(Reward):
    """Shared part: log_softmax of a frozen classifier's logits, in float32.

    The classifier is used as given: no parameters are changed (not even requires_grad), and
    `classifier.classifier_logits` runs it in eval mode and restores the previous mode afterwards.
    """

    def __init__(self, classifier: torch.nn.Module, batch_size: int = 512):
        self.classifier = classifier
        self.batch_size = batch_size
        self.num_classes = classifier_num_classes(classifier)
        # set by classifier.load_classifier: a classifier trained on other images gives meaningless rewards
        self.image_shape = getattr(classifier, "image_shape", None)

    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> log p(k | x) [B, K] float32."""
        if self.image_shape is not None and tuple(images.shape[1:]) != tuple(self.image_shape):
            raise ValueError(
                f"reward '{self.name}': the classifier was trained on images {list(self.image_shape)}, "
                f"got {list(images.shape[1:])}"
            )
        device = next(self.classifier.parameters()).device
        # full precision even inside the rollout's bf16 autocast: GRPO standardises rewards within a
        # group, and bf16 logits (~3 significant digits) would quantise near-equal rewards
        with torch.autocast(device.type, enabled=False):
            logits = classifier_logits(self.classifier, images, self.batch_size)
        return torch.log_softmax(logits.float(), dim=1)


class ClassifierLogProbReward(_ClassifierReward):
    """log p(labels | x) [B] under a frozen classifier: prompt (class label) alignment.

    Labels must lie in [0, K) for the classifier's K classes (not the CFG null label).
    ceiling: if set (a probability in (0, 1)), the reward is min(log p, log ceiling). As the anchor of a
    compressibility reward this makes it a constraint rather than a trade: a sample the classifier
    already gives the requested class with p >= ceiling earns nothing for more confidence, so within a
    GRPO group only compressibility ranks such samples, and only those below the ceiling pay for it.
    """

    name = "classifier_logprob"
    uses_labels = True

    def __init__(self, classifier: torch.nn.Module, batch_size: int = 512, ceiling: float | None = None):
        super().__init__(classifier, batch_size)
        if ceiling is not None and (
            isinstance(ceiling, bool) or not isinstance(ceiling, (int, float)) or not 0 < ceiling < 1
        ):
            raise ValueError(f"ceiling = {ceiling!r}: must be null or a probability in (0, 1)")
        self.ceiling = None if ceiling is None else float(ceiling)
        if self.ceiling is not None:
            self.name = f"classifier_logprob_cap{self.ceiling:g}"

    def compute(self, images, labels):
        log_probs = self.log_probs(images)
        labels = labels.to(log_probs.device).long()
        num_classes = log_probs.shape[1]
        # one host sync per rollout batch; an out-of-range label would otherwise be an index error
        # on CPU and a device assert on CUDA
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
            raise ValueError(
                f"reward '{self.name}': labels must lie in [0, {num_classes}) for this classifier, "
                f"got min {int(labels.min())} max {int(labels.max())}"
            )
        log_prob = log_probs.gather(1, labels[:, None])[:, 0]
        return log_prob if self.ceiling is None else log_prob.clamp(max=math.log(self.ceiling))


class FixedClassLogProbReward(_ClassifierReward):
    """log p(target_class | x) [B] under a frozen classifier, whatever class was requested: pushes
    every sample towards one class (Fashion-MNIST Trouser = 1, the "pantsiness" reward).

    target_class: an index in [0, K), or a class name from the classifier file's metadata
    (e.g. "Trouser" for a Fashion-MNIST classifier).
    """

    def __init__(self, classifier: torch.nn.Module, target_class: int | str, batch_size: int = 512):
        super().__init__(classifier, batch_size)
        if isinstance(target_class, str):
            names = classifier_class_names(classifier)
            if target_class not in names:
                raise ValueError(
                    f"target_class = {target_class!r} is not a class name of this classifier; "
                    f"choose an index or one of: {', '.join(names) or '(the classifier has no names)'}"
                )
            target_class = names.index(target_class)
        if (
            isinstance(target_class, bool)
            or not isinstance(target_class, int)
            or target_class < 0
            or (self.num_classes is not None and target_class >= self.num_classes)
        ):
            raise ValueError(f"target_class = {target_class!r}: must be an int in [0, {self.num_classes})")
        self.target_class = target_class
        self.name = f"class{target_class}_logprob"

    def compute(self, images, labels):
        return self.log_probs(images)[:, self.target_class]


# --- compressibility rewards ------------------------------------------------------------------------


class JpegCompressibilityReward(Reward):
    """-JPEG bits per pixel [B] at `quality` (metrics.py): higher for more compressible images.

    Encoded one image at a time on the CPU by PIL; the result moves back to the images' device.
    """

    name = "jpeg"

    def __init__(self, quality: int = 75):
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"quality = {quality!r}: must be an int in [1, 100]")
        self.quality = quality

    def compute(self, images, labels):
        return -jpeg_bits_per_pixel(images, self.quality)


class PngCompressibilityReward(Reward):
    """-PNG bits per pixel [B] (metrics.py, lossless)."""

    name = "png"

    def compute(self, images, labels):
        return -png_bits_per_pixel(images)


# --- combinations -----------------------------------------------------------------------------------


class WeightedSumReward(Reward):
    """sum_i weight_i * reward_i(x, c) [B], e.g. [(1.0, jpeg), (0.5, classifier_logprob)] trades
    compressibility against fidelity. Needs labels if any term does."""

    def __init__(self, terms: list[tuple[float, Reward]]):
        if not terms:
            raise ValueError("terms: a weighted sum needs at least one (weight, reward) term")
        for i, term in enumerate(terms):
            if not (isinstance(term, (tuple, list)) and len(term) == 2 and callable(term[1])):
                raise ValueError(f"terms[{i}] = {term!r}: must be a (weight, reward) pair")
            weight = term[0]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"terms[{i}].weight = {weight!r}: must be a finite number")
        self.terms = [(float(weight), reward) for weight, reward in terms]
        self.uses_labels = any(getattr(reward, "uses_labels", True) for _, reward in self.terms)
        self.name = "+".join(f"{weight:g}*{getattr(reward, 'name', 'reward')}" for weight, reward in self.terms)

    def components(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each term's unweighted reward [B] by name (a repeated name gets a #i suffix), for logging."""
        out = {}
        for i, (_, reward) in enumerate(self.terms):
            key = getattr(reward, "name", "reward")
            out[key if key not in out else f"{key}#{i}"] = reward(images, labels)
        return out

    def compute(self, images, labels):
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        components = self.components(images, labels)
        for (weight, _), value in zip(self.terms, components.values()):
            total += weight * value.to(device=images.device, dtype=torch.float32)
        # each term's batch mean, unweighted, for the trainer's log (reward/<term>): computed once, here
        self.last_terms = {name: float(value.float().mean()) for name, value in components.items()}
        return total


REWARDS: dict[str, type] = {
    "classifier_logprob": ClassifierLogProbReward,
    "fixed_class_logprob": FixedClassLogProbReward,
    "jpeg": JpegCompressibilityReward,
    "png": PngCompressibilityReward,
    "weighted_sum": WeightedSumReward,
}

# spec keys besides "name": (required, optional). Classifier specs give a file path where the
# constructor takes the module, and an optional `dataset` the file must have been trained on.
SPEC_KEYS = {
    "classifier_logprob": (("classifier",), ("batch_size", "dataset", "ceiling")),
    "fixed_class_logprob": (("classifier", "target_class"), ("batch_size", "dataset")),
    "jpeg": ((), ("quality",)),
    "png": ((), ()),
    "weighted_sum": (("terms",), ()),
}


def build_reward(spec, device="cpu", key: str = "reward") -> Reward:
    """A plain spec -> a reward; classifier files load onto `device` via `classifier.load_classifier`.

        {"name": "jpeg", "quality": 75}
        {"name": "png"}
        {"name": "classifier_logprob", "classifier": "runs/classifiers/digits.safetensors"}
        {"name": "classifier_logprob", "classifier": PATH, "ceiling": 0.9}    # min(log p, log 0.9)
        {"name": "fixed_class_logprob", "classifier": PATH, "target_class": 1}   # or "Trouser"
        {"name": "weighted_sum", "terms": [{"weight": 1.0, "reward": {...}}, {"weight": 0.5, "reward": {...}}]}

    `spec` may be a dict or an OmegaConf DictConfig. Errors are ConfigError (a ValueError) naming
    the key path (`key`, e.g. reward.terms[1].reward.quality), the value and what is allowed.
    """
    if isinstance(spec, (DictConfig, ListConfig)):
        spec = OmegaConf.to_container(spec, resolve=True)
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{key} = {spec!r} must be a mapping with a 'name' key; choose one of: {', '.join(REWARDS)}")
    name = spec["name"]
    if name not in REWARDS:
        raise ConfigError(f"{key}.name = {name!r} is not a reward; choose one of: {', '.join(REWARDS)}")
    required, optional = SPEC_KEYS[name]
    for arg in spec:
        if arg != "name" and arg not in required + optional:
            raise ConfigError(
                f"{key}.{arg} = {spec[arg]!r} is not an argument of reward '{name}'; "
                f"allowed: {', '.join(required + optional) or '(none)'}"
            )
    for arg in required:
        if arg not in spec:
            raise ConfigError(
                f"{key}.{arg} is required by reward '{name}' (arguments: {', '.join(required + optional)})"
            )
    args = {arg: value for arg, value in spec.items() if arg != "name"}

    if name == "weighted_sum":
        terms = args["terms"]
        if not isinstance(terms, list) or not terms:
            raise ConfigError(f"{key}.terms = {terms!r}: must be a non-empty list of {{weight, reward}} mappings")
        built = []
        for i, term in enumerate(terms):
            where = f"{key}.terms[{i}]"
            if not isinstance(term, dict) or set(term) != {"weight", "reward"}:
                raise ConfigError(f"{where} = {term!r}: must be a mapping with exactly the keys weight, reward")
            weight = term["weight"]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ConfigError(f"{where}.weight = {weight!r}: must be a finite number")
            built.append((float(weight), build_reward(term["reward"], device, f"{where}.reward")))
        return WeightedSumReward(built)

    if "batch_size" in args:
        batch_size = args["batch_size"]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"{key}.batch_size = {batch_size!r}: must be an int >= 1")
    if "classifier" in args:
        path = args.pop("classifier")
        if not isinstance(path, (str, PathLike)) or not str(path):
            raise ConfigError(
                f"{key}.classifier = {path!r}: must be the path of a file written by scripts/train_classifier.py"
            )
        # ClassifierError (a ConfigError) names the file and how to train one
        args["classifier"] = load_classifier(Path(path), device, expected_dataset=args.pop("dataset", None))
    try:
        return REWARDS[name](**args)
    except ValueError as e:  # the constructor's checks ("ARG = VALUE: ..."), re-keyed to the spec
        raise ConfigError(f"{key}.{e}") from None
