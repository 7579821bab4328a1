"""runtime.py: the LR schedule, seeding, epoch order, EMA, one optimizer step, the metric logger, devices,
the error contract and run_main's exit codes, each against a closed form or a hand computation."""

import errno
import json
import math

import pytest
import torch

import runtime
from config import ConfigError

# --- the LR schedule ---------------------------------------------------------------------------------


def test_learning_rate_warmup_then_cosine():
    lr = lambda s: runtime.learning_rate(s, 1.0, warmup_steps=10, total_steps=110, schedule="cosine", min_ratio=0.1)
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    assert runtime.learning_rate(50, 2.0, 10, 110, "constant", 0.0) == 2.0


@pytest.mark.parametrize("step", [0, 3, 7, 8, 20, 45, 71, 99, 100, 250])
def test_learning_rate_is_the_closed_form(step):
    base, warmup, total, floor = 3e-3, 8, 100, 0.05
    if step < warmup:
        expected = base * (step + 1) / warmup
    else:
        progress = min(1.0, (step - warmup) / (total - warmup))
        expected = base * (floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)
    assert runtime.learning_rate(step, base, warmup, total, "cosine", floor) == pytest.approx(expected, rel=1e-12)


def test_learning_rate_without_warmup_starts_at_the_base_and_never_rises():
    values = [runtime.learning_rate(s, 1.0, 0, 50, "cosine", 0.0) for s in range(60)]
    assert values[0] == 1.0 and values[50] == pytest.approx(0.0, abs=1e-15)
    assert all(b <= a for a, b in zip(values, values[1:]))
    # constant after warmup, and warmup still ramps linearly
    assert [runtime.learning_rate(s, 2.0, 4, 50, "constant", 0.0) for s in (0, 1, 3, 4, 49, 80)] == [
        0.5,
        1.0,
        2.0,
        2.0,
        2.0,
        2.0,
    ]


def test_set_learning_rate_sets_every_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    runtime.set_learning_rate(optimizer, 0.37)
    assert [group["lr"] for group in optimizer.param_groups] == [0.37, 0.37]


# --- seeding and the epoch order -----------------------------------------------------------------------


def test_derive_seed_is_stable_and_spreads():
    assert runtime.derive_seed(1, 2, 3) == runtime.derive_seed(1, 2, 3)
    seeds = {runtime.derive_seed(0, step, j) for step in range(200) for j in range(4)}
    assert len(seeds) == 800 and all(0 <= s < 2**63 for s in seeds)
    assert runtime.derive_seed(1, 2) != runtime.derive_seed(2, 1)


def test_derive_seed_depends_on_every_value_and_seeds_a_generator():
    base = runtime.derive_seed(7, 100, 2)
    assert (
        len(
            {
                base,
                runtime.derive_seed(8, 100, 2),
                runtime.derive_seed(7, 101, 2),
                runtime.derive_seed(7, 100, 3),
                runtime.derive_seed(7, 100),
                runtime.derive_seed(7, 100, 2, 0),
            }
        )
        == 6
    )
    # 63 bits: a valid torch seed; negative inputs are taken modulo 2^64 rather than refused
    torch.Generator().manual_seed(base)
    assert runtime.derive_seed(-1) == runtime.derive_seed(2**64 - 1)


def test_epoch_permutation_depends_only_on_seed_and_epoch():
    p = runtime.epoch_permutation(100, seed=0, epoch=3, device="cpu")
    assert sorted(p.tolist()) == list(range(100))
    assert torch.equal(p, runtime.epoch_permutation(100, seed=0, epoch=3, device="cpu"))
    assert not torch.equal(p, runtime.epoch_permutation(100, seed=0, epoch=4, device="cpu"))
    assert not torch.equal(p, runtime.epoch_permutation(100, seed=1, epoch=3, device="cpu"))


def test_epoch_permutation_ignores_the_global_rng():
    torch.manual_seed(0)
    first = runtime.epoch_permutation(257, seed=3, epoch=1, device="cpu")
    torch.manual_seed(12345)
    torch.rand(1000)
    second = runtime.epoch_permutation(257, seed=3, epoch=1, device="cpu")
    assert torch.equal(first, second)
    assert torch.equal(first.sort().values, torch.arange(257)) and first.dtype == torch.int64


# --- EMA ---------------------------------------------------------------------------------------------


def test_ema_warmup_matches_the_formula():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = runtime.EMA(model, decay=0.9, warmup=True)
    expected = 0.0
    for n in range(30):
        with torch.no_grad():
            model.weight.fill_(float(n + 1))
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * (n + 1)
        ema.update(model)
        assert ema.model.weight.item() == pytest.approx(expected, rel=1e-6)


def test_ema_without_warmup_is_the_lerp_by_hand_on_every_parameter():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = runtime.EMA(model, decay=0.8, warmup=False)
    assert ema.current_decay() == 0.8
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for name, p in model.named_parameters():
            expected[name] = 0.8 * expected[name] + 0.2 * p.detach()
    for name, p in ema.model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-6, atol=1e-6)
        assert not p.requires_grad
    assert ema.num_updates == 5 and not ema.model.training


def test_ema_skip_leaves_the_average_unchanged_and_copies_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = runtime.EMA(model, decay=0.5, warmup=False)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(4.0)
    ema.update(model, skip=torch.tensor(True))
    for a, b in zip(before, ema.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(ema.model[1].running_mean, torch.full((2,), 4.0))  # buffers are copied, not averaged
    ema.update(model, skip=torch.tensor(False))  # a real step: half way to the model
    for a, b, p in zip(before, ema.model.parameters(), model.parameters()):
        torch.testing.assert_close(b, 0.5 * a + 0.5 * p.detach())


# --- one optimizer step --------------------------------------------------------------------------------


def _linear_with_grad(grad):
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
    model.weight.grad = torch.tensor([grad])
    return model


def test_optimizer_step_clips_to_the_given_norm():
    model = _linear_with_grad([3.0, 4.0])  # norm 5
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, fused=True)
    grad_norm, nonfinite = runtime.optimizer_step(model, optimizer, grad_clip=0.5)
    assert float(grad_norm) == pytest.approx(5.0) and not bool(nonfinite)  # the norm before clipping
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[1.0 - 0.3, -1.0 - 0.4]]))  # 0.5 * (3, 4) / 5
    assert model.weight.grad is None  # zeroed for the next step
    model = _linear_with_grad([3.0, 4.0])
    runtime.optimizer_step(
        model, torch.optim.SGD(model.parameters(), lr=1.0, fused=True), grad_clip=0.0
    )  # 0: no clipping
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[-2.0, -5.0]]))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_optimizer_step_skips_a_non_finite_step_with_fused_adamw(bad):
    model = _linear_with_grad([bad, 1.0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    grad_norm, nonfinite = runtime.optimizer_step(model, optimizer, grad_clip=1.0)
    assert bool(nonfinite) and not math.isfinite(float(grad_norm))
    assert torch.equal(model.weight.detach(), torch.tensor([[1.0, -1.0]]))
    assert torch.isfinite(optimizer.state[model.weight]["exp_avg"]).all()
    # the next, finite step moves the weights again
    model.weight.grad = torch.tensor([[1.0, 1.0]])
    _, nonfinite = runtime.optimizer_step(model, optimizer, grad_clip=1.0)
    assert not bool(nonfinite) and not torch.equal(model.weight.detach(), torch.tensor([[1.0, -1.0]]))


# --- the metric logger -------------------------------------------------------------------------------


def test_metric_logger_appends_one_json_line_per_call(tmp_path):
    run_dir = tmp_path / "run"
    logger = runtime.MetricLogger(run_dir, enabled=True, tensorboard=False)
    assert not run_dir.exists()  # nothing is written before the first scalars
    logger.scalars(10, {"train/loss": 0.5})
    logger.scalars(20, {"train/loss": 0.25, "train/lr": 1e-3})
    logger.close()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 10, "train/loss": 0.5}, {"step": 20, "train/loss": 0.25, "train/lr": 1e-3}]
    again = runtime.MetricLogger(run_dir, enabled=True, tensorboard=False)  # a resume appends
    again.scalars(30, {"train/loss": 0.1})
    again.close()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert not (run_dir / "tb").exists()


def test_a_disabled_metric_logger_writes_and_prints_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    logger = runtime.MetricLogger(run_dir, enabled=False, tensorboard=True)
    logger.scalars(1, {"train/loss": 1.0})
    logger.print("hello")
    logger.figure(1, "samples", object())
    logger.close()
    assert not run_dir.exists()
    assert capsys.readouterr().out == ""
    enabled = runtime.MetricLogger(run_dir, enabled=True, tensorboard=False)
    enabled.print("hello", 3)
    assert capsys.readouterr().out == "hello 3\n"


# --- devices, errors and exit codes -------------------------------------------------------------------


def test_describe_error_names_the_file_of_an_os_error():
    error = OSError(errno.ENOENT, "No such file or directory", "/data/x.npz")
    assert runtime.describe_error(error) == "/data/x.npz: No such file or directory (FileNotFoundError)"
    assert (
        runtime.describe_error(OSError(errno.ENOSPC, "No space left on device", "m.jsonl"))
        == "m.jsonl: No space left on device (OSError)"
    )
    assert runtime.describe_error(OSError("disk on fire")) == "disk on fire"  # ours carry their message
    assert runtime.describe_error(ConfigError("training.lr = -1: must be > 0")) == "training.lr = -1: must be > 0"


def test_amp_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert runtime.amp_dtype("auto", cpu) is None
    assert runtime.amp_dtype("auto", cuda) == torch.bfloat16
    assert runtime.amp_dtype("bf16", cpu) == torch.bfloat16
    assert runtime.amp_dtype("none", cuda) is None


def test_select_device_refuses_an_absent_device_instead_of_falling_back():
    assert runtime.select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            runtime.select_device("cuda")
        if not torch.backends.mps.is_available():
            assert runtime.select_device("auto") == torch.device("cpu")


def test_single_process_runtime():
    rt = runtime.setup_runtime("cpu")
    assert rt.is_main and not rt.distributed and (rt.rank, rt.world_size) == (0, 1)
    assert runtime.broadcast_object({"a": 1}, rt) == {"a": 1}
    assert not runtime.Runtime(torch.device("cpu"), rank=1, world_size=2).is_main


@pytest.mark.parametrize(
    "raised, code, line",
    [
        (None, 0, None),
        (ConfigError("training.lr = -1: must be > 0"), runtime.EXIT_ERROR, "error: training.lr = -1: must be > 0"),
        (runtime.RunError("run dir r is in use"), runtime.EXIT_ERROR, "error: run dir r is in use"),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "w.pt"),
            runtime.EXIT_ERROR,
            "error: w.pt: No such file or directory (FileNotFoundError)",
        ),
        (runtime.Preempted("stopped"), runtime.EXIT_PREEMPTED, "stopped"),
    ],
)
def test_run_main_turns_faults_into_one_line_and_an_exit_code(monkeypatch, capsys, raised, code, line):
    monkeypatch.delenv("NANOFLOW_DEBUG", raising=False)

    def main(argv):
        assert argv == ["x=1"]
        if raised is not None:
            raise raised
        return 0

    with pytest.raises(SystemExit) as exited:
        runtime.run_main(main, ["x=1"])
    assert exited.value.code == code
    err = capsys.readouterr().err
    assert (err == "") if line is None else (err.strip() == line)


def test_run_main_lets_a_bug_through():
    def main(argv):
        raise KeyError("a bug, not a fault")

    with pytest.raises(KeyError):
        runtime.run_main(main, [])


# --- progress -----------------------------------------------------------------------------------


def test_progress_without_a_bar_writes_a_line_per_interval_and_a_last_one(monkeypatch):
    """Where no bar is drawn (a log file, a pipe, training.progress=false) a long phase still says how far it is."""
    monkeypatch.setattr(runtime, "PROGRESS_LINE_EVERY_S", 0.0)
    lines = []
    with runtime.Progress(5, "final evaluation", "img", enabled=False, write=lines.append) as bar:
        bar.update(2)
        bar.set_postfix(loss="0.5")
        bar.update(3)
    assert [line.split(",")[0] for line in lines] == [
        "final evaluation: 2/5 img (40 %)",
        "final evaluation: 5/5 img (100 %)",
    ]
    assert lines[-1].endswith("img/s, loss=0.5")


def test_progress_lines_come_only_after_the_interval_and_never_on_other_ranks(monkeypatch):
    lines = []
    with runtime.Progress(3, "short", enabled=False, write=lines.append) as bar:  # 30 s interval: a short phase
        bar.update(3)
    monkeypatch.setattr(runtime, "PROGRESS_LINE_EVERY_S", 0.0)
    with runtime.Progress(3, "rank 1", enabled=False, write=lines.append, active=False) as bar:
        bar.update(3)
    with runtime.Progress(3, "bar", enabled=True, write=lines.append) as bar:  # a bar is drawn: no lines
        bar.update(3)
    assert lines == []


def test_the_metric_loggers_progress_writes_its_lines_through_print(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "PROGRESS_LINE_EVERY_S", 0.0)
    bar = runtime.MetricLogger(tmp_path, enabled=True, tensorboard=False).progress(4, 2, None, "moons")
    bar.update(1)
    bar.close()
    assert capsys.readouterr().out.startswith("moons: 3/4 it (75 %)")  # captured stdout is no terminal
