"""scripts/benchmark_train.py times the real training step and counts its FLOPs."""

import importlib.util

import pytest

from conftest import ROOT


def _load():
    spec = importlib.util.spec_from_file_location("benchmark_train", ROOT / "scripts" / "benchmark_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_reports_throughput_memory_and_flops():
    bench = _load()
    result = bench.main(["steps=5", "warmup=2", "batch=64"])
    assert result["experiment"] == "moons_cfg" and result["batch"] == 64
    assert result["images_per_s"] > 0 and result["ms_per_step"] > 0 and result["peak_memory_mb"] > 0
    assert result["parameters"] == 73_154
    # forward + backward of the MLP's linear layers is ~6 x params x batch FLOPs (2 fwd + 4 bwd per MAC);
    # the time MLP runs on a [B, 64] embedding, so the count is a little below that
    expected = 6 * result["parameters"] * 64 / 1e9
    assert 0.7 * expected < result["gflops_per_step"] < 1.1 * expected
    assert "mfu" not in result  # no peak known for a CPU unless peak_tflops is given


def test_benchmark_rejects_unknown_keys():
    bench = _load()
    from config import ConfigError

    with pytest.raises(ConfigError, match="training.lrr"):
        bench.main(["steps=1", "warmup=0", "training.lrr=1"])


def test_benchmark_times_a_flow_map_step_with_its_jvp():
    """A MeanFlow step (a JVP, then the loss forward and backward) runs under the FLOP counter too; its
    count exceeds a plain step's of the same model (scripts/gpu_benchmarks.sh compares the DiT-B/2 pair)."""
    bench = _load()
    plain = bench.main(["steps=2", "warmup=1", "batch=64", "experiment=moons"])
    flow_map = bench.main(["steps=2", "warmup=1", "batch=64", "experiment=moons_meanflow"])
    assert flow_map["experiment"] == "moons_meanflow" and flow_map["ms_per_step"] > 0
    assert flow_map["gflops_per_step"] > 1.3 * plain["gflops_per_step"]
