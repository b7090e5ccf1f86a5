"""Optimizer details the torch-parity suite does not reach: large parameters and bad arguments."""
import numpy as np
import pytest

from numexp import nn, optim


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_update_of_a_parameter_larger_than_one_chunk_is_exact(momentum):
    rng = np.random.default_rng(0)
    layer = nn.Linear(700, 500, rng=rng)  # 350,000 weights: more than optim.CHUNK, so chunked
    assert layer.params["weight"].size > optim.CHUNK
    opt = optim.SGD(layer, lr=0.01, momentum=momentum)
    expected = layer.params["weight"].copy()
    velocity = np.zeros_like(expected)
    for _ in range(3):
        out = layer(rng.standard_normal((8, 700), dtype=np.float32))
        layer.backward(np.ones_like(out))
        g = layer.grads["weight"]
        velocity = g.copy() if momentum and not velocity.any() else momentum * velocity + g
        expected -= 0.01 * (velocity if momentum else g)
        opt.step()
    np.testing.assert_allclose(layer.params["weight"], expected, rtol=1e-6, atol=1e-7)
    assert layer.params["weight"].dtype == np.float32


@pytest.mark.parametrize("make", [
    lambda m: optim.SGD(m, lr=0),
    lambda m: optim.SGD(m, lr=0.1, momentum=-1),
    lambda m: optim.SGD(m, lr=0.1, nesterov=True),
    lambda m: optim.Adam(m, lr=1e-3, betas=(1.0, 0.999)),
    lambda m: optim.RMSprop(m, lr=1e-3, alpha=2),
    lambda m: optim.SGD(m, lr=0.1, reg=-1e-4),
], ids=["lr0", "negative_momentum", "nesterov_without_momentum", "beta1", "alpha", "negative_reg"])
def test_impossible_arguments_raise_value_error_naming_the_value(make):
    with pytest.raises(ValueError):
        make(nn.Linear(2, 2))


def test_unknown_optimizer_name_lists_the_choices():
    with pytest.raises(ValueError, match="adam"):
        optim.build("lbfgs", nn.Linear(2, 2), lr=0.1)
