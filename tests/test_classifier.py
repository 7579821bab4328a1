"""The reward / metrics classifier (classifier.py, trained by scripts/train_classifier.py) and the metrics
built on it."""

import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import runtime
from classifier import (
    CLASSIFIERS,
    Classifier,
    ClassifierError,
    class_accuracy,
    class_diversity,
    classifier_features,
    classifier_logits,
    classifier_outputs,
    image_sample_metrics,
    load_classifier,
    real_class_diversity,
    reference_statistics,
    train_classifier,
)
from config import ConfigError
from conftest import load_script
from datasets import load_digits
from models import count_parameters

classifier_script = load_script("train_classifier")
main = classifier_script.main

WIDTH = 16  # features 4 * WIDTH; small enough to train on digits in a few seconds on one core


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(path, held-out accuracy, log lines) of a digits classifier trained once for this module."""
    path = tmp_path_factory.mktemp("classifier") / "digits.safetensors"
    lines = []
    accuracy = train_classifier("digits", path, epochs=4, batch_size=64, width=WIDTH, device="cpu", log=lines.append)
    return path, accuracy, lines


@pytest.fixture(scope="module")
def test_split():
    return load_digits(split="test")


def test_digits_classifier_reaches_90_percent_held_out(trained):
    path, accuracy, lines = trained
    assert accuracy >= 0.9, lines
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # nothing else written (no temp file left)


def test_saved_file_loads_to_the_same_model(trained, test_split):
    path, accuracy, _ = trained
    classifier = load_classifier(path, "cpu", expected_dataset="digits", expected_shape=(1, 16, 16))
    assert not classifier.training and classifier.dataset_name == "digits" and classifier.image_shape == (1, 16, 16)
    saved = load_file(str(path))
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, saved[key]), key
    logits = classifier_logits(classifier, test_split.x)
    assert class_accuracy(logits, test_split.y) == accuracy
    assert float(classifier.metadata["test_accuracy"]) == pytest.approx(accuracy, abs=1e-6)
    again = load_classifier(path)
    assert torch.equal(classifier_logits(again, test_split.x), logits)


def test_features_and_logits_have_the_documented_shapes(trained, test_split):
    classifier = load_classifier(trained[0])
    x, _ = test_split.batch(torch.arange(len(test_split)))  # float [-1, 1]
    features, logits = classifier_outputs(classifier, x, batch_size=100)  # several batches
    assert features.shape == (len(test_split), 4 * WIDTH) and logits.shape == (len(test_split), 10)
    with torch.no_grad():
        torch.testing.assert_close(logits, classifier(x))  # one pass gives the forward's logits
    # uint8 storage and model-space floats give the same outputs
    torch.testing.assert_close(classifier_features(classifier, test_split.x), features)


def test_image_sample_metrics_on_real_images(trained, test_split):
    classifier = load_classifier(trained[0])
    reference = reference_statistics(classifier, test_split)
    x, y = test_split.batch(torch.arange(len(test_split)))
    real = image_sample_metrics(x, y, classifier, reference)
    assert set(real) == {
        "classifier_accuracy",
        "class_diversity",
        "classifier_fd",
        "jpeg_bpp",
        "png_bpp",
        "jpeg_payload_bpp",
        "png_payload_bpp",
    }
    assert real["classifier_accuracy"] == trained[1]
    assert real["classifier_fd"] == pytest.approx(0.0, abs=1e-6)  # the reference set itself
    assert 0 < real["jpeg_payload_bpp"] < real["jpeg_bpp"] and 0 < real["png_payload_bpp"] < real["png_bpp"]
    noise = torch.rand(len(x), 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fake = image_sample_metrics(noise, None, classifier, reference)  # unconditional: no accuracy
    assert "classifier_accuracy" not in fake and "class_diversity" not in fake
    # the held-out split against itself: exactly the real data's within-class diversity
    assert real["class_diversity"] == pytest.approx(real_class_diversity(classifier, test_split), rel=1e-6)
    assert fake["classifier_fd"] > 10 * max(real["classifier_fd"], 1e-3) and fake["png_bpp"] > real["png_bpp"]
    # Scored as the saved 8-bit image: pixels beyond [-1, 1] count as clipped, not as the raw floats.
    overshoot = x * 3
    assert image_sample_metrics(overshoot, y, classifier, reference) == image_sample_metrics(
        overshoot.clamp(-1, 1), y, classifier, reference
    )


def test_loading_for_other_data_or_a_missing_file_fails_clearly(trained, tmp_path):
    path = trained[0]
    with pytest.raises(ClassifierError, match=r"trained on dataset 'digits', not 'mnist'.*dataset=mnist"):
        load_classifier(path, expected_dataset="mnist")
    with pytest.raises(ClassifierError, match=r"shape \[1, 16, 16\], not \[1, 28, 28\]"):
        load_classifier(path, expected_dataset="digits", expected_shape=(1, 28, 28))
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(
        ConfigError,
        match=rf"{re.escape(str(missing))} does not exist.*python scripts/train_classifier.py dataset=digits",
    ):
        load_classifier(missing, expected_dataset="digits")
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ClassifierError, match="not a classifier written by scripts/train_classifier.py"):
        load_classifier(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(ClassifierError, match="not a readable safetensors file"):
        load_classifier(garbage)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["dataset=digits", "out=x.safetensors", "epoch=3"], "unknown config key 'epoch'.*epochs"),
        (["out=x.safetensors"], "dataset = None: required"),
        (["dataset=moons", "out=x.safetensors"], "dataset = 'moons' is not allowed; choose one of: digits"),
        (["dataset=digits"], "out = None: required"),
        (["dataset=digits", "out=x.safetensors", "epochs=many"], "'epochs' has a value of the wrong type"),
        (["dataset=digits", "out=x.safetensors", "lr=0"], "lr = 0.0: must be > 0"),
        (["digits"], "'digits' is not key=value"),
    ],
)
def test_cli_rejects_bad_arguments_before_any_work(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        main(argv)
    assert list(tmp_path.iterdir()) == []


def test_command_line_errors_exit_1_with_the_message(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run(
        [
            sys.executable,
            "scripts/train_classifier.py",
            "dataset=digits",
            f"out={tmp_path / 'c.safetensors'}",
            "epoch=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "error: unknown config key 'epoch'" in result.stderr, result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_fashion_is_an_alias_of_fashion_mnist():
    assert classifier_script.parse_args(["dataset=fashion", "out=x.safetensors"]).dataset == "fashion_mnist"


def test_trainer_rejects_a_missing_classifier_before_training(tmp_path):
    import pytest

    from classifier import ClassifierError
    from conftest import run_train

    with pytest.raises(ClassifierError, match="scripts/train_classifier.py"):
        run_train(
            tmp_path / "run",
            "experiment=digits_cfg",
            "training.max_steps=2",
            f"training.classifier={tmp_path / 'missing.safetensors'}",
        )
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- the network --------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_ch,size", [(1, 16), (1, 28), (1, 32), (3, 16), (3, 28), (3, 32)])
def test_classifier_logits_and_features(in_ch, size):
    model = CLASSIFIERS["cnn"](in_ch=in_ch, num_classes=7, width=16).eval()
    x = torch.randn(5, in_ch, size, size)
    logits, feats = model(x), model.features(x)
    assert logits.shape == (5, 7) and feats.shape == (5, model.feature_dim) == (5, 64)
    assert (feats >= 0).all()  # post-ReLU
    assert 100_000 < count_parameters(Classifier(in_ch=in_ch)) < 1_000_000


def test_a_classifier_at_chance_is_said_loudly_recorded_and_its_accuracy_reported(tmp_path, capsys):
    """A classifier at chance (held-out accuracy 0.100) was written without a word and then used silently."""
    from safetensors import safe_open

    from build import load_eval_classifier
    from classifier import train_classifier
    from config import load_config

    out = tmp_path / "chance.safetensors"
    accuracy = train_classifier("digits", out, epochs=1, lr=1e-12, width=4, device="cpu", log=lambda line: None)
    assert accuracy < 0.15
    assert f"WARNING: classifier {out}: held-out accuracy {accuracy:.3f} is near chance" in capsys.readouterr().err
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["near_chance"] == "true"
    cfg = load_config(["experiment=digits_cfg"])
    scorer = load_eval_classifier(out, cfg.dataset, "cpu", num_samples=20, seed=0)
    assert "near chance" in capsys.readouterr().err
    images = torch.zeros(4, 1, 8, 8)
    assert scorer.score(images, torch.arange(4))["classifier_test_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_training_reports_progress_within_an_epoch(tmp_path, monkeypatch):
    """One epoch is many steps: where no bar is drawn, progress lines come between the epoch lines."""
    monkeypatch.setattr(runtime, "PROGRESS_LINE_EVERY_S", 0.0)
    lines = []
    train_classifier(
        "digits", tmp_path / "c.safetensors", epochs=1, batch_size=256, width=4, device="cpu", log=lines.append
    )
    steps = [line for line in lines if line.startswith("classifier: ") and " step " in line]
    assert [line.split(" step")[0] for line in steps[:2]] == ["classifier: 1/5", "classifier: 2/5"]
    assert len(steps) == 5 and lines.index(steps[-1]) < next(
        i for i, line in enumerate(lines) if line.startswith("epoch 1/1")
    )


def test_class_diversity_is_the_mean_within_class_pairwise_distance():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [0.0, 1.0], [0.0, 2.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 1, 1, 1, 2])  # class 2 has one sample: no pair, left out
    # class 0: one pair at distance 5; class 1: pairs at 1, 2, 1 -> 4 / 3
    assert class_diversity(features, labels) == pytest.approx((5 + 4 / 3) / 2)
    collapsed = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
    assert class_diversity(collapsed, torch.tensor([0, 0, 1, 1])) == 0.0  # every sample of a class the same
    assert math.isnan(class_diversity(features[:2], torch.tensor([0, 1])))
