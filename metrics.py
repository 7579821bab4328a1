"""Sample-quality numbers computed without a network.

- 2-D data: sliced Wasserstein distance to the training set and, for two moons, the fraction of
  class-k samples that land nearer crescent k than the other crescent (`sample_metrics`).
- Images: JPEG/PNG bits per pixel, how much detail samples carry (`image_compression_metrics`; the
  compressibility reward uses the same functions).
- Feature statistics and the Frechet distance between the Gaussians they define (float64): the
  formula of classifier-FD (classifier.py) and FID (inception.py), which supply the features.

The 2-D and bits-per-pixel numbers are cheap enough to log at every training-time evaluation.
Metrics that run a network live with it: classifier.py (accuracy and classifier-FD of a small CNN
trained on the dataset), inception.py (FID, sFID, IS, KID, precision/recall).
"""

import functools
import io
import math

import numpy as np
import torch
from PIL import Image

from datasets import model_space_to_uint8, moons_to_data_space


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
        raise ValueError(
            f"frechet_distance: shapes do not match: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
            f"sigma {tuple(sigma1.shape)} / {tuple(sigma2.shape)}"
        )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return max(distance.item(), 0.0)  # rounding can leave -1e-13 for identical inputs


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
