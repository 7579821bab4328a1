import pytest

from config import ConfigError, compose, load_config
from presets import presets

PRESETS = presets("train")


def test_presets_exist():
    assert {"moons", "moons_cfg"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(preset):
    # A second stage names the run it starts from (required, so it can never silently start from scratch).
    stage = ["training.init.checkpoint=runs/stage1"] if "unmasked" in preset else []
    # A reflow / distillation student names its pair directory (required too).
    stage += ["training.coupling.pairs=runs/pairs"] if "reflow" in preset or "distill" in preset else []
    cfg = load_config([f"experiment={preset}", *stage])
    assert cfg.experiment == preset
    assert cfg.training.lr > 0


def test_two_stage_imagenet_recipe():
    """masked80 -> unmasked20: same architecture, masking off, EMA-free weights handed over, 1/10 the lr."""
    name = "imagenet256_latent_dit_m2_moe_layerwise_h1024_d20_e16_c2_moew05"
    masked = load_config([f"experiment={name}_masked80"])
    with pytest.raises(ConfigError, match="training.init.checkpoint"):
        load_config([f"experiment={name}_unmasked20"])
    unmasked = load_config([f"experiment={name}_unmasked20", "training.init.checkpoint=runs/m"])
    assert (masked.model.mask_ratio, unmasked.model.mask_ratio) == (0.75, 0.0)
    assert {k: v for k, v in masked.model.items() if k != "mask_ratio"} == {
        k: v for k, v in unmasked.model.items() if k != "mask_ratio"
    }
    assert (masked.training.epochs, unmasked.training.epochs) == (80, 20)
    assert (masked.training.lr, unmasked.training.lr) == (1e-4, 1e-5)
    init = unmasked.training.init
    assert (init.model, init.optimizer, init.step) == ("model", False, False)


def test_default_is_moons_cfg():
    cfg = load_config([])
    assert cfg.experiment == "moons_cfg"
    assert cfg.model.name == "class_cond_mlp"


def test_config_is_read_only():
    cfg = load_config([])
    from omegaconf.errors import ReadonlyConfigError

    with pytest.raises(ReadonlyConfigError):
        cfg.training.lr = 1.0


@pytest.mark.parametrize(
    "override, fragments",
    [
        (["training.lrr=1"], ["training.lrr", "allowed keys", "lr", "batch_size"]),
        (["+training.lrr=1"], ["training.lrr", "allowed keys", "lr"]),
        (["training.lr=abc"], ["training.lr", "wrong type"]),
        (["training.lr=-0.1"], ["training.lr", "-0.1", "> 0"]),
        (["training.p_uncond=1.0"], ["training.p_uncond", "[0, 1)"]),
        (["training.p_uncond=-0.2"], ["training.p_uncond"]),
        (["solver.guidance_interval=[0.8,0.2]"], ["solver.guidance_interval", "t_lo <= t_hi"]),
        (["solver.method=leapfrog"], ["solver.method", "leapfrog", "heun", "dopri5"]),
        (["experiment=nope"], ["experiment", "nope", "moons_cfg"]),
        (["device=tpu"], ["device", "tpu", "cuda", "mps"]),
        (["+model.hidden_dimm=3"], ["model.hidden_dimm", "allowed", "hidden_dim"]),
        (["model.name=transformer"], ["model.name", "transformer", "mlp"]),
        (["flow.prediction=score"], ["flow.prediction", "velocity", "data", "noise"]),
        (["flow.time_sampler.name=gamma"], ["flow.time_sampler.name", "logit_normal"]),
        (["training.lr_schedule=step"], ["training.lr_schedule", "cosine", "constant"]),
    ],
)
def test_bad_config_fails_with_key_and_allowed_values(override, fragments):
    with pytest.raises(ConfigError) as error:
        load_config(override)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_overrides_apply():
    cfg = load_config(
        [
            "experiment=moons",
            "training.lr=0.01",
            "+flow.time_sampler.mean=0.5",
            "flow.time_sampler.name=logit_normal",
            "seed=3",
        ]
    )
    assert cfg.training.lr == 0.01 and cfg.seed == 3
    assert cfg.flow.time_sampler.mean == 0.5
    assert cfg.model.name == "mlp"


def test_inference_config_composes():
    cfg = compose(["checkpoint=runs/x/checkpoints/latest", "guidance_scale=3"], config_name="inference")
    assert cfg.checkpoint.endswith("latest") and cfg.guidance_scale == 3


def test_polynomial_below_one_refuses_data_and_noise_prediction():
    """alpha = t^n with n < 1 has an infinite velocity at t = 0, where sampling starts: a data or noise
    prediction converted there gave NaN samples. Refused at validation; velocity prediction is allowed."""
    for prediction in ("data", "noise"):
        with pytest.raises(ConfigError) as error:
            load_config(["flow.scheduler.name=polynomial", "+flow.scheduler.n=0.5", f"flow.prediction={prediction}"])
        assert all(word in str(error.value) for word in ("flow.scheduler.n", "0.5", ">= 1", prediction))
    assert load_config(["flow.scheduler.name=polynomial", "+flow.scheduler.n=0.5"]).flow.prediction == "velocity"
    load_config(["flow.scheduler.name=polynomial", "+flow.scheduler.n=2.0", "flow.prediction=data"])


@pytest.mark.parametrize("entry", ["train", "train_grpo", "inference", "eval_imagenet"])
def test_every_entry_point_answers_help(entry, capsys):
    """`python train.py --help` exited 1 with a Hydra lexer error."""
    import importlib

    module = importlib.import_module(entry)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(module.__doc__.strip().splitlines()[0])
    if entry == "train":
        assert "presets (experiment=NAME):" in out and "moons_cfg" in out and "fashion_grpo_jpeg" not in out
    elif entry == "train_grpo":
        assert "fashion_grpo_jpeg" in out and "reward: " in out
    else:
        assert "checkpoint: str | None = null" in out
