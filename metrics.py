"""Sample-quality numbers that are cheap enough to log during training.

2-D data: sliced Wasserstein distance to the training set and, for two moons, the fraction of
class-k samples that land nearer crescent k than the other crescent.

Images: a small CNN classifier trained on the dataset (`scripts/train_classifier.py`) gives proxy
metrics: its accuracy on samples against the requested labels, and the Frechet distance between
its penultimate features on samples and on the held-out real split ("classifier-FD": FID's
formula with a dataset-specific network in place of Inception, so comparable only between runs
that use the same classifier file and the same number of samples). JPEG/PNG bits per pixel
measure how much detail samples carry (the compressibility reward uses the same functions).

Inception metrics (FID, sFID, IS, KID, precision/recall) use torch-fidelity's port of the TF-2015
Inception-v3 that published numbers are computed with (`load_inception`, `inception_metrics`), with
reference statistics of real data written by `scripts/build_reference_stats.py` or read from ADM's
reference batches.
"""

import functools
import hashlib
import io
import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from config import ConfigError
from datasets import model_space_to_uint8, moons_to_data_space, uint8_to_model_space
from runtime import epoch_permutation


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between point sets a [N, D] and b [M, D].

    SW2^2 = E_theta W2^2(theta.a, theta.b) over uniform unit directions theta (Bonneel et al. 2015);
    each 1-D W2 compares the two empirical quantile functions on a common grid of levels, which
    also handles N != M.
    """
    a, b = a.double().flatten(1), b.double().flatten(1)
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(a.device)
    levels = (torch.arange(max(len(a), len(b)), dtype=torch.float64, device=a.device) + 0.5) / max(len(a), len(b))
    qa = torch.quantile((a @ theta).sort(dim=0).values, levels, dim=0, interpolation="linear")
    qb = torch.quantile((b @ theta).sort(dim=0).values, levels, dim=0, interpolation="linear")
    return math.sqrt(((qa - qb) ** 2).mean().item())


def _moon_arcs(num_points: int = 2000) -> torch.Tensor:
    """The two noise-free crescents of sklearn's make_moons in data space: [2, num_points, 2]."""
    theta = torch.linspace(0, math.pi, num_points, dtype=torch.float64)
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1)
    lower = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], dim=-1)
    return torch.stack([upper, lower])


def nearest_moon(points_data_space: torch.Tensor) -> torch.Tensor:
    """Index (0 upper, 1 lower) of the crescent nearest to each point [N, 2] -> [N] long."""
    points = points_data_space.double().cpu()
    distances = torch.stack([torch.cdist(points, arc).min(dim=1).values for arc in _moon_arcs()], dim=1)
    return distances.argmin(dim=1)


def sample_metrics(samples: torch.Tensor, labels: torch.Tensor | None, dataset) -> dict[str, float]:
    """Metrics for generated samples in model space; which ones depends on the dataset."""
    metrics = {}
    if dataset.name == "moons":
        metrics["sliced_w2"] = sliced_wasserstein(samples.cpu(), dataset.x.cpu())
        if labels is not None:
            points = moons_to_data_space(samples.cpu().float())
            metrics["class_accuracy"] = (nearest_moon(points) == labels.cpu()).double().mean().item()
    return metrics


# --- Frechet distance -----------------------------------------------------------------------------


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """features [N, F] -> (mean [F], covariance [F, F]), float64 on the CPU.

    Unbiased covariance (divides by N - 1), as np.cov in the reference FID code.
    """
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_statistics needs features [N >= 2, F], got shape {tuple(features.shape)}")
    x = features.detach().cpu().double()
    mu = x.mean(dim=0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix [F, F] by eigendecomposition.

    Rounding leaves eigenvalues that should be 0 slightly negative (rank-deficient covariances,
    N < F); they are clamped to 0 rather than producing NaNs.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet distance between N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982), the
    quantity reported as FID (Heusel et al. 2017):

        d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    S1 S2 is not symmetric, and scipy.linalg.sqrtm of it (the reference code) can turn complex or
    inaccurate for singular covariances. It is similar to the symmetric PSD matrix
    M = S1^(1/2) S2 S1^(1/2) (same eigenvalues), so tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(M)),
    from two symmetric eigendecompositions in float64. Inputs: tensors or arrays, [F] and [F, F].
    """
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(v).detach().cpu().double() for v in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"frechet_distance: shapes do not match: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)} / {tuple(sigma2.shape)}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return max(distance.item(), 0.0)  # rounding can leave -1e-13 for identical inputs


# --- classifier-based proxy metrics ---------------------------------------------------------------


class ClassifierError(ConfigError):
    """A classifier file that is missing, unreadable or trained for other data. A ConfigError, since
    it comes from a config value (training.classifier), so entry points report it as one."""


CLASSIFIER_FORMAT = "nanoflow-classifier-v1"  # metadata["format"] of files written by scripts/train_classifier.py


def _how_to_train(dataset: str | None) -> str:
    return f"train one with: python scripts/train_classifier.py dataset={dataset or 'NAME'} out=PATH"


def load_classifier(path, device="cpu", expected_dataset: str | None = None,
                    expected_shape: tuple[int, ...] | None = None) -> torch.nn.Module:
    """A classifier file written by `scripts/train_classifier.py` -> the model in eval mode on `device`.

    Everything needed to rebuild it (architecture, constructor kwargs, dataset name, image shape
    [C, H, W]) is in the safetensors metadata. With expected_dataset / expected_shape given, a
    file trained for other data is an error rather than a silently meaningless metric. The model
    gets `.dataset_name`, `.image_shape` and `.metadata` (the raw string dict) attributes.
    Raises ClassifierError naming the file, and how to train one, if it is missing or does not fit.
    """
    from safetensors import SafetensorError, safe_open

    import models
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
        raise ClassifierError(f"{path} is not a classifier written by scripts/train_classifier.py (metadata format "
                              f"{meta.get('format')!r}, expected {CLASSIFIER_FORMAT!r}); {_how_to_train(expected_dataset)}")
    dataset, shape = meta["dataset"], tuple(json.loads(meta["image_shape"]))
    if expected_dataset is not None and dataset != expected_dataset:
        raise ClassifierError(f"classifier {path} was trained on dataset '{dataset}', not '{expected_dataset}'; "
                              f"{_how_to_train(expected_dataset)}")
    if expected_shape is not None and shape != tuple(expected_shape):
        raise ClassifierError(f"classifier {path} was trained on images of shape {list(shape)}, not "
                              f"{list(expected_shape)}; {_how_to_train(expected_dataset or dataset)}")
    classifier = models.CLASSIFIERS[meta["architecture"]](**json.loads(meta["kwargs"]))
    load_weights(classifier, weights, f"classifier {path}")
    classifier.dataset_name, classifier.image_shape, classifier.metadata = dataset, shape, meta
    return classifier.to(device).eval()


@torch.no_grad()
def classifier_outputs(classifier: torch.nn.Module, images: torch.Tensor,
                       batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
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
        x = images[start:start + batch_size].to(device)
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


def reference_statistics(classifier: torch.nn.Module, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature (mean, covariance) of a real image dataset (use the held-out split), float64 CPU."""
    return feature_statistics(classifier_features(classifier, dataset.x))


# --- compressed size: JPEG / PNG bits per pixel ---------------------------------------------------
#
# Compressed size of images in bits per pixel, for the compressibility reward and as a metric.
#
# bpp = 8 * encoded bytes / (H * W): per *pixel*, not per channel, so a 3-channel image is not
# divided by 3 (an RGB and a grayscale image of equal size and detail have comparable file sizes
# per pixel, not per channel). The size includes the format's fixed overhead (headers, Huffman and
# quantisation tables for JPEG; signature, IHDR, IEND and zlib framing for PNG), which is large at
# these sizes: a constant grayscale 28x28 JPEG is already ~3.5 bpp. `constant_image_bits_per_pixel`
# gives that floor, so callers can report payload bpp = total - constant.
#
# Encoding is PIL, in memory, one image at a time (PIL has no batched encoder). Inputs are detached
# and copied to the CPU first: these numbers are never differentiated, only used as rewards/metrics.

FORMATS = ("jpeg", "png")


def to_uint8_nhwc(images) -> np.ndarray:
    """Images -> uint8 numpy [B, H, W, C] with C in {1, 3}.

    Accepts a numpy uint8 array [B, H, W, C] (the layout of samples.npz), or a torch tensor
    [B, C, H, W]: float in [-1, 1] (model space; rounded as `datasets.model_space_to_uint8`, the
    same mapping used to save samples) or uint8 0..255 (dataset storage).
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"expected an image tensor [B, C, H, W], got shape {tuple(images.shape)}")
        images = images.detach()
        if images.dtype != torch.uint8:
            images = model_space_to_uint8(images)
        array = images.cpu().permute(0, 2, 3, 1).contiguous().numpy()
    elif isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected a uint8 numpy array [B, H, W, C], got {images.dtype} {images.shape}")
        array = np.ascontiguousarray(images)
    else:
        raise TypeError(f"expected a torch tensor [B, C, H, W] or a uint8 numpy array [B, H, W, C], got {type(images)}")
    if array.shape[-1] not in (1, 3):
        raise ValueError(f"images need 1 (grayscale) or 3 (RGB) channels, got {array.shape[-1]} in shape {array.shape}")
    return array


def encode(image: np.ndarray, fmt: str, quality: int = 75) -> bytes:
    """One uint8 [H, W, C] image -> its JPEG / PNG file bytes ('L' for C = 1, 'RGB' for C = 3).

    JPEG: PIL's defaults at `quality` (4:2:0 chroma subsampling for RGB, standard tables).
    PNG: PIL's defaults (zlib level 6, no optimize pass); `quality` is ignored.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    # fromarray picks 'L' for a 2-D uint8 array and 'RGB' for [H, W, 3]
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    if fmt == "jpeg":
        pil.save(buffer, format="JPEG", quality=quality)
    else:
        pil.save(buffer, format="PNG")
    return buffer.getvalue()


def bits_per_pixel(images, fmt: str, quality: int = 75) -> torch.Tensor:
    """Images (see `to_uint8_nhwc`) -> encoded size in bits per pixel [B] float32 on the CPU."""
    array = to_uint8_nhwc(images)
    pixels = array.shape[1] * array.shape[2]
    sizes = [len(encode(image, fmt, quality)) for image in array]
    # float32: the reward is combined with float32 advantages, and MPS has no float64
    return torch.tensor(sizes, dtype=torch.float64).mul_(8 / pixels).float()


def jpeg_bits_per_pixel(images, quality: int = 75) -> torch.Tensor:
    """JPEG size at `quality` in bits per pixel: [B] float32 (CPU)."""
    return bits_per_pixel(images, "jpeg", quality)


def png_bits_per_pixel(images) -> torch.Tensor:
    """PNG size in bits per pixel: [B] float32 (CPU)."""
    return bits_per_pixel(images, "png")


@functools.lru_cache(maxsize=64)
def constant_image_bits_per_pixel(shape: tuple[int, int, int], fmt: str, quality: int = 75) -> float:
    """bpp of a constant mid-gray image of sample shape (C, H, W): the encoder's fixed overhead.

    The JPEG size of a flat image does not depend on its level (one DC coefficient per block, all
    AC zero); PNG's barely does. payload bpp = bpp - this is what the image content costs.
    """
    channels, height, width = (int(s) for s in shape)
    flat = np.full((height, width, channels), 128, dtype=np.uint8)
    return 8 * len(encode(flat, fmt, quality)) / (height * width)


def image_compression_metrics(samples, quality: int = 75) -> dict[str, float]:
    """Mean JPEG (at `quality`) / PNG bits per pixel of samples [N, C, H, W] in [-1, 1], and the same
    minus a constant image's bpp (payload: what the content costs beyond the format's overhead)."""
    shape = tuple(samples.shape[1:])
    jpeg = jpeg_bits_per_pixel(samples, quality).double().mean().item()
    png = png_bits_per_pixel(samples).double().mean().item()
    return {
        "jpeg_bpp": jpeg,
        "png_bpp": png,
        "jpeg_payload_bpp": jpeg - constant_image_bits_per_pixel(shape, "jpeg", quality),
        "png_payload_bpp": png - constant_image_bits_per_pixel(shape, "png"),
    }


def image_sample_metrics(samples: torch.Tensor, labels: torch.Tensor | None, classifier: torch.nn.Module,
                         reference_stats: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """samples [N, C, H, W] in [-1, 1] and the labels [N] they were drawn for (None: unconditional,
    no accuracy) -> classifier_accuracy, classifier_fd (to `reference_statistics` of real data),
    jpeg_bpp, png_bpp, jpeg_payload_bpp, png_payload_bpp.

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

    def score(self, samples: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        """image_sample_metrics of samples [N, C, H, W] (on any device) plus the floor."""
        device = next(self.classifier.parameters()).device
        values = image_sample_metrics(samples.to(device), labels, self.classifier, self.reference_statistics)
        return {**values, "classifier_fd_real_floor": self.fd_floor}


# --- Inception metrics (torch-fidelity) -----------------------------------------------------------
#
# The standard sample-quality numbers, computed as the literature computes them: with the TF-2015
# Inception-v3 graph (Szegedy et al.; the network of the original FID / IS code and of ADM's
# evaluator), here as torch-fidelity's faithful PyTorch port ("inception-v3-compat": the TF weights,
# TF1's bilinear resize to 299 x 299 and the graph's pooling quirks), so features match the TF code to
# float rounding. Metrics reuse torch-fidelity's own functions where it exposes them on features (IS,
# KID, precision/recall); FID is `frechet_distance` above (float64, stable for singular covariances).
#
# - FID (Heusel et al. 2017): Frechet distance of the 2048-d pool features.
# - sFID (Nash et al. 2021, as ADM's evaluator): Frechet distance of the first 7 channels of the TF
#   graph's `mixed_6/conv` output, 7 x 17 x 17 = 2023 dims flattened in TF's NHWC order. torch-fidelity
#   exposes only pooled features, but its weight converter maps `mixed_6/conv` to `Mixed_6d.branch1x1`
#   (conv + BN + ReLU), so a forward hook on that module gives the same tensor.
# - IS (Salimans et al. 2016): torch-fidelity's `isc_features_to_metric` on the bias-free logits
#   ('logits_unbiased', 1008 classes; ADM's evaluator also drops the bias), 10 shuffled splits.
# - KID (Binkowski et al. 2018): torch-fidelity's `kid_features_to_metric` (unbiased MMD^2, cubic
#   polynomial kernel, 100 subsets of 1000).
# - Precision / recall (Kynkaanniemi et al. 2019, k = 3): torch-fidelity's `prc_features_to_metric`.
#
# All are biased by the number of samples (FID and sFID upwards at small N; precision/recall depend on
# both set sizes): compare numbers computed with equal counts (the usual protocol is 50k samples).

INCEPTION_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's registry name for the TF-2015 port
INCEPTION_FEATURES = ("2048", "logits_unbiased")  # torch-fidelity feature names: pool, IS logits
INCEPTION_REFERENCE_FORMAT = "nanoflow-inception-reference-v1"  # `format` in files ReferenceStatistics.save writes
SFID_CHANNELS = 7  # ADM's evaluator: mixed_6/conv[..., :7], 7 * 17 * 17 = 2023 dims
SFID_MODULE = "Mixed_6d.branch1x1"  # TF `mixed_6/conv` in torch-fidelity's module names


class InceptionWeightsError(ConfigError):
    """The Inception weights file is missing or unreadable. A ConfigError: it comes from a setting
    (training.inception_weights, inference/eval's inception_weights, build_reference_stats weights=), so entry
    points report it as one line."""


class ReferenceStatisticsError(ConfigError):
    """A reference statistics file that is missing, unreadable, or built with other Inception weights."""


def inception_weights_url() -> str:
    """Where torch-fidelity publishes the converted TF-2015 Inception-v3 weights (its own constant)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def inception_weights_filename() -> str:
    """The weights file's name, as torch hub stores the download: weights-inception-2015-12-05-6726825d.pth."""
    from urllib.parse import urlparse

    return os.path.basename(urlparse(inception_weights_url()).path)


def default_inception_weights_path() -> Path:
    """Where torch-fidelity's own download lands: torch.hub.get_dir()/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / inception_weights_filename()


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_help() -> str:
    return (f"download {inception_weights_url()} (torch-fidelity's TF-2015 Inception-v3, file "
            f"{inception_weights_filename()}) and pass training.inception_weights=PATH (inference.py, eval_imagenet.py: inception_weights=PATH; scripts: "
            f"weights=PATH), or put it at "
            f"{default_inception_weights_path()} (the torch hub cache, where torch-fidelity looks)")


def load_inception(weights_path: str | None = None, device="cpu") -> torch.nn.Module:
    """torch-fidelity's TF-2015 Inception-v3 feature extractor (FeatureExtractorInceptionV3,
    "inception-v3-compat", features '2048' and 'logits_unbiased') in eval mode on `device`.

    weights_path: the converted weights (.pth); None looks in the torch hub cache for the file name
    torch-fidelity downloads. Nothing is downloaded here: a missing or unreadable file raises
    InceptionWeightsError naming the file, the URL torch-fidelity publishes it at and where to put it.
    The extractor gets `.weights_path` and `.weights_sha256` (the file's sha256, which reference
    statistics record so that features from other weights are refused).

    The file is read with torch.load(weights_only=True): a pickle that would build any Python object other
    than tensors (e.g. one that calls os.system) is refused before anything in it runs. torch-fidelity's
    own loader unpickles with weights_only=False, so it is handed an in-memory copy of the verified
    tensors, never the file.
    """
    import io
    import pickle

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = Path(weights_path).expanduser() if weights_path else default_inception_weights_path()
    if not path.is_file():
        where = f"Inception weights file {path}" if weights_path else \
            f"Inception weights file {inception_weights_filename()} (looked in the torch hub cache, {path})"
        raise InceptionWeightsError(f"{where} does not exist; {_weights_help()}")

    def refuse(reason: str) -> InceptionWeightsError:
        return InceptionWeightsError(f"Inception weights file {path} is not torch-fidelity's Inception-v3 "
                                     f"state dict ({reason}); {_weights_help()}")

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; keep its one informative line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        code = next((line for line in lines if "GLOBAL" in line), None)
        if code is not None:
            raise refuse(f"its pickle asks for Python code, and weight files are never unpickled with code: "
                         f"{code}") from None
        detail = next((line for line in reversed(lines) if not line.startswith(("Check the", "Weights only"))),
                      type(e).__name__)
        raise refuse(f"not a tensor file: {detail}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise refuse(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise refuse(f"a {type(state_dict).__name__}, expected a dict of tensors")
    verified = io.BytesIO()
    torch.save(state_dict, verified)
    verified.seek(0)
    try:
        extractor = FeatureExtractorInceptionV3(INCEPTION_EXTRACTOR, list(INCEPTION_FEATURES),
                                                feature_extractor_weights_path=verified)
    except (RuntimeError, ValueError) as e:
        raise refuse(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    extractor.weights_path, extractor.weights_sha256 = str(path), file_sha256(path)
    return extractor.to(device).eval()


def _image_batches(images, batch_size: int):
    """uint8 images, torch [N, C, H, W] or numpy [N, H, W, C] (samples.npz, ADM's arr_0), C in {1, 3}
    -> torch uint8 [B, 3, H, W] batches on the CPU (grayscale repeated to 3 channels)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"Inception features need uint8 images [N, H, W, C] with C in (1, 3) as a numpy "
                             f"array, got {images.dtype} {images.shape}")
        to_nchw = lambda batch: torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need uint8 images [N, C, H, W] with C in (1, 3) (the saved "
                             f"8-bit images), got {images.dtype} {tuple(images.shape)}")
        to_nchw = lambda batch: batch.detach()
    else:
        raise TypeError(f"expected a uint8 torch tensor [N, C, H, W] or numpy array [N, H, W, C], got {type(images)}")
    if len(images) == 0:
        raise ValueError("Inception features of an empty image set")
    for start in range(0, len(images), batch_size):
        batch = to_nchw(images[start:start + batch_size])
        yield batch.repeat(1, 3, 1, 1) if batch.shape[1] == 1 else batch


@torch.no_grad()
def inception_features(extractor: torch.nn.Module, images_uint8, batch_size: int = 100,
                       spatial: bool = True, progress: bool = False) -> dict[str, np.ndarray]:
    """8-bit images -> {"pool": [N, 2048], "logits": [N, 1008], "spatial": [N, 2023]} float64 on the CPU.

    images_uint8: torch uint8 [N, C, H, W] (or numpy uint8 [N, H, W, C]), C = 1 (repeated to RGB) or 3,
    any size: torch-fidelity's extractor resizes to 299 x 299 itself (TF1 bilinear) and maps 0..255 to
    [-1, 1]; score the saved 8-bit images, as the reference code does. Batches move to the extractor's
    device one at a time. "logits" are bias-free (for IS); "spatial" (sFID, see the section comment) is
    skipped when spatial is false. The extractor returns float32, so the float64 copies are exact.
    """
    from tqdm import tqdm

    device = next(extractor.parameters()).device
    outputs = {"pool": [], "logits": []}
    handle = None
    if spatial:
        outputs["spatial"] = []

        def keep_spatial(module, inputs, output):  # [B, 192, 17, 17] -> TF's NHWC [..., :7], flattened
            block = output[:, :SFID_CHANNELS].permute(0, 2, 3, 1)
            outputs["spatial"].append(block.reshape(len(block), -1).double().cpu())

        handle = extractor.get_submodule(SFID_MODULE).register_forward_hook(keep_spatial)
    try:
        with tqdm(total=len(images_uint8), desc="inception features", unit="img", disable=not progress) as bar:
            for batch in _image_batches(images_uint8, batch_size):
                pool, logits = extractor(batch.to(device))
                outputs["pool"].append(pool.double().cpu())
                outputs["logits"].append(logits.double().cpu())
                bar.update(len(batch))
    finally:
        if handle is not None:
            handle.remove()
    return {key: torch.cat(parts).numpy() for key, parts in outputs.items()}


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception score of logits [N, K] (the 'logits_unbiased' of `inception_features`) -> (mean, std)
    over `splits` parts: exp(E_x KL(p(y|x) || p(y))) per part, torch-fidelity's isc_features_to_metric
    (rows shuffled with its fixed seed first)."""
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    logits = torch.as_tensor(logits).detach().cpu()
    if logits.dim() != 2 or logits.shape[0] < splits:
        raise ValueError(f"inception_score needs logits [N >= splits = {splits}, K], got shape {tuple(logits.shape)}")
    out = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=DEFAULTS["rng_seed"])
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def kernel_inception_distance(features, reference_features, subsets: int = 100,
                              subset_size: int = 1000) -> tuple[float, float]:
    """KID of features [N, F] to reference features [M, F] -> (mean, std) over `subsets` random subsets
    (torch-fidelity's kid_features_to_metric: unbiased MMD^2, kernel (x.y / F + 1)^3, its fixed seed).
    The subset size is capped at min(N, M): smaller subsets keep KID unbiased but noisier."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    a, b = (torch.as_tensor(np.asarray(f, dtype=np.float64)) for f in (features, reference_features))
    size = min(subset_size, len(a), len(b))
    if size < 2 or a.dim() != 2 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"kernel_inception_distance needs two feature sets [N >= 2, F] of equal F, got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    out = kid_features_to_metric(a, b, kid_subsets=subsets, kid_subset_size=size, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def precision_recall(features, reference_features, k: int = 3, batch_size: int = 5000,
                     device="cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of generated features [N, F] against real
    reference features [M, F] -> (precision, recall), torch-fidelity's prc_features_to_metric.

    Each sample's ball has the radius of its k-th nearest neighbour within its own set; precision is
    the fraction of generated samples inside some real sample's ball, recall the converse. Distances
    are float32 (the extractor's precision) on `device`, in blocks of `batch_size` rows (torch-fidelity's
    save_cpu_ram path: memory batch_size x max(N, M) instead of N x M).
    """
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    a, b = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device) for f in (features, reference_features))
    if a.dim() != 2 or a.shape[1:] != b.shape[1:] or min(len(a), len(b)) <= k:
        raise ValueError(f"precision_recall needs two feature sets [N > k = {k}, F] of equal F, got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    out = prc_features_to_metric(a, b, prc_neighborhood=k, prc_batch_size=batch_size, save_cpu_ram=True,
                                 verbose=False)
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]


def save_npz_deterministic(path, arrays: dict) -> None:
    """np.savez's layout (one uncompressed .npy member per key, in the given order), but with fixed
    member timestamps, so the same arrays give byte-identical files (np.savez stamps the current time).
    Written to a temporary file beside `path` and renamed into place. np.load reads it as usual."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for key, value in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class ReferenceStatistics:
    """Inception statistics of real images, the reference side of `inception_metrics`.

    mu [2048], sigma [2048, 2048]: pool-feature mean and covariance (FID); count: images behind them
    (None: unknown, precomputed in an ADM reference batch); extractor_sha256: sha256 of the Inception
    weights that computed them (None: ADM's precomputed TF statistics); features [M, 2048]: pool
    features of (a subset of) the images, for KID and precision/recall (None: those are skipped);
    sfid_mu [2023], sfid_sigma [2023, 2023]: spatial-feature statistics (sFID; None: skipped);
    source: how it was made (e.g. "dataset=cifar10 split=train").
    """

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None
    extractor_sha256: str | None
    features: np.ndarray | None = None
    sfid_mu: np.ndarray | None = None
    sfid_sigma: np.ndarray | None = None
    source: str = ""

    @classmethod
    def from_features(cls, features: dict[str, np.ndarray], extractor_sha256: str | None,
                      keep_features: int | None = None, source: str = "") -> "ReferenceStatistics":
        """`inception_features` output -> statistics. keep_features: how many pool-feature rows to keep
        for KID / precision-recall (None: all; 0: none; fewer than N: a fixed-seed subset, in order)."""
        pool = np.asarray(features["pool"], dtype=np.float64)
        mu, sigma = feature_statistics(torch.from_numpy(pool))
        sfid_mu = sfid_sigma = None
        if "spatial" in features:
            sfid_mu, sfid_sigma = (v.numpy() for v in feature_statistics(torch.from_numpy(features["spatial"])))
        kept = None
        if keep_features is None or keep_features >= len(pool):
            kept = pool
        elif keep_features > 0:
            kept = pool[np.sort(np.random.default_rng(0).permutation(len(pool))[:keep_features])]
        return cls(mu.numpy(), sigma.numpy(), len(pool), extractor_sha256, kept, sfid_mu, sfid_sigma, source)

    def save(self, path) -> None:
        """An .npz (deterministic: the same statistics give the same bytes) with format, extractor,
        extractor_sha256 ('' for none), count (-1 for unknown), source, mu, sigma, then sfid_mu /
        sfid_sigma and features (float32: the extractor's own precision, so nothing is lost) if present."""
        arrays = {"format": np.array(INCEPTION_REFERENCE_FORMAT), "extractor": np.array(INCEPTION_EXTRACTOR),
                  "extractor_sha256": np.array(self.extractor_sha256 or ""),
                  "count": np.array(-1 if self.count is None else self.count, dtype=np.int64),
                  "source": np.array(self.source),
                  "mu": np.asarray(self.mu, dtype=np.float64), "sigma": np.asarray(self.sigma, dtype=np.float64)}
        if self.sfid_mu is not None:
            arrays["sfid_mu"] = np.asarray(self.sfid_mu, dtype=np.float64)
            arrays["sfid_sigma"] = np.asarray(self.sfid_sigma, dtype=np.float64)
        if self.features is not None:
            arrays["features"] = np.asarray(self.features, dtype=np.float32)
        save_npz_deterministic(path, arrays)

    def check_extractor(self, extractor: torch.nn.Module, source="reference statistics") -> None:
        """Refuse statistics computed with other Inception weights than the extractor's."""
        have = getattr(extractor, "weights_sha256", None)
        if self.extractor_sha256 is not None and self.extractor_sha256 != have:
            raise ReferenceStatisticsError(
                f"{source} were computed with Inception weights of sha256 {self.extractor_sha256}, but the loaded "
                f"weights ({getattr(extractor, 'weights_path', '?')}) have sha256 {have}; features of different "
                f"weights are not comparable. Load the weights the statistics were built with, or rebuild them "
                f"with these weights (scripts/build_reference_stats.py)")


def _check_statistics(path: Path, mu: np.ndarray, sigma: np.ndarray, dim: int, name: str) -> None:
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ReferenceStatisticsError(f"reference statistics {path}: {name} mean/covariance have shapes "
                                       f"{mu.shape} / {sigma.shape}, expected ({dim},) / ({dim}, {dim})")


def load_reference_statistics(path, extractor: torch.nn.Module | None = None, batch_size: int = 100,
                              progress: bool = False) -> ReferenceStatistics:
    """Reference statistics from an .npz: one written by `ReferenceStatistics.save`
    (scripts/build_reference_stats.py), or an ADM reference batch as published
    (e.g. VIRTUAL_imagenet256_labeled.npz: arr_0 uint8 [N, H, W, 3], optionally mu / sigma and
    mu_s / sigma_s precomputed with the TF graph).

    Our files: with `extractor` given, statistics built with other weights (sha256) are refused.
    ADM files need `extractor`: pool features for KID / precision-recall are computed from arr_0, and
    so are the FID (sFID) statistics unless mu / sigma (mu_s / sigma_s) are present, which are used
    as they are (torch-fidelity's port reproduces the TF graph's features, so they are comparable).
    """
    path = Path(path)
    if not path.is_file():
        raise ReferenceStatisticsError(f"reference statistics {path} do not exist; build them with "
                                       f"python scripts/build_reference_stats.py dataset=NAME dataset.split=train out={path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ReferenceStatisticsError(f"reference statistics {path} are not a readable .npz ({e})") from None
    with archive:
        keys = set(archive.files)
        if "format" in keys:
            if str(archive["format"]) != INCEPTION_REFERENCE_FORMAT:
                raise ReferenceStatisticsError(f"reference statistics {path} have format {str(archive['format'])!r}, "
                                               f"expected {INCEPTION_REFERENCE_FORMAT!r}")
            count = int(archive["count"])
            stats = ReferenceStatistics(
                mu=archive["mu"], sigma=archive["sigma"], count=None if count < 0 else count,
                extractor_sha256=str(archive["extractor_sha256"]) or None,
                features=archive["features"].astype(np.float64) if "features" in keys else None,
                sfid_mu=archive["sfid_mu"] if "sfid_mu" in keys else None,
                sfid_sigma=archive["sfid_sigma"] if "sfid_sigma" in keys else None,
                source=str(archive["source"]))
            if extractor is not None:
                stats.check_extractor(extractor, f"reference statistics {path}")
        elif "arr_0" in keys:
            if extractor is None:
                raise ReferenceStatisticsError(f"{path} is an ADM reference batch (arr_0 images): computing its "
                                               f"features needs the Inception extractor (metrics.load_inception)")
            images = archive["arr_0"]
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ReferenceStatisticsError(f"{path}: arr_0 should be uint8 images [N, H, W, 3], got "
                                               f"{images.dtype} {images.shape}")
            has_fid, has_sfid = {"mu", "sigma"} <= keys, {"mu_s", "sigma_s"} <= keys
            features = inception_features(extractor, images, batch_size, spatial=not has_sfid, progress=progress)
            stats = ReferenceStatistics.from_features(features, extractor.weights_sha256, source=f"adm:{path.name}")
            if has_fid:  # the TF graph's statistics, over however many images the file's authors used
                stats.mu, stats.sigma, stats.count, stats.extractor_sha256 = \
                    archive["mu"], archive["sigma"], None, None
            if has_sfid:
                stats.sfid_mu, stats.sfid_sigma = archive["mu_s"], archive["sigma_s"]
        else:
            raise ReferenceStatisticsError(f"{path} holds neither reference statistics (format, mu, sigma, ...) nor "
                                           f"an ADM reference batch (arr_0); keys: {', '.join(sorted(keys))}")
    stats.mu, stats.sigma = np.asarray(stats.mu, dtype=np.float64), np.asarray(stats.sigma, dtype=np.float64)
    _check_statistics(path, stats.mu, stats.sigma, 2048, "pool-feature")
    if stats.sfid_mu is not None:
        stats.sfid_mu, stats.sfid_sigma = (np.asarray(v, dtype=np.float64) for v in (stats.sfid_mu, stats.sfid_sigma))
        _check_statistics(path, stats.sfid_mu, stats.sfid_sigma, SFID_CHANNELS * 17 * 17, "spatial-feature (sFID)")
    return stats


def inception_metrics_from_features(features: dict[str, np.ndarray], reference: ReferenceStatistics,
                                    is_splits: int = 10, kid_subsets: int = 100, kid_subset_size: int = 1000,
                                    k: int = 3, device="cpu") -> dict[str, float]:
    """`inception_features` of samples + reference statistics -> the metrics (see `inception_metrics`)."""
    mu, sigma = feature_statistics(torch.from_numpy(np.asarray(features["pool"], dtype=np.float64)))
    out = {"fid": frechet_distance(mu, sigma, reference.mu, reference.sigma)}
    if reference.sfid_mu is not None and "spatial" in features:
        spatial_stats = feature_statistics(torch.from_numpy(np.asarray(features["spatial"], dtype=np.float64)))
        out["sfid"] = frechet_distance(*spatial_stats, reference.sfid_mu, reference.sfid_sigma)
    out["is_mean"], out["is_std"] = inception_score(features["logits"], is_splits)
    if reference.features is not None:
        out["kid_mean"], out["kid_std"] = kernel_inception_distance(features["pool"], reference.features,
                                                                    kid_subsets, kid_subset_size)
        out["precision"], out["recall"] = precision_recall(features["pool"], reference.features, k, device=device)
    return out


def inception_metrics(extractor: torch.nn.Module, samples_uint8, reference: ReferenceStatistics,
                      batch_size: int = 100, is_splits: int = 10, kid_subsets: int = 100,
                      kid_subset_size: int = 1000, k: int = 3, progress: bool = False) -> dict[str, float]:
    """8-bit samples (see `inception_features`) against reference statistics -> {fid, sfid, is_mean,
    is_std, kid_mean, kid_std, precision, recall}.

    sfid needs the reference's spatial statistics, kid_* / precision / recall its pool features; a
    key whose inputs the reference lacks is left out. IS needs N >= is_splits. Statistics built with
    other Inception weights than the extractor's are refused (ReferenceStatisticsError).
    """
    reference.check_extractor(extractor)
    features = inception_features(extractor, samples_uint8, batch_size, spatial=reference.sfid_mu is not None,
                                  progress=progress)
    device = next(extractor.parameters()).device
    return inception_metrics_from_features(features, reference, is_splits, kid_subsets, kid_subset_size, k, device)
