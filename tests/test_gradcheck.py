"""Every layer and loss against centred finite differences, in float64 (relative error < 1e-6)."""
import numpy as np
import pytest

from numexp import losses, nn
from numexp.gradcheck import numerical_gradient, rel_error

TOL = 1e-6


@pytest.fixture(autouse=True)
def float64_params():
    nn.set_default_dtype(np.float64)
    yield
    nn.set_default_dtype(np.float32)


def distinct(rng, shape, spread=1.0):
    """Values with no ties and well away from each other (max-pool and ReLU stay differentiable)."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) - n / 2) * (spread / n) + rng.choice([-1, 1], shape) * 0.05


def check_layer(layer, x, rng):
    """Compare backward's input and parameter gradients with finite differences of sum(forward * dout)."""
    out = layer.forward(x)
    dout = rng.standard_normal(out.shape)
    dx = layer.backward(dout)
    num_dx = numerical_gradient(lambda: layer.forward(x), x, dout)
    assert rel_error(dx, num_dx) < TOL, "input gradient"
    for name, p in layer.params.items():
        layer.forward(x)
        layer.backward(dout)
        analytic = layer.grads[name].copy()
        numeric = numerical_gradient(lambda: layer.forward(x), p, dout)
        assert rel_error(analytic, numeric) < TOL, name


@pytest.mark.parametrize("row_blocks", [False, True])
def test_linear_gradients_match_finite_differences(row_blocks, monkeypatch):
    """row_blocks: the forward product a block of weight rows at a time, as for FC1-sized weights on one
    BLAS thread (blocks of 2 rows of 5: the last one short)."""
    if row_blocks:
        monkeypatch.setattr(nn, "BLOCKED_WEIGHT_BYTES", 0)
        monkeypatch.setattr(nn, "ROW_BLOCK", 2)
        monkeypatch.setattr(nn.blas, "threads", lambda: 1)
    rng = np.random.default_rng(0)
    layer, x = nn.Linear(7, 5, rng=rng), rng.standard_normal((4, 7))
    out = layer.forward(x)
    np.testing.assert_allclose(out, x @ layer.params["weight"].T + layer.params["bias"], rtol=1e-14, atol=1e-14)
    assert out.flags.f_contiguous  # the layout the next layers' backward expects (see Linear.backward)
    check_layer(layer, x, rng)


@pytest.mark.parametrize("k,stride,padding,shape", [
    (3, 1, 1, (2, 3, 6, 5)), (3, 2, 0, (2, 2, 7, 7)), (5, 1, 2, (1, 2, 6, 6)), (1, 1, 0, (2, 3, 4, 3)),
    (3, 2, 1, (1, 1, 5, 8)), (3, 1, 1, (3, 2, 4, 6)),
])
@pytest.mark.parametrize("method", ["im2col", "batch_last", "winograd", "naive"])
def test_conv2d_gradients_match_finite_differences(k, stride, padding, shape, method, monkeypatch):
    monkeypatch.setattr(nn.blas, "threads", lambda: 1)  # Winograd runs on one BLAS thread only
    rng = np.random.default_rng(1)
    layer = nn.Conv2d(shape[1], 4, k, stride, padding, method=method, rng=rng)
    check_layer(layer, rng.standard_normal(shape), rng)
    if method == "winograd":  # ran as such where it applies, else as im2col
        assert isinstance(layer._cache[1], str) == ((k, stride, padding) == (3, 1, 1) and shape[2] % 2 == 0 == shape[3] % 2)


@pytest.mark.parametrize("layer_cls,k,stride", [
    (nn.MaxPool2d, 2, None), (nn.MaxPool2d, 3, 2), (nn.MaxPool2d, 2, 1), (nn.AvgPool2d, 2, None), (nn.AvgPool2d, 3, 1),
])
def test_pooling_gradients_match_finite_differences(layer_cls, k, stride):
    rng = np.random.default_rng(2)
    check_layer(layer_cls(k, stride), distinct(rng, (2, 3, 7, 6)), rng)


@pytest.mark.parametrize("layer", [nn.ReLU(), nn.Sigmoid(), nn.Tanh(), nn.Softmax(), nn.Flatten(), nn.GlobalAvgPool2d()],
                         ids=lambda l: type(l).__name__)
def test_elementwise_and_reshape_gradients_match_finite_differences(layer):
    rng = np.random.default_rng(3)
    shape = (3, 6) if isinstance(layer, nn.Softmax) else (2, 3, 4, 5)
    check_layer(layer, distinct(rng, shape, spread=4.0), rng)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm1d, (6, 4)), (nn.BatchNorm2d, (3, 4, 3, 2))])
def test_batchnorm_gradients_match_finite_differences(cls, shape, training):
    rng = np.random.default_rng(4)
    layer = cls(shape[1])
    layer.params["weight"][:] = rng.uniform(0.5, 1.5, shape[1])
    layer.params["bias"][:] = rng.standard_normal(shape[1])
    layer.buffers["running_mean"][:] = rng.standard_normal(shape[1])
    layer.buffers["running_var"][:] = rng.uniform(0.5, 2, shape[1])
    layer.train(training)
    check_layer(layer, rng.standard_normal(shape) * 2 + 1, rng)


def test_dropout_gradient_uses_the_forward_mask():
    rng = np.random.default_rng(5)
    layer = nn.Dropout(0.5, rng=np.random.default_rng(0))
    x = rng.standard_normal((50, 40))
    out = layer.forward(x)
    dx = layer.backward(np.ones_like(x))
    kept = out != 0
    assert 0.4 < kept.mean() < 0.6
    np.testing.assert_array_equal(dx, np.where(kept, 2.0, 0.0))
    assert layer.eval().forward(x) is x


@pytest.mark.parametrize("projection,stride", [(False, 1), (True, 2)])
def test_residual_block_gradients_match_finite_differences(projection, stride):
    rng = np.random.default_rng(6)
    block = nn.Residual(2, 2 if not projection else 3, stride=stride, rng=rng)
    x = rng.standard_normal((2, 2, 5, 5)) + 3  # a positive shift keeps the output ReLU away from 0
    out = block.forward(x)
    dout = rng.standard_normal(out.shape)
    dx = block.backward(dout)
    assert rel_error(dx, numerical_gradient(lambda: block.forward(x), x, dout)) < TOL
    for name, module, key, _ in block.param_slots():
        block.forward(x)
        block.backward(dout)
        analytic = module.grads[key].copy()
        numeric = numerical_gradient(lambda: block.forward(x), module.params[key], dout)
        assert rel_error(analytic, numeric) < TOL, name


@pytest.mark.parametrize("name", ["softmax", "svm_l1", "svm_l2"])
def test_loss_gradients_match_finite_differences(name):
    rng = np.random.default_rng(7)
    loss_fn = losses.build(name)
    scores = distinct(rng, (5, 4), spread=6.0)  # margins stay away from the hinge's kink
    y = rng.integers(0, 4, 5)
    _, dscores = loss_fn(scores, y)
    numeric = numerical_gradient(lambda: loss_fn(scores, y)[0], scores)
    assert rel_error(dscores, numeric) < TOL


def test_rel_error_detects_a_wrong_gradient():
    rng = np.random.default_rng(8)
    layer = nn.Linear(4, 3, rng=rng)
    x = rng.standard_normal((2, 4))
    out = layer.forward(x)
    dout = rng.standard_normal(out.shape)
    wrong = layer.backward(dout) * 1.001
    assert rel_error(wrong, numerical_gradient(lambda: layer.forward(x), x, dout)) > TOL
