"""Sample a trained checkpoint: `python inference.py checkpoint=RUN/checkpoints/latest out=samples/
[n_per_class=8 guidance_scale=3 solver=heun num_steps=32 seed=0 classifier=PATH ...]`.

generate -> save (`samples.png` + `samples.npz`) -> decode latents -> score, from nothing but the
checkpoint. The sampler itself is `sampling.FlowSampler`; the checkpoint is read by `build.load_run`.
Solver keys left out fall back to the run's own `solver` config.
"""

import json
import sys
from pathlib import Path

from build import latent_vae_id, load_eval_classifier, load_run
from config import ConfigError, InferenceConfig, apply_schema, compose, solver_overrides, validate_inference
from figures import close_figure, samples_figure, save_samples
from runtime import run_main, select_device
from sampling import generate
from vae import latent_decoder


def main(argv: list[str] | None = None) -> int:
    cfg = apply_schema(compose(sys.argv[1:] if argv is None else argv, config_name="inference"), InferenceConfig)
    if not cfg.checkpoint:
        raise ConfigError("checkpoint is required: checkpoint=RUN_DIR/checkpoints/latest (or a run dir or a step_* dir)")
    validate_inference(cfg)
    device = select_device(cfg.device)
    run = load_run(cfg.checkpoint, device, use_ema=cfg.use_ema, solver_overrides=solver_overrides(cfg))
    sampler, solver = run.sampler, run.solver
    if sampler.num_classes is None:
        num = 64 if cfg.num_samples is None else cfg.num_samples
    elif cfg.num_samples is not None:
        raise ConfigError(f"num_samples = {cfg.num_samples}: {run.checkpoint.path} is class-conditional "
                          f"({sampler.num_classes} classes), so the count is n_per_class per class; use n_per_class")
    else:
        num = cfg.n_per_class * sampler.num_classes
    samples, labels = generate(sampler, solver, run.sample_shape, num, seed=cfg.seed, device=device,
                               batch_size=cfg.batch_size)
    decode, latents = latent_decoder(latent_vae_id(run.config.dataset), device), None
    if decode is not None:
        latents, samples = samples, decode(samples).cpu()
    figure = samples_figure(samples, labels, run.config.dataset.name)
    save_samples(samples, labels, cfg.out, figure, latents=latents)
    close_figure(figure)
    if cfg.classifier:
        scorer = load_eval_classifier(cfg.classifier, run.config.dataset, device, len(samples), cfg.seed)
        scores = scorer.score(samples, labels)
        (Path(cfg.out) / "metrics.json").write_text(json.dumps(scores, indent=2))
        print(" ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    print(f"{len(samples)} samples from {run.checkpoint.path} (step {run.checkpoint.step}, solver {solver.method} "
          f"x{solver.num_steps}, guidance {solver.guidance_scale}) -> {Path(cfg.out) / 'samples.png'}, "
          f"{Path(cfg.out) / 'samples.npz'}")
    return 0


if __name__ == "__main__":
    run_main(main)
