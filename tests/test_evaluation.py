"""evaluation.py: Evaluator samples with the run's solver (decoding latents), scores with the metric the data
calls for, measures straightness and writes the samples files, each against the function it must agree with."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import datasets
import metrics
import sampling
from config import SolverConfig
from evaluation import Evaluator
from flow import expand_t, make_path
from sampling import FlowSampler

SOLVER = OmegaConf.structured(SolverConfig(method="heun", num_steps=3))


@pytest.fixture(autouse=True)
def close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def conditional_sampler(num_classes=2):
    """u = -x + t + y: class-dependent, elementwise."""
    return FlowSampler(
        lambda x, t, y: -x + expand_t(t, x) + expand_t(y.to(x.dtype), x), make_path(), num_classes=num_classes
    )


def test_sample_without_a_decoder_is_generate_with_the_same_seed():
    evaluator = Evaluator((2,), "cpu")
    samples, labels, latents = evaluator.sample(conditional_sampler(), SOLVER, 10, seed=5)
    expected, expected_labels = sampling.generate(conditional_sampler(), SOLVER, (2,), 10, seed=5)
    assert latents is None
    torch.testing.assert_close(samples, expected, rtol=0, atol=0)
    assert torch.equal(labels, expected_labels) and labels.tolist() == [0] * 5 + [1] * 5


def test_sample_with_a_decoder_returns_the_decoded_images_and_the_latents():
    calls = []

    def decode(latents):
        calls.append(len(latents))
        return latents * 2

    evaluator = Evaluator((1, 2, 2), "cpu", decode=decode)
    images, labels, latents = evaluator.sample(conditional_sampler(), SOLVER, 70, seed=1)
    expected, _ = sampling.generate(conditional_sampler(), SOLVER, (1, 2, 2), 70, seed=1)
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)
    torch.testing.assert_close(images, 2 * expected, rtol=0, atol=0)
    assert calls == [64, 6] and images.device.type == "cpu" and len(labels) == 70  # decoded in chunks of 64


def test_score_on_2d_data_is_sample_metrics():
    moons = datasets.load_moons(num_samples=400)
    evaluator = Evaluator((2,), "cpu", dataset=moons, dataset_name="moons")
    samples = moons.x[:100] + 0.1 * torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    labels = moons.y[:100]
    scores = evaluator.score(samples, labels)
    assert scores == metrics.sample_metrics(samples, labels, moons)
    assert set(scores) == {"sliced_w2", "class_accuracy"} and scores["class_accuracy"] > 0.9
    assert scores["sliced_w2"] == pytest.approx(metrics.sliced_wasserstein(samples, moons.x))


def test_score_on_images_without_a_classifier_is_the_compressed_size():
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scores = Evaluator((3, 8, 8), "cpu").score(images, None)
    assert scores == metrics.image_compression_metrics(images)
    assert set(scores) == {"jpeg_bpp", "png_bpp", "jpeg_payload_bpp", "png_payload_bpp"}


def test_score_on_images_with_a_classifier_is_the_classifiers():
    class Classifier:
        def score(self, samples, labels):
            return {"classifier_accuracy": float(len(samples)), "labels": float(labels.sum())}

    scores = Evaluator((1, 4, 4), "cpu", classifier=Classifier()).score(
        torch.zeros(3, 1, 4, 4), torch.tensor([1, 1, 0])
    )
    assert scores == {"classifier_accuracy": 3.0, "labels": 2.0}


def test_straightness_of_a_constant_velocity_field_is_zero():
    evaluator = Evaluator((3,), "cpu")
    constant = FlowSampler(lambda x, t, y: torch.full_like(x, 0.7), make_path())
    assert evaluator.straightness(constant, SOLVER, 1000, seed=0) == pytest.approx(0.0, abs=1e-10)
    curved = FlowSampler(lambda x, t, y: expand_t(t, x) * x, make_path())  # x(t) = x0 exp(t^2 / 2)
    assert evaluator.straightness(curved, SOLVER, 1000, seed=0) > 1e-3


def test_save_writes_the_png_and_npz_and_no_temp_files(tmp_path):
    evaluator = Evaluator(
        (1, 2, 2), "cpu", decode=lambda x: x.clamp(-1, 1), dataset_name="digits", class_names=["zero", "one"]
    )
    images, labels, latents = evaluator.sample(conditional_sampler(), SOLVER, 4, seed=0)
    evaluator.save(tmp_path / "out", images, labels, latents)
    saved = np.load(tmp_path / "out" / "samples.npz")
    assert saved["images"].dtype == np.uint8 and saved["images"].shape == (4, 2, 2, 1)
    np.testing.assert_array_equal(saved["images"], datasets.model_space_to_uint8(images).permute(0, 2, 3, 1).numpy())
    assert saved["labels"].tolist() == [0, 0, 1, 1] and saved["labels"].dtype == np.int64
    np.testing.assert_array_equal(saved["latents"], latents.numpy())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["samples.npz", "samples.png"]
    assert [axis.get_ylabel() for axis in evaluator.figure(images, labels).axes] == ["zero", "one"]


def test_evaluate_reports_every_batch_it_draws_to_its_progress_callable():
    evaluator = Evaluator((2,), "cpu", dataset=datasets.load_moons(num_samples=64), dataset_name="moons")
    counts = []
    evaluator.evaluate(conditional_sampler(), SOLVER, 300, seed=0, progress=counts.append)
    assert counts == [128, 128, 44] and sum(counts) == evaluator.evaluation_images(300)


def test_inception_features_report_each_batch_to_a_callable():
    import inception

    class Extractor(torch.nn.Module):  # the extractor's interface: images -> (pool, logits)
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            flat = x.float().flatten(1).mean(1, keepdim=True) * self.scale
            return flat.expand(-1, 2048), flat.expand(-1, 1008)

    counts = []
    images = torch.zeros((5, 3, 8, 8), dtype=torch.uint8)
    features = inception.inception_features(Extractor(), images, batch_size=2, spatial=False, progress=counts.append)
    assert counts == [2, 2, 1] and features["pool"].shape == (5, 2048)
