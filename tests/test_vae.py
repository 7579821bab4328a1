import importlib.util
import subprocess
import sys

import pytest
import torch

from config import ConfigError
from conftest import ROOT


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    """The tiny AutoencoderKL the smoke presets use, saved with save_pretrained."""
    from smoke_data import save_tiny_vae

    return save_tiny_vae(tmp_path_factory.mktemp("tiny_vae"))


def test_local_directory_encode_decode_and_scaling(tiny_vae_dir):
    import vae

    codec = vae.SDVAE(str(tiny_vae_dir), chunk_size=3)
    assert codec.vae_id == str(tiny_vae_dir) and codec.scaling_factor == pytest.approx(0.18215)
    assert codec.shift_factor == 0.0 and codec.latent_shape(32) == (4, 4, 4)
    assert not any(p.requires_grad for p in codec.model.parameters())
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = codec.encode(images)
    assert z.shape == (5, 4, 4, 4) and z.dtype == torch.float32
    with torch.no_grad():
        raw = codec.model.encode(images).latent_dist.mean
    torch.testing.assert_close(z, raw * 0.18215)  # chunked (3 + 2) == one pass, scaled
    out = codec.decode(z)
    assert out.shape == (5, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    with torch.no_grad():
        expected = codec.model.decode(raw).sample.clamp(-1, 1)
    torch.testing.assert_close(out, expected)
    # A sample with a generator: reproducible and different from the mean.
    a = codec.encode(images, generator=torch.Generator().manual_seed(3))
    b = codec.encode(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.allclose(a, z)


def test_shift_factor_read_from_config(tmp_path):
    import vae
    from smoke_data import save_tiny_vae

    save_tiny_vae(tmp_path, shift_factor=0.25)
    codec = vae.SDVAE(str(tmp_path), dtype="float32")
    assert codec.shift_factor == 0.25
    images = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        raw = codec.model.encode(images).latent_dist.mean
        torch.testing.assert_close(codec.encode(images), (raw - 0.25) * 0.18215)
        torch.testing.assert_close(codec.decode((raw - 0.25) * 0.18215), codec.model.decode(raw).sample.clamp(-1, 1))


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`:UserWarning")
def test_presets_and_offline_errors(tmp_path):
    import vae

    assert vae.resolve_vae_id("sd_vae_ft_ema") == "stabilityai/sd-vae-ft-ema"
    assert vae.resolve_vae_id("sd_vae_ft_mse") == "stabilityai/sd-vae-ft-mse"
    assert vae.resolve_vae_id("org/other") == "org/other"
    # local_files_only stands in for "offline" without waiting for network retries.
    with pytest.raises(vae.VAENotFoundError, match=r"(?s)'stabilityai/sd-vae-ft-ema'.*--local-dir DIR"):
        vae.SDVAE("sd_vae_ft_ema", local_files_only=True)
    with pytest.raises(vae.VAENotFoundError, match="does not exist"):
        vae.SDVAE(str(tmp_path / "missing" / "vae"))
    with pytest.raises(vae.VAENotFoundError, match="local directory"):
        vae.SDVAE(str(tmp_path))  # exists but holds no config.json
    with pytest.raises(ValueError, match="dtype='float64'"):
        vae.SDVAE(str(tmp_path), dtype="float64")


def test_local_copy_can_claim_a_hub_id_and_ids_compare(tiny_vae_dir, tmp_path, monkeypatch):
    import vae
    from smoke_data import tiny_autoencoder

    codec = vae.SDVAE(str(tiny_vae_dir), vae_id="sd_vae_ft_mse")
    assert codec.vae_id == "stabilityai/sd-vae-ft-mse"  # what a cache built with it records
    assert vae.same_vae("sd_vae_ft_ema", "stabilityai/sd-vae-ft-ema")
    assert not vae.same_vae("sd_vae_ft_ema", "sd_vae_ft_mse")
    monkeypatch.chdir(tiny_vae_dir.parent)
    assert vae.same_vae(f"./{tiny_vae_dir.name}", str(tiny_vae_dir))  # a local directory, spelled two ways
    assert not vae.same_vae(str(tiny_vae_dir), str(tmp_path))
    # The helper is seeded: same weights every call, and the caller's RNG is left alone.
    state = torch.random.get_rng_state()
    a, b = tiny_autoencoder(), tiny_autoencoder()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.config.latent_channels == 4 and 2 ** (len(a.config.block_out_channels) - 1) == 8


def test_make_tiny_vae_script(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_tiny_vae", ROOT / "scripts" / "make_tiny_vae.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "v"
    assert script.main([f"out={out}", "scaling_factor=0.5"]) == 0
    with pytest.raises(
        ConfigError, match="unknown config key 'scale'; allowed keys under '<root>': out, scaling_factor"
    ):
        script.main(["scale=2"])
    with pytest.raises(ConfigError, match="out = None: is required"):
        script.main(["seed=1"])
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0 and "latent_channels: int = 4" in capsys.readouterr().out
    assert (out / "config.json").is_file() and '"scaling_factor": 0.5' in (out / "config.json").read_text()


def test_diffusers_is_imported_lazily():
    code = "import sys, vae, datasets; assert 'diffusers' not in sys.modules, 'diffusers imported eagerly'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
