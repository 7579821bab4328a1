"""Save a tiny random-init diffusers AutoencoderKL (SD-VAE structure: 8x downsampling, 4 latent
channels, 67k parameters) with save_pretrained, for CPU smoke runs and tests.

    uv run python scripts/make_tiny_vae.py out=runs/tiny_vae [scaling_factor=0.18215 shift_factor=null
        latent_channels=4 seed=0]

Load it like any VAE: vae.SDVAE("runs/tiny_vae"), `--vae runs/tiny_vae` in build_latent_cache.py,
`dataset.vae=runs/tiny_vae`. It is not a useful codec (random weights).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smoke_data import save_tiny_vae  # noqa: E402

KEYS = {"out": None, "scaling_factor": 0.18215, "shift_factor": None, "latent_channels": 4, "seed": 0}
CASTS = {"out": str, "scaling_factor": float, "shift_factor": float, "latent_channels": int, "seed": int}


def main(argv=None) -> int:
    options = dict(KEYS)
    for arg in sys.argv[1:] if argv is None else argv:
        key, _, value = arg.partition("=")
        if key not in KEYS or not value:
            print(f"error: expected key=value with key one of {', '.join(KEYS)}, got {arg!r}", file=sys.stderr)
            return 1
        options[key] = None if value in ("null", "None") else CASTS[key](value)
    if options["out"] is None:
        print("error: out=DIR is required", file=sys.stderr)
        return 1
    path = save_tiny_vae(options.pop("out"), **options)
    print(f"saved a tiny AutoencoderKL to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
