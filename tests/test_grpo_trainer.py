"""rl/trainer.py's position-seeded pieces, on a stand-in trainer (no seed checkpoint needed): the prompt draw
and the per-iteration generators. The full GRPO loop is tested through its entry point in test_train_grpo.py."""

from types import SimpleNamespace

import torch

import runtime
from rl.trainer import GRPOTrainer, draw_prompts


def stand_in(batch_size, group_size, num_classes, seed=0, step=0):
    cfg = SimpleNamespace(seed=seed, grpo=SimpleNamespace(batch_size=batch_size, group_size=group_size))
    return SimpleNamespace(
        cfg=cfg, num_classes=num_classes, step=step, runtime=runtime.Runtime(device=torch.device("cpu"))
    )


def draw(trainer, seed=0):
    return draw_prompts(
        trainer.cfg.grpo, trainer.num_classes, torch.Generator().manual_seed(seed), trainer.runtime.device
    )


def test_prompts_are_distinct_classes_each_repeated_group_size_times():
    prompts = draw(stand_in(batch_size=4, group_size=3, num_classes=10))
    assert prompts.shape == (12,)
    groups = prompts.view(4, 3)
    assert (groups == groups[:, :1]).all()  # each group shares its prompt
    assert len(set(groups[:, 0].tolist())) == 4 and int(prompts.min()) >= 0 and int(prompts.max()) < 10
    assert torch.equal(prompts, draw(stand_in(4, 3, 10)))  # a function of the generator
    assert {tuple(draw(stand_in(4, 3, 10), seed).tolist()) for seed in range(5)} != {tuple(prompts.tolist())}


def test_more_prompts_than_classes_repeat_classes_and_unconditional_has_none():
    prompts = draw(stand_in(batch_size=6, group_size=2, num_classes=3))
    assert prompts.shape == (12,) and set(prompts.tolist()) <= {0, 1, 2}
    assert (prompts.view(6, 2)[:, 0] == prompts.view(6, 2)[:, 1]).all()
    all_classes = draw(stand_in(batch_size=3, group_size=1, num_classes=3))  # batch == classes: a permutation
    assert sorted(all_classes.tolist()) == [0, 1, 2]
    assert draw(stand_in(4, 3, None)) is None


def test_the_generators_are_a_function_of_seed_iteration_and_stream():
    def first_draw(seed, step, *stream):
        return torch.rand(4, generator=GRPOTrainer.generator(stand_in(1, 1, 2, seed, step), *stream))

    assert torch.equal(first_draw(0, 3, 1), first_draw(0, 3, 1))
    expected = torch.rand(4, generator=torch.Generator().manual_seed(runtime.derive_seed(0, 3, 1)))
    assert torch.equal(first_draw(0, 3, 1), expected)
    draws = [first_draw(0, 3, 1), first_draw(0, 4, 1), first_draw(0, 3, 2), first_draw(1, 3, 1), first_draw(0, 3)]
    assert len({tuple(d.tolist()) for d in draws}) == 5
