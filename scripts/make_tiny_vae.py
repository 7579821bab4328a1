"""Save a tiny random-init diffusers AutoencoderKL (SD-VAE structure: 8x downsampling, 4 latent
channels, 67k parameters) with save_pretrained, for CPU smoke runs and tests.

    uv run python scripts/make_tiny_vae.py out=runs/tiny_vae [scaling_factor=0.18215 shift_factor=null
        latent_channels=4 seed=0]

Load it like any VAE: vae.SDVAE("runs/tiny_vae"), `vae=runs/tiny_vae` in build_latent_cache.py,
`dataset.vae=runs/tiny_vae`. It is not a useful codec (random weights).
"""

import sys
from dataclasses import asdict, dataclass

from cli import parse_keys
from config import check
from runtime import run_main
from smoke_data import save_tiny_vae


@dataclass
class TinyVAEConfig:
    out: str | None = None  # required: the directory to write (config.json + safetensors)
    scaling_factor: float = 0.18215  # recorded in the VAE config, as SD-VAE's
    shift_factor: float | None = None
    latent_channels: int = 4
    seed: int = 0  # the random initialisation


def main(argv: list[str] | None = None) -> int:
    cfg = parse_keys(sys.argv[1:] if argv is None else argv, TinyVAEConfig, __doc__)
    check(bool(cfg.out), "out", cfg.out, "is required: the directory to write, e.g. out=runs/tiny_vae")
    check(cfg.latent_channels >= 1, "latent_channels", cfg.latent_channels, "must be >= 1")
    options = asdict(cfg)
    path = save_tiny_vae(options.pop("out"), **options)
    print(f"saved a tiny AutoencoderKL to {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
