"""Sample a trained checkpoint: `python inference.py checkpoint=RUN/checkpoints/latest out=samples/
[n_per_class=8 guidance_scale=3 solver=heun num_steps=32 seed=0 classifier=PATH ...]`.

generate -> save (`samples.png` + `samples.npz`) -> decode latents -> score, from nothing but the
checkpoint. The sampler itself is `sampling.FlowSampler`; the checkpoint is read by `build.load_run`.
Solver keys left out fall back to the run's own `solver` config.
"""

import json
from pathlib import Path

from build import build_evaluator, latent_vae_id, load_run
from checkpoint import atomic_write_text
from config import ConfigError, InferenceConfig, load_tool_config, solver_overrides, validate_inference
from run_dir import refuse_inside_run
from runtime import Progress, run_main, select_device


def held_out_bits_per_dim(run, cfg, device) -> dict:
    """Bits/dim of the first `likelihood_images` held-out images (uniform dequantisation, the 7 bits/dim
    of the [0, 256) -> [-1, 1) scaling included): an upper bound on the model's discrete bits/dim."""
    import torch

    from build import build_dataset
    from sampling import image_bits_per_dim

    if len(run.sample_shape) != 3 or latent_vae_id(run.config.dataset) is not None:
        raise ConfigError(
            "likelihood=true scores pixel image models (bits per 8-bit dimension); this checkpoint "
            f"models {run.config.dataset.name!r} samples of shape {list(run.sample_shape)}"
        )
    held_out = build_dataset(run.config.dataset, device, split="test")
    count = min(cfg.likelihood_images, len(held_out))
    labels = held_out.y[:count] if run.sampler.num_classes is not None else None
    result = image_bits_per_dim(
        run.sampler,
        held_out.x[:count],
        labels,
        torch.Generator(device).manual_seed(cfg.seed),
        num_steps=cfg.likelihood_steps,
        hutchinson_samples=cfg.likelihood_probes,
    )
    return {
        "bits_per_dim": result["mean"],
        "bits_per_dim_sem": result["sem"],
        "bits_per_dim_images": count,
        "bits_per_dim_estimator": result["estimator"],
        "bits_per_dim_nfe": result["nfe"],
    }


def main(argv: list[str] | None = None) -> int:
    cfg = load_tool_config(argv, __doc__, "inference", InferenceConfig)
    if not cfg.checkpoint:
        raise ConfigError(
            "checkpoint is required: checkpoint=RUN_DIR/checkpoints/latest (or a run dir or a step_* dir)"
        )
    validate_inference(cfg)
    refuse_inside_run(cfg.out)
    device = select_device(cfg.device)
    run = load_run(cfg.checkpoint, device, use_ema=cfg.use_ema, solver_overrides=solver_overrides(cfg))
    sampler, solver = run.sampler, run.solver
    if sampler.num_classes is None:
        num = 64 if cfg.num_samples is None else cfg.num_samples
    elif cfg.num_samples is not None:
        raise ConfigError(
            f"num_samples = {cfg.num_samples}: {run.checkpoint.path} is class-conditional "
            f"({sampler.num_classes} classes), so the count is n_per_class per class; use n_per_class"
        )
    else:
        num = cfg.n_per_class * sampler.num_classes
    evaluator = build_evaluator(
        run.config.dataset,
        device,
        sample_shape=run.sample_shape,
        classifier=cfg.classifier,
        fid_reference=cfg.fid_reference,
        inception_weights=cfg.inception_weights,
        num_samples=num,
        seed=cfg.seed,
    )
    # a bar on a terminal; in a log file or a captured pipe a line every runtime.PROGRESS_LINE_EVERY_S seconds
    # (a short run prints none, so the error contract's one line stays one line)
    with Progress(num, f"sampling {solver.method} x{solver.num_steps}", "img") as bar:
        samples, labels, latents = evaluator.sample(
            sampler, solver, num, cfg.seed, batch_size=cfg.batch_size, progress=bar.update
        )
    evaluator.save(cfg.out, samples, labels, latents, solver=solver)
    scores = {}
    if run.skipped:  # the newest checkpoints failed verification: say which one was sampled, with the numbers
        scores["checkpoint_fallback"] = (
            f"sampled {run.checkpoint.path}: newer {', '.join(run.skipped)} failed verification (warned on stderr)"
        )
    if cfg.classifier:
        scores.update(evaluator.score(samples, labels))
    if cfg.fid_reference:
        values = evaluator.inception(samples, progress=True)
        scores.update({f"inception/{k}": v for k, v in values.items()} | {"inception/num_samples": len(samples)})
    if cfg.likelihood:
        scores.update(held_out_bits_per_dim(run, cfg, device))
    if cfg.straightness:  # of the first batch's paths (their trajectories are kept), same seed and settings
        scores["straightness"] = evaluator.straightness(sampler, solver, num, cfg.seed)
    if scores:
        atomic_write_text(Path(cfg.out) / "metrics.json", json.dumps(scores, indent=2))
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in scores.items()))
    print(
        f"{len(samples)} samples from {run.checkpoint.path} (step {run.checkpoint.step}, solver {solver.method} "
        f"x{solver.num_steps}, guidance {solver.guidance_scale}) -> {Path(cfg.out) / 'samples.png'}, "
        f"{Path(cfg.out) / 'samples.npz'}"
    )
    if run.best:  # a run dir resolves to what the run published; say so, and how to get the newest instead
        print(
            f"(the run's best checkpoint, named by {run.checkpoint.path.parent / 'best.json'}; "
            f"checkpoint={run.checkpoint.path.parent / 'latest'} samples its newest)"
        )
    return 0


if __name__ == "__main__":
    run_main(main)
