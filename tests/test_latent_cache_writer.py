"""latent_cache_writer: building shards split across ranks, converting them into the cache (deleting the
shards), damaged shards found, moved aside and rebuilt, and synthetic caches written by the same writer,
each read back by the real reader and preflight. Resume after an interruption is exercised by the
`cache` fixture of test_latent_cache.py."""

import numpy as np
import pytest

import latent_cache
import latent_cache_writer
from conftest import QUIET, load_script, preflight

build = load_script("build_latent_cache")


def test_ranks_split_shards_and_no_twin_cache(pngs_and_vae, tmp_path):
    root, codec = pngs_and_vae
    out = tmp_path / "cache"
    common = dict(image_size=32, shard_size=2, dtype="float32", **QUIET)
    assert latent_cache_writer.build_shards(root / "images", out, codec, rank=1, world=2, **common)["written"] == [1]
    assert sorted(p.name for p in (out / "shards").glob("*.npz")) == ["shard_00001.npz"]  # (+ its .sha256 record)
    with pytest.raises(latent_cache.LatentCacheError, match="shard_size: cache has 2, this run 3"):
        latent_cache_writer.build_shards(root / "images", out, codec, rank=0, world=2, **{**common, "shard_size": 3})
    assert latent_cache_writer.build_shards(root / "images", out, codec, rank=0, world=2, **common)["written"] == [0, 2]
    assert build.main(["convert", f"out={out}", "delete_shards=true"]) == 0
    assert not list((out / "shards").iterdir())
    data = latent_cache.LatentCacheDataset(out)
    assert data.latents.dtype == np.float32 and not data.flip and data.y.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(
        latent_cache.LatentCacheError, match="flip=true needs latents_flip.npy, but this cache has flip policy 'none'"
    ):
        latent_cache.LatentCacheDataset(out, flip=True)


def test_synthetic_cache_uses_the_same_writer(tmp_path):
    manifest = latent_cache_writer.write_synthetic_cache(
        tmp_path / "train", 10, num_classes=7, latent_shape=(4, 2, 2), flip=True, chunk=4
    )
    assert manifest["count"] == 10 and manifest["vae_id"] == "synthetic"
    assert preflight(tmp_path / "train").returncode == 0
    data = latent_cache.load_latent_cache(path=str(tmp_path), vae="synthetic")
    assert data.sample_shape == (4, 2, 2) and data.num_classes == 7 and 0 <= int(data.y.min()) <= int(data.y.max()) < 7


def test_a_damaged_shard_is_found_moved_aside_and_rebuilt(pngs_and_vae, tmp_path, capsys):
    """A truncated shard counted as done on resume, and `convert` then failed with a BadZipFile traceback."""
    root, codec = pngs_and_vae
    out = tmp_path / "cache"
    common = dict(image_size=32, shard_size=2, dtype="float32", **QUIET)
    assert latent_cache_writer.build_shards(root / "images", out, codec, **common)["written"] == [0, 1, 2]
    shard = latent_cache_writer.shard_path(out, 1)
    shard.write_bytes(shard.read_bytes()[:64])
    preflight = load_script("preflight_latent_cache")
    assert preflight.main([f"cache={out}", "quick=true"]) == 1  # preflight reads the shards too, read-only
    assert "shard_00001.npz: 64 bytes" in capsys.readouterr().err and shard.is_file()
    with pytest.raises(latent_cache.LatentCacheError, match=r"1 of 3 shards are missing or damaged .*indices 1\)"):
        latent_cache_writer.convert_shards(out, log=lambda line: None)
    assert (shard.parent / "shard_00001.npz.corrupt").is_file() and not shard.exists()
    assert latent_cache_writer.build_shards(root / "images", out, codec, **common)["written"] == [1]
    assert latent_cache_writer.convert_shards(out)["count"] == 6
