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


def _two_layers(rng):
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(60, 50, rng=rng))  # 3,000 weights: chunked below
    model.add_module("fc2", nn.Linear(50, 7, rng=rng))
    return model


@pytest.mark.parametrize("penalty", [{}, {"weight_decay": 1e-2}, {"reg": 1e-1}], ids=["none", "decay", "reg"])
@pytest.mark.parametrize("name, options", [
    ("sgd", {}), ("momentum", {}), ("momentum", {"dampening": 0.5}), ("nesterov", {}), ("adagrad", {"lr_decay": 0.1}),
    ("rmsprop", {}),
    ("rmsprop", {"momentum": 0.9}), ("adam", {}),
])
def test_a_chunked_update_equals_the_whole_array_update_bit_for_bit(monkeypatch, name, options, penalty):
    """The torch-parity suite checks each rule on small parameters, updated whole; large ones go chunk
    by chunk through scratch arrays, on one thread or several, which must not change a single bit."""
    rng = np.random.default_rng(0)
    ways = [(1 << 30, 1), (1000, 1), (400, 3)]  # (chunk size, threads); the first updates whole
    models = {way: _two_layers(np.random.default_rng(1)) for way in ways}
    opts = {}
    for (chunk, threads), model in models.items():
        opts[chunk, threads] = optim.build(name, model, lr=1e-2, **options, **penalty)
        opts[chunk, threads].threads = threads
    for _ in range(3):
        x = rng.standard_normal((4, 60), dtype=np.float32)
        for (chunk, threads), model in models.items():
            monkeypatch.setattr(optim, "CHUNK", chunk)
            out = model(x)
            model.backward(np.cos(out))
            opts[chunk, threads].step()
    whole, *others = (dict(m.named_params()) for m in models.values())
    for other in others:
        assert other.keys() == whole.keys()
        for key in whole:
            assert other[key].dtype == np.float32
            np.testing.assert_array_equal(other[key], whole[key], err_msg=key)
    assert len(opts[400, 3]._scratch) == 3  # fc1's 3,000 weights: 7 chunks of 400, cut into 3 runs


@pytest.mark.parametrize("name", ["momentum", "adagrad", "rmsprop", "adam"])
def test_a_stateful_update_of_a_large_parameter_makes_no_parameter_sized_temporary(name):
    """Regression guard, in bytes: Adam's update of SimpleNet's 12.6M FC1 weights took 70 ms when each
    of its steps wrote a 50 MB temporary, 24 ms chunk by chunk."""
    import tracemalloc

    rng = np.random.default_rng(0)
    layer = nn.Linear(2048, 1024, rng=rng)  # 8 MB of weights
    layer.grads = {k: rng.standard_normal(p.shape, dtype=np.float32) for k, p in layer.params.items()}
    opt = optim.build(name, layer, lr=1e-3, weight_decay=1e-4)
    opt.step()  # creates the state and the scratch arrays
    tracemalloc.start()
    try:
        opt.step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"peak {peak / 2**20:.1f} MB"


def test_chunks_of_arrays_that_are_not_all_contiguous_come_whole():
    p = np.asfortranarray(np.ones((30, 40), dtype=np.float32))
    parts = list(optim.chunks((p, np.ones_like(p), None), {}))
    assert len(parts) == 1
    got_p, _, state, s0, s1 = parts[0]
    assert got_p is p and state is None and s0.shape == s1.shape == p.shape


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-sgd", "weight-gradient"])
@pytest.mark.parametrize("layout", ["C", "F"])
def test_large_linear_input_grad_in_row_blocks_comes_from_the_weights_before_the_update(layout, fused, threads,
                                                                                        monkeypatch):
    """On one BLAS thread a Linear layer with large weights (over a lowered nn.BLOCKED_WEIGHT_BYTES) takes
    dx = dout @ W as a sum over blocks of nn.GRAD_ROWS rows of W (the last one short), one gemm with beta each; on two,
    one product. Then, fused, W -= lr * (dout.T @ x + reg * W) in one gemm. dx comes from the weights before the
    update, in x's memory order, as the whole products give it."""
    monkeypatch.setattr(nn, "BLOCKED_WEIGHT_BYTES", 1 << 20)
    monkeypatch.setattr(nn.blas, "threads", lambda: threads)
    nn.set_default_dtype(np.float64)
    try:
        layer = nn.Linear(1000, 300, rng=np.random.default_rng(0))  # 2.4 MB of weights
    finally:
        nn.set_default_dtype(np.float32)
    opt = optim.SGD(layer, lr=0.1, reg=0.01)
    if fused:
        assert opt.fuse_into_backward() == 1
    rng = np.random.default_rng(1)
    x = np.asarray(rng.standard_normal((5, 1000)), order=layout)
    dout = rng.standard_normal((5, 300))
    w = layer.params["weight"].copy()
    calls, gemm = [], nn.blas.gemm_at_b
    monkeypatch.setattr(nn.blas, "gemm_at_b", lambda *args: calls.append(gemm(*args)) or calls[-1])
    layer.forward(x)
    dx = layer.backward(dout)
    assert calls == [True] * (5 * (threads == 1) + fused)  # 5 blocks of at most 64 rows, and the update
    np.testing.assert_allclose(dx, dout @ w, rtol=1e-12, atol=1e-12)
    assert dx.flags[f"{layout}_CONTIGUOUS"]
    if fused:
        np.testing.assert_allclose(layer.params["weight"], w * (1 - 0.1 * 0.01) - 0.1 * dout.T @ x, rtol=1e-12, atol=1e-12)
    else:
        np.testing.assert_allclose(layer.grads["weight"], dout.T @ x, rtol=1e-12, atol=1e-12)
