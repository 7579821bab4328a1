"""Couplings (independent, minibatch OT, reflow pairs), pair files and their generation, straightness,
the discrete time sampler, and exact resume / torchrun equivalence with the new couplings."""

import json

import pytest
import torch

import config
import couplings
import flow
import runtime
from conftest import FAST, assert_same_state, final_state, load_script, run_train, torchrun
from sampling import FlowSampler, straightness
from trainer import Trainer

SHORT = ["experiment=moons", "training.max_steps=20", "training.checkpoint_every=10", "training.batch_size=64"]


# --- the assignment -------------------------------------------------------------------------------


def test_ot_recovers_a_known_permutation():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(96, 2, generator=generator)
    perm = torch.randperm(96, generator=generator)
    data = noise[perm] + 1e-3 * torch.randn(96, 2, generator=generator)
    assert torch.equal(couplings.ot_permutation(data, noise), perm)
    # the re-paired noise is the data's own point, and the total cost is far below independent pairing
    paired = couplings.MinibatchOT(within_class=False)(data, noise, None, None)
    assert (data - paired).square().sum(1).max() < 1e-4 < (data - noise).square().sum(1).mean()


def test_within_class_pairing_never_crosses_classes():
    generator = torch.Generator().manual_seed(1)
    x1, eps = torch.randn(120, 3, generator=generator), torch.randn(120, 3, generator=generator)
    y = torch.randint(0, 4, (120,), generator=generator)
    perm = couplings.ot_permutation(x1, eps, y)
    assert sorted(perm.tolist()) == list(range(120)) and torch.equal(y[perm], y)
    cost = lambda p: float((x1 - eps[p]).square().sum())
    identity = torch.arange(120)
    # optimal within the classes: no better than the unconstrained assignment, better than no assignment
    assert cost(couplings.ot_permutation(x1, eps)) <= cost(perm) < cost(identity)


def _trainer(tmp_path, *overrides):
    cfg = config.load_config(["experiment=moons_cfg", "training.batch_size=64", *overrides])
    return Trainer(cfg, runtime.Runtime(device=torch.device("cpu")), tmp_path / "run")


def test_minibatch_ot_is_a_function_of_seed_step_and_micro_batch(tmp_path):
    """The coupling only re-pairs the micro-batch's own seeded draws: the same (seed, step, j) gives the
    same tensors, and the label drop (after the pairing) is the independent coupling's."""
    ot = _trainer(tmp_path, "training.coupling.name=minibatch_ot", "training.grad_accum=2")
    independent = _trainer(tmp_path, "training.grad_accum=2")
    a, b = ot.batches.micro_batch(5, 1), ot.batches.micro_batch(5, 1)
    for one, two in zip(a, b):
        assert torch.equal(one, two)
    x1, y, t, eps = a
    x1_i, y_i, t_i, eps_i = independent.batches.micro_batch(5, 1)
    assert torch.equal(x1, x1_i) and torch.equal(y, y_i) and torch.equal(t, t_i)  # same draws, same drop
    assert sorted(map(tuple, eps.tolist())) == sorted(map(tuple, eps_i.tolist()))  # a permutation of them
    assert (x1 - eps).square().sum() < 0.5 * (x1 - eps_i).square().sum()
    assert not torch.equal(ot.batches.micro_batch(6, 1)[3], eps)


def test_coupling_errors_name_the_key_value_and_allowed(tmp_path):
    with pytest.raises(
        config.ConfigError,
        match=r"^training.coupling.name = 'sinkhorn' is not allowed; choose one "
        r"of: independent, minibatch_ot, pairs$",
    ):
        config.load_config(["training.coupling.name=sinkhorn"])
    with pytest.raises(config.ConfigError, match="training.coupling.pairs = None: is required"):
        config.load_config(["experiment=moons_reflow"])
    with pytest.raises(couplings.PairFileError, match="no manifest.json"):
        _trainer(tmp_path, "model=mlp", "training.coupling.name=pairs", f"training.coupling.pairs={tmp_path}")


# --- pair files -----------------------------------------------------------------------------------


def test_pair_file_reloads_the_same_pairs_and_detects_damage(tmp_path):
    generator = torch.Generator().manual_seed(2)
    noise, samples = torch.randn(10, 1, 4, 4, generator=generator), torch.randn(10, 1, 4, 4, generator=generator)
    labels = torch.arange(10) % 3
    couplings.write_chunk(tmp_path, 0, noise[:6], samples[:6], labels[:6])
    couplings.write_chunk(tmp_path, 1, noise[6:], samples[6:], labels[6:])
    settings = {"num_pairs": 10, "sample_shape": [1, 4, 4], "num_classes": 3, "dataset": "digits"}
    couplings.write_manifest(tmp_path, settings, num_chunks=2)
    loaded_noise, loaded_samples, loaded_labels, manifest = couplings.load_pairs(tmp_path)
    assert torch.equal(loaded_noise, noise) and torch.equal(loaded_samples, samples)
    assert torch.equal(loaded_labels, labels) and manifest["num_classes"] == 3
    chunk = couplings.chunk_path(tmp_path, 1)
    chunk.write_bytes(chunk.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(couplings.PairFileError, match="fails its sha256 check"):
        couplings.load_pairs(tmp_path)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny unconditional moons teacher and 1,024 of its pairs (4 chunks)."""
    root = tmp_path_factory.mktemp("reflow")
    assert run_train(root / "teacher", *SHORT) == 0
    generate = load_script("generate_pairs")
    assert (
        generate.main(
            [
                f"checkpoint={root / 'teacher'}",
                f"out={root / 'pairs'}",
                "num_pairs=1024",
                "chunk_size=256",
                "num_steps=8",
                "device=cpu",
            ]
        )
        == 0
    )
    return root


def _files(directory):
    # .lock: the owner record (pid, time), not part of the pairs
    return {
        p.relative_to(directory): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.mark.slow  # needs the teacher fixture (a trained moons model and its pairs)
def test_killed_generation_resumes_to_the_same_files(teacher, tmp_path, monkeypatch):
    generate = load_script("generate_pairs")
    args = [
        f"checkpoint={teacher / 'teacher'}",
        f"out={tmp_path / 'pairs'}",
        "num_pairs=1024",
        "chunk_size=256",
        "num_steps=8",
        "device=cpu",
    ]
    original, solved = generate.PairGeneration.solve_chunk, []

    def dies_after_two(self, chunk):
        if len(solved) == 2:
            raise KeyboardInterrupt  # a kill between chunks; a kill inside a write leaves only a .tmp file
        solved.append(chunk)
        original(self, chunk)

    monkeypatch.setattr(generate.PairGeneration, "solve_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        generate.main(args)
    assert not (tmp_path / "pairs" / "manifest.json").exists()
    with pytest.raises(couplings.PairFileError, match="did not finish"):
        couplings.load_pairs(tmp_path / "pairs")
    (tmp_path / "pairs" / "chunks" / ".chunk_000002.safetensors.tmp999").write_bytes(b"partial")
    monkeypatch.setattr(
        generate.PairGeneration, "solve_chunk", lambda self, chunk: (solved.append(chunk), original(self, chunk))
    )
    assert generate.main(args) == 0
    assert solved == [0, 1, 2, 3]  # the re-run solved only the missing chunks
    (tmp_path / "pairs" / "chunks" / ".chunk_000002.safetensors.tmp999").unlink()
    assert _files(tmp_path / "pairs") == _files(teacher / "pairs")
    # a finished directory is a no-op; other settings in it are refused
    assert generate.main(args) == 0
    with pytest.raises(runtime.RunError, match="other settings .*seed"):
        generate.main([*args, "seed=1"])
    manifest = json.loads((teacher / "pairs" / "manifest.json").read_text())
    assert manifest["teacher"]["step"] == 20 and manifest["solver"]["num_steps"] == 8
    assert manifest["sample_shape"] == [2] and len(manifest["chunks"]) == 4


# --- training on the new couplings: exact resume, torchrun = accumulation -------------------------


def _pairs_args(teacher):
    return [
        "training.coupling.name=pairs",
        f"training.coupling.pairs={teacher / 'pairs'}",
        f"training.init.checkpoint={teacher / 'teacher'}",
    ]


@pytest.mark.slow  # two interrupted runs per coupling on the teacher fixture
@pytest.mark.parametrize("coupling", ["minibatch_ot", "pairs"])
def test_resume_is_bitwise_exact_with_the_coupling(coupling, teacher, tmp_path):
    extra = _pairs_args(teacher) if coupling == "pairs" else ["training.coupling.name=minibatch_ot"]
    assert run_train(tmp_path / "full", *SHORT, *extra) == 0
    assert run_train(tmp_path / "split", *SHORT[:1], *SHORT[2:], "training.max_steps=7", *extra) == 0
    assert run_train(tmp_path / "split", *SHORT, *extra, "training.resume=auto") == 0
    assert_same_state(final_state(tmp_path / "full"), final_state(tmp_path / "split"))
    evaluation = [
        json.loads(line)
        for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
        if "eval/straightness" in line
    ]
    assert evaluation and evaluation[-1]["eval/straightness"] >= 0


@pytest.mark.slow  # two torchrun launches: ~40 s on the 2-core machine
@pytest.mark.parametrize("coupling", ["minibatch_ot", "pairs"])
def test_two_ranks_match_one_process_with_the_coupling(coupling, teacher, tmp_path):
    extra = _pairs_args(teacher) if coupling == "pairs" else ["training.coupling.name=minibatch_ot"]
    torchrun("train.py", f"training.run_dir={tmp_path / 'ddp'}", *FAST, *SHORT, *extra)
    assert run_train(tmp_path / "single", *SHORT, *extra, "training.grad_accum=2") == 0
    ddp, single = final_state(tmp_path / "ddp"), final_state(tmp_path / "single")
    for part in (0, 1):
        for key in single[part]:
            torch.testing.assert_close(ddp[part][key], single[part][key], rtol=1e-5, atol=1e-6)


# --- straightness and the discrete time sampler ----------------------------------------------------


class Field(torch.nn.Module):
    def __init__(self, velocity):
        super().__init__()
        self.velocity = velocity

    def forward(self, x, t, y=None):
        return self.velocity(x)


def _straightness(velocity, method="euler", num_steps=16):
    sampler = FlowSampler(Field(velocity), flow.make_path("condot"), "velocity")
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))
    solution = sampler.sample(noise, solver=method, num_steps=num_steps, return_trajectory=True)
    from ode_solvers import time_grid

    return straightness(solution.trajectory, time_grid(num_steps, "uniform", 1.0))


def test_straightness_is_zero_for_straight_paths_and_positive_for_a_rotation():
    constant = _straightness(lambda x: torch.tensor([1.5, -0.5]).expand_as(x))
    assert constant.abs().max() < 1e-10  # float32 rounding of x_k only
    # a linear field v = A x with A fixed moves along straight lines only if x is an eigenvector;
    # a rotation never does: |v| = |x| is conserved while the chord is shorter than the arc.
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    curved = _straightness(lambda x: x @ rotation.T, method="rk4")
    assert (curved > 0).all()
    # for a unit-speed rotation over an angle of 1 rad the exact value is r^2 - |chord|^2 = r^2 (1 - 2 (1 - cos 1))
    # per path; the 16 chord slopes are each r (2 sin(h/2) / h) long, short by h^2 / 24: 0.4 % of S here
    radius2 = torch.randn(32, 2, generator=torch.Generator().manual_seed(3)).square().sum(1).double()
    torch.testing.assert_close(
        curved, radius2 * (1 - 2 * (1 - torch.cos(torch.tensor(1.0, dtype=torch.float64)))), rtol=1e-2, atol=1e-6
    )


def test_discrete_time_sampler_draws_the_euler_grid():
    t = flow.make_time_sampler("discrete", num_steps=4)(4000, torch.Generator().manual_seed(0))
    levels = torch.tensor([0.0, 0.25, 0.5, 0.75])
    nearest = (t[:, None] - levels).abs().min(1)
    assert nearest.values.max() < 1e-6 and set(nearest.indices.tolist()) == {0, 1, 2, 3}
    assert (flow.make_time_sampler("discrete")(100, torch.Generator()) < 1e-6).all()  # one-step: t = 0


@pytest.mark.slow  # needs the teacher fixture (a trained moons model and its pairs)
def test_inference_reports_straightness(teacher, tmp_path):
    import inference

    out = tmp_path / "samples"
    assert (
        inference.main(
            [
                f"checkpoint={teacher / 'teacher'}",
                f"out={out}",
                "num_samples=32",
                "solver=euler",
                "num_steps=4",
                "straightness=true",
                "device=cpu",
            ]
        )
        == 0
    )
    assert json.loads((out / "metrics.json").read_text())["straightness"] > 0


@pytest.mark.slow  # trains a teacher and two reflow rounds: ~4 CPU-minutes
def test_two_rectified_moons_needs_a_quarter_of_the_nfe(tmp_path):
    """The 2-rectified `moons` MLP at 2 Euler steps reaches a sliced W2 the independent-coupling model
    needs >= 8 Euler steps for. Measured by experiments/few_step.py stage=moons (50k pairs per round, SW2 of
    4,000 samples): see experiments/few_step.md for the numbers; this test uses 20k pairs per round."""
    import metrics
    from build import build_dataset, load_run
    from sampling import generate

    generate_pairs = load_script("generate_pairs")
    quiet = ["training.progress=false", "training.tensorboard=false"]
    assert run_train(tmp_path / "independent", "experiment=moons", *quiet) == 0
    teacher = tmp_path / "independent"
    for round_ in (1, 2):
        assert (
            generate_pairs.main(
                [f"checkpoint={teacher}", f"out={tmp_path / f'pairs{round_}'}", "num_pairs=20000", "device=cpu"]
            )
            == 0
        )
        student = tmp_path / f"reflow_{round_}"
        assert (
            run_train(
                student,
                "experiment=moons_reflow",
                *quiet,
                f"training.coupling.pairs={tmp_path / f'pairs{round_}'}",
                f"training.init.checkpoint={teacher}",
                "training.epochs=25",
            )
            == 0
        )
        teacher = student
    data = build_dataset(config.load_config(["experiment=moons"]).dataset, "cpu").x

    def sw2(run_dir, steps):
        run = load_run(run_dir, "cpu", solver_overrides={"method": "euler", "num_steps": steps})
        return metrics.sliced_wasserstein(generate(run.sampler, run.solver, run.sample_shape, 4000, seed=1)[0], data)

    target = sw2(tmp_path / "reflow_2", 2)
    independent = {steps: sw2(tmp_path / "independent", steps) for steps in (1, 2, 4, 8)}
    assert all(independent[steps] > target for steps in (1, 2, 4)), (target, independent)
