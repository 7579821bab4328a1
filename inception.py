"""Inception metrics (FID, sFID, IS, KID, precision/recall), computed as the literature computes them.

torch-fidelity's port of the TF-2015 Inception-v3 that published numbers are computed with
(`load_inception`, `inception_features`, `inception_metrics`), with reference statistics of real data
(`ReferenceStatistics`) written by `scripts/build_reference_stats.py` or read from ADM's reference
batches. Each image goes through Inception-v3 at 299 x 299: these run at evaluation time, not every step.
"""

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from checkpoint import sha256_file
from config import ConfigError
from metrics import feature_statistics, frechet_distance

# --- Inception metrics (torch-fidelity) -----------------------------------------------------------
#
# The standard sample-quality numbers, computed as the literature computes them: with the TF-2015
# Inception-v3 graph (Szegedy et al.; the network of the original FID / IS code and of ADM's
# evaluator), here as torch-fidelity's faithful PyTorch port ("inception-v3-compat": the TF weights,
# TF1's bilinear resize to 299 x 299 and the graph's pooling quirks), so features match the TF code to
# float rounding. Metrics reuse torch-fidelity's own functions where it exposes them on features (IS,
# KID, precision/recall); FID is `metrics.frechet_distance` (float64, stable for singular covariances).
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


def _weights_help() -> str:
    return (
        f"download {inception_weights_url()} (torch-fidelity's TF-2015 Inception-v3, file "
        f"{inception_weights_filename()}) and pass training.inception_weights=PATH (inference.py, eval_imagenet.py: "
        f"inception_weights=PATH; scripts: weights=PATH), or put it at "
        f"{default_inception_weights_path()} (the torch hub cache, where torch-fidelity looks)"
    )


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
    own loader unpickles without that restriction, so it is handed an in-memory copy of the verified
    tensors, never the file.
    """
    import io
    import pickle

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = Path(weights_path).expanduser() if weights_path else default_inception_weights_path()
    if not path.is_file():
        where = (
            f"Inception weights file {path}"
            if weights_path
            else f"Inception weights file {inception_weights_filename()} (looked in the torch hub cache, {path})"
        )
        raise InceptionWeightsError(f"{where} does not exist; {_weights_help()}")

    def refuse(reason: str) -> InceptionWeightsError:
        return InceptionWeightsError(
            f"Inception weights file {path} is not torch-fidelity's Inception-v3 "
            f"state dict ({reason}); {_weights_help()}"
        )

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; keep its one informative line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        code = next((line for line in lines if "GLOBAL" in line), None)
        if code is not None:
            raise refuse(
                f"its pickle asks for Python code, and weight files are never unpickled with code: {code}"
            ) from None
        detail = next(
            (line for line in reversed(lines) if not line.startswith(("Check the", "Weights only"))), type(e).__name__
        )
        raise refuse(f"not a tensor file: {detail}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise refuse(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise refuse(f"a {type(state_dict).__name__}, expected a dict of tensors")
    verified = io.BytesIO()
    torch.save(state_dict, verified)
    verified.seek(0)
    try:
        extractor = FeatureExtractorInceptionV3(
            INCEPTION_EXTRACTOR, list(INCEPTION_FEATURES), feature_extractor_weights_path=verified
        )
    except (RuntimeError, ValueError) as e:
        raise refuse(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    extractor.weights_path, extractor.weights_sha256 = str(path), sha256_file(path)
    return extractor.to(device).eval()


def _image_batches(images, batch_size: int):
    """uint8 images, torch [N, C, H, W] or numpy [N, H, W, C] (samples.npz, ADM's arr_0), C in {1, 3}
    -> torch uint8 [B, 3, H, W] batches on the CPU (grayscale repeated to 3 channels)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"Inception features need uint8 images [N, H, W, C] with C in (1, 3) as a numpy "
                f"array, got {images.dtype} {images.shape}"
            )
        to_nchw = lambda batch: torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"Inception features need uint8 images [N, C, H, W] with C in (1, 3) (the saved "
                f"8-bit images), got {images.dtype} {tuple(images.shape)}"
            )
        to_nchw = lambda batch: batch.detach()
    else:
        raise TypeError(f"expected a uint8 torch tensor [N, C, H, W] or numpy array [N, H, W, C], got {type(images)}")
    if len(images) == 0:
        raise ValueError("Inception features of an empty image set")
    for start in range(0, len(images), batch_size):
        batch = to_nchw(images[start : start + batch_size])
        yield batch.repeat(1, 3, 1, 1) if batch.shape[1] == 1 else batch


@torch.no_grad()
def inception_features(
    extractor: torch.nn.Module, images_uint8, batch_size: int = 100, spatial: bool = True, progress=False
) -> dict[str, np.ndarray]:
    """8-bit images -> {"pool": [N, 2048], "logits": [N, 1008], "spatial": [N, 2023]} float64 on the CPU.

    images_uint8: torch uint8 [N, C, H, W] (or numpy uint8 [N, H, W, C]), C = 1 (repeated to RGB) or 3,
    any size: torch-fidelity's extractor resizes to 299 x 299 itself (TF1 bilinear) and maps 0..255 to
    [-1, 1]; score the saved 8-bit images, as the reference code does. Batches move to the extractor's
    device one at a time. "logits" are bias-free (for IS); "spatial" (sFID, see the section comment) is
    skipped when spatial is false. The extractor returns float32, so the float64 copies are exact.
    progress: True for a bar of its own, or a callable given each batch's size (a caller's runtime.Progress).
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
        own = not callable(progress)
        bar_off = not own or not progress
        with tqdm(total=len(images_uint8), desc="inception features", unit="img", disable=bar_off) as bar:
            for batch in _image_batches(images_uint8, batch_size):
                pool, logits = extractor(batch.to(device))
                outputs["pool"].append(pool.double().cpu())
                outputs["logits"].append(logits.double().cpu())
                (bar.update if own else progress)(len(batch))
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


def kernel_inception_distance(
    features, reference_features, subsets: int = 100, subset_size: int = 1000
) -> tuple[float, float]:
    """KID of features [N, F] to reference features [M, F] -> (mean, std) over `subsets` random subsets
    (torch-fidelity's kid_features_to_metric: unbiased MMD^2, kernel (x.y / F + 1)^3, its fixed seed).
    The subset size is capped at min(N, M): smaller subsets keep KID unbiased but noisier."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    a, b = (torch.as_tensor(np.asarray(f, dtype=np.float64)) for f in (features, reference_features))
    size = min(subset_size, len(a), len(b))
    if size < 2 or a.dim() != 2 or a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"kernel_inception_distance needs two feature sets [N >= 2, F] of equal F, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    out = kid_features_to_metric(a, b, kid_subsets=subsets, kid_subset_size=size, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def precision_recall(
    features, reference_features, k: int = 3, batch_size: int = 5000, device="cpu"
) -> tuple[float, float]:
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
        raise ValueError(
            f"precision_recall needs two feature sets [N > k = {k}, F] of equal F, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    out = prc_features_to_metric(a, b, prc_neighborhood=k, prc_batch_size=batch_size, save_cpu_ram=True, verbose=False)
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
    def from_features(
        cls,
        features: dict[str, np.ndarray],
        extractor_sha256: str | None,
        keep_features: int | None = None,
        source: str = "",
    ) -> "ReferenceStatistics":
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
        arrays = {
            "format": np.array(INCEPTION_REFERENCE_FORMAT),
            "extractor": np.array(INCEPTION_EXTRACTOR),
            "extractor_sha256": np.array(self.extractor_sha256 or ""),
            "count": np.array(-1 if self.count is None else self.count, dtype=np.int64),
            "source": np.array(self.source),
            "mu": np.asarray(self.mu, dtype=np.float64),
            "sigma": np.asarray(self.sigma, dtype=np.float64),
        }
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
                f"with these weights (scripts/build_reference_stats.py)"
            )


def _check_statistics(path: Path, mu: np.ndarray, sigma: np.ndarray, dim: int, name: str) -> None:
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ReferenceStatisticsError(
            f"reference statistics {path}: {name} mean/covariance have shapes "
            f"{mu.shape} / {sigma.shape}, expected ({dim},) / ({dim}, {dim})"
        )


def load_reference_statistics(
    path, extractor: torch.nn.Module | None = None, batch_size: int = 100, progress: bool = False
) -> ReferenceStatistics:
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
        raise ReferenceStatisticsError(
            f"reference statistics {path} do not exist; build them with "
            f"python scripts/build_reference_stats.py dataset=NAME dataset.split=train out={path}"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ReferenceStatisticsError(f"reference statistics {path} are not a readable .npz ({e})") from None
    with archive:
        keys = set(archive.files)
        if "format" in keys:
            if str(archive["format"]) != INCEPTION_REFERENCE_FORMAT:
                raise ReferenceStatisticsError(
                    f"reference statistics {path} have format {str(archive['format'])!r}, "
                    f"expected {INCEPTION_REFERENCE_FORMAT!r}"
                )
            count = int(archive["count"])
            stats = ReferenceStatistics(
                mu=archive["mu"],
                sigma=archive["sigma"],
                count=None if count < 0 else count,
                extractor_sha256=str(archive["extractor_sha256"]) or None,
                features=archive["features"].astype(np.float64) if "features" in keys else None,
                sfid_mu=archive["sfid_mu"] if "sfid_mu" in keys else None,
                sfid_sigma=archive["sfid_sigma"] if "sfid_sigma" in keys else None,
                source=str(archive["source"]),
            )
            if extractor is not None:
                stats.check_extractor(extractor, f"reference statistics {path}")
        elif "arr_0" in keys:
            if extractor is None:
                raise ReferenceStatisticsError(
                    f"{path} is an ADM reference batch (arr_0 images): computing its "
                    f"features needs the Inception extractor (inception.load_inception)"
                )
            images = archive["arr_0"]
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ReferenceStatisticsError(
                    f"{path}: arr_0 should be uint8 images [N, H, W, 3], got {images.dtype} {images.shape}"
                )
            has_fid, has_sfid = {"mu", "sigma"} <= keys, {"mu_s", "sigma_s"} <= keys
            features = inception_features(extractor, images, batch_size, spatial=not has_sfid, progress=progress)
            stats = ReferenceStatistics.from_features(features, extractor.weights_sha256, source=f"adm:{path.name}")
            if has_fid:  # the TF graph's statistics, over however many images the file's authors used
                stats.mu, stats.sigma, stats.count, stats.extractor_sha256 = archive["mu"], archive["sigma"], None, None
            if has_sfid:
                stats.sfid_mu, stats.sfid_sigma = archive["mu_s"], archive["sigma_s"]
        else:
            raise ReferenceStatisticsError(
                f"{path} holds neither reference statistics (format, mu, sigma, ...) nor "
                f"an ADM reference batch (arr_0); keys: {', '.join(sorted(keys))}"
            )
    stats.mu, stats.sigma = np.asarray(stats.mu, dtype=np.float64), np.asarray(stats.sigma, dtype=np.float64)
    _check_statistics(path, stats.mu, stats.sigma, 2048, "pool-feature")
    if stats.sfid_mu is not None:
        stats.sfid_mu, stats.sfid_sigma = (np.asarray(v, dtype=np.float64) for v in (stats.sfid_mu, stats.sfid_sigma))
        _check_statistics(path, stats.sfid_mu, stats.sfid_sigma, SFID_CHANNELS * 17 * 17, "spatial-feature (sFID)")
    return stats


def inception_metrics_from_features(
    features: dict[str, np.ndarray],
    reference: ReferenceStatistics,
    is_splits: int = 10,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    k: int = 3,
    device="cpu",
) -> dict[str, float]:
    """`inception_features` of samples + reference statistics -> the metrics (see `inception_metrics`)."""
    mu, sigma = feature_statistics(torch.from_numpy(np.asarray(features["pool"], dtype=np.float64)))
    out = {"fid": frechet_distance(mu, sigma, reference.mu, reference.sigma)}
    if reference.sfid_mu is not None and "spatial" in features:
        spatial_stats = feature_statistics(torch.from_numpy(np.asarray(features["spatial"], dtype=np.float64)))
        out["sfid"] = frechet_distance(*spatial_stats, reference.sfid_mu, reference.sfid_sigma)
    out["is_mean"], out["is_std"] = inception_score(features["logits"], is_splits)
    if reference.features is not None:
        out["kid_mean"], out["kid_std"] = kernel_inception_distance(
            features["pool"], reference.features, kid_subsets, kid_subset_size
        )
        out["precision"], out["recall"] = precision_recall(features["pool"], reference.features, k, device=device)
    return out


def inception_metrics(
    extractor: torch.nn.Module,
    samples_uint8,
    reference: ReferenceStatistics,
    batch_size: int = 100,
    is_splits: int = 10,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    k: int = 3,
    progress=False,
) -> dict[str, float]:
    """8-bit samples (see `inception_features`) against reference statistics -> {fid, sfid, is_mean,
    is_std, kid_mean, kid_std, precision, recall}.

    sfid needs the reference's spatial statistics, kid_* / precision / recall its pool features; a
    key whose inputs the reference lacks is left out. IS needs N >= is_splits. Statistics built with
    other Inception weights than the extractor's are refused (ReferenceStatisticsError).
    """
    reference.check_extractor(extractor)
    features = inception_features(
        extractor, samples_uint8, batch_size, spatial=reference.sfid_mu is not None, progress=progress
    )
    device = next(extractor.parameters()).device
    return inception_metrics_from_features(features, reference, is_splits, kid_subsets, kid_subset_size, k, device)
