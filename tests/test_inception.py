"""Inception metrics on torch-fidelity (metrics.py, scripts/build_reference_stats.py), offline on the CPU.

The real TF-2015 weights cannot be downloaded here, so the network is torch-fidelity's own
architecture with a fixed random initialisation (conftest.inception_weights), loaded through
inception.load_inception. The numbers are then meaningless as quality scores but exercise the real
extraction (resize to 299, pool / logits / spatial features) and the metric code; properties that
hold for any network are what is checked. Images are tiny (16 x 16): the extractor upsamples them.
"""

import hashlib
import os

import numpy as np
import pytest
import torch

import inception
from config import ConfigError
from conftest import load_script

N = 24  # images per set: enough for 10 IS splits and k = 3 neighbourhoods, cheap on one core


def tiny_images(seed: int, count: int = N, channels: int = 3, size: int = 16, bright: int = 0) -> torch.Tensor:
    """Smooth random uint8 images [count, channels, size, size] (a 4x4 pattern upsampled, plus noise)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, channels, 4, 4, generator=generator) * 200 + bright
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noisy = fine + 20 * torch.randn(fine.shape, generator=generator)
    return noisy.round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def extractor(inception_weights):
    return inception.load_inception(inception_weights, "cpu")


@pytest.fixture(scope="module")
def images_a():
    return tiny_images(1)


@pytest.fixture(scope="module")
def images_b():
    return tiny_images(2, bright=55)


@pytest.fixture(scope="module")
def features_a(extractor, images_a):
    return inception.inception_features(extractor, images_a, batch_size=12)


@pytest.fixture(scope="module")
def features_b(extractor, images_b):
    return inception.inception_features(extractor, images_b, batch_size=12)


@pytest.fixture(scope="module")
def reference_a(extractor, features_a):
    return inception.ReferenceStatistics.from_features(features_a, extractor.weights_sha256, source="set a")


@pytest.fixture(scope="module")
def reference_b(extractor, features_b):
    return inception.ReferenceStatistics.from_features(features_b, extractor.weights_sha256, source="set b")


@pytest.fixture(scope="module")
def self_metrics(extractor, images_a, reference_a):
    """inception_metrics of set a against its own statistics: the whole path, extraction included."""
    return inception.inception_metrics(extractor, images_a, reference_a, batch_size=12, kid_subset_size=N)


def scipy_fid(features_1: np.ndarray, features_2: np.ndarray) -> float:
    """The reference FID code's formula (np.cov, scipy.linalg.sqrtm of S1 S2) on pool features.

    With N << 2048 both covariances and the mean difference lie in the span V of the centred
    features of both sets and mu1 - mu2 (<= N1 + N2 - 1 dims). In an orthonormal basis Q of V
    every term is unchanged (|Q^T d|^2 = |d|^2, tr(Q^T S Q) = tr S, and Q^T S1 Q Q^T S2 Q has the
    nonzero eigenvalues of S1 S2), so sqrtm runs on a ~50 x 50 matrix instead of 2048 x 2048 (20 s).
    """
    from scipy import linalg

    mu1, mu2 = features_1.mean(0), features_2.mean(0)
    span = np.concatenate([features_1 - mu1, features_2 - mu2, (mu1 - mu2)[None]]).T
    q, _ = np.linalg.qr(span)
    x1, x2 = features_1 @ q, features_2 @ q
    m1, m2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# --- the extractor -----------------------------------------------------------------------------------


def test_load_inception_is_torch_fidelitys_extractor_and_records_the_weights_sha256(extractor, inception_weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    assert isinstance(extractor, FeatureExtractorInceptionV3) and not extractor.training
    assert extractor.get_name() == "inception-v3-compat"
    assert extractor.weights_sha256 == hashlib.sha256(inception_weights.read_bytes()).hexdigest()
    # the fixture's network, not a download: the loaded weights are the saved ones
    saved = torch.load(inception_weights, weights_only=True)
    assert torch.equal(
        extractor.state_dict()["Mixed_6d.branch1x1.conv.weight"], saved["Mixed_6d.branch1x1.conv.weight"]
    )


def test_inception_features_shapes_and_grayscale_is_repeated_to_rgb(extractor, features_a):
    assert {key: value.shape for key, value in features_a.items()} == {
        "pool": (N, 2048),
        "logits": (N, 1008),
        "spatial": (N, 7 * 17 * 17),
    }
    assert all(value.dtype == np.float64 for value in features_a.values())
    assert np.isfinite(features_a["pool"]).all() and features_a["pool"].std(0).mean() > 0  # images differ
    gray = tiny_images(3, count=2, channels=1)
    as_gray = inception.inception_features(extractor, gray, spatial=False)
    as_rgb = inception.inception_features(extractor, gray.repeat(1, 3, 1, 1), spatial=False)
    assert as_gray.keys() == {"pool", "logits"}
    np.testing.assert_array_equal(as_gray["pool"], as_rgb["pool"])
    with pytest.raises(ValueError, match="uint8"):
        inception.inception_features(extractor, gray.float())


def test_spatial_features_are_the_first_7_channels_of_mixed_6d_branch1x1_in_nhwc_order(extractor, images_a, features_a):
    captured = []
    handle = extractor.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        extractor(images_a[:2])
    handle.remove()
    expected = captured[0][:, :7].permute(0, 2, 3, 1).reshape(2, -1).double().numpy()
    np.testing.assert_allclose(features_a["spatial"][:2], expected, rtol=1e-5, atol=1e-7)


# --- the metrics -------------------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero(self_metrics, features_a, reference_a):
    scale = np.trace(reference_a.sigma)
    assert self_metrics["fid"] == pytest.approx(0.0, abs=1e-9 * scale)
    assert self_metrics["sfid"] == pytest.approx(0.0, abs=1e-9 * np.trace(reference_a.sfid_sigma))


def test_precision_and_recall_of_a_set_against_itself_are_one(self_metrics, features_a):
    assert (self_metrics["precision"], self_metrics["recall"]) == (1.0, 1.0)
    assert inception.precision_recall(features_a["pool"], features_a["pool"], k=3) == (1.0, 1.0)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # sqrtm of the singular S1 S2 (rank 23)
@pytest.mark.slow  # scipy's sqrtm of two 2048-d products; test_metrics checks frechet_distance against it
def test_inception_metrics_keys_and_fid_matches_a_direct_scipy_computation(
    extractor, images_a, features_a, features_b, reference_b
):
    """rel 2e-5: with N = 24 the 2048-d covariances have ~2000 zero eigenvalues, which rounding leaves at
    ~1e-17; frechet_distance's square roots of them shift tr sqrt(S1 S2) by ~3e-6 relative here (scipy's
    sqrtm at full size is off by as much; the reduced computation agrees with a 40-digit one to 1e-13).
    The error vanishes when N > 2048, the real protocol."""
    values = inception.inception_metrics(extractor, images_a, reference_b, batch_size=12, kid_subset_size=N)
    assert list(values) == ["fid", "sfid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall"]
    expected = scipy_fid(features_a["pool"], features_b["pool"])
    assert expected > 0
    assert values["fid"] == pytest.approx(expected, rel=2e-5)
    assert values["sfid"] == pytest.approx(scipy_fid(features_a["spatial"], features_b["spatial"]), rel=2e-5)
    assert all(np.isfinite(v) for v in values.values())
    assert 0 <= values["precision"] <= 1 and 0 <= values["recall"] <= 1


def test_inception_score_of_identical_one_hot_logits_is_one_and_of_k_even_classes_is_k():
    identical = torch.zeros(40, 1008, dtype=torch.float64)
    identical[:, 7] = 100.0
    mean, std = inception.inception_score(identical, splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    even = torch.zeros(40, 1008, dtype=torch.float64)
    even[torch.arange(40), torch.arange(40) % 8] = 100.0  # one-hot, 8 classes, 5 samples each
    assert inception.inception_score(even, splits=1)[0] == pytest.approx(8.0, rel=1e-9)  # exp(H(p(y))) = 8
    with pytest.raises(ValueError, match="splits"):
        inception.inception_score(even[:5], splits=10)


def test_kid_is_torch_fidelitys_unbiased_mmd_and_separates_different_sets(features_a, features_b):
    """A set against itself: near 0 (the unbiased estimate may dip below 0); a brighter set: far larger."""
    same = inception.kernel_inception_distance(features_a["pool"], features_a["pool"], subsets=20, subset_size=N)
    other = inception.kernel_inception_distance(features_a["pool"], features_b["pool"], subsets=20, subset_size=N)
    assert abs(same[0]) < 0.1 * other[0]


# --- reference statistics files ----------------------------------------------------------------------


def test_reference_statistics_round_trip_and_a_different_extractor_is_refused(
    tmp_path, extractor, reference_a, images_a
):
    path = tmp_path / "ref.npz"
    reference_a.save(path)
    loaded = inception.load_reference_statistics(path, extractor)
    assert loaded.count == N and loaded.extractor_sha256 == extractor.weights_sha256 and loaded.source == "set a"
    for name in ("mu", "sigma", "features", "sfid_mu", "sfid_sigma"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(reference_a, name))
    assert set(np.load(path).files) == {
        "format",
        "extractor",
        "extractor_sha256",
        "count",
        "source",
        "mu",
        "sigma",
        "sfid_mu",
        "sfid_sigma",
        "features",
    }

    other = inception.ReferenceStatistics(reference_a.mu, reference_a.sigma, N, "0" * 64)
    other.save(path)
    with pytest.raises(inception.ReferenceStatisticsError, match="sha256 0000.*not comparable"):
        inception.load_reference_statistics(path, extractor)
    with pytest.raises(inception.ReferenceStatisticsError, match="not comparable"):
        inception.inception_metrics(extractor, images_a, other)
    assert inception.load_reference_statistics(path).extractor_sha256 == "0" * 64  # no extractor: nothing to check
    with pytest.raises(inception.ReferenceStatisticsError, match="do not exist"):
        inception.load_reference_statistics(tmp_path / "missing.npz", extractor)


def test_adm_reference_batch_is_read_as_is(tmp_path, extractor, features_b):
    """An ADM reference batch (arr_0 uint8 [N, H, W, 3], optional precomputed mu/sigma and mu_s/sigma_s):
    precomputed statistics are used as they are; pool features (and missing statistics) come from arr_0."""
    images = tiny_images(4, count=6)
    arr_0 = images.permute(0, 2, 3, 1).numpy()
    mu, sigma = features_b["pool"].mean(0), np.cov(features_b["pool"], rowvar=False)
    mu_s, sigma_s = features_b["spatial"].mean(0), np.cov(features_b["spatial"], rowvar=False)
    path = tmp_path / "VIRTUAL_tiny_labeled.npz"
    np.savez(path, arr_0=arr_0, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    loaded = inception.load_reference_statistics(path, extractor, batch_size=3)
    np.testing.assert_array_equal(loaded.mu, mu)
    np.testing.assert_array_equal(loaded.sfid_sigma, sigma_s)
    assert loaded.count is None and loaded.extractor_sha256 is None  # the TF graph's statistics
    direct = inception.inception_features(extractor, images, spatial=False)["pool"]
    np.testing.assert_allclose(loaded.features, direct, rtol=1e-5, atol=1e-6)

    np.savez(path, arr_0=arr_0)  # images only: everything is computed from them
    computed = inception.load_reference_statistics(path, extractor)
    assert computed.count == 6 and computed.extractor_sha256 == extractor.weights_sha256
    np.testing.assert_allclose(computed.mu, direct.mean(0), rtol=1e-5, atol=1e-7)
    assert computed.sfid_mu.shape == (2023,)
    with pytest.raises(inception.ReferenceStatisticsError, match="needs the Inception extractor"):
        inception.load_reference_statistics(path)


def test_build_reference_stats_twice_gives_byte_identical_files(tmp_path, inception_weights, extractor):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(tiny_images(5, count=8).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    script = load_script("build_reference_stats")
    common = [
        f"images={folder}",
        "image_size=16",
        f"weights={inception_weights}",
        "device=cpu",
        "batch_size=5",
        "progress=false",
    ]
    assert script.main([*common, f"out={tmp_path / 'one.npz'}"]) == 0
    assert script.main([*common, f"out={tmp_path / 'two.npz'}"]) == 0
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    stats = inception.load_reference_statistics(tmp_path / "one.npz", extractor)
    assert stats.count == 8 and stats.features.shape == (8, 2048) and stats.sfid_mu.shape == (2023,)
    assert stats.source == f"images={folder} image_size=16"


def test_build_reference_stats_from_a_dataset_split(tmp_path, inception_weights, extractor):
    """dataset=digits (bundled with scikit-learn, offline): grayscale 16 x 16, repeated to RGB."""
    script = load_script("build_reference_stats")
    out = tmp_path / "digits.npz"
    assert (
        script.main(
            [
                "dataset=digits",
                "dataset.split=test",
                "limit=6",
                "features=4",
                f"out={out}",
                f"weights={inception_weights}",
                "device=cpu",
                "progress=false",
            ]
        )
        == 0
    )
    stats = inception.load_reference_statistics(out, extractor)
    assert stats.count == 6 and stats.features.shape == (4, 2048)
    assert stats.source == "dataset=digits split=test limit=6"


# --- errors ------------------------------------------------------------------------------------------


def test_missing_weights_error_names_the_file_the_url_and_where_to_put_it(tmp_path, monkeypatch, capsys):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    from runtime import run_main

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert inception.inception_weights_filename() == "weights-inception-2015-12-05-6726825d.pth"
    assert inception.inception_weights_url() == URL_INCEPTION_V3
    hub_path = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(inception.InceptionWeightsError) as error:
        inception.load_inception(None)
    message = str(error.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in message and URL_INCEPTION_V3 in message
    assert str(hub_path) in message and "training.inception_weights=PATH" in message
    assert isinstance(error.value, ConfigError)
    with pytest.raises(
        inception.InceptionWeightsError, match=f"{tmp_path / 'nope.pth'} does not exist.*{URL_INCEPTION_V3}"
    ):
        inception.load_inception(tmp_path / "nope.pth")
    # an entry point reports it as one line and exit code 1
    script = load_script("build_reference_stats")
    with pytest.raises(SystemExit) as exit_info:
        run_main(script.main, ["dataset=digits", f"out={tmp_path / 'x.npz'}", "device=cpu"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("error: Inception weights file weights-inception-2015-12-05-6726825d.pth")
        and err.count("\n") == 1
        and URL_INCEPTION_V3 in err
    )


def test_weights_are_found_in_the_torch_hub_cache_and_an_unreadable_file_is_refused(
    tmp_path, monkeypatch, inception_weights
):
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / inception_weights.name).symlink_to(inception_weights)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert inception.load_inception(None).weights_path == str(checkpoints / inception_weights.name)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(inception.InceptionWeightsError, match="broken.pth is not torch-fidelity's Inception-v3"):
        inception.load_inception(broken)
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, broken)  # a state dict, but not this network's
    with pytest.raises(inception.InceptionWeightsError, match="not torch-fidelity's Inception-v3 state dict"):
        inception.load_inception(broken)


class _RunsAShellCommand:
    """Pickles to os.system(command): what a hostile weights file holds."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_weights_file_whose_pickle_runs_code_is_refused_before_it_runs(tmp_path, inception_weights, capsys):
    """torch-fidelity unpickles its weights file without the weights-only restriction; given as inception_weights= (or
    through the hub cache, fid_reference or build_reference_stats weights=) such a file ran its code."""
    from runtime import run_main

    marker = tmp_path / "code_ran"
    hostile = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    state = torch.load(inception_weights, weights_only=True)
    torch.save({**state, "payload": _RunsAShellCommand(f"touch {marker}")}, hostile)
    with pytest.raises(inception.InceptionWeightsError, match=r"never unpickled with code: .*posix\.system"):
        inception.load_inception(hostile)
    assert not marker.exists()
    script = load_script("build_reference_stats")
    with pytest.raises(SystemExit) as exit_info:
        run_main(script.main, ["dataset=digits", f"out={tmp_path / 'x.npz'}", "device=cpu", f"weights={hostile}"])
    assert exit_info.value.code == 1 and not marker.exists()
    err = capsys.readouterr().err
    assert err.startswith(f"error: Inception weights file {hostile}") and err.count("\n") == 1, err
    # a file that is no pickle at all says so, in one line too
    hostile.write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(inception.InceptionWeightsError, match="not a tensor file"):
        inception.load_inception(hostile)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["dataset=digits"], "out = None: is required"),
        (["out=x.npz"], "give either dataset=NAME"),
        (["dataset=digits", "images=d", "out=x.npz"], "give either dataset=NAME"),
        (["dataset=digits", "out=x.npz", "--limit", "3"], "argument '--limit' is not key=value"),
        (["dataset=digits", "out=x.npz", "limit=1"], "limit = 1: must be null or >= 2"),
        (["dataset=moons", "out=x.npz"], "dataset='moons' holds no 8-bit images"),
        (["dataset=digits", "dataset.splits=test", "out=x.npz"], "dataset='digits': .*splits"),
    ],
)
def test_build_reference_stats_rejects_bad_arguments_naming_the_key(
    argv, message, tmp_path, monkeypatch, inception_weights
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_script("build_reference_stats").main([*argv, f"weights={inception_weights}", "device=cpu"])
    assert not (tmp_path / "x.npz").exists()
