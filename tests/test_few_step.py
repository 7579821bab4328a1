"""experiments/few_step.py (and flow_maps.py, which uses its stages) writes its table and figure beside its
runs; the tracked experiments/ files change only with update_docs=true, and an `out` inside experiments/ is
refused before any stage runs.

The stages (train.py / generate_pairs.py processes, minutes each) and the NFE evaluation are replaced by
stand-ins that return fixed costs and metrics: what is tested is where the results go."""

import hashlib
import importlib.util
import json

import pytest

from config import ConfigError
from conftest import ROOT

TRACKED = [ROOT / "experiments" / "few_step_moons.json", ROOT / "experiments" / "figures" / "few_step_moons.png"]


@pytest.fixture
def few_step(monkeypatch):
    spec = importlib.util.spec_from_file_location("few_step", ROOT / "experiments" / "few_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    def stage(*args, **kwargs):
        calls.append(args)
        return 1.0

    def evaluate(stage, checkpoint, guidance, classifier):
        return {nfe: {"sliced_w2": 0.5 / nfe, "straightness": 0.0} for nfe in module.NFES}

    monkeypatch.setattr(module, "train", stage)
    monkeypatch.setattr(module, "pairs", stage)
    monkeypatch.setattr(module, "evaluate", evaluate)
    module.calls = calls
    return module


def digests():
    return [hashlib.sha256(path.read_bytes()).hexdigest() for path in TRACKED]


def test_by_default_the_results_go_beside_the_runs_and_tracked_files_stay(few_step, tmp_path):
    before = digests()
    assert few_step.main(["stage=moons", f"out={tmp_path}"]) == 0
    table = json.loads((tmp_path / "few_step_moons.json").read_text())["table"]
    assert set(table) == {"independent", "minibatch_ot", "reflow_1", "reflow_2", "reflow_1_distill"}
    assert (tmp_path / "few_step_moons.png").stat().st_size > 0
    assert digests() == before


def test_update_docs_writes_the_experiments_files(few_step, tmp_path, monkeypatch):
    copy = tmp_path / "repo"  # a stand-in for the repository root, so the real tracked files stay as they are
    (copy / "experiments" / "figures").mkdir(parents=True)
    monkeypatch.setattr(few_step, "ROOT", copy)
    assert few_step.main(["stage=moons", f"out={tmp_path / 'runs'}", "update_docs=true"]) == 0
    assert (copy / "experiments" / "few_step_moons.json").is_file()
    assert (copy / "experiments" / "figures" / "few_step_moons.png").is_file()
    assert not (tmp_path / "runs" / "few_step_moons.json").exists()


def test_an_out_inside_experiments_is_refused_before_any_stage(few_step, monkeypatch):
    monkeypatch.chdir(ROOT)
    before = digests()
    with pytest.raises(ConfigError, match=r"out = 'experiments/few'.*tracked.*update_docs=true"):
        few_step.main(["stage=moons", "out=experiments/few"])
    assert few_step.calls == [] and digests() == before and not (ROOT / "experiments" / "few").exists()


@pytest.fixture
def flow_maps(monkeypatch):
    """experiments/flow_maps.py with its runs and scoring replaced (it imports few_step's)."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location("flow_maps", ROOT / "experiments" / "flow_maps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scored = []

    def evaluate(stage, checkpoint, guidance, classifier, method="euler"):
        scored.append((checkpoint.name, guidance, method))
        return {n: {"classifier_accuracy": 0.9, "classifier_fd": 1.0 / n, "straightness": 0.0} for n in module.NFES}

    def train(out, name, experiment, timings, *overrides):
        timings[name] = 1.0
        return 1.0

    monkeypatch.setattr(module, "train", train)
    monkeypatch.setattr(module, "evaluate", evaluate)
    module.scored = scored
    return module


def test_flow_maps_scores_at_the_given_guidance_and_writes_beside_the_runs(flow_maps, tmp_path):
    docs = ROOT / "experiments"
    tracked = [docs / "flow_maps_digits.json", docs / "figures" / "flow_maps_digits.png"]
    before = [hashlib.sha256(path.read_bytes()).hexdigest() for path in tracked]
    assert flow_maps.main(["stage=digits", f"out={tmp_path}", "teacher=true", "guidance=1.5"]) == 0
    # the flow map at the asked w (a guidance-conditioned model's input), the teacher at its run's guidance
    assert flow_maps.scored == [("scratch", 1.5, "flow_map"), ("teacher", None, "euler")]
    assert set(json.loads((tmp_path / "flow_maps_digits.json").read_text())["table"]) == {"scratch", "teacher (Euler)"}
    assert (tmp_path / "flow_maps_digits.png").stat().st_size > 0
    assert [hashlib.sha256(path.read_bytes()).hexdigest() for path in tracked] == before


def test_flow_maps_refuses_a_guidance_below_one_and_an_out_in_experiments(flow_maps, monkeypatch):
    with pytest.raises(ConfigError, match=r"guidance = 0.5: must be >= 1") as error:
        flow_maps.main(["stage=digits", "guidance=0.5"])
    assert "\n" not in str(error.value)
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"out = 'experiments/fm'.*tracked.*update_docs=true"):
        flow_maps.main(["stage=moons", "out=experiments/fm"])
    assert flow_maps.scored == [] and not (ROOT / "experiments" / "fm").exists()
