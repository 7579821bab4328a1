"""Sampling from a trained flow model.

`FlowSampler` turns (model, path, prediction) into a velocity field with classifier-free guidance, and
integrates it three ways, all in our convention (t = 0 noise, t = 1 data):

- `sample`: the probability-flow ODE, noise -> data, with any solver in `ode_solvers`;
- `sde_step` / `sample_sde`: Euler-Maruyama steps of an SDE with the same marginals (Flow-GRPO rollouts);
- `log_likelihood`: the ODE backwards, data -> noise, with the divergence of the velocity (bits/dim).

It is the one sampler used by training-time sample grids, this file's CLI, ImageNet eval and GRPO.
Models are called as model(x [B, ...], t [B], y [B] | None); callers put them in eval mode.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from flow import PREDICTIONS, AffinePath, expand_t
from ode_solvers import ODESolution, solve, time_grid

# Below this many dimensions the likelihood uses the exact divergence (one backward pass per dimension);
# above it, Hutchinson's estimator.
EXACT_DIVERGENCE_MAX_DIM = 16


def _per_sample_norm(v: Tensor) -> Tensor:
    """L2 norm over all but the batch dim, shaped to broadcast: [B, ...] -> [B, 1, ..., 1]."""
    return torch.linalg.vector_norm(v.flatten(1), dim=1).reshape(-1, *[1] * (v.dim() - 1))


def _divergence_exact(u: Tensor, x: Tensor) -> Tensor:
    """tr(du/dx) per sample. u [B, D] computed from x [B, ...] (samples independent) -> [B].

    Summing u[:, i] over the batch before differentiating gives every sample's d u_i / d x_i in one pass."""
    div = torch.zeros(u.shape[0], device=u.device, dtype=u.dtype)
    for i in range(u.shape[1]):
        (grad,) = torch.autograd.grad(u[:, i].sum(), x, retain_graph=True)
        div = div + grad.flatten(1)[:, i]
    return div


def _divergence_hutchinson(u: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    """Hutchinson's estimate tr(J) ~ mean_k v_k^T J v_k (FFJORD, Grathwohl et al. 2019, eq. 7), each
    v_k^T J from one vector-Jacobian product. u [B, D] from x [B, ...], probes [K, B, D] -> [B]."""
    total = torch.zeros(u.shape[0], device=u.device, dtype=u.dtype)
    for v in probes:
        (v_jacobian,) = torch.autograd.grad(u, x, grad_outputs=v, retain_graph=True)
        total = total + (v_jacobian.flatten(1) * v).sum(1)
    return total / probes.shape[0]


class FlowSampler:
    """A model that predicts `prediction` on `path`, seen as a velocity field.

    Class-conditional models (num_classes set) use label `num_classes` as the learned null label for CFG.
    """

    def __init__(self, model: nn.Module, path: AffinePath, prediction: str = "velocity", num_classes=None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {list(PREDICTIONS)}, got {prediction!r}")
        self.model = model
        self.path = path
        self.prediction = prediction
        self.num_classes = num_classes

    def _model_velocity(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """One forward pass, converted to velocity in float32 (or wider). x [B, ...], t [B] -> [B, ...]."""
        output = self.model(x, t, y)
        dtype = torch.promote_types(output.dtype, torch.float32)
        return self.path.to_velocity(output.to(dtype), x.to(dtype), t.to(dtype), self.prediction)

    def velocity(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        ep_cfg: bool = False,
    ) -> Tensor:
        """Guided velocity [B, ...] in float32 (or wider) at x [B, ...], t (0-dim or [B]), labels y [B].

        CFG (Ho & Salimans 2022) u = u_uncond + s (u_cond - u_uncond), applied only where
        t_lo <= t <= t_hi (guidance interval, Kynkaanniemi et al. 2024) and always in a single forward
        pass: the batch is [x; x[guided]] with labels [y; null], so an unguided call costs B rows, a
        fully guided one 2B. The interval is checked per sample; a narrowed interval costs one host sync.
        ep_cfg (EP-CFG, Zhang et al. 2024, arXiv 2412.09966) rescales each guided velocity to the L2 norm
        of its conditional velocity, which curbs the over-saturation of large scales.
        """
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device).to(torch.promote_types(x.dtype, torch.float32))
        t = t.expand(batch).contiguous()
        if guidance_scale == 1.0:
            return self._model_velocity(x, t, y)
        if y is None or self.num_classes is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs labels y and num_classes (the null label index); "
                f"got y={'None' if y is None else 'given'}, num_classes={self.num_classes}"
            )
        t_lo, t_hi = guidance_interval
        if not 0.0 <= t_lo <= t_hi <= 1.0:
            raise ValueError(
                f"guidance_interval must be (t_lo, t_hi), 0 <= t_lo <= t_hi <= 1; got {guidance_interval}"
            )
        if t_lo == 0.0 and t_hi == 1.0:
            guided = torch.arange(batch, device=x.device)  # every t in [0, 1]: no mask, no host sync
        else:
            guided = ((t >= t_lo) & (t <= t_hi)).nonzero().squeeze(1)
            if guided.numel() == 0:
                return self._model_velocity(x, t, y)
        null = torch.full_like(y[guided], self.num_classes)
        u = self._model_velocity(torch.cat([x, x[guided]]), torch.cat([t, t[guided]]), torch.cat([y, null]))
        u_cond, u_uncond = u[:batch], u[batch:]
        u_guided = u_uncond + guidance_scale * (u_cond[guided] - u_uncond)
        if ep_cfg:
            energy_ratio = _per_sample_norm(u_cond[guided]) / _per_sample_norm(u_guided).clamp_min(1e-12)
            u_guided = u_guided * energy_ratio
        return u_cond.index_copy(0, guided, u_guided)

    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        y: Tensor | None = None,
        solver: str = "heun",
        num_steps: int = 32,
        grid: str = "uniform",
        shift: float = 1.0,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        ep_cfg: bool = False,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        return_trajectory: bool = False,
    ) -> ODESolution:
        """Integrate the ODE from noise [B, ...] at t = 0 to samples at t = 1 (`ode_solvers.solve`).
        NFE in the result equals the number of model forward passes."""
        velocity_fn = partial(
            self.velocity,
            y=y,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            ep_cfg=ep_cfg,
        )
        return solve(
            velocity_fn,
            noise,
            solver,
            num_steps,
            grid,
            shift,
            rtol,
            atol,
            return_trajectory=return_trajectory,
        )

    def sde_step(
        self,
        x: Tensor,
        t: Tensor,
        t_next: Tensor,
        y: Tensor | None = None,
        noise_level: float = 0.7,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        ep_cfg: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """One Euler-Maruyama step from t to t_next > t (0-dim or [B]) of an SDE whose marginals are the
        ODE's. Returns (mean [B, ...], std [B, 1, ..., 1]): x_next ~ N(mean, std^2 I), a Gaussian policy
        for GRPO. Differentiable in the model's parameters when called with grad enabled.

        Any diffusion g(t) keeps the marginals p_t if the drift gains g^2/2 times the score (Fokker-Planck):
            dx = [u(x, t) + g(t)^2 / 2 * grad log p_t(x)] dt + g(t) dW.
        The score comes from the velocity: grad log p_t(x) = -eps_hat / sigma(t) (Tweedie), with eps_hat
        = E[eps | x_t] the velocity converted to a noise prediction (x - t u for CondOT). Flow-GRPO (Liu
        et al. 2025, arXiv 2505.05470, eqs. 8-9) writes this with s = 1 - t, noise at s = 1, integrating
        s downwards: sigma_s = a sqrt(s / (1 - s)) and drift v + sigma_s^2 / (2 s) (x + (1 - s) v).
        Substituting s = 1 - t, v = -u, ds = -dt gives the equation above with g(t) = a sqrt((1 - t) / t)
        = a sqrt(sigma / alpha); we use a sqrt(sigma(t) / alpha(t)) for every affine path.

        g is infinite at t = 0 (alpha = 0); like Flow-GRPO at its s = 1 endpoint, it is then evaluated at
        the next grid time. Nothing is evaluated at t_next, so the last step into t = 1 (sigma = 0) is
        finite; its std, g(t) sqrt(dt), vanishes as the grid is refined. The velocity -> noise conversion
        must be finite at t (true for every path in flow.py except polynomial n > 1 at t = 0).
        """
        u = self.velocity(x, t, y, guidance_scale, guidance_interval, ep_cfg)
        x = x.to(u.dtype)
        t, t_next = (torch.as_tensor(v, device=x.device).to(u.dtype).expand(x.shape[0]) for v in (t, t_next))
        scheduler = self.path.scheduler
        t_g = torch.where(t > 0, t, t_next)
        g_squared = noise_level**2 * scheduler.sigma(t_g) / scheduler.alpha(t_g)
        score = -self.path.convert(u, x, t, "velocity", "noise") / expand_t(scheduler.sigma(t), x)
        drift = u + 0.5 * expand_t(g_squared, x) * score
        dt = t_next - t
        return x + expand_t(dt, x) * drift, expand_t((g_squared * dt).sqrt(), x)

    @torch.no_grad()
    def sample_sde(
        self,
        noise: Tensor,
        y: Tensor | None = None,
        num_steps: int = 100,
        noise_level: float = 0.7,
        generator: torch.Generator | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        ep_cfg: bool = False,
        grid: str = "uniform",
        shift: float = 1.0,
    ) -> Tensor:
        """Samples [B, ...] from noise [B, ...] by `num_steps` `sde_step`s on `time_grid(num_steps, grid,
        shift)`; the injected noise comes from `generator` (on noise's device)."""
        dtype = torch.promote_types(noise.dtype, torch.float32)
        times = time_grid(num_steps, grid, shift, device=noise.device).to(dtype)
        x = noise.to(dtype)
        for t, t_next in zip(times[:-1], times[1:]):
            mean, std = self.sde_step(x, t, t_next, y, noise_level, guidance_scale, guidance_interval, ep_cfg)
            x = mean + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x

    @torch.no_grad()
    def log_likelihood(
        self,
        x1: Tensor,
        y: Tensor | None = None,
        num_steps: int = 64,
        solver: str = "rk4",
        exact_divergence: bool | None = None,
        hutchinson_samples: int = 1,
        generator: torch.Generator | None = None,
        guidance_scale: float = 1.0,
        rtol: float = 1e-5,
        atol: float = 1e-5,
    ) -> Tensor:
        """Negative log-likelihood of data x1 [B, ...] in bits per dimension [B], -log p_1(x1) / (D ln 2).

        Instantaneous change of variables (Chen et al. 2018, thm. 1; FFJORD, Grathwohl et al. 2019):
        log p_1(x1) = log N(x0; 0, I) - int_0^1 div u(x_t, t) dt, with x0 the ODE solution from x1 at
        t = 1 back to t = 0. The state [x, int_1^t div u] is integrated by `solver` ("dopri5" adapts with
        rtol/atol; others use num_steps uniform steps). The divergence is exact for D <=
        EXACT_DIVERGENCE_MAX_DIM (or exact_divergence=True), else Hutchinson's estimate with
        `hutchinson_samples` Rademacher probes drawn once from `generator` (on x1's device), so the ODE
        stays deterministic for adaptive solvers. For discrete data (images) add dequantisation yourself.
        """
        batch, dim = x1.shape[0], x1[0].numel()
        exact = dim <= EXACT_DIVERGENCE_MAX_DIM if exact_divergence is None else exact_divergence
        dtype = torch.promote_types(x1.dtype, torch.float32)
        probes = None
        if not exact:
            if hutchinson_samples < 1:
                raise ValueError(f"hutchinson_samples must be >= 1, got {hutchinson_samples}")
            bits = torch.randint(
                0, 2, (hutchinson_samples, batch, dim), generator=generator, device=x1.device
            )
            probes = (2 * bits - 1).to(dtype)

        def velocity_and_divergence(state: Tensor, t: Tensor) -> Tensor:
            with torch.enable_grad():
                x = state[:, :dim].reshape(x1.shape).detach().requires_grad_(True)
                u = self.velocity(x, t, y, guidance_scale).flatten(1)
                div = _divergence_exact(u, x) if exact else _divergence_hutchinson(u, x, probes)
            return torch.cat([u.detach(), div.detach()[:, None]], dim=1)

        state1 = torch.cat([x1.flatten(1).to(dtype), x1.new_zeros(batch, 1, dtype=dtype)], dim=1)
        state0 = solve(
            velocity_and_divergence, state1, solver, num_steps, rtol=rtol, atol=atol, t_start=1.0, t_end=0.0
        ).x
        x0, div_integral = state0[:, :dim], state0[:, dim]
        # div_integral = int_1^0 div u dt = -int_0^1 div u dt.
        log_p0 = -0.5 * (x0.square().sum(1) + dim * math.log(2 * math.pi))
        return -(log_p0 + div_integral) / (dim * math.log(2))


# --- generation, figures and the checkpoint -> samples CLI --------------------------------------


@torch.no_grad()
def generate(
    sampler: FlowSampler,
    solver_cfg,
    sample_shape: tuple[int, ...],
    num_samples: int,
    seed: int = 0,
    device="cpu",
    batch_size: int = 1024,
    labels: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Draw samples with the ODE solver settings in solver_cfg (method, num_steps, grid, shift,
    guidance_scale, guidance_interval, ep_cfg).

    Conditional models get num_samples split evenly over the classes (class-major order) unless
    `labels` is given; with fewer samples than classes (ImageNet), one each of evenly spaced classes. The noise is drawn on the CPU from `seed`, so the same seed gives the same
    samples on every device. Returns (samples [N, *sample_shape] float32, labels [N] or None).
    """
    if labels is None and sampler.num_classes is not None:
        if num_samples < sampler.num_classes:
            labels = torch.arange(num_samples) * sampler.num_classes // num_samples
        else:
            labels = torch.arange(sampler.num_classes).repeat_interleave(num_samples // sampler.num_classes)
    total = len(labels) if labels is not None else num_samples
    noise = torch.randn((total, *sample_shape), generator=torch.Generator().manual_seed(seed))
    chunks = []
    for start in range(0, total, batch_size):
        y = labels[start : start + batch_size].to(device) if labels is not None else None
        solution = sampler.sample(
            noise[start : start + batch_size].to(device),
            y,
            solver=solver_cfg.method,
            num_steps=solver_cfg.num_steps,
            grid=solver_cfg.grid,
            shift=solver_cfg.shift,
            guidance_scale=solver_cfg.guidance_scale,
            guidance_interval=tuple(solver_cfg.guidance_interval),
            ep_cfg=solver_cfg.ep_cfg,
            rtol=solver_cfg.rtol,
            atol=solver_cfg.atol,
        )
        chunks.append(solution.x.float().cpu())
    return torch.cat(chunks), labels


def to_uint8_images(samples: Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, H, W, C] uint8."""
    return ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def samples_figure(samples: Tensor, labels: Tensor | None, dataset_name: str, class_names=None, max_per_row: int = 10):
    """A matplotlib figure: a scatter plot for 2-D data, else a grid with one row per class
    (at most max_per_row images each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if samples.dim() == 2:
        points = samples
        if dataset_name == "moons":
            from datasets import moons_to_data_space

            points = moons_to_data_space(points)
        points = points.numpy()
        figure, axis = plt.subplots(figsize=(5, 4), dpi=100)
        if labels is None:
            axis.scatter(points[:, 0], points[:, 1], s=2, alpha=0.6)
        else:
            for k in labels.unique().tolist():
                chosen = (labels == k).numpy()
                axis.scatter(points[chosen, 0], points[chosen, 1], s=2, alpha=0.6, label=f"class {k}")
            axis.legend(markerscale=5, loc="upper right")
        axis.set_title(f"{dataset_name}: {len(points)} samples")
        axis.set_aspect("equal")
        figure.tight_layout()
        return figure
    images = to_uint8_images(samples)
    if labels is None:  # a square-ish grid
        per_row = min(max(int(math.sqrt(len(images))), 1), max_per_row)
        groups = [images[i : i + per_row] for i in range(0, min(len(images), per_row * per_row), per_row)]
        names = [None] * len(groups)
    else:  # one row per class
        classes = labels.unique().tolist()
        groups = [images[(labels == k).numpy()][:max_per_row] for k in classes]
        names = [class_names[k] if class_names and k < len(class_names) else str(k) for k in classes]
    per_row = max(len(group) for group in groups)
    figure, axes = plt.subplots(
        len(groups), 1, figsize=(per_row * 0.6 + 1.2, len(groups) * 0.6 + 0.3), dpi=100, squeeze=False
    )
    for axis, group, name in zip(axes[:, 0], groups, names):
        blank = np.zeros((per_row - len(group), *group.shape[1:]), dtype=np.uint8)
        strip = np.concatenate([*group, *blank], axis=1)
        axis.imshow(strip.squeeze(-1) if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255)
        axis.set_xticks([]), axis.set_yticks([])
        if name is not None:
            axis.set_ylabel(name, rotation=0, ha="right", va="center")
    figure.tight_layout(pad=0.2)
    return figure


def close_figure(figure) -> None:
    """pyplot keeps every figure alive until closed."""
    import matplotlib.pyplot as plt

    plt.close(figure)


def latent_vae_id(dataset_cfg) -> str | None:
    """The VAE a latent-space run's samples decode with (the dataset's `vae`, else the one its cache
    manifest records); None for pixel-space data."""
    from config import spec_kwargs

    name, kwargs = spec_kwargs(dataset_cfg)
    if name != "latent_cache":
        return None
    if kwargs.get("vae"):
        return kwargs["vae"]
    from datasets import latent_cache_dir, read_latent_manifest

    return read_latent_manifest(latent_cache_dir(kwargs["path"], kwargs.get("split", "train")))["vae_id"]


def latent_decoder(vae_id: str | None, device):
    """vae_id -> a function scaled latents [B, C, h, w] -> images [B, 3, 8h, 8w] in [-1, 1] (the frozen
    SD-VAE decoder, bf16 on CUDA); None -> None (pixel data needs no decoding)."""
    if vae_id is None:
        return None
    from vae import SDVAE

    device = torch.device(device)
    return SDVAE(vae_id, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).decode


def save_samples(samples: Tensor, labels: Tensor | None, out_dir, figure, latents: Tensor | None = None) -> None:
    """Write out_dir/samples.png and out_dir/samples.npz.

    samples.npz: `images` (uint8, N x H x W x C) for image data or `points` (float32, N x D,
    model space) for low-dimensional data, and `labels` (int64, N; -1 for unconditional); for a
    latent model also `latents` (float32, N x C x h x w, what the flow generated before decoding).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_dir / "samples.png")
    label_array = (
        labels.numpy().astype(np.int64) if labels is not None else np.full(len(samples), -1, np.int64)
    )
    if samples.dim() == 2:
        np.savez(out_dir / "samples.npz", points=samples.numpy().astype(np.float32), labels=label_array)
    else:
        extra = {} if latents is None else {"latents": latents.float().cpu().numpy()}
        np.savez(out_dir / "samples.npz", images=to_uint8_images(samples), labels=label_array, **extra)


def load_sampler(checkpoint_path, device, use_ema: bool = True):
    """Checkpoint (dir, run dir or RUN/checkpoints/latest) -> (FlowSampler, its training config)."""
    from checkpoint import load_checkpoint, load_weights
    from config import build_flow, build_model

    loaded = load_checkpoint(checkpoint_path, map_location="cpu", load_state=False)
    model = build_model(loaded.config.model)
    weights = loaded.ema if use_ema and loaded.ema is not None else loaded.model
    load_weights(model, weights, f"checkpoint {loaded.path}")
    model.to(device).eval()
    path, _, _ = build_flow(loaded.config.flow)
    sampler = FlowSampler(
        model, path, loaded.config.flow.prediction, num_classes=getattr(model, "num_classes", None)
    )
    return sampler, loaded


def score_samples(samples: Tensor, labels: Tensor | None, train_config, classifier_path, device, seed: int = 0) -> dict:
    """The trainer's image metrics for samples of a checkpoint: classifier accuracy, classifier-FD to
    the held-out split and its real-vs-real floor at the same N, JPEG/PNG bpp."""
    import metrics
    from config import spec_kwargs
    from datasets import build_dataset

    name, kwargs = spec_kwargs(train_config.dataset)
    classifier = metrics.load_classifier(classifier_path, device, expected_dataset=name,
                                         expected_shape=tuple(samples.shape[1:]))
    reference = metrics.reference_statistics(classifier, build_dataset(name, device, **{**kwargs, "split": "test"}))
    train_split = build_dataset(name, device, **{**kwargs, "split": "train"})
    scores = metrics.image_sample_metrics(samples.to(device), labels, classifier, reference)
    scores["classifier_fd_real_floor"] = metrics.real_fd_floor(classifier, train_split, reference, len(samples), seed)
    return scores


def main(argv: list[str] | None = None) -> int:
    """python inference.py checkpoint=RUN/checkpoints/latest out=samples/ [n_per_class=8 guidance_scale=3
    solver=heun num_steps=32 seed=0 ...]: samples.png + samples.npz from nothing but the checkpoint."""
    import sys

    from omegaconf import OmegaConf

    from config import ConfigError, InferenceConfig, apply_schema, compose, validate_solver
    from train import select_device

    cfg = apply_schema(
        compose(sys.argv[1:] if argv is None else argv, config_name="inference"), InferenceConfig
    )
    if not cfg.checkpoint:
        raise ConfigError(
            "checkpoint is required: checkpoint=RUN_DIR/checkpoints/latest (or a run dir or a step_* dir)"
        )
    device = select_device(cfg.device)
    sampler, loaded = load_sampler(cfg.checkpoint, device, use_ema=cfg.use_ema)
    solver = OmegaConf.merge(
        loaded.config.solver,
        {
            k: v
            for k, v in {
                "method": cfg.solver,
                "num_steps": cfg.num_steps,
                "grid": cfg.grid,
                "shift": cfg.shift,
                "guidance_scale": cfg.guidance_scale,
                "guidance_interval": cfg.guidance_interval,
                "ep_cfg": cfg.ep_cfg,
            }.items()
            if v is not None
        },
    )
    validate_solver(solver, "solver")
    shape = tuple(loaded.meta["sample_shape"])
    num = cfg.num_samples if sampler.num_classes is None else cfg.n_per_class * sampler.num_classes
    samples, labels = generate(
        sampler, solver, shape, num, seed=cfg.seed, device=device, batch_size=cfg.batch_size
    )
    dataset_name = loaded.config.dataset.name
    decode, latents = latent_decoder(latent_vae_id(loaded.config.dataset), device), None
    if decode is not None:
        latents, samples = samples, decode(samples).cpu()
    figure = samples_figure(samples, labels, dataset_name)
    save_samples(samples, labels, cfg.out, figure, latents=latents)
    close_figure(figure)
    if cfg.classifier:
        scores = score_samples(samples, labels, loaded.config, cfg.classifier, device, seed=cfg.seed)
        (Path(cfg.out) / "metrics.json").write_text(json.dumps(scores, indent=2))
        print(" ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    print(
        f"{len(samples)} samples from {loaded.path} (step {loaded.step}, solver {solver.method} x{solver.num_steps}, "
        f"guidance {solver.guidance_scale}) -> {Path(cfg.out) / 'samples.png'}, {Path(cfg.out) / 'samples.npz'}"
    )
    return 0


if __name__ == "__main__":
    import sys

    from checkpoint import CheckpointError
    from config import ConfigError

    try:
        sys.exit(main())
    except (ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
