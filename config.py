"""Config loading: Hydra composes `configs/`, schemas.py types it, this file validates what it means.

Entry points call `load_config(argv)` once; everything after works on a validated, read-only
DictConfig. Swappable parts (model, dataset, scheduler, time sampler, weighting) are written as
`{name: <registry key>, <constructor kwargs>...}` and checked against the constructor's signature,
so a typo fails before any work with the key and the allowed values in the message.
"""

import dataclasses
import importlib.util
import math
import re
import sys

from omegaconf import DictConfig, OmegaConf

from cli import exit_on_help
from presets import CONFIG_DIR, check_preset, presets
from schemas import (
    AMP_MODES,
    DEVICES,
    FLAT_CONFIGS,
    INIT_SOURCES,
    LR_SCHEDULES,
    SCHEMAS,
    Config,
    ConfigError,
    EvalConfig,
    GRPORunConfig,
    InferenceConfig,
    PairsConfig,
    SolverConfig,
    SolverOverrides,
    _allowed_keys,
    apply_schema,
    check,
    check_choice,
    check_spec,
    to_plain,
)

# --- loading ------------------------------------------------------------------------------------


def compose(overrides: list[str], config_name: str = "config") -> DictConfig:
    """Hydra composition of configs/ with command-line overrides; Hydra errors reworded.

    `inference` and `eval` live in their own directories (configs/inference/, configs/eval/), so that
    their scalar keys (`solver=heun`) are not mistaken for the training config groups of the same name.
    An `experiment=` preset must be one of this entry point's (`check_preset`).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    # The typed schemas are the first entry of each primary config's defaults list, so every
    # key they declare can be overridden from the command line and is type-checked on the way in.
    ConfigStore.instance().store(name="train_schema", node=Config)
    ConfigStore.instance().store(name="inference_schema", node=InferenceConfig)
    ConfigStore.instance().store(name="grpo_schema", node=GRPORunConfig)
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
    ConfigStore.instance().store(name="pairs_schema", node=PairsConfig)
    check_preset(overrides, config_name)
    GlobalHydra.instance().clear()
    config_dir = CONFIG_DIR / config_name if config_name in FLAT_CONFIGS else CONFIG_DIR
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        try:
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
        except HydraException as e:
            message = _reword_hydra_error(e, SCHEMAS[config_name])
            key = re.match(r"unknown config key '([^']+)'", message)
            if key:
                message = _free_form_key_error(key.group(1), overrides, config_name, hydra_compose) or message
            raise ConfigError(message) from None
    choices = cfg.hydra.runtime.choices
    with _open(cfg):
        if "experiment" in choices and choices.experiment is not None:
            cfg.experiment = choices.experiment
        del cfg["hydra"]
    return cfg


def _free_form_key_error(key: str, overrides: list[str], config_name: str, hydra_compose) -> str | None:
    """For an unknown key in a free-form section (model.hidden=3): the arguments its registry entry
    takes, read from the config composed without that key; None for other sections."""
    from hydra.errors import HydraException

    section, _, arg = key.rpartition(".")
    if section not in FREE_FORM_SPECS:
        return None
    rest = [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]
    try:
        spec = to_plain(OmegaConf.select(hydra_compose(config_name=config_name, overrides=rest), section))
        check_spec(section, {**spec, arg: None}, FREE_FORM_SPECS[section]())
    except ConfigError as error:
        return str(error)
    except (HydraException, TypeError):
        return None
    # A real argument that the preset does not set: Hydra adds new keys only with a '+'.
    value = next((o.partition("=")[2] for o in overrides if o.lstrip("+~").partition("=")[0] == key), "VALUE")
    return (
        f"config key '{key}' is an argument of {section} '{spec['name']}' that this preset does not set; "
        f"add it with a '+': +{key}={value}"
    )


def load_tool_config(argv: list[str] | None, doc: str, config_name: str, schema, keys: str = "key=value"):
    """A tool's `--help` (its keys from `schema`), then configs/<config_name> composed with argv and
    checked against `schema`."""
    argv = sys.argv[1:] if argv is None else argv
    exit_on_help(argv, doc, (f"keys ({keys})", schema))
    return apply_schema(compose(argv, config_name=config_name), schema)


def load_config(overrides: list[str]) -> DictConfig:
    """argv overrides -> validated, read-only training config."""
    return validate(compose(overrides))


def _reword_hydra_error(error: Exception, schema) -> str:
    message = f"{error}\n{error.__cause__ or ''}"
    full_key = re.search(r"full_key: (\S+)", message)
    if "could not be converted" in message or "Value '" in message and "is not a valid" in message:
        detail = next(line for line in message.splitlines() if "Value '" in line)
        return f"config key '{full_key.group(1) if full_key else '?'}' has a value of the wrong type: {detail.strip()}"
    match = re.search(r"Could not override '([^']+)'", message)
    cause = str(error.__cause__ or "")
    if match and ("To append to your config" in message or "not in struct" in cause):
        key = match.group(1)
        parent = key.rpartition(".")[0]
        allowed = _allowed_keys(schema, parent)
        hint = f"; allowed keys under '{parent or '<root>'}': {', '.join(allowed)}" if allowed else ""
        return f"unknown config key '{key}'{hint}"
    return message


class _open:
    """Temporarily lift OmegaConf's struct/readonly flags."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __enter__(self):
        OmegaConf.set_struct(self.cfg, False)
        OmegaConf.set_readonly(self.cfg, False)

    def __exit__(self, *exc):
        OmegaConf.set_struct(self.cfg, True)


# --- validation ---------------------------------------------------------------------------------


def check_model_builds(spec) -> None:
    """Build the model on the meta device (no memory, no init cost): a constructor's own checks
    (heads dividing the width, a patch dividing the input, ...) fail here, before any file is written."""
    import torch

    name, kwargs = spec_kwargs(spec)
    try:
        with torch.device("meta"):
            model_registry()[name](**kwargs)
    except (ValueError, TypeError, RuntimeError, AssertionError, ZeroDivisionError) as e:
        raise ConfigError(f"model = {to_plain(spec)} cannot be built: {e}") from None


def validate(cfg: DictConfig) -> DictConfig:
    """Type-check and range-check a composed training config; returns it read-only."""
    import couplings
    import dataset_registry
    import flow
    import flow_map

    cfg = apply_schema(cfg)
    tr, so, fl = cfg.training, cfg.solver, cfg.flow
    check_choice("device", cfg.device, DEVICES)
    check_spec("dataset", cfg.dataset, dataset_registry.DATASETS, skip=("device",))
    check_spec("model", cfg.model, model_registry())
    check_model_builds(cfg.model)
    check_spec("flow.scheduler", fl.scheduler, flow.SCHEDULERS)
    check_spec("flow.time_sampler", fl.time_sampler, flow.TIME_SAMPLERS)
    check_spec("flow.weighting", fl.weighting, flow.LOSS_WEIGHTINGS)
    check_choice("flow.prediction", fl.prediction, flow.PREDICTIONS)
    check(0 < fl.denominator_min < 1, "flow.denominator_min", fl.denominator_min, "must be in (0, 1)")
    if fl.scheduler.get("name") == "polynomial" and fl.prediction != "velocity":
        # alpha = t^n has d_alpha = n t^(n-1) = inf at t = 0 for n < 1: a data or noise prediction converts to
        # an infinite velocity where every sampler starts (a velocity-predicting model outputs it finite).
        n = fl.scheduler.get("n", flow.PolynomialScheduler.n)
        check(
            n >= 1,
            "flow.scheduler.n",
            n,
            f"must be >= 1 with flow.prediction = {fl.prediction} (for n < 1 the "
            f"path's velocity is infinite at t = 0, where sampling starts; use flow.prediction=velocity)",
        )

    validate_flow_map(cfg, flow_map)
    validate_run(tr)
    check(tr.lr > 0, "training.lr", tr.lr, "must be > 0")
    check(tr.epochs >= 1, "training.epochs", tr.epochs, "must be >= 1")
    check(tr.batch_size >= 1, "training.batch_size", tr.batch_size, "must be >= 1")
    check(tr.grad_accum >= 1, "training.grad_accum", tr.grad_accum, "must be >= 1")
    check(0 <= tr.p_uncond < 1, "training.p_uncond", tr.p_uncond, "must be in [0, 1)")
    check(0 <= tr.ema_decay < 1, "training.ema_decay", tr.ema_decay, "must be in [0, 1)")
    check(tr.weight_decay >= 0, "training.weight_decay", tr.weight_decay, "must be >= 0")
    check(tr.grad_clip >= 0, "training.grad_clip", tr.grad_clip, "must be >= 0 (0 disables)")
    check(tr.warmup_steps >= 0, "training.warmup_steps", tr.warmup_steps, "must be >= 0")
    check(0 <= tr.min_lr_ratio <= 1, "training.min_lr_ratio", tr.min_lr_ratio, "must be in [0, 1]")
    check(
        len(tr.betas) == 2 and all(0 <= b < 1 for b in tr.betas),
        "training.betas",
        list(tr.betas),
        "must be two values in [0, 1)",
    )
    check_choice("training.init.model", tr.init.model, INIT_SOURCES)
    check_choice("training.init.ema", tr.init.ema, INIT_SOURCES)
    check(
        tr.init.checkpoint is not None
        or (tr.init.model, tr.init.ema, tr.init.optimizer, tr.init.step) == ("ema", "ema", False, False),
        "training.init.checkpoint",
        None,
        "required when any other training.init key is set (the run to start from)",
    )
    check_choice("training.lr_schedule", tr.lr_schedule, LR_SCHEDULES)
    check_choice("training.coupling.name", tr.coupling.name, couplings.COUPLINGS)
    check(
        tr.coupling.name != "pairs" or bool(tr.coupling.pairs),
        "training.coupling.pairs",
        tr.coupling.pairs,
        "is required with training.coupling.name=pairs: the pair directory of scripts/generate_pairs.py",
    )
    check(
        tr.coupling.name == "pairs" or tr.coupling.pairs is None,
        "training.coupling.pairs",
        tr.coupling.pairs,
        f"is only read with training.coupling.name=pairs (here {tr.coupling.name!r}); drop it or use pairs",
    )
    check(tr.threads is None or tr.threads >= 1, "training.threads", tr.threads, "must be >= 1 or null")
    check(tr.fid_samples >= 2, "training.fid_samples", tr.fid_samples, "must be >= 2")
    validate_solver(so, "solver")
    return _freeze(cfg)


WANDB_MODES = ("off", "offline", "online")  # training.wandb: offline writes RUN/wandb/ and needs no network


def require_tracking_packages(tr, key: str = "training") -> None:
    """The entry points' check, right after the config loads and before any work: a tracker the config
    selects must be installed (an environment check, so the docs' dry runs do not need the optional group)."""
    if tr.wandb != "off" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"{key}.wandb = {tr.wandb!r} needs the optional wandb package, which is not installed: "
            f"`uv sync --group wandb` (or {key}.wandb=off)"
        )


def validate_flow_map(cfg, flow_map) -> None:
    """flow.objective and its settings; a flow map (objective or sampler) needs a model built with
    interval_conditioning, a velocity output and no token masking; guidance as a model condition needs
    guidance_conditioning on both sides (objective and model)."""
    fl, interval = cfg.flow, bool(cfg.model.get("interval_conditioning", False))
    guidance_model = bool(cfg.model.get("guidance_conditioning", False))
    guidance_objective = fl.objective == "meanflow" and fl.meanflow.guidance_condition
    check_choice("flow.objective", fl.objective, flow_map.OBJECTIVES)
    check(
        guidance_model == guidance_objective,
        "model.guidance_conditioning",
        guidance_model,
        f"must be {str(guidance_objective).lower()} with flow.objective={fl.objective} and "
        f"flow.meanflow.guidance_condition={str(bool(fl.meanflow.guidance_condition)).lower()} (only that "
        "objective trains the guidance embedding; the model and the objective are switched on together)",
    )
    check(
        not (guidance_model and cfg.solver.ep_cfg),
        "solver.ep_cfg",
        cfg.solver.ep_cfg,
        "must be false with model.guidance_conditioning=true (one guided forward, no conditional branch to rescale to)",
    )
    if fl.objective == "meanflow":
        for condition, key, value, requirement in flow_map.check_settings(fl.meanflow):
            check(condition, key, value, requirement)
        check(
            fl.prediction == "velocity",
            "flow.prediction",
            fl.prediction,
            "must be velocity with flow.objective=meanflow (the network outputs an average velocity)",
        )
        check(
            fl.weighting.get("name") == "uniform",
            "flow.weighting.name",
            fl.weighting.get("name"),
            "must be uniform with flow.objective=meanflow (its weighting is flow.meanflow.weight_p / weight_c)",
        )
        check(
            fl.meanflow.guidance_scale == 1 or cfg.training.p_uncond > 0,
            "training.p_uncond",
            cfg.training.p_uncond,
            f"must be > 0 with flow.meanflow.guidance_scale = {fl.meanflow.guidance_scale} (the folded CFG "
            "target reads the null-label branch, which label dropout trains)",
        )
        check(
            not fl.meanflow.guidance_condition or cfg.training.p_uncond > 0,
            "training.p_uncond",
            cfg.training.p_uncond,
            "must be > 0 with flow.meanflow.guidance_condition=true (the folded CFG target reads the "
            "null-label branch, which label dropout trains)",
        )
        check(
            float(cfg.model.get("mask_ratio", 0.0) or 0.0) == 0,
            "model.mask_ratio",
            cfg.model.get("mask_ratio"),
            "must be 0 with flow.objective=meanflow (deferred token masking is not supported for flow maps)",
        )
    for key, value, used in (
        ("flow.objective", fl.objective, fl.objective == "meanflow"),
        ("solver.method", cfg.solver.method, cfg.solver.method == "flow_map"),
    ):
        check(
            interval or not used,
            "model.interval_conditioning",
            interval,
            f"must be true with {key}={value} (the model must take the target time r)",
        )


def validate_run(tr, key: str = "training") -> None:
    """The run-management keys every trainer shares (RunConfig)."""
    check_choice(f"{key}.amp", tr.amp, AMP_MODES)
    check(tr.max_steps is None or tr.max_steps >= 0, f"{key}.max_steps", tr.max_steps, "must be >= 0 or null")
    for name in ("checkpoint_every", "keep_last", "log_every", "num_eval_samples", "max_nonfinite_steps"):
        check(tr[name] >= 1, f"{key}.{name}", tr[name], "must be >= 1")
    check(tr.eval_every >= 0, f"{key}.eval_every", tr.eval_every, "must be >= 0 (0 = only at the end)")
    check(tr.resume in (None, "auto") or bool(tr.resume), f"{key}.resume", tr.resume, "must be null, 'auto' or a path")
    check_choice(f"{key}.wandb", tr.wandb, WANDB_MODES)
    check(bool(tr.wandb_project), f"{key}.wandb_project", tr.wandb_project, "must be a non-empty W&B project name")


def validate_solver(so, key: str) -> None:
    import ode_solvers

    check_choice(f"{key}.method", so.method, ode_solvers.SAMPLER_METHODS)
    check(so.num_steps >= 1, f"{key}.num_steps", so.num_steps, "must be >= 1")
    check_choice(f"{key}.grid", so.grid, ode_solvers.GRIDS)
    check(math.isfinite(so.shift) and so.shift > 0, f"{key}.shift", so.shift, "must be finite and > 0")
    check(
        math.isfinite(so.guidance_scale) and so.guidance_scale >= 0,
        f"{key}.guidance_scale",
        so.guidance_scale,
        "must be finite and >= 0",
    )
    check(so.rtol > 0 and so.atol > 0, f"{key}.rtol/atol", (so.rtol, so.atol), "must be > 0")
    interval = list(so.guidance_interval)
    check(
        len(interval) == 2 and 0 <= interval[0] <= interval[1] <= 1,
        f"{key}.guidance_interval",
        interval,
        "must be [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1",
    )


def _freeze(cfg: DictConfig) -> DictConfig:
    OmegaConf.set_readonly(cfg, True)
    OmegaConf.set_struct(cfg, True)
    return cfg


def spec_kwargs(spec) -> tuple[str, dict]:
    """`{name: x, a: 1}` -> ("x", {"a": 1})."""
    plain = dict(to_plain(spec))
    return plain.pop("name"), plain


# --- registries and solver settings -------------------------------------------------------------


def model_registry() -> dict:
    """Every trainable network by config name: the U-Nets / MLPs of models.py and the DiTs of models_dit.py
    (named sizes included, each accepting any constructor argument as an override)."""
    from models import MODELS
    from models_dit import DIT_MODELS

    return {**MODELS, **DIT_MODELS}


def _dataset_registry() -> dict:
    import dataset_registry

    return dataset_registry.DATASETS


def _flow_registry(name: str):
    def registry() -> dict:
        import flow

        return getattr(flow, name)

    return registry


# Config sections written as {name: <registry key>, **constructor kwargs}, and their registries.
FREE_FORM_SPECS = {
    "model": model_registry,
    "dataset": _dataset_registry,
    "flow.scheduler": _flow_registry("SCHEDULERS"),
    "flow.time_sampler": _flow_registry("TIME_SAMPLERS"),
    "flow.weighting": _flow_registry("LOSS_WEIGHTINGS"),
}


def resolve_solver(base, overrides: dict, key: str = "solver") -> DictConfig:
    """A run's solver settings (SolverConfig) with the non-null overrides merged in, validated."""
    solver = OmegaConf.merge(
        OmegaConf.structured(SolverConfig), base, {k: v for k, v in dict(overrides).items() if v is not None}
    )
    validate_solver(solver, key)
    return solver


def validate_sharded(cfg, count_key: str, checkpoint_hint: str, out_hint: str) -> None:
    """The keys of a chunked sampling job (eval_imagenet.py, scripts/generate_pairs.py): a checkpoint, an
    out directory, a count, chunk and batch sizes, a device."""
    check(bool(cfg.checkpoint), "checkpoint", cfg.checkpoint, f"is required: {checkpoint_hint}")
    check(bool(cfg.out), "out", cfg.out, f"is required: {out_hint}")
    check(cfg[count_key] >= 1, count_key, cfg[count_key], "must be >= 1")
    check(cfg.chunk_size >= 1, "chunk_size", cfg.chunk_size, "must be >= 1")
    check(cfg.batch_size is None or cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be >= 1 or null")
    check_choice("device", cfg.device, DEVICES)


def validate_pairs(cfg) -> None:
    validate_sharded(
        cfg, "num_pairs", "the teacher, checkpoint=RUN_DIR", "the pair directory, e.g. out=runs/pairs/moons_rf1"
    )


def validate_eval(cfg) -> None:
    validate_sharded(
        cfg,
        "num_samples",
        "checkpoint=RUN_DIR (or .../latest or a step_* dir)",
        "the evaluation directory, e.g. out=runs/eval/h1024_cfg3",
    )


def validate_inference(cfg) -> None:
    """Range checks of inference.py's own keys (solver keys are checked after merging with the run's)."""
    check(
        bool(cfg.checkpoint),
        "checkpoint",
        cfg.checkpoint,
        "is required: checkpoint=RUN_DIR/checkpoints/latest (or a run dir or a step_* dir)",
    )
    check(cfg.n_per_class >= 1, "n_per_class", cfg.n_per_class, "must be >= 1")
    check(cfg.num_samples is None or cfg.num_samples >= 1, "num_samples", cfg.num_samples, "must be >= 1")
    check(cfg.batch_size is None or cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be >= 1 or null")
    check_choice("device", cfg.device, DEVICES)
    for key in ("likelihood_images", "likelihood_probes", "likelihood_steps"):
        check(cfg[key] >= 1, key, cfg[key], "must be >= 1")


def solver_overrides(cfg) -> dict:
    """The non-null SolverOverrides keys of a config node (inference's flat keys or GRPO's solver.*)."""
    values = {f.name: cfg.get(f.name) for f in dataclasses.fields(SolverOverrides)}
    if cfg.get("solver") is not None and not isinstance(cfg.get("solver"), (dict, DictConfig)):
        if values["method"] is not None and values["method"] != cfg.solver:
            raise ConfigError(f"solver = {cfg.solver!r} and method = {values['method']!r} name two methods; give one")
        values["method"] = cfg.solver
    return {k: v for k, v in values.items() if v is not None}


# --- Flow-GRPO post-training (train_grpo.py) -----------------------------------------------------


def load_grpo_config(overrides: list[str]) -> DictConfig:
    """argv overrides -> validated, read-only train_grpo.py config (configs/config_grpo.yaml)."""
    cfg = apply_schema(compose(overrides, config_name="config_grpo"), GRPORunConfig)
    g, tr = cfg.grpo, cfg.training
    seed = f"{cfg.experiment.partition('_grpo')[0]}_cfg"  # the preset a GRPO preset's seed is trained with
    if seed not in presets("train"):
        seed = "digits_cfg"
    check(
        bool(cfg.seed_checkpoint),
        "seed_checkpoint",
        cfg.seed_checkpoint,
        f"is required: the flow model to post-train, e.g. seed_checkpoint=runs/{seed} (from `python train.py "
        f"experiment={seed} training.run_dir=runs/{seed}`; a run dir, a step_* dir or RUN/checkpoints/latest)",
    )
    check_choice("device", cfg.device, DEVICES)
    for key in ("epochs", "batch_size", "num_inner", "rollout_steps"):
        check(g[key] >= 1, f"grpo.{key}", g[key], "must be >= 1")
    check(
        g.group_size >= 2,
        "grpo.group_size",
        g.group_size,
        "must be >= 2 (a group of one has no spread, so every advantage would be 0)",
    )
    check_choice("grpo.timestep_selection", g.timestep_selection, ("first", "last", "random"))
    if g.timestep_selection in ("first", "last"):
        most = max(1, g.rollout_steps - 1)
        check(
            g.train_timesteps is None or 1 <= g.train_timesteps <= most,
            "grpo.train_timesteps",
            g.train_timesteps,
            f"must be null or in [1, grpo.rollout_steps - 1 = {most}] with grpo.timestep_selection = "
            f"{g.timestep_selection} (the final step is never trained; timestep_selection=random may include it)",
        )
    else:
        check(
            g.train_timesteps is None or 1 <= g.train_timesteps <= g.rollout_steps,
            "grpo.train_timesteps",
            g.train_timesteps,
            f"must be null or in [1, grpo.rollout_steps = {g.rollout_steps}]",
        )
    check(g.noise_level > 0, "grpo.noise_level", g.noise_level, "must be > 0 (the SDE needs noise for a log-prob)")
    check(g.guidance_scale >= 0, "grpo.guidance_scale", g.guidance_scale, "must be >= 0")
    interval = list(g.guidance_interval)
    check(
        len(interval) == 2 and 0 <= interval[0] <= interval[1] <= 1,
        "grpo.guidance_interval",
        interval,
        "must be [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1",
    )
    check(g.clip_eps > 0, "grpo.clip_eps", g.clip_eps, "must be > 0")
    check(g.kl_beta >= 0, "grpo.kl_beta", g.kl_beta, "must be >= 0")
    check(g.advantage_scale > 0, "grpo.advantage_scale", g.advantage_scale, "must be > 0")
    check(
        g.advantage_clip is None or g.advantage_clip > 0, "grpo.advantage_clip", g.advantage_clip, "must be null or > 0"
    )
    check(g.advantage_eps > 0, "grpo.advantage_eps", g.advantage_eps, "must be > 0")
    check_choice("grpo.log_prob_reduce", g.log_prob_reduce, ("mean", "sum"))
    check(g.lr > 0, "grpo.lr", g.lr, "must be > 0")
    check(g.warmup_steps >= 0, "grpo.warmup_steps", g.warmup_steps, "must be >= 0")
    check(
        len(g.betas) == 2 and all(0 <= b < 1 for b in g.betas),
        "grpo.betas",
        list(g.betas),
        "must be two values in [0, 1)",
    )
    check(g.weight_decay >= 0, "grpo.weight_decay", g.weight_decay, "must be >= 0")
    check(g.grad_clip >= 0, "grpo.grad_clip", g.grad_clip, "must be >= 0 (0 disables)")
    check_choice("grpo.objective", g.objective, ("flow_grpo", "diffusion_nft"))
    check_choice("grpo.lr_schedule", g.lr_schedule, ("constant", "cosine"))
    check(0 <= g.min_lr_ratio <= 1, "grpo.min_lr_ratio", g.min_lr_ratio, "must be in [0, 1]")
    _validate_grpo_variants(g)
    _validate_guard(g.guard, tr)
    validate_run(tr)
    return _freeze(cfg)


def _validate_grpo_variants(g) -> None:
    """grpo.window.*, grpo.ratio_norm and grpo.nft.*: each for the objective it modifies."""
    w = g.window
    check_choice("grpo.window.mode", w.mode, ("fixed", "sliding"))
    if w.size is not None:
        most = max(1, g.rollout_steps - 1)
        check(
            1 <= w.size <= most,
            "grpo.window.size",
            w.size,
            f"must be null (off) or in [1, grpo.rollout_steps - 1 = {most}] (the final step is never trained)",
        )
        check(
            0 <= w.start <= most - w.size,
            "grpo.window.start",
            w.start,
            f"must be in [0, {most - w.size}] (grpo.rollout_steps - 1 - grpo.window.size)",
        )
        check(g.objective == "flow_grpo", "grpo.window.size", w.size, "windows apply to grpo.objective = flow_grpo")
    check(w.stride >= 1, "grpo.window.stride", w.stride, "must be >= 1")
    check(w.every >= 1, "grpo.window.every", w.every, "must be >= 1")
    check(
        not g.ratio_norm or g.objective == "flow_grpo",
        "grpo.ratio_norm",
        g.ratio_norm,
        "normalises Flow-GRPO's likelihood ratios; grpo.objective = diffusion_nft has none",
    )
    check_choice("grpo.sampler", g.sampler, ("sde", "cps"))
    if g.sampler == "cps":
        check(g.noise_level <= 1, "grpo.noise_level", g.noise_level, "must be in (0, 1] with grpo.sampler = cps")
        check(
            g.timestep_selection != "random" or g.window.size is not None,
            "grpo.timestep_selection",
            g.timestep_selection,
            "must be first or last with grpo.sampler = cps (its final step into t = 1 is deterministic: no "
            "log-prob to train)",
        )
    check(g.nft.beta > 0, "grpo.nft.beta", g.nft.beta, "must be > 0")
    check(g.nft.advantage_max > 0, "grpo.nft.advantage_max", g.nft.advantage_max, "must be > 0")
    check(g.nft.timesteps >= 1, "grpo.nft.timesteps", g.nft.timesteps, "must be >= 1")


def _validate_guard(guard, tr) -> None:
    check(0 <= guard.min_accuracy <= 1, "grpo.guard.min_accuracy", guard.min_accuracy, "must be in [0, 1]")
    check(guard.max_fd_ratio > 0, "grpo.guard.max_fd_ratio", guard.max_fd_ratio, "must be > 0")
    check(guard.patience >= 1, "grpo.guard.patience", guard.patience, "must be >= 1")
    check_choice("grpo.guard.action", guard.action, ("rollback", "stop"))
    check(0 < guard.lr_factor <= 1, "grpo.guard.lr_factor", guard.lr_factor, "must be in (0, 1]")
    check(guard.max_rollbacks >= 0, "grpo.guard.max_rollbacks", guard.max_rollbacks, "must be >= 0")
    check_choice("grpo.guard.samples", guard.samples, ("ode", "sde"))
    if guard.enabled:
        check(
            bool(tr.classifier),
            "training.classifier",
            tr.classifier,
            "is required by grpo.guard.enabled = true (its accuracy and classifier-FD are the constraint); set "
            "one, or grpo.guard.enabled=false",
        )
        check(
            tr.eval_every >= 1,
            "training.eval_every",
            tr.eval_every,
            "must be >= 1 with grpo.guard.enabled = true (the guard checks at every evaluation)",
        )
