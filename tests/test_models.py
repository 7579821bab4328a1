import pytest
import torch

import models


def test_timestep_embedding_shape_and_range():
    emb = models.timestep_embedding(torch.tensor([0.0, 0.5, 1.0]), 65)
    assert emb.shape == (3, 65) and emb.abs().max() <= 1.0
    assert not torch.allclose(emb[0], emb[1])


@pytest.mark.parametrize("cls", [models.MLP, models.ClassCondMLP])
def test_output_shape_and_zero_init(cls):
    model = cls()
    x, t = torch.randn(5, 2), torch.rand(5)
    y = torch.randint(0, 2, (5,)) if cls is models.ClassCondMLP else None
    out = model(x, t, y)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output layer


def test_reference_sized_presets():
    # configs/model/class_cond_mlp.yaml: hidden 144, 1 block (the write-up's model has ~70.8k)
    assert models.count_parameters(models.ClassCondMLP(num_classes=2, hidden_dim=144, num_blocks=1)) == 73_154
    assert models.count_parameters(models.MLP(hidden_dim=144, num_blocks=1)) == 73_154 - 3 * 144


def test_conditioning_and_null_label_change_the_output():
    torch.manual_seed(0)
    model = models.ClassCondMLP(num_classes=2)
    torch.nn.init.normal_(model.out[-1].weight)  # undo the zero init so outputs differ
    x, t = torch.randn(4, 2), torch.rand(4)
    out0 = model(x, t, torch.zeros(4, dtype=torch.long))
    out1 = model(x, t, torch.ones(4, dtype=torch.long))
    null = model(x, t, torch.full((4,), 2))
    assert not torch.allclose(out0, out1) and not torch.allclose(out0, null)
    torch.testing.assert_close(model(x, t, None), null)  # y=None means the null label
    assert not torch.allclose(model(x, torch.zeros(4), None), model(x, torch.ones(4), None))  # time matters
