"""The typed schemas of every command's config, and the checks that type a composed config against them.

config.py composes `configs/` with Hydra and validates what the values mean together; this file says
what keys exist, their types and defaults (a short comment each), and checks a value against a
constructor's annotations, so a typo or a wrong type fails with the key and what is allowed.
"""

import dataclasses
import functools
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A config value or key that cannot work; the message names the key and what is allowed."""


@dataclass
class MeanFlowConfig:
    """The flow-map objective's settings (flow_map.py), read with flow.objective = meanflow."""

    equal_fraction: float = 0.75  # fraction of samples trained at r = t (plain flow matching); MeanFlow's 75 %
    endpoint_fraction: float = 0.0  # of the r != t samples, the share at the whole interval (t, r) = (0, 1)
    weight_p: float = 1.0  # adaptive weight 1 / (||err||^2 + c)^p, stop-gradient; 0 = plain squared error
    weight_c: float = 1.0e-3
    guidance_scale: float = 1.0  # CFG folded into the target at this fixed scale (1 = none); sample at 1
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # [t_lo, t_hi] where it folds
    tangent: str = "conditional"  # JVP z-tangent: conditional (v = d_alpha x1 + d_sigma eps) | model (u(z, t, t))
    derivative: str = "jvp"  # jvp (torch.func.jvp) | finite_difference (central, step fd_step) | split (no derivative)
    fd_step: float = 1.0e-3
    curriculum_steps: int = 0  # widen the largest r - t from curriculum_start to 1 over this many steps; 0 = off
    curriculum_start: float = 0.0
    # Guidance as a model condition (improved MeanFlow, arXiv 2512.02012): each sample's CFG scale is drawn
    # from guidance_range, folded into its target and given to the model (model.guidance_conditioning), so
    # solver.guidance_scale picks it at sampling in one forward. Exclusive with guidance_scale != 1.
    guidance_condition: bool = False
    guidance_range: list[float] = field(default_factory=lambda: [1.0, 4.0])  # [lo, hi], w ~ uniform, lo >= 1


@dataclass
class FlowConfig:
    objective: str = "flow_matching"  # flow_matching (velocity loss) | meanflow (a flow map, flow_map.py)
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "condot"})
    prediction: str = "velocity"  # what the network outputs: velocity | data | noise
    denominator_min: float = 0.05  # clip on 1-t (data prediction) / t (noise prediction), as in JiT
    time_sampler: dict[str, Any] = field(default_factory=lambda: {"name": "uniform"})
    weighting: dict[str, Any] = field(default_factory=lambda: {"name": "uniform"})


@dataclass
class InitConfig:
    """Start a fresh run from another run's checkpoint, loading only the parts asked for (e.g. the
    unmasked fine-tune of a masked pretrain takes its EMA weights and nothing else). Resuming the
    run itself (training.resume) always wins over this."""

    checkpoint: str | None = None  # checkpoint dir, run dir or RUN/checkpoints/latest; null = random init
    model: str = "ema"  # what the trained weights start from: ema | model | none (keep the random init)
    ema: str = "ema"  # what the EMA starts from: ema | model | none (a copy of the model's start)
    optimizer: bool = False  # also the AdamW moments (needs the same parameters, in the same order)
    step: bool = False  # also the step counter, and with it the LR schedule position and data order


@dataclass
class CouplingConfig:
    """Which noise each training sample is paired with (couplings.py)."""

    name: str = "independent"  # independent | minibatch_ot (exact OT per micro-batch) | pairs (reflow)
    pairs: str | None = None  # pairs: a directory from scripts/generate_pairs.py; its rows are the training set
    within_class: bool = True  # minibatch_ot with a class-conditional model: pair only within a class


@dataclass
class RunConfig:
    """Run management, the same keys and meaning for train.py and train_grpo.py (validate_run)."""

    run_dir: str | None = None  # default runs/<experiment>_<timestamp>, chosen once on rank 0
    resume: str | None = None  # null | auto | PATH (checkpoint dir, run dir or RUN/checkpoints/latest)
    start_over: bool = False  # when no checkpoint of run_dir verifies: move that attempt to RUN/attempt_N/, start at 0
    max_steps: int | None = None  # caps optimizer steps (GRPO: iterations) without changing the schedule
    amp: str = "auto"  # auto (bf16 on CUDA, off elsewhere) | bf16 | none
    checkpoint_every: int = 1000  # steps; a final checkpoint is always written
    keep_last: int = 3  # complete checkpoints kept
    log_every: int = 100
    eval_every: int = 0  # sample figures / metrics besides the final ones; 0 = only at the end
    num_eval_samples: int = 512  # samples drawn for figures and metrics
    classifier: str | None = None  # safetensors from `scripts/train_classifier.py`: enables accuracy / classifier-FD
    max_nonfinite_steps: int = 10  # abort after this many consecutive skipped (non-finite) steps
    tensorboard: bool = True  # scalars, figures and (at each start) the resolved config as text and hparams
    wandb: str = "off"  # Weights & Biases through the same logger: off | offline (no network) | online
    wandb_project: str = "nanoflow"  # the W&B project (wandb != off)
    # rank 0: true a tqdm bar, false a line every 30 s, null a bar on a terminal and lines elsewhere
    progress: bool | None = None


@dataclass
class TrainingConfig(RunConfig):
    init: InitConfig = field(default_factory=InitConfig)  # selective start from another run (fresh runs only)
    coupling: CouplingConfig = field(default_factory=CouplingConfig)  # noise-data pairing (couplings.py)
    epochs: int = 100  # sets the LR-schedule horizon: epochs * steps_per_epoch optimizer steps
    batch_size: int = 128  # global batch (all ranks, all accumulation micro-steps)
    grad_accum: int = 1  # micro-steps per optimizer step on each rank
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # cosine | constant (both after linear warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    ema: bool = True
    ema_decay: float = 0.999
    ema_warmup: bool = True  # effective decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    p_uncond: float = 0.1  # label dropout to the null label, for classifier-free guidance
    compile: bool | None = None  # torch.compile the model; null = on for CUDA, off elsewhere
    channels_last: bool | None = None  # NHWC activations for image models; null = on for image data
    threads: int | None = None  # CPU intra-op threads; null = 1 for models under 0.2M parameters, else torch's
    fid_reference: str | None = None  # Inception reference statistics: log FID-<n>k at every evaluation
    fid_samples: int = 5000  # samples for that FID (FID-5k by default; biased upwards vs FID-50k: compare equal n)
    inception_weights: str | None = None  # torch-fidelity's Inception file; null = the torch hub cache


@dataclass
class SolverConfig:
    method: str = "heun"  # euler | midpoint | heun | rk4 | dopri5 | flow_map (jumps of a flow-map model)
    num_steps: int = 32
    grid: str = "uniform"  # uniform | shifted | edm
    shift: float = 1.0
    rtol: float = 1e-5
    atol: float = 1e-5
    guidance_scale: float = 1.0
    # CFG only where t_lo <= t <= t_hi, both ends included (t = 0 noise, t = 1 data)
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    ep_cfg: bool = False  # energy-preserving CFG


@dataclass
class Config:
    experiment: str = "custom"  # filled from the chosen experiment preset
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    dataset: dict[str, Any] = field(default_factory=lambda: {"name": "moons"})
    model: dict[str, Any] = field(default_factory=lambda: {"name": "mlp"})
    flow: FlowConfig = field(default_factory=FlowConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)


DEVICES = ("auto", "cpu", "cuda", "mps")
LR_SCHEDULES = ("cosine", "constant")
AMP_MODES = ("auto", "bf16", "none")
INIT_SOURCES = ("ema", "model", "none")  # training.init.model / .ema: which saved weights, or none


def apply_schema(cfg: DictConfig, schema=Config) -> DictConfig:
    """Merge into the typed schema: unknown keys and wrong types fail with the key named."""
    _check_known_keys(cfg, schema)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        _check_finite(OmegaConf.to_container(merged, resolve=True))
        return merged
    except ConfigKeyError as e:
        key = e.full_key or ""
        parent = key.rpartition(".")[0]
        allowed = _allowed_keys(schema, parent)
        raise ConfigError(
            f"unknown config key '{key}'; allowed keys under '{parent or '<root>'}': {', '.join(allowed)}"
        ) from None
    except ValidationError as e:
        raise ConfigError(f"config key '{e.full_key}' has a value of the wrong type: {e.msg.splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"config error at '{getattr(e, 'full_key', '?')}': {e}") from None


def _check_finite(node, prefix: str = "") -> None:
    """Every float in a config is finite: an inf learning rate, noise level or guidance scale trains NaN
    weights or skips every update, so it fails here with the key named."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_finite(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _check_finite(value, f"{prefix.rstrip('.')}[{index}].")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{prefix.rstrip('.')} = {node!r}: must be finite")


def _check_known_keys(cfg: DictConfig, schema, prefix: str = "") -> None:
    """Keys added with '+' slip past Hydra's struct check; catch them here."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if key not in fields:
            parent = prefix.rstrip(".")
            raise ConfigError(
                f"unknown config key '{full}'; allowed keys under '{parent or '<root>'}': {', '.join(fields)}"
            )
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and isinstance(cfg[key], DictConfig):
            _check_known_keys(cfg[key], type(default), f"{full}.")


def check_choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def check(condition: bool, key: str, value, requirement: str) -> None:
    if not condition:
        raise ConfigError(f"{key} = {value!r}: {requirement}")


def constructor_parameters(target) -> dict[str, inspect.Parameter]:
    """The keyword arguments a registry entry accepts, by name. A class taking **kwargs for its parent
    (ClassCondMLP(num_classes, **mlp_kwargs)) also accepts the parent's; a named size
    (functools.partial) accepts its constructor's, with the size's values as defaults."""
    fixed = {}
    if isinstance(target, functools.partial):
        fixed, target = target.keywords, target.func
    params = dict(inspect.signature(target).parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and inspect.isclass(target):
        for base in reversed(target.__mro__[1:]):
            if "__init__" in vars(base) and base is not object:
                params = {**inspect.signature(base.__init__).parameters, **params}
    params = {
        name: p
        for name, p in params.items()
        if name not in ("self", "device")
        and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }
    return {name: p.replace(default=fixed[name]) if name in fixed else p for name, p in params.items()}


def check_spec(key: str, spec, registry: dict, skip: tuple[str, ...] = ()) -> None:
    """A `{name: ..., **kwargs}` spec must name a registry entry and only pass its arguments."""
    if not isinstance(spec, (dict, DictConfig)) or "name" not in spec:
        raise ConfigError(f"{key} must be a mapping with a 'name' key; choose one of: {', '.join(registry)}")
    check_choice(f"{key}.name", spec["name"], registry)
    params = constructor_parameters(registry[spec["name"]])
    allowed = [p for p in params if p not in skip]
    for arg in spec:
        if arg != "name" and arg not in allowed:
            raise ConfigError(
                f"{key}.{arg} is not an argument of {key} '{spec['name']}'; allowed: {', '.join(allowed)}"
            )
    hints = _type_hints(registry[spec["name"]])
    for arg, value in spec.items():
        if arg != "name" and value is not None:
            _check_value(f"{key}.{arg}", to_plain(value), hints.get(arg, inspect.Parameter.empty), params[arg].default)


def _type_hints(target) -> dict:
    """Annotations of a registry entry's arguments (a class's whole __init__ chain, a function's own)."""
    target = target.func if isinstance(target, functools.partial) else target
    hints = {}
    for owner in reversed(target.__mro__) if inspect.isclass(target) else [target]:
        init = vars(owner).get("__init__") if inspect.isclass(owner) else owner
        if init is not None and owner is not object:
            try:
                hints.update(typing.get_type_hints(init))
            except (NameError, TypeError):
                pass
    return hints


def _describe(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _matches(value, annotation) -> bool:
    """Whether a plain config value fits an annotation (int, float, bool, str, None, unions, lists/tuples)."""
    if annotation is inspect.Parameter.empty or annotation is typing.Any:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True


def _check_value(key: str, value, annotation, default) -> None:
    """One constructor argument: its type, and the ranges every size and rate needs (ints >= 0, and
    >= 1 where the default is a positive int: a width, depth or count; floats finite)."""
    if not _matches(value, annotation):
        raise ConfigError(f"{key} = {value!r}: must be {_describe(annotation)}")
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, bool):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key} = {value!r}: must be finite")
        if isinstance(v, int):
            floor = 1 if isinstance(default, int) and not isinstance(default, bool) and default > 0 else 0
            if v < floor:
                raise ConfigError(f"{key} = {value!r}: must be >= {floor}")


@dataclass
class SolverOverrides:
    """Sampler settings that replace a checkpoint's own (SolverConfig) where set; null keeps the run's.
    GRPO nests them (`solver.num_steps=8`); inference.py takes them flat (`num_steps=8`)."""

    method: str | None = None
    num_steps: int | None = None
    grid: str | None = None
    shift: float | None = None
    guidance_scale: float | None = None
    guidance_interval: list[float] | None = None
    ep_cfg: bool | None = None


@dataclass
class InferenceConfig(SolverOverrides):
    """`python inference.py` keys; the solver keys (SolverOverrides) are flat here, and `solver` names
    the method (`solver=heun`, the documented spelling; `method=` is the same key)."""

    checkpoint: str | None = None  # required: checkpoint dir, run dir, or RUN_DIR/checkpoints/latest
    out: str = "samples"
    n_per_class: int = 8  # class-conditional models: samples of each class
    num_samples: int | None = None  # unconditional models only (default 64)
    seed: int = 0
    device: str = "auto"
    use_ema: bool = True
    batch_size: int | None = None  # images per forward; null = 1024 on CUDA / MPS, 128 on the CPU
    solver: str | None = None  # the ODE method (SolverOverrides.method)
    classifier: str | None = None  # score the samples (accuracy, classifier-FD + floor, bpp) -> metrics.json
    fid_reference: str | None = None  # Inception FID / IS / precision-recall against these statistics
    inception_weights: str | None = None  # torch-fidelity's Inception file; null = the torch hub cache
    likelihood: bool = False  # also bits/dim of the held-out split (pixel image models) -> metrics.json
    likelihood_images: int = 256  # held-out images scored
    likelihood_probes: int = 1  # Hutchinson probes per image
    likelihood_steps: int = 64  # rk4 steps of the likelihood ODE
    straightness: bool = False  # also the ODE paths' straightness (Liu et al. 2022 eq. 8; 0 = straight) -> metrics.json


@dataclass
class EvalConfig(SolverOverrides):
    """`eval_imagenet.py` keys (flat solver keys as in inference.py; null keeps the run's own)."""

    checkpoint: str | None = None  # required: checkpoint dir, run dir, or RUN_DIR/checkpoints/latest
    out: str | None = None  # required: the evaluation directory (shards, samples.npz, metrics.json)
    num_samples: int = 50000
    seed: int = 0  # sample i's label and noise come from (seed, i) alone
    chunk_size: int = 500  # samples per shard file: the unit of work, resume and rank assignment
    batch_size: int | None = None  # images per forward; null = 250 on CUDA, 50 on the CPU
    use_ema: bool = True
    device: str = "auto"
    solver: str | None = None  # the ODE method (SolverOverrides.method)
    reference: str | None = None  # reference statistics (.npz from scripts/build_reference_stats.py, or an ADM batch)
    inception_weights: str | None = None  # torch-fidelity's Inception file; null = the torch hub cache
    metrics: bool = True  # false: samples.npz only (score elsewhere)


@dataclass
class PairsConfig(SolverOverrides):
    """`scripts/generate_pairs.py` keys: a teacher's (noise, sample, label) triples for reflow. Flat solver
    keys as in inference.py; the defaults ask for an accurate solve (heun x64) rather than the run's own."""

    checkpoint: str | None = None  # required: the teacher (checkpoint dir, run dir or RUN/checkpoints/latest)
    out: str | None = None  # required: the pair directory (settings.json, chunks/, manifest.json)
    num_pairs: int = 100_000
    seed: int = 0  # pair i's noise comes from (seed, i) alone; its label is i mod num_classes
    chunk_size: int = 10_000  # pairs per chunk file: the unit of work, resume and rank assignment
    batch_size: int | None = None  # rows per forward; null = 1024 on CUDA / MPS, 128 on the CPU
    use_ema: bool = True
    device: str = "auto"
    solver: str | None = None  # the ODE method (SolverOverrides.method)
    method: str | None = "heun"
    num_steps: int | None = 64


@dataclass
class GuardConfig:
    """The fidelity guard (rl/guard.py): at each evaluation, accuracy >= min_accuracy and classifier-FD <=
    max_fd_ratio x the seed's, on the `samples` evaluation samples, scored by training.classifier."""

    enabled: bool = False
    min_accuracy: float = 0.9  # tau
    max_fd_ratio: float = 3.0  # kappa: classifier-FD at most this many times the seed's (iteration 0)
    patience: int = 2  # violating evaluations in a row before the guard acts
    action: str = "rollback"  # rollback (to the last good checkpoint, lr x lr_factor) | stop
    lr_factor: float = 0.5  # the learning rate's factor at each rollback
    max_rollbacks: int = 3  # after this many rollbacks the next trigger stops the run
    samples: str = "ode"  # which evaluation samples are checked: ode | sde


@dataclass
class WindowConfig:
    """Windowed Flow-GRPO (rl/sde_sampler.py: window_steps): `size` SDE steps inside the rollout, the rest
    deterministic ODE (Euler) steps, and only the window trained. null size = off (every step is SDE)."""

    size: int | None = None
    mode: str = "fixed"  # fixed (steps start..start+size-1) | sliding (moves by stride every `every` iterations)
    start: int = 0
    stride: int = 1
    every: int = 1


@dataclass
class NFTConfig:
    """DiffusionNFT (rl/nft.py): forward-process RL on the rollouts' final samples, no likelihoods."""

    beta: float = 1.0  # how far the implicit positive / negative policies sit from the old one
    advantage_max: float = 5.0  # r = 0.5 + 0.5 clip(A / advantage_max, -1, 1): the optimality probability
    timesteps: int = 4  # forward-process times t ~ U(0, 1) drawn per sample and update


@dataclass
class GRPOConfig:
    """The Flow-GRPO recipe. One iteration (an "epoch" in the write-up's recipes) draws batch_size
    prompts x group_size SDE rollouts, scores them, then takes num_inner optimizer steps on them."""

    epochs: int = 100  # rollout iterations
    batch_size: int = 4  # prompts (class labels) per iteration
    group_size: int = 8  # G: rollouts per prompt; advantages are relative within a group
    num_inner: int = 6  # optimizer steps per rollout batch (PPO epochs)
    rollout_steps: int = 10  # T_rollout: Euler-Maruyama steps per rollout
    # Which transitions each update trains (rl/sde_sampler.py: select_timesteps). "first" (Flow-GRPO):
    # the first train_timesteps of them, null = all but the final step into t = 1; "last": the
    # train_timesteps just before the final step (the low-noise end); "random": a random
    # train_timesteps of all rollout_steps, the final one included (null = all).
    timestep_selection: str = "first"
    train_timesteps: int | None = None
    noise_level: float = 0.7  # a in g(t) = a sqrt((1 - t) / t), Flow-GRPO's default
    guidance_scale: float = 1.0  # CFG in rollouts, in the recomputed log-probs and in SDE evaluation
    # [t_lo, t_hi]: where that CFG applies (closed; plain conditional velocity elsewhere), e.g. the
    # interval of the sampler the seed is deployed with, so the rollout policy is that sampler's SDE
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # Flow-GRPO: with CFG, log pi's gradient flows through the conditional branch only; false also trains
    # the shared unconditional (null-label) model, with weight 1 - guidance_scale.
    detach_uncond: bool = True
    clip_eps: float = 0.2  # PPO ratio clip
    kl_beta: float = 0.0  # weight of the Gaussian KL to the frozen seed policy
    advantage_scale: float = 1.0  # multiplies the normalised advantage
    advantage_clip: float | None = None  # clip the normalised advantage to [-c, c] before scaling
    advantage_eps: float = 1e-4  # (R - mean) / (std + eps)
    global_std: bool = False  # normalise by the batch's reward std instead of each group's
    log_prob_reduce: str = "mean"  # log pi and KL averaged ("mean") or summed over pixels (rl/sde_sampler.py)
    lr: float = 1e-4  # constant after warmup_steps
    warmup_steps: int = 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    init_from_ema: bool = True  # policy and reference start from the seed's EMA weights (else its raw weights)
    # flow_grpo: clipped ratios of SDE transitions (rl/grpo.py); diffusion_nft: forward-process RL (rl/nft.py)
    objective: str = "flow_grpo"
    lr_schedule: str = "constant"  # constant | cosine (to min_lr_ratio x lr over epochs x num_inner updates)
    min_lr_ratio: float = 0.0
    # GRPO-Guard's ratio normalisation (rl/grpo.py: normalized_log_ratio): unbiased, step-consistent ratios
    # and 1/dt gradient reweighting, so PPO clipping bounds positive updates at every timestep
    ratio_norm: bool = False
    # the rollouts' stochastic step (rl/sde_sampler.py): sde (Euler-Maruyama, Flow-GRPO) | cps (coefficients-
    # preserving; noise_level in (0, 1]); also the SDE evaluation samples'
    sampler: str = "sde"
    window: WindowConfig = field(default_factory=WindowConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)


@dataclass
class GRPOTrainingConfig(RunConfig):
    """RunConfig with GRPO's defaults: a step is one rollout iteration."""

    checkpoint_every: int = 50  # iterations; a final checkpoint is always written
    log_every: int = 1
    eval_every: int = 0  # evaluations besides the seed's (iteration 0) and the final one; 0 = none
    num_eval_samples: int = 200  # split evenly over the classes


@dataclass
class GRPORunConfig:
    experiment: str = "custom"
    seed: int = 0
    device: str = "auto"
    seed_checkpoint: str | None = None  # required: the flow model to post-train (dir, run dir or .../latest)
    reward: dict[str, Any] = field(default_factory=lambda: {"name": "jpeg"})  # rl/reward.py spec
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    training: GRPOTrainingConfig = field(default_factory=GRPOTrainingConfig)
    solver: SolverOverrides = field(default_factory=lambda: SolverOverrides())


# The typed schema of each primary config (configs/<name>.yaml), for error messages.
SCHEMAS = {
    "config": Config,
    "inference": InferenceConfig,
    "config_grpo": GRPORunConfig,
    "eval": EvalConfig,
    "pairs": PairsConfig,
}
FLAT_CONFIGS = ("inference", "eval", "pairs")  # primary configs with flat keys, each in configs/<name>/


def _allowed_keys(schema, dotted_parent: str) -> list[str]:
    for part in [p for p in dotted_parent.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
        if part not in fields or not dataclasses.is_dataclass(fields[part].default_factory()):
            return []
        schema = type(fields[part].default_factory())
    return [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []


def to_plain(node) -> Any:
    """DictConfig/ListConfig -> plain Python containers (for **kwargs)."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node
