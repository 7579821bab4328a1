"""The ImageNet latent cache end to end: scripts/build_latent_cache.py (build, interrupted and
resumed; convert; its command line), scripts/preflight_latent_cache.py, and the reader
latent_cache.LatentCacheDataset, on a folder of PNGs written here and the tiny AutoencoderKL. The
writer's own tests (ranks, synthetic caches, damaged shards) are in test_latent_cache_writer.py."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import dataset_registry
import image_folder
import latent_cache
import latent_cache_writer
from config import ConfigError
from conftest import QUIET, ROOT, load_script, preflight

build = load_script("build_latent_cache")


class CountingVAE:
    """Wraps SDVAE and counts images encoded, to prove resume skips finished shards."""

    def __init__(self, codec):
        self.codec, self.encoded = codec, 0
        self.vae_id, self.scaling_factor, self.shift_factor = codec.vae_id, codec.scaling_factor, codec.shift_factor
        self.latent_shape = codec.latent_shape

    def encode(self, x):
        self.encoded += len(x)
        return self.codec.encode(x)


@pytest.fixture(scope="module")
def cache(pngs_and_vae):
    """Built with flip twin in shards of 2 (interrupted after 1 shard, then resumed) and converted."""
    root, codec = pngs_and_vae
    out = root / "cache" / "train"
    counting = CountingVAE(codec)
    common = dict(image_size=32, shard_size=2, flip=True, **QUIET)
    first = latent_cache_writer.build_shards(root / "images", out, counting, max_shards=1, **common)
    assert first == {"written": [0], "skipped": [], "num_shards": 3} and counting.encoded == 2 * 2
    with pytest.raises(latent_cache.LatentCacheError, match=r"2 of 3 shards are missing .*indices 1, 2"):
        latent_cache_writer.convert_shards(out)
    (out / "shards" / ".shard_00001.npz.tmp").write_bytes(b"half a shard")  # a killed writer's leftover
    second = latent_cache_writer.build_shards(root / "images", out, counting, **common)
    assert second == {"written": [1, 2], "skipped": [0], "num_shards": 3}
    assert counting.encoded == 6 * 2  # each image (and its mirror) encoded exactly once
    assert build.main(["convert", f"out={out}"]) == 0
    return out


def test_preflight_command_line(cache):
    command = [sys.executable, str(ROOT / "scripts" / "preflight_latent_cache.py"), f"cache={cache}"]
    result = subprocess.run([*command, "vae=org/tiny-vae"], capture_output=True, text=True)
    assert result.returncode == 0 and f"latent cache {cache}: OK" in result.stdout, result.stderr
    result = subprocess.run([*command, "vae=sd_vae_ft_ema", "quick=true"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("problem:") == 1 and "vae_id" in result.stderr
    result = subprocess.run([*command, "--scaling-factor", "0.2"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("error: argument '--scaling-factor' is not key=value")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["build", "out=x"], "images = None: is required"),
        (["build", "images=x", "out=x", "shard-size=3"], "unknown config key 'shard-size'.*shard_size"),
        (["build", "images=x", "out=x", "dtype=int8"], "dtype = 'int8' is not allowed; choose one of: float16"),
        (["build", "images=x", "out=x", "rank=2", "world=2"], r"rank = 2: must be in \[0, world = 2\)"),
        (["synthetic", "out=x"], "count = None: is required"),
        (
            ["--out", "x"],
            "command = '--out' is not allowed; the first argument is one of: build, convert, smoke, synthetic",
        ),
    ],
)
def test_build_command_line_rejects_bad_arguments(argv, message):
    with pytest.raises(ConfigError, match=message):
        build.main(argv)


def test_manifest_preflight_and_dataset(pngs_and_vae, cache):
    root, codec = pngs_and_vae
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["count"] == 6 and manifest["latent_shape"] == [4, 4, 4] and manifest["dtype"] == "float16"
    assert manifest["vae_id"] == "org/tiny-vae" and manifest["vae_scaling_factor"] == pytest.approx(0.18215)
    assert manifest["vae_shift_factor"] == 0.0 and manifest["flip"] == "twin" and manifest["image_size"] == 32
    assert manifest["split"] == "train" and manifest["crop"] == "adm_center_crop" and manifest["num_classes"] == 2
    assert manifest["class_names"] == ["cat", "dog"] and set(manifest["files"]) == {
        "latents.npy",
        "latents_flip.npy",
        "labels.npy",
    }
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in manifest["files"].values())
    result = preflight(cache, "vae=org/tiny-vae", "scaling_factor=0.18215")
    assert result.returncode == 0, result.stderr
    assert "count 6" in result.stdout and "org/tiny-vae" in result.stdout and "flip twin" in result.stdout

    # Through the registry, as train.py builds it: path/split, float32 on the device, the VAE binding exposed.
    data = dataset_registry.build_dataset(
        "latent_cache", "cpu", path=str(cache.parent), split="train", vae="org/tiny-vae", flip=True, verify=True
    )
    assert len(data) == 6 and data.sample_shape == (4, 4, 4) and data.num_classes == 2 and data.flip
    assert data.class_names == ("cat", "dog") and data.name == "latent_cache" and data.image_size == 32
    assert data.vae_id == "org/tiny-vae" and data.latent_scaling_factor == pytest.approx(0.18215)
    data.check_vae(codec)
    x, y = data.batch(torch.tensor([5, 0, 3, 0]))
    assert x.shape == (4, 4, 4, 4) and x.dtype == torch.float32 and y.tolist() == [1, 0, 1, 0]
    # Stored latents are the VAE's scaled posterior means of the ADM-cropped image (and its mirror).
    paths, _, _ = image_folder.list_image_folder(root / "images")
    image = torch.from_numpy(image_folder.load_image(root / "images" / paths[5], 32)).permute(2, 0, 1)[None]
    image = image.float() / 127.5 - 1
    torch.testing.assert_close(x[0], codec.encode(image)[0], atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(
        torch.from_numpy(data.latents_flip[5].astype(np.float32)), codec.encode(image.flip(-1))[0], atol=2e-3, rtol=1e-2
    )
    # Random flips come from the twin, one coin per sample, reproducibly from the generator only.
    indices = torch.arange(6).repeat(4)
    a, _ = data.batch(indices, torch.Generator().manual_seed(0))
    b, _ = data.batch(indices, torch.Generator().manual_seed(0))
    plain = torch.from_numpy(data.latents[:].astype(np.float32))[indices]
    twin = torch.from_numpy(data.latents_flip[:].astype(np.float32))[indices]
    from_twin = (a == twin).flatten(1).all(1)
    assert torch.equal(a, b) and torch.equal(torch.where(from_twin.view(-1, 1, 1, 1), twin, plain), a)
    assert 0 < from_twin.sum() < len(indices)
    assert torch.equal(data.batch(indices)[0], plain)  # no generator: nothing random
    no_flip = latent_cache.load_latent_cache(path=str(cache), split="train", vae="org/tiny-vae", flip=False)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert torch.equal(no_flip.batch(indices, generator)[0], plain) and torch.equal(generator.get_state(), state)
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        data.batch(torch.tensor([6]))
    # A split directory given directly must be the split asked for.
    with pytest.raises(
        latent_cache.LatentCacheError, match="split: this directory holds split 'train', the run asked for 'test'"
    ):
        latent_cache.load_latent_cache(path=str(cache), split="test", vae="org/tiny-vae")
    with pytest.raises(latent_cache.LatentCacheError, match="no manifest.json"):
        latent_cache.load_latent_cache(path=str(cache.parent), split="val", vae="org/tiny-vae")


def test_reader_unmaps_pages_and_picks_random_access_for_caches_larger_than_ram(tmp_path, monkeypatch):
    latent_cache_writer.write_synthetic_cache(tmp_path / "train", 2048, num_classes=3, latent_shape=(4, 8, 8))  # 1 MiB

    def rss_file_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))

    data = latent_cache.load_latent_cache(path=str(tmp_path), vae="synthetic", flip=False)
    assert not data.random_access and data.unmap_pages
    before = rss_file_kib()
    data.unmap_pages = False
    data.batch(torch.arange(2048))  # everything read stays mapped: RssFile grows by the file
    assert rss_file_kib() - before >= 900
    data.release_pages()
    assert rss_file_kib() - before < 200
    monkeypatch.setattr(latent_cache, "_available_memory_bytes", lambda: 1024)
    assert latent_cache.load_latent_cache(path=str(tmp_path), vae="synthetic", flip=False).random_access


def _resign(path, name):
    """Update manifest.json's bytes and sha256 for one file, so only the targeted problem remains."""
    from checkpoint import sha256_file

    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name].update(bytes=(path / name).stat().st_size, sha256=sha256_file(path / name))
    (path / "manifest.json").write_text(json.dumps(manifest))


def _damage(path, kind):
    if kind == "truncated":
        os.truncate(path / "latents.npy", (path / "latents.npy").stat().st_size - 64)
    elif kind == "truncated_resigned":  # sizes agree with the manifest, but the .npy header promises more data
        os.truncate(path / "latents_flip.npy", (path / "latents_flip.npy").stat().st_size - 64)
        _resign(path, "latents_flip.npy")
    elif kind == "flipped_byte":
        with open(path / "latents.npy", "r+b") as f:
            f.seek(-3, os.SEEK_END)
            byte = f.read(1)
            f.seek(-3, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0x40]))
    elif kind == "bad_label":
        labels = np.load(path / "labels.npy", mmap_mode="r+")
        labels[4] = 2  # num_classes == 2
        labels.flush()
        del labels
        _resign(path, "labels.npy")
    elif kind == "nan":
        latents = np.load(path / "latents.npy", mmap_mode="r+")
        latents[1, 0, 0, 0] = np.nan
        latents.flush()
        del latents
        _resign(path, "latents.npy")
    elif kind == "wrong_dtype":
        np.save(path / "labels.npy", np.load(path / "labels.npy").astype(np.float64))
        _resign(path, "labels.npy")


# (damage, the one problem line, does a plain (verify=false) dataset open also refuse it?)
CASES = [
    ("truncated", r"latents.npy: \d+ bytes, manifest.json says \d+ \(truncated", True),
    ("truncated_resigned", r"latents_flip.npy: not a readable .npy \(mmap length is greater", True),
    ("flipped_byte", "latents.npy: sha256 differs from manifest.json", False),
    ("bad_label", r"labels.npy: 1 labels outside \[0, 2\) .*first at index 4 = 2; min 0, max 2", True),
    ("nan", r"latents.npy: 1 samples contain NaN or inf \(first at index 1\)", False),
    ("wrong_dtype", r"labels.npy: dtype float64 \(manifest.json: int64\), allowed: int64", True),
]


@pytest.mark.parametrize("kind,message,plain_open_fails", CASES, ids=[c[0] for c in CASES])
def test_damaged_cache_fails_preflight_and_open(cache, tmp_path, kind, message, plain_open_fails):
    path = tmp_path / "train"
    shutil.copytree(cache, path)
    _damage(path, kind)
    result = preflight(path)
    assert result.returncode == 1 and result.stdout == ""
    problems = [line for line in result.stderr.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1, result.stderr
    assert re.search(message, problems[0]), problems[0]
    with pytest.raises(latent_cache.LatentCacheError, match=message):
        latent_cache.load_latent_cache(path=str(tmp_path), vae="org/tiny-vae", verify=True)
    if plain_open_fails:
        with pytest.raises(latent_cache.LatentCacheError, match=message):
            latent_cache.load_latent_cache(path=str(tmp_path), vae="org/tiny-vae")
    else:
        latent_cache.load_latent_cache(
            path=str(tmp_path), vae="org/tiny-vae"
        )  # the O(size) scans: verify=true or preflight


def test_wrong_vae_binding_and_missing_manifest(cache, tmp_path):
    result = preflight(cache, "vae=sd_vae_ft_mse", "scaling_factor=0.13025")
    assert result.returncode == 1
    assert "vae_id: cache was encoded with 'org/tiny-vae', the run expects 'stabilityai/sd-vae-ft-mse'" in result.stderr
    assert "vae_scaling_factor: cache has 0.18215" in result.stderr and "has 0.13025" in result.stderr
    with pytest.raises(latent_cache.LatentCacheError, match="vae_id: cache was encoded with 'org/tiny-vae'"):
        latent_cache.load_latent_cache(path=str(cache.parent), vae="sd_vae_ft_ema")
    shutil.copytree(cache, tmp_path / "c")
    (tmp_path / "c" / "manifest.json").unlink()
    result = preflight(tmp_path / "c")
    assert result.returncode == 1 and "no manifest.json (shards exist: run `convert`)" in result.stderr
