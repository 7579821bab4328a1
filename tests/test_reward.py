"""The GRPO reward registry (rl/reward.py): values, no-autograd contract, specs and their errors."""

import pytest
import torch
from omegaconf import OmegaConf

from classifier import Classifier, load_classifier, train_classifier
from config import ConfigError
from metrics import jpeg_bits_per_pixel, png_bits_per_pixel
from rl.reward import (
    REWARDS,
    ClassifierLogProbReward,
    FixedClassLogProbReward,
    JpegCompressibilityReward,
    PngCompressibilityReward,
    WeightedSumReward,
    build_reward,
)

ALLOWED = "classifier_logprob, fixed_class_logprob, jpeg, png, weighted_sum"


def images(batch: int = 6, channels: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Noise in [-1, 1], [B, C, H, W]."""
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def classifier():
    """An untrained tiny classifier.Classifier (10 classes, 1 channel)."""
    torch.manual_seed(0)
    return Classifier(in_ch=1, num_classes=10, width=4).eval()


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    """A digits classifier file in scripts/train_classifier.py's format (1x16x16, 10 classes named "0".."9")."""
    path = tmp_path_factory.mktemp("reward") / "digits.safetensors"
    train_classifier("digits", path, epochs=1, batch_size=256, width=4, device="cpu", log=lambda line: None)
    return path


def expected_log_probs(classifier, x):
    with torch.no_grad():
        return torch.log_softmax(classifier.eval()(x), dim=1)


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_compression_rewards_are_minus_bits_per_pixel(channels, size):
    x = images(5, channels, size)
    labels = torch.arange(5)
    jpeg = JpegCompressibilityReward(quality=50)(x, labels)
    assert jpeg.dtype == torch.float32 and jpeg.shape == (5,)
    torch.testing.assert_close(jpeg, -jpeg_bits_per_pixel(x, 50), rtol=0, atol=0)
    torch.testing.assert_close(JpegCompressibilityReward()(x), -jpeg_bits_per_pixel(x, 75), rtol=0, atol=0)
    torch.testing.assert_close(PngCompressibilityReward()(x, labels), -png_bits_per_pixel(x), rtol=0, atol=0)
    # a flat image compresses better than noise: higher (less negative) reward
    flat = torch.full((1, channels, size, size), 0.2)
    for reward in (JpegCompressibilityReward(), PngCompressibilityReward()):
        assert reward(flat).item() > reward(x).max().item(), reward.name


def test_classifier_logprob_is_log_softmax_at_the_label(classifier):
    x, labels = images(6), torch.tensor([0, 3, 9, 3, 1, 7])
    reward = ClassifierLogProbReward(classifier, batch_size=4)  # two classifier batches
    value = reward(x, labels)
    expected = expected_log_probs(classifier, x)[torch.arange(6), labels]
    torch.testing.assert_close(value, expected)
    assert value.dtype == torch.float32 and (value <= 0).all() and reward.name == "classifier_logprob"
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\).*max 10"):
        reward(x, torch.tensor([0, 1, 2, 3, 4, 10]))  # the CFG null label is no class
    with pytest.raises(ValueError, match="pass labels"):
        reward(x)


def test_classifier_logprob_ceiling_caps_at_log_ceiling(classifier):
    """min(log p, log ceiling): samples above the ceiling tie, those below keep their log p."""
    import math

    x, labels = images(8, seed=3), torch.tensor([0, 3, 9, 3, 1, 7, 2, 5])
    log_p = expected_log_probs(classifier, x)[torch.arange(8), labels]
    ceiling = math.exp(log_p.median().item())  # half the batch above it, half at or below
    value = ClassifierLogProbReward(classifier, ceiling=ceiling)(x, labels)
    torch.testing.assert_close(value, torch.minimum(log_p, torch.tensor(math.log(ceiling))))
    above = log_p > math.log(ceiling)
    assert 0 < int(above.sum()) < 8 and torch.unique(value[above]).numel() == 1
    torch.testing.assert_close(value[~above], log_p[~above])
    assert ClassifierLogProbReward(classifier, ceiling=0.9).name == "classifier_logprob_cap0.9"
    for bad in (0, 1, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match=rf"ceiling = {bad!r}: must be null or a probability in \(0, 1\)"):
            ClassifierLogProbReward(classifier, ceiling=bad)


def test_fixed_class_logprob_ignores_the_labels(classifier):
    x = images(6)
    reward = FixedClassLogProbReward(classifier, target_class=1)
    expected = expected_log_probs(classifier, x)[:, 1]
    torch.testing.assert_close(reward(x, torch.zeros(6, dtype=torch.long)), expected)
    torch.testing.assert_close(reward(x, torch.arange(6)), expected)
    torch.testing.assert_close(reward(x), expected)  # labels optional
    assert reward.name == "class1_logprob"
    with pytest.raises(ValueError, match=r"target_class = 10: must be an int in \[0, 10\)"):
        FixedClassLogProbReward(classifier, target_class=10)
    with pytest.raises(ValueError, match="not a class name"):
        FixedClassLogProbReward(classifier, target_class="Trouser")  # a bare module has no class names


def test_rewards_never_enter_the_autograd_graph(classifier):
    x = images(4).requires_grad_(True)
    labels = torch.tensor([1, 2, 3, 4])
    classifier.train()  # the caller's mode must survive the call
    rewards = [
        ClassifierLogProbReward(classifier),
        FixedClassLogProbReward(classifier, 1),
        JpegCompressibilityReward(),
        PngCompressibilityReward(),
        WeightedSumReward([(1.0, JpegCompressibilityReward()), (0.5, ClassifierLogProbReward(classifier))]),
    ]
    with torch.enable_grad():
        for reward in rewards:
            value = reward(x, labels)
            assert not value.requires_grad and value.grad_fn is None, reward.name
            assert value.shape == (4,) and value.dtype == torch.float32 and value.device == x.device
    assert classifier.training and all(p.requires_grad and p.grad is None for p in classifier.parameters())
    classifier.eval()


def test_weighted_sum_is_the_weighted_sum_of_its_terms(classifier):
    x, labels = images(5), torch.tensor([0, 1, 2, 3, 4])
    jpeg, fidelity = JpegCompressibilityReward(), ClassifierLogProbReward(classifier)
    total = WeightedSumReward([(1.0, jpeg), (0.5, fidelity)])
    torch.testing.assert_close(total(x, labels), jpeg(x, labels) + 0.5 * fidelity(x, labels))
    assert total.name == "1*jpeg+0.5*classifier_logprob" and total.uses_labels
    parts = total.components(x, labels)
    assert list(parts) == ["jpeg", "classifier_logprob"]
    torch.testing.assert_close(parts["jpeg"], jpeg(x))
    twice = WeightedSumReward([(2, PngCompressibilityReward()), (-1, PngCompressibilityReward())])
    assert list(twice.components(x)) == ["png", "png#1"] and not twice.uses_labels
    torch.testing.assert_close(twice(x), -png_bits_per_pixel(x))
    with pytest.raises(ValueError, match="at least one"):
        WeightedSumReward([])


def test_build_reward_from_specs(classifier_file):
    assert set(REWARDS) == set(ALLOWED.split(", "))
    x, labels = images(4), torch.tensor([5, 0, 9, 2])
    jpeg = build_reward({"name": "jpeg", "quality": 60}, "cpu")
    assert isinstance(jpeg, JpegCompressibilityReward) and jpeg.quality == 60
    assert isinstance(build_reward(OmegaConf.create({"name": "png"})), PngCompressibilityReward)

    loaded = load_classifier(classifier_file)
    logp = expected_log_probs(loaded, x)
    aligned = build_reward(
        {"name": "classifier_logprob", "classifier": str(classifier_file), "dataset": "digits"}, "cpu"
    )
    torch.testing.assert_close(aligned(x, labels), logp[torch.arange(4), labels])
    by_name = build_reward({"name": "fixed_class_logprob", "classifier": str(classifier_file), "target_class": "7"})
    assert by_name.target_class == 7
    torch.testing.assert_close(by_name(x, labels), logp[:, 7])

    total = build_reward(
        OmegaConf.create(
            {
                "name": "weighted_sum",
                "terms": [
                    {"weight": 1.0, "reward": {"name": "jpeg"}},
                    {"weight": 0.5, "reward": {"name": "classifier_logprob", "classifier": str(classifier_file)}},
                ],
            }
        ),
        "cpu",
    )
    torch.testing.assert_close(total(x, labels), -jpeg_bits_per_pixel(x) + 0.5 * logp[torch.arange(4), labels])
    with pytest.raises(ValueError, match=r"trained on images \[1, 16, 16\], got \[1, 28, 28\]"):
        aligned(images(4, size=28), labels)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "jpg"}, rf"reward.name = 'jpg' is not a reward; choose one of: {ALLOWED}"),
        ({"quality": 75}, rf"must be a mapping with a 'name' key; choose one of: {ALLOWED}"),
        ({"name": "jpeg", "qualty": 75}, r"reward.qualty = 75 is not an argument of reward 'jpeg'; allowed: quality"),
        ({"name": "jpeg", "quality": 0}, r"reward.quality = 0: must be an int in \[1, 100\]"),
        ({"name": "jpeg", "quality": "high"}, r"reward.quality = 'high'"),
        ({"name": "png", "quality": 75}, r"reward.quality = 75 is not an argument of reward 'png'; allowed: \(none\)"),
        (
            {"name": "fixed_class_logprob", "target_class": 1},
            r"reward.classifier is required by reward 'fixed_class_logprob' \(arguments: classifier, target_class",
        ),
        ({"name": "classifier_logprob", "classifier": 3}, r"reward.classifier = 3: must be the path"),
        ({"name": "weighted_sum", "terms": []}, r"reward.terms = \[\]: must be a non-empty list"),
        (
            {
                "name": "weighted_sum",
                "terms": [{"weight": 1, "reward": {"name": "png"}}, {"weight": 1, "reward": {"name": "gif"}}],
            },
            rf"reward.terms\[1\].reward.name = 'gif' is not a reward; choose one of: {ALLOWED}",
        ),
        (
            {"name": "weighted_sum", "terms": [{"weight": "a", "reward": {"name": "png"}}]},
            r"reward.terms\[0\].weight = 'a': must be a finite number",
        ),
        (
            {"name": "weighted_sum", "terms": [{"reward": {"name": "png"}}]},
            r"reward.terms\[0\] = .*exactly the keys weight, reward",
        ),
    ],
)
def test_build_reward_errors_name_the_key_and_the_allowed_values(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_reward(spec, "cpu")
    assert isinstance(info.value, ValueError)


def test_build_reward_classifier_errors(classifier_file, tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; train one with: python scripts/train_classifier.py"):
        build_reward({"name": "classifier_logprob", "classifier": str(tmp_path / "missing.safetensors")})
    with pytest.raises(ConfigError, match="trained on dataset 'digits', not 'fashion_mnist'"):
        build_reward({"name": "classifier_logprob", "classifier": str(classifier_file), "dataset": "fashion_mnist"})
    with pytest.raises(
        ConfigError, match=r"reward.target_class = 'Trouser' is not a class name.*choose an index or one of: 0, 1"
    ):
        build_reward({"name": "fixed_class_logprob", "classifier": str(classifier_file), "target_class": "Trouser"})
    with pytest.raises(ConfigError, match=r"reward.target_class = 12: must be an int in \[0, 10\)"):
        build_reward({"name": "fixed_class_logprob", "classifier": str(classifier_file), "target_class": 12})
    with pytest.raises(ConfigError, match=r"reward.batch_size = 0: must be an int >= 1"):
        build_reward({"name": "classifier_logprob", "classifier": str(classifier_file), "batch_size": 0})
    with pytest.raises(ConfigError, match=r"reward.ceiling = 2: must be null or a probability in \(0, 1\)"):
        build_reward({"name": "classifier_logprob", "classifier": str(classifier_file), "ceiling": 2})


def test_a_weighted_sum_keeps_each_terms_batch_mean_for_the_log(classifier):
    """GRPO logged only reward/mean and reward/std: which term moved (JPEG bpp or the anchor) was invisible."""
    x, labels = images(5), torch.tensor([0, 1, 2, 3, 4])
    jpeg, fidelity = JpegCompressibilityReward(), ClassifierLogProbReward(classifier)
    total = WeightedSumReward([(1.0, jpeg), (0.5, fidelity)])
    total(x, labels)
    assert total.last_terms == pytest.approx(
        {"jpeg": float(jpeg(x).mean()), "classifier_logprob": float(fidelity(x, labels).mean())}
    )
