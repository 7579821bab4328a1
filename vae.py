"""SD-VAE (diffusers `AutoencoderKL`) as a frozen image <-> latent codec.

    vae = SDVAE("sd_vae_ft_ema")                   # preset, hub id, or a local directory
    z = vae.encode(images)                          # [B, 3, H, W] in [-1, 1] -> [B, 4, H/8, W/8]
    images = vae.decode(z)                          # -> [B, 3, H, W] in [-1, 1]

Latents are *scaled*: z = (mean - shift_factor) * scaling_factor, both read from the VAE's
config (shift_factor defaults to 0: SD-1/2 VAEs have none, SD3/FLUX VAEs do), which is diffusers'
convention, so a latent model sees roughly unit-variance inputs. diffusers is imported lazily:
the rest of the repo (and a training run from a latent cache) does not need it.
"""

import os
from pathlib import Path

import torch

VAE_PRESETS = {"sd_vae_ft_ema": "stabilityai/sd-vae-ft-ema", "sd_vae_ft_mse": "stabilityai/sd-vae-ft-mse"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class VAENotFoundError(FileNotFoundError):
    """A VAE that could not be loaded: not on disk and not reachable on the hub."""


def resolve_vae_id(name: str) -> str:
    """A preset name -> its hub id; a hub id or a path comes back unchanged."""
    return VAE_PRESETS.get(name, name)


def _looks_like_path(name: str) -> bool:
    # Hub ids are exactly "org/name"; anything else with a separator, or rooted, is meant as a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def same_vae(a: str, b: str) -> bool:
    """Do two VAE names mean the same VAE? Presets resolve to hub ids; local directories (existing,
    or written as paths) compare by resolved absolute path, so `./vae` and `/abs/vae` agree."""
    a, b = resolve_vae_id(a), resolve_vae_id(b)
    if a == b:
        return True
    as_path = [
        Path(n).expanduser().resolve() if Path(n).expanduser().is_dir() or _looks_like_path(n) else None for n in (a, b)
    ]
    return None not in as_path and as_path[0] == as_path[1]


def load_autoencoder(
    name: str,
    subfolder: str | None = None,
    local_files_only: bool = False,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
):
    """diffusers `AutoencoderKL.from_pretrained` on a preset, hub id or local directory, eval mode,
    gradients off. Any failure to find it becomes one `VAENotFoundError` saying what to do offline."""
    vae_id = resolve_vae_id(name)
    local = Path(vae_id).expanduser()
    if not local.is_dir() and _looks_like_path(vae_id):
        raise VAENotFoundError(
            f"vae: local directory {str(local)!r} does not exist (expected the output of "
            f"`AutoencoderKL.save_pretrained` or `hf download <hub id> --local-dir DIR`)"
        )
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError(
            "vae.py needs diffusers: `uv sync` (it is a project dependency) or `pip install diffusers`"
        ) from e
    source = str(local) if local.is_dir() else vae_id
    try:
        # low_cpu_mem_usage=False: the accelerate path is optional and only warns when absent.
        model = AutoencoderKL.from_pretrained(
            source,
            subfolder=subfolder,
            local_files_only=local_files_only,
            revision=revision,
            low_cpu_mem_usage=False,
            torch_dtype=dtype,
        )
    except (OSError, ValueError) as e:  # diffusers reports missing files/repos as OSError
        where = f"subfolder {subfolder!r} of " if subfolder else ""
        if local.is_dir():
            raise VAENotFoundError(
                f"vae: could not load an AutoencoderKL from {where}local directory {source!r}: {e}"
            ) from e
        raise VAENotFoundError(
            f"vae: could not load {where}hub id {vae_id!r} ({type(e).__name__}: {str(e).splitlines()[0]}).\n"
            f"  Offline? On a machine with internet run `hf download {vae_id} --local-dir DIR` (or "
            f"`AutoencoderKL.from_pretrained({vae_id!r}).save_pretrained(DIR)`), copy DIR here and pass its path "
            f"instead of the id; a populated HF_HOME cache also works with HF_HUB_OFFLINE=1."
        ) from e
    model.requires_grad_(False)
    return model.eval()


class SDVAE:
    """A frozen AutoencoderKL: batched encode/decode in `dtype` on `device`, no gradients.

    name: preset (`VAE_PRESETS`), hub id or local directory to load from.
    vae_id: the identity a latent cache records and is checked against; default `name` resolved.
    Give it when loading a local copy of a hub VAE (offline): name=/models/sd-vae-ft-ema,
    vae_id=sd_vae_ft_ema. chunk_size: images per forward pass (bounds activation memory; the 256px
    SD-VAE decoder needs ~2 GB per 16 images in fp16). Outputs are float32 on `device`.
    """

    def __init__(
        self,
        name: str = "sd_vae_ft_ema",
        device="cpu",
        dtype: torch.dtype | str = torch.float32,
        chunk_size: int = 32,
        vae_id: str | None = None,
        subfolder: str | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
    ):
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"vae: dtype={dtype!r} is not one of {sorted(DTYPES)}")
            dtype = DTYPES[dtype]
        if chunk_size < 1:
            raise ValueError(f"vae: chunk_size={chunk_size} must be >= 1")
        # A local directory is recorded by absolute path, so a cache built from `./vae` matches a run in another cwd.
        local = Path(resolve_vae_id(name)).expanduser()
        self.vae_id = (
            resolve_vae_id(vae_id) if vae_id else str(local.resolve()) if local.is_dir() else resolve_vae_id(name)
        )
        self.device, self.dtype, self.chunk_size = torch.device(device), dtype, chunk_size
        self.model = load_autoencoder(name, subfolder, local_files_only, revision, dtype).to(self.device)
        config = self.model.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)  # 8 for every SD VAE

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return (self.latent_channels, image_size // self.downsample, image_size // self.downsample)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, H/8, W/8] float32.

        Without a generator the posterior *mean* is used (deterministic: the same image always gives
        the same latent); with one, a sample mean + std * eps drawn from it (on the VAE's device).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"vae.encode: images must be [B, 3, H, W], got {tuple(images.shape)}")
        out = []
        for chunk in images.split(self.chunk_size):
            dist = self.model.encode(chunk.to(self.device, self.dtype)).latent_dist
            raw = dist.mean if generator is None else dist.sample(generator=generator)
            out.append((raw.float() - self.shift_factor) * self.scaling_factor)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents [B, C, h, w] -> images [B, 3, 8h, 8w] float32 clamped to [-1, 1]."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"vae.decode: latents must be [B, {self.latent_channels}, h, w], got {tuple(latents.shape)}"
            )
        out = []
        for chunk in latents.split(self.chunk_size):
            raw = chunk.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
            out.append(self.model.decode(raw.to(self.dtype)).sample.float().clamp(-1, 1))
        return torch.cat(out)


# --- a tiny AutoencoderKL for tests and CPU smoke runs ------------------------------------------------


def latent_decoder(vae_id: str | None, device):
    """vae_id -> a function scaled latents [B, C, h, w] -> images [B, 3, 8h, 8w] in [-1, 1] (the frozen
    SD-VAE decoder, bf16 on CUDA); None -> None (pixel data needs no decoding)."""
    if vae_id is None:
        return None
    device = torch.device(device)
    return SDVAE(vae_id, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).decode
