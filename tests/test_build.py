"""build.py: config sections -> model, flow, dataset, coupling and evaluator; a checkpoint -> a ready sampler
with the run's solver and the overrides merged in."""

import pytest
import torch
from safetensors.torch import load_file

import build
import couplings
import flow
import models
from config import load_config
from conftest import run_train
from evaluation import Evaluator
from sampling import FlowSampler


@pytest.fixture(scope="module")
def moons_cfg():
    return load_config(["experiment=moons_cfg"])


def test_build_model_from_the_moons_presets(moons_cfg):
    model = build.build_model(moons_cfg.model)
    assert type(model) is models.ClassCondMLP and model.num_classes == moons_cfg.model.num_classes
    assert model.in_proj.out_features == moons_cfg.model.hidden_dim
    out = model(torch.randn(3, 2), torch.rand(3), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 2)
    unconditional = build.build_model(load_config(["experiment=moons", "model.hidden_dim=16"]).model)
    assert type(unconditional) is models.MLP and unconditional.in_proj.out_features == 16


def test_build_flow_is_the_configured_path_sampler_and_weighting():
    cfg = load_config(
        [
            "experiment=moons",
            "flow.time_sampler.name=logit_normal",
            "+flow.time_sampler.mean=0.5",
            "flow.weighting.name=min_snr",
        ]
    )
    path, time_sampler, weighting = build.build_flow(cfg.flow)
    assert isinstance(path.scheduler, flow.SCHEDULERS["condot"]) and path.denominator_min == cfg.flow.denominator_min
    assert type(time_sampler) is flow.TIME_SAMPLERS["logit_normal"] and time_sampler.mean == 0.5
    assert type(weighting) is flow.LOSS_WEIGHTINGS["min_snr"]
    x1, eps, t = torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t, u = path.sample(x1, eps, t)
    torch.testing.assert_close(x_t, t[:, None] * x1 + (1 - t[:, None]) * eps)  # CondOT
    torch.testing.assert_close(u, x1 - eps)


def test_build_dataset_with_overrides(moons_cfg):
    data = build.build_dataset(moons_cfg.dataset, "cpu", num_samples=100)
    assert data.name == "moons" and len(data) == 100 and data.sample_shape == (2,) and data.num_classes == 2
    assert len(build.build_dataset(moons_cfg.dataset, "cpu")) == moons_cfg.dataset.num_samples


def test_build_coupling_by_name(moons_cfg):
    data = build.build_dataset(moons_cfg.dataset, "cpu", num_samples=64)
    coupling = build.build_coupling(moons_cfg.training.coupling, data, True, "cpu")
    assert type(coupling) is couplings.Coupling
    ot = build.build_coupling(load_config(["experiment=moons_ot"]).training.coupling, data, True, "cpu")
    assert isinstance(ot, couplings.MinibatchOT)


def test_parse_overrides_and_latent_vae_id(moons_cfg):
    assert build.parse_overrides(["depth=4", "mlp_ratio=[0.5,4.0]", "name=dit"]) == {
        "depth": 4,
        "mlp_ratio": [0.5, 4.0],
        "name": "dit",
    }
    with pytest.raises(ValueError, match="not key=value"):
        build.parse_overrides(["depth"])
    assert build.latent_vae_id(moons_cfg.dataset) is None
    assert build.latent_vae_id({"name": "latent_cache", "path": "/nowhere", "vae": "my/vae"}) == "my/vae"


def test_build_meta_dit_allocates_nothing_and_refuses_unknown_names():
    import models_dit

    name = next(iter(models_dit.DIT_MODELS))
    model = build.build_meta_dit(name, {"depth": 1})
    assert all(p.device.type == "meta" for p in model.parameters())
    with pytest.raises(ValueError, match="unknown DiT 'nope'"):
        build.build_meta_dit("nope")


def test_build_evaluator_for_moons_scores_in_2d(moons_cfg):
    evaluator = build.build_evaluator(moons_cfg.dataset, "cpu")
    assert isinstance(evaluator, Evaluator)
    assert evaluator.decode is None and evaluator.classifier is None and evaluator.inception_reference is None
    assert evaluator.sample_shape == (2,) and evaluator.dataset_name == "moons"
    scores = evaluator.score(evaluator.dataset.x[:200], evaluator.dataset.y[:200])
    assert set(scores) == {"sliced_w2", "class_accuracy"} and scores["class_accuracy"] > 0.95


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("build") / "run"
    assert (
        run_train(
            run_dir,
            "training.max_steps=6",
            "training.batch_size=64",
            "training.checkpoint_every=3",
            "training.num_eval_samples=20",
        )
        == 0
    )
    return run_dir


def snapshot(directory):
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def test_load_run_returns_the_sampler_and_the_runs_solver_with_overrides(tiny_run):
    before = snapshot(tiny_run)
    loaded = build.load_run(tiny_run, "cpu", solver_overrides={"method": "euler", "num_steps": 3, "shift": None})
    assert snapshot(tiny_run) == before  # reading changes nothing
    assert loaded.checkpoint.step == 6 and loaded.sample_shape == (2,)
    assert isinstance(loaded.sampler, FlowSampler) and loaded.sampler.model is loaded.model
    assert loaded.sampler.num_classes == loaded.model.num_classes == loaded.config.model.num_classes
    assert not loaded.model.training
    # the run's solver (FAST: 4 steps, the preset's guidance), with the non-null overrides merged in
    run_solver = loaded.config.solver
    assert (loaded.solver.method, loaded.solver.num_steps) == ("euler", 3)
    assert loaded.solver.guidance_scale == run_solver.guidance_scale and loaded.solver.shift == run_solver.shift
    assert build.load_run(tiny_run, "cpu").solver == run_solver


@pytest.mark.parametrize("use_ema, weights", [(True, "ema.safetensors"), (False, "model.safetensors")])
def test_load_run_loads_the_ema_or_the_raw_weights(tiny_run, use_ema, weights):
    loaded = build.load_run(tiny_run / "checkpoints" / "latest", "cpu", use_ema=use_ema)
    saved = load_file(str(loaded.checkpoint.path / weights))
    state = loaded.model.state_dict()
    assert saved.keys() == state.keys()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert loaded.checkpoint.model is None and loaded.checkpoint.ema is None  # the module holds them now
    other = load_file(str(loaded.checkpoint.path / ({"ema.safetensors", "model.safetensors"} - {weights}).pop()))
    assert any(not torch.equal(other[key], value) for key, value in saved.items())  # the two really differ
