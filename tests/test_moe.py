"""moe.ExpertChoiceMoE: the batched dispatch against a slow per-sample loop, per-sample capacity, batch
independence and the load statistics."""

import pytest
import torch
import torch.nn.functional as F

from moe import ExpertChoiceMoE


def loop_reference(moe, x):
    """Slow per-sample, per-expert MoE: routing and FFN one (sample, expert) at a time, accumulation by
    indexing. x [B, N, D]."""
    outs = []
    for sample in x:  # [N, D]
        scores = moe.router(sample).float().softmax(dim=-1)
        k = moe.capacity(sample.shape[0])
        out = torch.zeros_like(sample)
        for e in range(moe.num_experts):
            gate, idx = scores[:, e].topk(k)
            h = sample[idx] @ moe.w1[e] + moe.b1[e]
            if moe.swiglu:
                a, b = h.chunk(2, dim=-1)
                h = F.silu(a) * b
            else:
                h = F.gelu(h, approximate="tanh")
            y = h @ moe.w2[e] + moe.b2[e]
            out = out.index_add(0, idx, gate[:, None] * y)
        outs.append(out)
    return torch.stack(outs)


@pytest.mark.parametrize("swiglu", [False, True])
def test_moe_dispatch_matches_loop_reference_forward_and_backward(swiglu):
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(dim=16, hidden=24, num_experts=4, capacity_factor=2.0, swiglu=swiglu).double()
    with torch.no_grad():
        moe.b1.normal_()
        moe.b2.normal_()
    x = torch.randn(3, 10, 16, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 10, 16, dtype=torch.float64)

    fast = moe(x)
    fast_grads = torch.autograd.grad(fast, [x, *moe.parameters()], grad_out)
    slow = loop_reference(moe, x)
    slow_grads = torch.autograd.grad(slow, [x, *moe.parameters()], grad_out)

    torch.testing.assert_close(fast, slow)
    for (name, _), a, b in zip([("x", None), *moe.named_parameters()], fast_grads, slow_grads):
        torch.testing.assert_close(a, b, msg=name)
    assert fast_grads[1].abs().sum() > 0  # the router learns through the gates


def test_every_expert_takes_exactly_its_capacity_from_every_sample_and_load_stats():
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(dim=8, hidden=16, num_experts=4, capacity_factor=2.0)
    B, N = 3, 12
    x = torch.randn(B, N, 8)
    gates, index = moe.route(x)
    assert index.shape == gates.shape == (B, 4, moe.capacity(N)) == (3, 4, 6)  # c * N / E = 2 * 12 / 4
    assert index.min() >= 0 and index.max() < N  # positions within the sample
    assert all(len(set(row.tolist())) == 6 for row in index.flatten(0, 1))  # distinct tokens per expert
    assert torch.isfinite(gates).all() and (gates > 0).all()
    moe(x)
    assert moe.load.shape == (3,) and torch.isclose(moe.load.sum(), torch.tensor(1.0))
    picks = torch.stack([torch.bincount(i.flatten(), minlength=N) for i in index])  # [B, N] experts/token
    assert (picks.sum(1) == 4 * 6).all()  # every sample gives each expert exactly k tokens
    expected = torch.stack(
        [(picks == 0).float().mean(1), (picks == 1).float().mean(1), (picks >= 2).float().mean(1)], dim=-1
    ).mean(0)
    torch.testing.assert_close(moe.load, expected)
    assert (picks * 1.0).mean() == 2.0  # a token meets c experts on average


def test_capacity_is_per_sample_rounded_and_clamped():
    moe = ExpertChoiceMoE(dim=8, hidden=16, num_experts=4, capacity_factor=2.0)
    assert [moe.capacity(n) for n in (16, 8, 10, 256, 64)] == [8, 4, 5, 128, 32]
    moe.capacity_factor = 1.0
    assert [moe.capacity(n) for n in (6, 10, 1)] == [2, 2, 1]  # round half to even; at least 1
    moe.capacity_factor = 8.0
    assert moe.capacity(3) == 3  # at most every token of the sample


def test_moe_layer_is_batch_independent():
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(dim=8, hidden=16, num_experts=4, capacity_factor=2.0)
    x = torch.randn(5, 12, 8)
    batched = moe(x)
    for i in range(5):
        torch.testing.assert_close(batched[i : i + 1], moe(x[i : i + 1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moe(x[0]), batched[0], rtol=1e-5, atol=1e-5)  # a 2-D x is one sample
