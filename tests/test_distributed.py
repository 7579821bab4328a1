"""torchrun with 2 CPU processes (gloo) trains the same model as 1 process with the same global batch."""

import pytest
import torch

from conftest import FAST, final_state, run_train, torchrun

ARGS = ["training.max_steps=20", "training.checkpoint_every=10", "training.batch_size=64"]


@pytest.mark.slow  # the flow-map case below runs the same trainer and checks on 2 ranks in the fast suite
def test_two_ranks_match_one_process(tmp_path):
    torchrun("train.py", f"training.run_dir={tmp_path / 'ddp'}", *FAST, *ARGS)
    # One process doing the same 2 micro-batches by accumulation = the same global batch and draws.
    assert run_train(tmp_path / "single", *ARGS, "training.grad_accum=2") == 0
    ddp, single = final_state(tmp_path / "ddp"), final_state(tmp_path / "single")
    for key in single[0]:
        torch.testing.assert_close(ddp[0][key], single[0][key], rtol=1e-5, atol=1e-6)
    for key in single[1]:
        torch.testing.assert_close(ddp[1][key], single[1][key], rtol=1e-5, atol=1e-6)
    # only rank 0 wrote: exactly one metrics file and one set of checkpoints
    written = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir() if p.name != "latest")
    assert written == ["step_0000020"] or written == ["step_0000010", "step_0000020"]


def test_two_ranks_match_one_process_for_a_flow_map(tmp_path):
    """The MeanFlow JVP runs on the plain module outside autograd; the loss's forward goes through DDP,
    so the gradients are all-reduced: rank 0 after 2-rank training equals one process accumulating the
    same two micro-batches (a rank that kept only its own gradient would not)."""
    args = [*ARGS, "experiment=moons_meanflow", "flow.meanflow.derivative=jvp", "training.max_steps=10"]
    torchrun("train.py", f"training.run_dir={tmp_path / 'ddp'}", *FAST, *args)
    assert run_train(tmp_path / "single", *args, "training.grad_accum=2") == 0
    assert run_train(tmp_path / "rank_only", *args, "training.batch_size=32") == 0  # one rank's half alone
    ddp, single, alone = (final_state(tmp_path / name) for name in ("ddp", "single", "rank_only"))
    for key in single[0]:
        torch.testing.assert_close(ddp[0][key], single[0][key], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(ddp[0][key], alone[0][key], rtol=1e-5, atol=1e-6) for key in single[0])
    # only rank 0 wrote: one set of checkpoints, no second rank's leftovers
    written = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir() if p.name != "latest")
    assert written == ["step_0000010"]
