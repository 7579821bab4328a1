"""Where configs and checkpoints become objects: the one builder every entry point calls.

- a validated config section -> a model, a flow (path, time sampler, weighting), a dataset;
- a checkpoint (dir, run dir or RUN/checkpoints/latest) -> a ready model and `FlowSampler` on a device,
  with EMA or raw weights, and the run's solver settings merged with overrides;
- a classifier file + the run's dataset -> the evaluation classifier with its reference statistics.

Nothing here parses argv or runs a loop; models, flows and datasets take plain keyword arguments.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import checkpoint as ckpt
from config import ConfigError, check_spec, model_registry, resolve_solver, spec_kwargs


def build_model(model_cfg) -> torch.nn.Module:
    """`{name: <registry key>, **kwargs}` -> the network (models.MODELS or models_dit.DIT_MODELS)."""
    name, kwargs = spec_kwargs(model_cfg)
    return model_registry()[name](**kwargs)


def build_flow(flow_cfg):
    """A validated `flow` section -> (path, time_sampler, weighting)."""
    import flow

    scheduler, scheduler_kwargs = spec_kwargs(flow_cfg.scheduler)
    path = flow.make_path(scheduler, denominator_min=flow_cfg.denominator_min, **scheduler_kwargs)
    sampler_name, sampler_kwargs = spec_kwargs(flow_cfg.time_sampler)
    weighting_name, weighting_kwargs = spec_kwargs(flow_cfg.weighting)
    time_sampler = flow.make_time_sampler(sampler_name, **sampler_kwargs)
    weighting = flow.make_loss_weighting(weighting_name, **weighting_kwargs)
    return path, time_sampler, weighting


def build_flow_map(flow_cfg, path, time_sampler):
    """A validated `flow` section and its (path, time_sampler) -> flow_map.MeanFlowObjective, or None when
    flow.objective is flow matching."""
    import flow_map

    if flow_cfg.objective != "meanflow":
        return None
    m = flow_cfg.meanflow
    return flow_map.MeanFlowObjective(
        path,
        flow_map.IntervalSampler(time_sampler, m.equal_fraction, m.endpoint_fraction),
        weight_p=m.weight_p,
        weight_c=m.weight_c,
        guidance_scale=m.guidance_scale,
        guidance_interval=tuple(m.guidance_interval),
        tangent=m.tangent,
        derivative=m.derivative,
        fd_step=m.fd_step,
        curriculum_steps=m.curriculum_steps,
        curriculum_start=m.curriculum_start,
        guidance_range=tuple(m.guidance_range) if m.guidance_condition else None,
    )


def build_dataset(dataset_cfg, device, **overrides):
    """A `dataset` section (`{name, **kwargs}`) -> the dataset on `device`; overrides win (split=...)."""
    import dataset_registry

    name, kwargs = spec_kwargs(dataset_cfg)
    return dataset_registry.build_dataset(name, device, **{**kwargs, **overrides})


def build_coupling(coupling_cfg, dataset, conditional: bool, device):
    """A validated `training.coupling` section -> a couplings.Coupling; a pair file must hold samples of
    the dataset's shape (and labels, for a class-conditional model)."""
    import couplings

    if coupling_cfg.name == "minibatch_ot":
        return couplings.MinibatchOT(within_class=coupling_cfg.within_class)
    if coupling_cfg.name != "pairs":
        return couplings.Coupling()
    coupling = couplings.PairCoupling(coupling_cfg.pairs, device)
    manifest, where = coupling.manifest, f"training.coupling.pairs = {str(coupling_cfg.pairs)!r}"
    if tuple(manifest["sample_shape"]) != tuple(dataset.sample_shape) or manifest["dataset"] != dataset.name:
        raise ConfigError(
            f"{where} holds {manifest['dataset']!r} samples of shape {manifest['sample_shape']}, but "
            f"this run's dataset is {dataset.name!r} of shape {list(dataset.sample_shape)}"
        )
    if conditional and bool((coupling.data.y < 0).any()):
        raise ConfigError(
            f"{where} comes from an unconditional teacher (labels -1), but this run's model is "
            f"class-conditional; use an unconditional model or a class-conditional teacher"
        )
    return coupling


def latent_vae_id(dataset_cfg) -> str | None:
    """The VAE a latent-space run's samples decode with (the dataset's `vae`, else the one its cache
    manifest records); None for pixel-space data."""
    name, kwargs = spec_kwargs(dataset_cfg)
    if name != "latent_cache":
        return None
    if kwargs.get("vae"):
        return kwargs["vae"]
    from latent_cache import latent_cache_dir, read_latent_manifest

    return read_latent_manifest(latent_cache_dir(kwargs["path"], kwargs.get("split", "train")))["vae_id"]


def parse_overrides(items: list[str]) -> dict:
    """["depth=4", "mlp_ratio=[0.5,4.0]"] -> {"depth": 4, "mlp_ratio": [0.5, 4.0]} (values as YAML)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        out[key] = yaml.safe_load(value)
    return out


def build_meta_dit(spec: str, overrides: dict | None = None):
    """A models_dit.DIT_MODELS name or a model config YAML (+ kwargs overrides) -> the DiT on the meta
    device (no memory, no init cost), for parameter and FLOP accounting."""
    import models_dit

    if spec.endswith((".yaml", ".yml")):
        model_cfg = dict(OmegaConf.to_container(OmegaConf.load(spec)))
    else:
        model_cfg = {"name": spec}
    model_cfg.update(overrides or {})
    if model_cfg["name"] not in models_dit.DIT_MODELS:
        raise ValueError(
            f"unknown DiT {model_cfg['name']!r}; choose a config YAML or one of: {', '.join(models_dit.DIT_MODELS)}"
        )
    check_spec("model", model_cfg, models_dit.DIT_MODELS)
    with torch.device("meta"):
        return build_model(model_cfg)


def meta_dit_from_keys(key: str, keys: dict | None):
    """Parsed keys `model=NAME|CONFIG.yaml [model.KEY=VALUE ...]` -> (the DiT on the meta device, a title
    'NAME KEY=VALUE ...'); a bad name or value is a ConfigError naming `key`."""
    keys = dict(keys or {})
    if "name" not in keys:
        raise ConfigError(
            f"{key} = {keys or None}: is required: model=NAME (models_dit.DIT_MODELS) or model=CONFIG.yaml, "
            "plus model.KEY=VALUE overrides"
        )
    name = str(keys.pop("name"))
    try:
        model = build_meta_dit(name, keys)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{key} = {name!r}: {e}") from None
    return model, " ".join([name, *(f"{k}={v}" for k, v in keys.items())])


# --- checkpoint -> ready model / sampler -----------------------------------------------------------


@dataclass
class LoadedRun:
    """A trained model read back from a checkpoint, ready to sample."""

    sampler: "object"  # sampling.FlowSampler around `model`
    model: torch.nn.Module  # on the device, eval mode
    solver: DictConfig  # the run's solver settings with the overrides merged in, validated
    checkpoint: ckpt.Checkpoint  # path, step, config, meta (weights dropped)
    sample_shape: tuple[int, ...]
    skipped: list[str]  # newer checkpoints of the run that failed verification (the fallback), newest first
    best: bool = False  # the run's published best (checkpoints/best.json) chosen for a run dir, not its newest

    @property
    def config(self) -> DictConfig:
        return self.checkpoint.config


def load_run(checkpoint_path, device, use_ema: bool = True, solver_overrides: dict | None = None) -> LoadedRun:
    """Checkpoint (dir, run dir or RUN/checkpoints/latest) -> its model on `device` with the EMA weights
    (or the raw ones when use_ema is false or the run kept no EMA), the sampler and the solver settings.
    Reading never modifies the run directory."""
    from sampling import FlowSampler

    loaded = ckpt.load_checkpoint(checkpoint_path, map_location="cpu", load_state=False)
    model = build_model(loaded.config.model)
    weights = loaded.ema if use_ema and loaded.ema is not None else loaded.model
    ckpt.load_weights(model, weights, f"checkpoint {loaded.path}")
    model.to(device).eval()
    loaded.model = loaded.ema = None  # the module holds them now
    path, _, _ = build_flow(loaded.config.flow)
    sampler = FlowSampler(model, path, loaded.config.flow.prediction, num_classes=getattr(model, "num_classes", None))
    solver = resolve_solver(loaded.config.solver, solver_overrides or {}, "solver")
    requested = Path(checkpoint_path)
    chosen = (requested / "manifest.json").is_file() or ckpt.STEP_DIR.match(requested.name)  # this one, no fallback
    run_dir = loaded.path.parent.parent
    published = not chosen and requested.name != "latest" and ckpt.best_checkpoint(run_dir) == loaded.path
    newer = reversed(ckpt.list_checkpoints(run_dir))
    skipped = [] if chosen or published else [str(path) for step, path in newer if step > loaded.step]
    return LoadedRun(
        sampler=sampler,
        model=model,
        solver=solver,
        checkpoint=loaded,
        sample_shape=tuple(loaded.meta["sample_shape"]),
        skipped=skipped,
        best=published,
    )


# --- evaluation classifier ------------------------------------------------------------------------


def load_eval_classifier(path, dataset_cfg, device, num_samples: int, seed: int, train_split=None):
    """A classifier file (`scripts/train_classifier.py`) for a run's dataset -> classifier.EvalClassifier:
    the classifier, the feature statistics of the held-out split and the real-vs-real FD floor at
    num_samples (from `train_split`, built when not given). Called before any training, so a wrong
    path or a classifier for other data fails at start-up."""
    from classifier import EvalClassifier, load_classifier, real_class_diversity, real_fd_floor, reference_statistics

    name, _ = spec_kwargs(dataset_cfg)
    if train_split is None:
        train_split = build_dataset(dataset_cfg, device, split="train")
    if len(train_split.sample_shape) != 3:
        raise ConfigError(
            f"training.classifier = {str(path)!r}: dataset {name!r} holds no images; a classifier "
            f"scores image datasets only"
        )
    classifier = load_classifier(
        Path(path), device, expected_dataset=name, expected_shape=tuple(train_split.sample_shape)
    )
    if classifier.metadata.get("near_chance") == "true":
        print(
            f"WARNING: {path} recorded a held-out accuracy of {classifier.metadata.get('test_accuracy')}, near "
            "chance: the accuracy and classifier-FD it reports mean little (retrain it)",
            file=sys.stderr,
        )

    held_out = build_dataset(dataset_cfg, device, split="test")
    reference = reference_statistics(classifier, held_out)
    floor = real_fd_floor(classifier, train_split, reference, num_samples, seed)
    diversity = real_class_diversity(classifier, held_out) if getattr(held_out, "y", None) is not None else None
    return EvalClassifier(classifier, reference, floor, diversity)


def load_inception_reference(weights, reference, device):
    """(torch-fidelity's Inception extractor, reference statistics made with the same weights)."""
    import inception

    extractor = inception.load_inception(weights, device)
    statistics = inception.load_reference_statistics(reference, extractor)
    statistics.check_extractor(extractor)
    return extractor, statistics


def build_evaluator(
    dataset_cfg,
    device,
    *,
    sample_shape=None,
    classifier: str | None = None,
    fid_reference: str | None = None,
    inception_weights: str | None = None,
    num_samples: int = 0,
    seed: int = 0,
    dataset=None,
    decode_latents: bool = True,
):
    """A run's evaluation settings -> evaluation.Evaluator: the VAE decoder of a latent dataset, the
    metrics classifier and the Inception reference, each loaded now so a wrong path fails at start-up.
    dataset: the training split when the caller has it (the 2-D metrics and the classifier's real-vs-real
    floor use it); sample_shape: defaults to the dataset's."""
    from classifier import classifier_class_names
    from evaluation import Evaluator
    from vae import latent_decoder

    name, _ = spec_kwargs(dataset_cfg)
    if sample_shape is None:
        dataset = build_dataset(dataset_cfg, device) if dataset is None else dataset
        sample_shape = dataset.sample_shape
    vae_id = getattr(dataset, "vae_id", None) if dataset is not None else latent_vae_id(dataset_cfg)
    decode = latent_decoder(vae_id, device) if decode_latents else None
    scorer = None
    if classifier:
        scorer = load_eval_classifier(classifier, dataset_cfg, device, num_samples, seed, train_split=dataset)
    inception = load_inception_reference(inception_weights, fid_reference, device) if fid_reference else None
    return Evaluator(
        sample_shape,
        device,
        decode=decode,
        classifier=scorer,
        inception=inception,
        dataset=dataset,
        dataset_name=name,
        # the dataset's names, else (a GRPO seed's evaluation, no dataset built) the classifier file's
        class_names=getattr(dataset, "class_names", None)
        or (scorer and classifier_class_names(scorer.classifier))
        or None,
    )
