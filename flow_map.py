"""Flow maps (the MeanFlow family): a network that jumps from time t to time r in one evaluation.

Convention (flow.py): t = 0 is noise, t = 1 is data, x_t = alpha(t) x1 + sigma(t) eps, and the marginal
velocity v(z, t) = dz/dt points towards the data. A flow map model u(z, r, t) (models called as
``model(z, t, y, r=r)``, z at time t) is the *average velocity* over [t, r],

    u(z_t, r, t) = 1 / (r - t) * int_t^r v(z_s, s) ds,        so    z_r = z_t + (r - t) u(z_t, r, t),

and u(z, t, t) = v(z, t) (``model(z, t, y)``, r = None, is the instantaneous velocity, so every ODE
solver and the likelihood still work). Sampling runs noise -> data, so r > t here; MeanFlow (Geng et al.
2025, arXiv 2505.13447) has data at 0 and writes r < t, with the same formulas below.

The MeanFlow identity. Write (r - t) u(z_t, r, t) = int_t^r v(z_s, s) ds along one ODE path and
differentiate in t at fixed r (dz_t/dt = v(z_t, t)):

    -u + (r - t) du/dt = -v(z_t, t)      =>      u = v + (r - t) du/dt,
    du/dt = v . d_z u + d_t u                  (the total derivative along the path, r fixed),

i.e. one Jacobian-vector product of u with the tangent (dz, dt, dr) = (v, 1, 0). The paper's
u = v - (t - r) du/dt is the same equation ((t - r) = -(r - t)); since r > t here, (r - t) >= 0 and
the du/dt term *adds*. The training target is u_tgt = v_c + (r - t) sg(du/dt), with v_c the conditional
velocity d_alpha x1 + d_sigma eps (flow.AffinePath.target_velocity) standing in for v, as in
flow matching; sg = stop-gradient, so the loss ||u_theta(z_t, r, t) - u_tgt||^2 costs one JVP (on the
rows with r != t) and one backward. Its minimiser is the true average velocity (MeanFlow, sec. 4.1).

Options: the JVP tangent may be the network's own instantaneous velocity u_theta(z_t, t, t) instead
of v_c (``tangent=model``, the tangent of improved MeanFlow, arXiv 2512.02012); du/dt may be a central
finite difference (``derivative=finite_difference``, error O(h^2) for a step h, for networks forward-mode
AD does not run through), or the target may avoid derivatives altogether by interval splitting
(``derivative=split``, `split_target`); CFG can be folded into the target at a fixed scale w (MeanFlow eq. 19 with
kappa = 0): v_c -> w v_c + (1 - w) u_theta(z_t, t, t | null) for samples that kept their label (and whose t
lies in ``guidance_interval``: the flow map then learns the sampler that guides on that interval only), or, with
guidance as a model condition (``guidance_condition``, improved MeanFlow), at a scale w drawn per sample
from a range and given to the model (``model(z, t, y, r=r, w=w)``, models.GuidanceEmbedding), so the
sampler picks w in one forward per step (null-label rows and the unconditional branch run at w = 1); the
adaptive weighting w = 1 / (||err||^2 + c)^p (stop-gradient) of the paper; and a curriculum that
widens the largest gap r - t over the first steps of a run (for conversion from a velocity model).

The JVP runs on the plain module in eager mode with PyTorch's math attention (the flash / memory-
efficient kernels have no forward-mode AD), outside autograd's graph; the loss's forward goes through
the trainer's wrapped module (DDP, torch.compile), so gradients are synchronised as in any other step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flow import AffinePath, TimeSampler, expand_t

OBJECTIVES = ("flow_matching", "meanflow")
TANGENTS = ("conditional", "model")  # the JVP's z-tangent: v_c, or the network's u(z, t, t)
DERIVATIVES = ("jvp", "finite_difference", "split")  # split: interval splitting, no derivative


def math_attention():
    """A context in which F.scaled_dot_product_attention uses its math (composite) kernel, the one that
    supports forward-mode AD; the fused kernels stay in use everywhere else."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def total_derivative(model_fn, z: Tensor, t: Tensor, r: Tensor, dz: Tensor) -> tuple[Tensor, Tensor]:
    """(u, du/dt) with du/dt = dz . d_z u + d_t u, by one forward-mode JVP (torch.func.jvp).

    model_fn(z [B, ...], t [B], r [B]) -> u [B, ...]; dz [B, ...] is the path's dz/dt. The tangent is
    (dz, dt = 1, dr = 0): r is held fixed, the state moves along the path."""
    with math_attention():
        return torch.func.jvp(model_fn, (z, t, r), (dz, torch.ones_like(t), torch.zeros_like(r)))


def finite_difference_derivative(model_fn, z: Tensor, t: Tensor, r: Tensor, dz: Tensor, step: float) -> Tensor:
    """du/dt by a central difference along (dz, 1, 0): [u(z + h dz, r, t + h) - u(z - h dz, r, t - h)] / 2h.
    Truncation error (h^2 / 6) d^3u/dt^3; float32 rounding adds about eps_32 |u| / h."""
    hb = expand_t(torch.full_like(t, step), z)
    ahead = model_fn(z + hb * dz, t + step, r)
    behind = model_fn(z - hb * dz, t - step, r)
    return (ahead - behind) / (2 * step)


def split_target(model_fn, z: Tensor, v: Tensor, t: Tensor, r: Tensor) -> Tensor:
    """The JVP-free target of interval splitting (SplitMeanFlow, arXiv 2507.16884), split at the midpoint
    s = (t + r) / 2: a flow map composes, z_s = z_t + (s - t) u(z_t, s, t), and

        (r - t) u(z_t, r, t) = (s - t) u(z_t, s, t) + (r - s) u(z_s, r, s),

    so the target is the mean of the two half-interval average velocities (exact for the true u, no
    derivative); rows with r = t get v (the boundary condition u(z, t, t) = v). Two forwards, no JVP."""
    s = (t + r) / 2
    first = model_fn(z, t, s)
    second = model_fn(z + expand_t(s - t, z) * first.to(z.dtype), s, r)
    return torch.where(expand_t(r > t, v), (first + second) / 2, v)


@dataclass(frozen=True)
class IntervalSampler:
    """(t, r) for a batch: t from the run's time sampler; with probability 1 - equal_fraction a second
    draw t' gives the interval (min(t, t'), max(t, t')), otherwise r = t (plain flow matching on those
    samples: u(z, t, t) = v). MeanFlow trains 75 % of samples at r = t (its best ratio, Table 1a).
    Two draws of uniform times give gaps of density 2 (1 - gap), none near the whole interval that a
    one-jump sampler uses; endpoint_fraction moves that share of the r != t samples to (0, 1) exactly.
    max_gap caps r - t (the conversion curriculum); every draw comes from the micro-batch's generator."""

    time_sampler: TimeSampler
    equal_fraction: float = 0.75
    endpoint_fraction: float = 0.0

    def __call__(self, t: Tensor, generator: torch.Generator, max_gap: float = 1.0) -> tuple[Tensor, Tensor]:
        other = self.time_sampler(t.shape[0], generator, t.device).to(t.dtype)
        equal = torch.rand(t.shape, generator=generator, device=generator.device).to(t.device) < self.equal_fraction
        low, high = torch.minimum(t, other), torch.maximum(t, other)
        if self.endpoint_fraction > 0:  # drawn only when asked, so runs without it keep their random stream
            whole = torch.rand(t.shape, generator=generator, device=generator.device).to(t.device)
            whole = whole < self.endpoint_fraction
            low, high = torch.where(whole, 0.0, low), torch.where(whole, 1.0, high)
        start = torch.where(equal, t, low)
        end = torch.where(equal, t, torch.minimum(high, low + max_gap))
        return start, end


def curriculum_gap(step: int, steps: int, start: float) -> float:
    """The largest r - t at optimizer step `step`: start, widened linearly to 1 over `steps` steps
    (instantaneous -> short -> long gaps); 1 (no cap) when steps = 0."""
    if steps <= 0:
        return 1.0
    return min(1.0, start + (1.0 - start) * step / steps)


@dataclass
class MeanFlowObjective:
    """The MeanFlow loss on a micro-batch (module docstring). weight_p = 0 is the plain squared error."""

    path: AffinePath
    intervals: IntervalSampler
    weight_p: float = 1.0
    weight_c: float = 1e-3
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # closed [t_lo, t_hi] in which CFG is folded in
    tangent: str = "conditional"
    derivative: str = "jvp"
    fd_step: float = 1e-3
    curriculum_steps: int = 0
    curriculum_start: float = 0.0
    guidance_range: tuple[float, float] | None = None  # guidance as a model condition: w ~ U[lo, hi] per sample

    def draw(self, t: Tensor, generator: torch.Generator, step: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(t, r, w) for a micro-batch whose flow-matching times are t [B]; w [B] is the per-sample guidance
        scale (guidance_range; drawn after (t, r), so runs without it keep their stream), else None."""
        t, r = self.intervals(t, generator, curriculum_gap(step, self.curriculum_steps, self.curriculum_start))
        if self.guidance_range is None:
            return t, r, None
        lo, hi = self.guidance_range
        u = torch.rand(t.shape, generator=generator, device=generator.device).to(t.device, t.dtype)
        return t, r, lo + (hi - lo) * u

    def target(self, model, x_t: Tensor, v: Tensor, t: Tensor, r: Tensor, y, null_label, w=None) -> Tensor:
        """u_tgt = v_g + (r - t) du/dt [B, ...] in float32 (or wider), with no autograd graph. v_g is v with
        CFG folded in (samples whose label is not the null label and whose t is in guidance_interval) at the
        fixed guidance_scale, or at the per-sample w [B] (guidance as a model condition: every pass of u then
        gets w too), the tangent v_g or the network's own u(z_t, t, t)."""
        dtype = v.dtype
        with torch.no_grad():
            if w is not None or self.guidance_scale != 1.0:
                scale = self.guidance_scale if w is None else expand_t(w.to(dtype), v)
                null = torch.full_like(y, null_label)
                u_uncond = model(x_t, t, null, r=t).to(dtype)  # w = None: the unguided branch, at w = 1
                t_lo, t_hi = self.guidance_interval  # the sampler's guidance interval, folded in
                guided = expand_t((y != null_label) & (t >= t_lo) & (t <= t_hi), v)
                v = torch.where(guided, scale * v + (1 - scale) * u_uncond, v)
            # Rows with r = t have the target v whatever du/dt is (its factor r - t is 0), so the tangent, the
            # JVP and the split run on the rows with r != t alone: with MeanFlow's 75 % at r = t, a quarter of
            # the batch (every model here treats rows independently, except expert-choice MoE routing, which
            # then routes the sub-batch).
            moving = (r != t).nonzero().squeeze(1)
            if moving.numel() == 0:
                return v
            x_m, t_m, r_m, v_m = x_t[moving], t[moving], r[moving], v[moving]
            y_m = None if y is None else y[moving]
            condition_m = {} if w is None else {"w": w[moving]}

            def u_m(z, tt, rr):
                return model(z, tt, y_m, r=rr, **condition_m).to(dtype)

            if self.derivative == "split":
                target_m = split_target(u_m, x_m, v_m, t_m, r_m)
            else:
                dz = u_m(x_m, t_m, t_m) if self.tangent == "model" else v_m
                if self.derivative == "jvp":
                    _, dudt = total_derivative(u_m, x_m, t_m, r_m, dz.to(x_t.dtype))
                else:
                    dudt = finite_difference_derivative(u_m, x_m, t_m, r_m, dz.to(x_t.dtype), self.fd_step)
                target_m = v_m + expand_t(r_m - t_m, v_m) * dudt.to(dtype)
            return v.index_copy(0, moving, target_m)

    def loss(self, model, forward_model, x1, eps, t, r, y=None, null_label=None, autocast=None, w=None):
        """(loss [], per_sample [B]) of forward_model(z_t, t, y, r=r) against the stop-gradient target.

        model: the plain module (JVP, no-grad passes); forward_model: the same weights as trained (DDP,
        compiled), whose output carries the gradient. autocast: a context factory for the forwards.
        w [B]: per-sample guidance scales from `draw` (guidance as a model condition); null-label rows get
        w = 1, and the target and the trained forward both see the same w."""
        autocast = autocast or contextlib.nullcontext
        dtype = torch.promote_types(x1.dtype, torch.float32)
        x_t, v = self.path.sample(x1, eps, t)
        x_t = x_t.to(x1.dtype)
        condition = {}
        if w is not None:
            w = torch.where(y == null_label, torch.ones_like(w), w)  # a dropped label trains unguided
            condition = {"w": w}
        with autocast():
            target = self.target(model, x_t, v.to(dtype), t.to(dtype), r.to(dtype), y, null_label, w)
            output = forward_model(x_t, t, y, r=r, **condition)
        error = output.to(dtype) - target
        sq_norm = error.square().flatten(1).sum(1)
        per_sample = error.square().flatten(1).mean(1)
        if self.weight_p != 0:
            # adaptive weighting (MeanFlow sec. 4.3): sg(w) ||err||^2 with w = (||err||^2 + c)^-p, on the
            # per-element mean so that p = 0 is the flow-matching loss's scale
            per_sample = per_sample / (sq_norm.detach() + self.weight_c) ** self.weight_p
        return per_sample.mean(), per_sample


def check_settings(m, key: str = "flow.meanflow") -> list[tuple[bool, str, object, str]]:
    """(condition, key, value, requirement) for every MeanFlow setting; config.validate raises the first."""
    return [
        (0 <= m.equal_fraction <= 1, f"{key}.equal_fraction", m.equal_fraction, "must be in [0, 1]"),
        (0 <= m.endpoint_fraction <= 1, f"{key}.endpoint_fraction", m.endpoint_fraction, "must be in [0, 1]"),
        (m.weight_p >= 0, f"{key}.weight_p", m.weight_p, "must be >= 0 (0 = plain squared error)"),
        (m.weight_c > 0, f"{key}.weight_c", m.weight_c, "must be > 0"),
        (m.guidance_scale >= 1, f"{key}.guidance_scale", m.guidance_scale, "must be >= 1 (1 = no guidance)"),
        (
            len(m.guidance_interval) == 2 and 0 <= m.guidance_interval[0] <= m.guidance_interval[1] <= 1,
            f"{key}.guidance_interval",
            list(m.guidance_interval),
            "must be [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1",
        ),
        (m.tangent in TANGENTS, f"{key}.tangent", m.tangent, f"must be one of: {', '.join(TANGENTS)}"),
        (m.derivative in DERIVATIVES, f"{key}.derivative", m.derivative, f"must be one of: {', '.join(DERIVATIVES)}"),
        (0 < m.fd_step < 0.5 and math.isfinite(m.fd_step), f"{key}.fd_step", m.fd_step, "must be in (0, 0.5)"),
        (m.curriculum_steps >= 0, f"{key}.curriculum_steps", m.curriculum_steps, "must be >= 0 (0 = off)"),
        (0 <= m.curriculum_start <= 1, f"{key}.curriculum_start", m.curriculum_start, "must be in [0, 1]"),
        (
            len(m.guidance_range) == 2 and 1 <= m.guidance_range[0] <= m.guidance_range[1],
            f"{key}.guidance_range",
            list(m.guidance_range),
            "must be [lo, hi] with 1 <= lo <= hi (guidance scales; lo = hi: one fixed scale)",
        ),
        (
            not m.guidance_condition or m.guidance_scale == 1,
            f"{key}.guidance_scale",
            m.guidance_scale,
            f"must be 1 with {key}.guidance_condition=true (the scale is drawn from {key}.guidance_range)",
        ),
    ]
