"""The one evaluation path: sample with a run's solver, decode latents, score, write the outputs.

Training (trainer.Trainer, rl/trainer.GRPOTrainer), inference.py and eval_imagenet.py all score with an
`Evaluator`, built from a config by `build.build_evaluator`:

    evaluator = build_evaluator(dataset_cfg, device, classifier=PATH, fid_reference=NPZ, ...)
    samples, labels, latents = evaluator.sample(sampler, solver, num_samples, seed)   # decoded images
    scores = evaluator.score(samples, labels)          # 2-D: sliced W2 (+ moons accuracy); images:
                                                       # classifier accuracy / FD, else JPEG/PNG bits per pixel
    scores |= evaluator.inception(samples)             # FID / IS (KID, precision/recall) vs the reference
    scores, samples, labels, latents = evaluator.evaluate(sampler, solver, num_samples, seed, fid_samples)
                                                       # all of the above, as training logs it
    evaluator.save(out_dir, samples, labels, latents)  # samples.png + samples.npz, each atomic

Scores are floats keyed by name; callers add their own prefix (`eval/`, `inception/`).
"""

import time
from collections.abc import Iterable

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor

import inception
import metrics
from datasets import model_space_to_uint8
from figures import close_figure, samples_figure, save_samples
from sampling import FlowSampler, generate, measure_straightness

STRAIGHTNESS_SAMPLES = 128  # ODE paths whose straightness is measured (their trajectories are kept)


def describe_solver(solver) -> str | None:
    """'heun x32, guidance 3 on [0, 0.6]': how samples were drawn, for figure titles."""
    if solver is None:
        return None
    interval = list(solver.guidance_interval)
    where = "" if interval == [0.0, 1.0] else f" on [{interval[0]:g}, {interval[1]:g}]"
    return f"{solver.method} x{solver.num_steps}, guidance {solver.guidance_scale:g}{where}"


class Evaluator:
    """What a run is judged by, loaded once (a wrong classifier or reference path fails at start-up).

    sample_shape: one sample's model-space shape; decode: latents -> images [-1, 1] (None: pixel data);
    classifier: a classifier.EvalClassifier (None: compressed size only); inception: (extractor, reference
    statistics) or None; dataset: the real data, for the 2-D metrics; dataset_name / class_names: figures."""

    def __init__(
        self,
        sample_shape,
        device,
        *,
        decode=None,
        classifier=None,
        inception=None,
        dataset=None,
        dataset_name: str = "",
        class_names=None,
    ):
        self.sample_shape, self.device = tuple(sample_shape), device
        self.decode, self.classifier, self.inception_reference = decode, classifier, inception
        self.dataset, self.dataset_name, self.class_names = dataset, dataset_name, class_names

    @torch.no_grad()
    def sample(
        self, sampler: FlowSampler, solver, num_samples: int, seed: int, batch_size: int | None = None, progress=None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """num_samples ODE samples with the solver settings -> (images or points, labels, latents or None).
        Raises sampling.NonFiniteSamplesError naming the first bad sample."""
        samples, labels = generate(
            sampler,
            solver,
            self.sample_shape,
            num_samples,
            seed=seed,
            device=self.device,
            batch_size=batch_size,
            progress=progress,
        )
        if self.decode is None:
            return samples, labels, None
        return torch.cat([self.decode(part) for part in samples.split(64)]).cpu(), labels, samples

    def score(self, samples: Tensor, labels: Tensor | None) -> dict[str, float]:
        """2-D data: sliced W2 (+ moons class accuracy). Images: classifier accuracy against the requested
        labels, classifier-FD to held-out real images (and the real-vs-real floor), or, without a
        classifier, JPEG/PNG bits per pixel."""
        if len(self.sample_shape) != 3:
            return metrics.sample_metrics(samples, labels, self.dataset)
        if self.classifier is None:
            return metrics.image_compression_metrics(samples)
        return self.classifier.score(samples, labels)

    def null_sliced_w2(self, sampler: FlowSampler, solver, num_samples: int, seed: int) -> float:
        """Class-conditional 2-D data: sliced W2 to the whole data of num_samples samples drawn with the null
        label and no guidance, i.e. the unconditional branch that CFG extrapolates from (guided samples
        concentrate on each class's core, so their own sliced W2 sits farther from the data)."""
        unguided = OmegaConf.merge(solver, {"guidance_scale": 1.0})
        null = torch.full((num_samples,), sampler.num_classes)
        samples, _ = generate(
            sampler, unguided, self.sample_shape, num_samples, seed=seed, device=self.device, labels=null
        )
        return metrics.sliced_wasserstein(samples.cpu(), self.dataset.x.cpu())

    def straightness(self, sampler: FlowSampler, solver, num_samples: int, seed: int) -> float:
        """How straight the sampled paths are (0: one Euler step is exact), on one batch of the same noise."""
        return measure_straightness(
            sampler, solver, self.sample_shape, min(STRAIGHTNESS_SAMPLES, num_samples), seed=seed, device=self.device
        )

    def inception(self, images: Tensor | Iterable[Tensor], progress=False) -> dict[str, float]:
        """FID / IS (and KID, precision/recall when the reference keeps features) of decoded images:
        [N, C, H, W] in [-1, 1], or an iterable of uint8 [n, 3, H, W] batches (streamed from disk).
        progress: True for a bar of its own, or a callable given each batch's image count."""
        extractor, reference = self.inception_reference
        if isinstance(images, Tensor):
            return inception.inception_metrics(
                extractor, model_space_to_uint8(images), reference, is_splits=min(10, len(images)), progress=progress
            )
        parts = [inception.inception_features(extractor, batch, progress=progress) for batch in images]
        features = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
        count = len(next(iter(features.values())))
        return inception.inception_metrics_from_features(
            features, reference, is_splits=min(10, count), device=self.device
        )

    def evaluation_images(self, num_samples: int, fid_samples: int = 0) -> int:
        """The images `evaluate` reports to its progress callable: samples drawn plus Inception inputs."""
        return num_samples + (2 * fid_samples if self.inception_reference is not None else 0)

    def evaluate(
        self, sampler: FlowSampler, solver, num_samples: int, seed: int, fid_samples: int = 0, progress=None
    ) -> tuple[dict[str, float], Tensor, Tensor | None, Tensor | None]:
        """A training run's periodic evaluation: num_samples samples, their scores (`score`), the sampling
        time and the paths' straightness; with an Inception reference also FID / IS of fid_samples (> 0) further
        samples (seed + 1), named for their count (`fid_5k`: biased upwards against FID-50k).
        progress: None or a callable given each batch's image count, `evaluation_images(...)` in all.
        -> (scores, samples, labels, latents). Raises sampling.NonFiniteSamplesError naming a bad sample."""
        started = time.perf_counter()
        samples, labels, latents = self.sample(sampler, solver, num_samples, seed, progress=progress)
        scores = {
            "sampling_s": time.perf_counter() - started,
            **self.score(samples, labels),
            "straightness": self.straightness(sampler, solver, num_samples, seed),
        }
        if len(self.sample_shape) == 1 and sampler.num_classes is not None and self.dataset is not None:
            scores["sliced_w2_null"] = self.null_sliced_w2(sampler, solver, num_samples, seed + 1)
        if self.inception_reference is not None and fid_samples:
            fid_images = self.sample(sampler, solver, fid_samples, seed + 1, progress=progress)[0]
            tag = f"{fid_samples // 1000}k" if fid_samples % 1000 == 0 else str(fid_samples)
            values = self.inception(fid_images, progress=progress or False)
            scores.update({f"{key}_{tag}": value for key, value in values.items()})
        return scores, samples, labels, latents

    def figure(self, samples: Tensor, labels: Tensor | None, solver=None):
        """A grid with one row per class named by the dataset's class names (a scatter plot for 2-D data),
        titled with the solver settings that drew the samples."""
        return samples_figure(samples, labels, self.dataset_name, self.class_names, title=describe_solver(solver))

    def save(
        self, out_dir, samples: Tensor, labels: Tensor | None, latents: Tensor | None = None, figure=None, solver=None
    ) -> None:
        """out_dir/samples.png and out_dir/samples.npz (with `latents` for a latent model), each atomic."""
        own = figure is None
        figure = self.figure(samples, labels, solver) if own else figure
        save_samples(samples.cpu(), labels.cpu() if labels is not None else None, out_dir, figure, latents=latents)
        if own:
            close_figure(figure)
